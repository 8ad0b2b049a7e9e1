//! # 02 — a coroutine: create, enter, yield, wake
//!
//! What it teaches: a [`Coroutine`] is a function with its own stack that can stop in the
//! middle ([`co_yield`]) and continue later. `enter()` runs it *inside the caller's call*, on
//! the caller's thread, until it yields or returns. Whoever holds its [`CoWaker`] can wake it:
//! from outside any coroutine the wake enters it at once; from inside another coroutine the wake
//! is deferred until that one yields (so coroutines never nest by accident). Finally,
//! `spawn(f).join()` runs `f` in a fresh coroutine and waits for its result — what QEMU
//! generates for every `co_wrapper` function.
//!
//! QEMU: `util/qemu-coroutine.c` (`qemu_coroutine_create()`, `qemu_coroutine_enter()`,
//! `qemu_coroutine_yield()`, the `co_queue_wakeup` list), `util/async.c` (`aio_co_wake()`),
//! `scripts/block-coroutine-wrapper.py` (`co_wrapper`).
//!
//! Run: `cargo run -p runtime --example 02_coroutine`
//!
//! Expected output:
//!
//! ```text
//! main: created the coroutine; it has not run yet
//! main: enter
//!   co: started; yielding
//! main: enter returned; the coroutine is suspended in co_yield
//! main: enter again
//!   co: resumed where it stopped; parking until someone wakes me
//! main: wake it from outside any coroutine: it is entered at once
//!   co: woken; returning
//! main: finished = true
//! main: a second coroutine wakes a parked one from inside itself
//!   waker: waking the sleeper, then going on
//!   waker: still running; yielding
//!   sleeper: woken (only after the waker yielded)
//! main: spawn(..).join() = 42
//! ```
//!
//! Exercise: make a wake from inside a coroutine enter the woken coroutine at once, nested
//! inside the waker. In `runtime/src/coroutine.rs`, `wake_shared`, replace the closure's body
//! with `Some(waker)` (never push to `t.deferred`). The sleeper then runs nested inside the
//! waker: its line comes before "waker: still running", and
//! `cargo test -p runtime --test coroutine wake_from_inside_a_coroutine_is_deferred_until_it_yields`
//! fails. Revert the change afterwards.

use std::cell::RefCell;
use std::rc::Rc;

use runtime::{co_yield, spawn, CoWaker, Coroutine};

fn main() {
    // --- create, enter, yield --------------------------------------------------------------
    // The waker slot: where a parked coroutine leaves its CoWaker for whoever will wake it
    // (in real code: a lock's wait queue, an I/O request, a timer).
    let slot: Rc<RefCell<Option<CoWaker>>> = Rc::new(RefCell::new(None));
    let s = slot.clone();
    let co = Coroutine::new(move || {
        println!("  co: started; yielding");
        co_yield(); // back to whoever entered us; our stack (and locals) stay as they are
        println!("  co: resumed where it stopped; parking until someone wakes me");
        *s.borrow_mut() = Some(CoWaker::current());
        co_yield();
        println!("  co: woken; returning");
    });
    println!("main: created the coroutine; it has not run yet");
    println!("main: enter");
    co.enter();
    println!("main: enter returned; the coroutine is suspended in co_yield");
    println!("main: enter again");
    co.enter();

    // --- wake ------------------------------------------------------------------------------
    // The CoWaker is `Send`: it could be sent to another thread (example 03). Here we are on
    // the coroutine's own thread and outside any coroutine, so `wake` enters it right away.
    println!("main: wake it from outside any coroutine: it is entered at once");
    let waker = slot
        .borrow_mut()
        .take()
        .expect("the coroutine left its waker");
    waker.wake();
    println!("main: finished = {}", co.is_finished());

    // --- a wake from inside a coroutine is deferred ----------------------------------------
    println!("main: a second coroutine wakes a parked one from inside itself");
    let sleeper = Coroutine::new(|| {
        co_yield();
        println!("  sleeper: woken (only after the waker yielded)");
    });
    sleeper.enter(); // runs until its co_yield
    let s = sleeper.clone();
    let waker = Coroutine::new(move || {
        println!("  waker: waking the sleeper, then going on");
        s.wake(); // queued: entered when this coroutine yields (QEMU's co_queue_wakeup)
        println!("  waker: still running; yielding");
        co_yield();
    });
    waker.enter(); // the waker yields, then `enter` runs the sleeper it woke

    // --- spawn + join: QEMU's co_wrapper ---------------------------------------------------
    // Outside a coroutine, `join` polls this thread's AioContext until the coroutine is done
    // (QEMU's generated wrappers do `AIO_WAIT_WHILE` the same way). This one never yields, so
    // it has finished before `spawn` returns.
    let answer = spawn(|| 6 * 7).join().expect("the coroutine panicked");
    println!("main: spawn(..).join() = {answer}");
    waker.enter(); // let the waker finish
    assert!(sleeper.is_finished() && waker.is_finished());
}
