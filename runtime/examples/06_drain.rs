//! # 06 — drain: count requests in flight, wait until there are none
//!
//! What it teaches: before a block device can be closed, resized or moved, every request that
//! is still running must finish. The pattern has two halves:
//!
//! - **count** each request in *before* it is handed to whoever runs it ([`InFlight::enter`]
//!   returns a guard; dropping the guard counts it out, however the request ends);
//! - **wait** by polling your own event loop while the count is not zero ([`InFlight::drain`]
//!   is [`wait_while`]`(ctx, || count > 0)`). The requests may finish on another thread; the
//!   one that brings the count to zero calls [`kick`], which makes every waiting loop's next
//!   `poll()` return so that it looks at its condition again.
//!
//! `wait_while` works for any condition: part 2 waits for a counter of steps, with a `kick()`
//! after each step.
//!
//! QEMU: `util/aio-wait.c` (`aio_wait_kick()`), `include/block/aio-wait.h` (`AIO_WAIT_WHILE`),
//! `block/block-backend.c` (`blk_inc_in_flight()`, `blk_dec_in_flight()`, `blk_drain()`).
//! QEMU's drain also *quiesces* — `bdrv_drained_begin()` stops new requests until
//! `bdrv_drained_end()`; ours only waits (see "Differences from QEMU" in `docs/runtime.md`).
//!
//! Run: `cargo run -p runtime --example 06_drain`
//!
//! Expected output:
//!
//! ```text
//! main: 3 requests counted in and sent to the iothread
//! main: in flight = 3; draining (polling main's loop while it is not 0)
//! io0: request 0 done
//! io0: request 1 done
//! io0: request 2 done
//! main: drained; in flight = 0
//! main: waiting while fewer than 3 steps are done
//! io0: step 1
//! io0: step 2
//! io0: step 3
//! main: woke with 3 steps done
//! ```
//!
//! Exercise: make `wait_while` poll once instead of re-checking its condition. In
//! `runtime/src/aio_wait.rs`, `wait_while`, replace `while cond() {` with `if cond() {`. Part 2
//! then ends after the first kick ("main: woke with 1 steps done", the process may even exit
//! before the other steps print), and
//! `cargo test -p runtime --test iothread wait_while_rechecks_its_condition_after_every_kick`
//! fails. (Part 1 still passes: `InFlight` kicks only when the count reaches zero.)
//! Revert the change afterwards.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use runtime::{co_sleep, kick, wait_while, AioContext, InFlight, IoThread};

/// The counter a drain waits on. A `static` so that its guards are `'static` and may travel to
/// the iothread with the requests they count.
static IN_FLIGHT: InFlight = InFlight::new();

fn main() -> std::io::Result<()> {
    let ctx = AioContext::current();
    let io = IoThread::spawn("io0")?;

    // --- part 1: InFlight + drain ----------------------------------------------------------
    // Count every request in first, on the submitting side: a drain that started before the
    // request reached the iothread must still see it.
    let guards: Vec<_> = (0..3).map(|_| IN_FLIGHT.enter()).collect();
    println!("main: 3 requests counted in and sent to the iothread");
    println!(
        "main: in flight = {}; draining (polling main's loop while it is not 0)",
        IN_FLIGHT.get()
    );
    for (i, guard) in guards.into_iter().enumerate() {
        io.spawn_co(move || {
            // The "I/O": a timer on the iothread. Requests finish in deadline order.
            co_sleep(Duration::from_millis(10 * (i as u64 + 1)));
            println!("io0: request {i} done");
            drop(guard); // the last one counts the total down to 0 and kicks main
        });
    }
    IN_FLIGHT.drain(&ctx); // QEMU: AIO_WAIT_WHILE(ctx, in_flight > 0)
    println!("main: drained; in flight = {}", IN_FLIGHT.get());

    // --- part 2: wait_while on any condition, kick() after every change --------------------
    println!("main: waiting while fewer than 3 steps are done");
    let steps = Arc::new(AtomicUsize::new(0));
    let s = steps.clone();
    io.spawn_co(move || {
        for _ in 0..3 {
            co_sleep(Duration::from_millis(10));
            // Print first, then publish: main may return as soon as it sees the new count.
            let n = s.load(Ordering::SeqCst) + 1;
            println!("io0: step {n}");
            s.store(n, Ordering::SeqCst);
            kick(); // every wait_while in progress re-checks its condition
        }
    });
    wait_while(&ctx, || steps.load(Ordering::SeqCst) < 3);
    println!(
        "main: woke with {} steps done",
        steps.load(Ordering::SeqCst)
    );
    io.stop();
    Ok(())
}
