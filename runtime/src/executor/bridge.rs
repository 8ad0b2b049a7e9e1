//! The bridge from a future to a coroutine: [`co_bridge`] runs code written for the coroutine
//! engine (`co_` functions, which may yield) inside a coroutine on behalf of an async task, and
//! the task awaits it. The block layer serves qcow2, blkdebug and its own slow paths to the async
//! engine this way, instead of a second copy of them written as futures.
//!
//! QEMU has no counterpart (it has one engine); the nearest is a `co_wrapper`, which runs a
//! `coroutine_fn` for a caller outside coroutine context.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::panic::{resume_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::thread;

use crate::coroutine::{Coroutine, NO_STACK};

struct BridgeState<R> {
    result: RefCell<Option<thread::Result<R>>>,
    waiter: Cell<Option<Waker>>,
}

/// Runs `f` in a coroutine of this thread (entered at once) and waits for it: the bridge that
/// lets a future call code written for coroutines (`co_` functions). `f` owns what it uses;
/// if the future is dropped early the coroutine still finishes and its result is discarded.
/// A panic in `f` resumes in the awaiting task. If no coroutine stack can be had, this panics
/// with a message starting with [`NO_STACK`].
///
/// Costs: a coroutine (pooled stack) and a shared cell per call.
pub async fn co_bridge<R: 'static>(f: impl FnOnce() -> R + 'static) -> R {
    let state = Rc::new(BridgeState {
        result: RefCell::new(None),
        waiter: Cell::new(None),
    });
    let s = state.clone();
    let co = Coroutine::try_new(move || {
        let r = std::panic::catch_unwind(AssertUnwindSafe(f));
        *s.result.borrow_mut() = Some(r);
        if let Some(w) = s.waiter.take() {
            w.wake();
        }
    });
    match co {
        Ok(co) => co.enter(),
        // A panic, not an abort: the caller's task catches it (the FUSE queue replies ENOMEM).
        Err(e) => panic!("{}: {e}", NO_STACK),
    }
    let r = poll_fn(|cx| {
        if let Some(r) = state.result.borrow_mut().take() {
            return Poll::Ready(r);
        }
        state.waiter.set(Some(cx.waker().clone()));
        Poll::Pending
    })
    .await;
    r.unwrap_or_else(|p| resume_unwind(p))
}
