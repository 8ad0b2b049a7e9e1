//! # 05 — CoMutex: waiting by yielding, and a fair (FIFO) hand-off
//!
//! What it teaches: a [`CoMutex`] is a lock for coroutines. A coroutine that finds it taken
//! does not block the thread: it joins the lock's queue and *yields*, and the loop serves other
//! work. Unlocking *hands the lock over*: the unlocker makes the first waiter the owner before
//! waking it. So waiters are served strictly in arrival order, and a coroutine that unlocks and
//! immediately locks again cannot barge ahead of those already waiting — it queues behind them.
//! The lock also holds its data (here, the log of who held it), reached through a guard that
//! unlocks when dropped, as with `std::sync::Mutex`.
//!
//! Everything below runs on one thread; the same rules hold when the waiters live on different
//! threads (each is woken through its own home context, example 03).
//!
//! QEMU: `util/qemu-coroutine-lock.c` (`qemu_co_mutex_lock()`, `qemu_co_mutex_unlock()`, the
//! hand-off to the next waiter).
//!
//! Run: `cargo run -p runtime --example 05_comutex_fairness`
//!
//! Expected output:
//!
//! ```text
//! A: locked; yielding while I hold the lock
//! B: the lock is taken; queueing
//! C: the lock is taken; queueing
//! D: the lock is taken; queueing
//! main: 3 waiters; entering A again
//! A: unlocking, then locking again at once
//! B: got the lock
//! C: got the lock
//! D: got the lock
//! A: got the lock again, behind everyone who was already waiting
//! main: holders in order: ["A", "B", "C", "D", "A"]
//! ```
//!
//! Exercise: let the unlocker barge. In `runtime/src/lock.rs`, `CoMutex::unlock`, replace
//! `st.locked = next.is_some();` with `st.locked = false;` (wake the first waiter but leave the
//! lock free, so whoever asks first gets it). A then gets the lock again before B — and B, woken
//! later, believes it owns a lock A holds — and
//! `cargo test -p runtime --test locks unlock_does_not_let_the_unlocker_barge_ahead` fails.
//! Revert the change afterwards.

use std::rc::Rc;

use runtime::{co_yield, CoMutex, Coroutine};

fn main() {
    // The data lives inside the lock: the names of the holders, in the order they held it.
    let lock = Rc::new(CoMutex::new(Vec::<&'static str>::new()));

    // A takes the lock and yields while holding it (as a request would while its I/O runs).
    let l = lock.clone();
    let a = Coroutine::new(move || {
        let mut held = l.co_lock();
        held.push("A");
        println!("A: locked; yielding while I hold the lock");
        co_yield();
        println!("A: unlocking, then locking again at once");
        drop(held); // hands the lock to B; B's wake-up waits until A yields
        let mut again = l.co_lock(); // queued behind D: A yields here, B runs
        again.push("A");
        println!("A: got the lock again, behind everyone who was already waiting");
    });
    a.enter();

    // B, C and D find the lock taken: each queues and yields, in this order.
    let others: Vec<Coroutine> = ["B", "C", "D"]
        .into_iter()
        .map(|name| {
            let l = lock.clone();
            let co = Coroutine::new(move || {
                println!("{name}: the lock is taken; queueing");
                let mut held = l.co_lock(); // yields until the lock is handed to us
                held.push(name);
                println!("{name}: got the lock");
                // The guard drops here: the lock goes to the next waiter.
            });
            co.enter();
            co
        })
        .collect();

    // One enter of A runs the whole chain: A unlocks (to B) and queues again; when A yields,
    // B runs, unlocks to C when it returns, and so on; finally A gets its turn.
    println!("main: {} waiters; entering A again", lock.waiters());
    a.enter();

    assert!(a.is_finished() && others.iter().all(Coroutine::is_finished));
    let lock = Rc::into_inner(lock).expect("every coroutine has finished");
    println!("main: holders in order: {:?}", lock.into_inner());
}
