//! # 01 — the event loop: an fd handler, a bottom half and a timer
//!
//! What it teaches: an [`AioContext`] is a loop you drive by calling `poll()`. One poll waits,
//! then runs what became ready in a fixed order — **fd handlers, then bottom halves, then
//! timers** — and returns whether anything ran ("progress"). Three more rules show up:
//!
//! - fd handlers are *level-triggered*: a handler that leaves bytes in its fd is called again
//!   next round (here it reads 2 bytes of 4 per call);
//! - a bottom half scheduled while bottom halves run waits for the *next* round, so a BH that
//!   keeps scheduling work cannot starve fds and timers;
//! - `poll(true)` with only a timer armed sleeps until its deadline, and never wakes early.
//!
//! QEMU: `util/aio-posix.c` (`aio_set_fd_handler()`, `aio_poll()`), `util/async.c`
//! (`aio_bh_new()`, `aio_bh_schedule_oneshot()`, `aio_bh_poll()`), `util/qemu-timer.c`.
//! One difference is visible right here: QEMU's `aio_poll()` runs bottom halves *before* fd
//! handlers; ours runs them after (see "Differences from QEMU" in `docs/runtime.md`).
//!
//! Run: `cargo run -p runtime --example 01_event_loop`
//!
//! Expected output (the same with the io_uring and the epoll fd monitor):
//!
//! ```text
//! round 1: a pipe write and an expired timer are ready
//!   fd handler: read "hi"; scheduling the BH
//!   bh: ran; scheduling a one-shot BH
//!   timer: fired
//!   progress: true
//! round 2: the one-shot BH scheduled during round 1 waited for this round
//!   one-shot bh: ran
//!   progress: true
//! round 3: 4 bytes written, the handler reads 2 per call
//!   fd handler: read "po"
//!   progress: true
//! round 4: 2 bytes are still in the pipe, so the fd is still readable
//!   fd handler: read "ng"
//!   progress: true
//! round 5: nothing is ready; poll(true) sleeps until the timer (20 ms)
//!   timer: fired
//!   progress: true, slept at least 20 ms: true
//! round 6: poll(false) with nothing to do
//!   progress: false
//! ```
//!
//! Exercise: make bottom halves scheduled during a round run in that same round. In
//! `runtime/src/bh.rs`, `BhList::poll`, wrap the body in a loop that swaps the queue again until
//! it is empty (`loop { swap; if batch.is_empty() { break } run the batch }`). Round 1 above then
//! prints the one-shot line too, round 2 has nothing left to run and blocks for good (Ctrl-C),
//! and
//! `cargo test -p runtime --test aio bh_scheduled_while_bhs_run_waits_for_next_round` fails with
//! "BH scheduled during the round ran in the same round". Revert the change afterwards.

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use runtime::AioContext;

fn main() -> std::io::Result<()> {
    // The calling thread's context, created on first use (QEMU: qemu_get_current_aio_context()).
    let ctx = AioContext::current();

    // --- a bottom half ---------------------------------------------------------------------
    // A BH is a callback that runs once per `schedule()`, in a later step of the same poll or
    // in the next poll. This one schedules a one-shot BH, which must wait for the next round:
    // a round runs only the BHs scheduled before it started running BHs.
    let ctx2 = ctx.clone();
    let bh = Rc::new(ctx.bh_new(move || {
        println!("  bh: ran; scheduling a one-shot BH");
        ctx2.schedule_oneshot(|| println!("  one-shot bh: ran"));
    }));

    // --- an fd handler ---------------------------------------------------------------------
    // A pipe: we write into one end, the loop watches the other. The handler is an `Rc<dyn Fn>`
    // (not `FnMut`): keep mutable state in a `Cell`/`RefCell`.
    let (reader, mut writer) = std::io::pipe()?;
    let reader = Rc::new(reader);
    let (r, b) = (reader.clone(), bh.clone());
    let first_call = Cell::new(true);
    let on_readable = Rc::new(move || {
        // Read at most 2 bytes per call. Whatever stays in the pipe keeps the fd readable, and
        // the loop calls us again next round: level-triggered, as QEMU's handlers are.
        let mut buf = [0u8; 2];
        let n = (&*r).read(&mut buf).expect("read the pipe");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if first_call.replace(false) {
            // Handlers run before BHs in our poll(), so this BH runs in this same poll.
            println!("  fd handler: read {text:?}; scheduling the BH");
            b.schedule();
        } else {
            println!("  fd handler: read {text:?}");
        }
    });
    ctx.set_fd_handler(reader.as_raw_fd(), Some(on_readable), None)?;

    // --- a timer ---------------------------------------------------------------------------
    let fired = Rc::new(Cell::new(0));
    let f = fired.clone();
    let timer = ctx.timer_new(move || {
        f.set(f.get() + 1);
        println!("  timer: fired");
    });

    // Round 1: make the fd and the timer ready before polling; watch the order poll() runs
    // things in: fd handler, then the BH it scheduled, then the timer.
    println!("round 1: a pipe write and an expired timer are ready");
    writer.write_all(b"hi")?;
    timer.modify(Instant::now()); // a deadline already passed: fires in this poll
    println!("  progress: {}", ctx.poll(true));

    // Round 2: a pending BH makes the poll's timeout zero; the one-shot runs.
    println!("round 2: the one-shot BH scheduled during round 1 waited for this round");
    println!("  progress: {}", ctx.poll(true));

    // Rounds 3 and 4: level-triggered fd handlers.
    println!("round 3: 4 bytes written, the handler reads 2 per call");
    writer.write_all(b"pong")?;
    println!("  progress: {}", ctx.poll(true));
    println!("round 4: 2 bytes are still in the pipe, so the fd is still readable");
    println!("  progress: {}", ctx.poll(true));

    // Round 5: nothing is ready. A blocking poll computes its timeout from the nearest timer
    // and sleeps in the kernel (io_uring_enter or epoll_wait) until then.
    println!("round 5: nothing is ready; poll(true) sleeps until the timer (20 ms)");
    let start = Instant::now();
    timer.modify_after(Duration::from_millis(20));
    let progress = ctx.poll(true);
    println!(
        "  progress: {progress}, slept at least 20 ms: {}",
        start.elapsed() >= Duration::from_millis(20)
    );

    // Round 6: a non-blocking poll only looks; nothing ran, so no progress.
    println!("round 6: poll(false) with nothing to do");
    println!("  progress: {}", ctx.poll(false));

    // Remove the handler before the fd is closed (the caller owns the fd, not the loop).
    ctx.set_fd_handler(reader.as_raw_fd(), None, None)?;
    assert_eq!(fired.get(), 2);
    Ok(())
}
