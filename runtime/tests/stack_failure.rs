//! A coroutine whose stack cannot be had is an error value, not an abort: `Coroutine::try_new`
//! returns it, the body is dropped unrun, and the next creation works. Its own test binary,
//! because the failure knobs (`inject_stack_failures`, the pool's stack size) are process-wide.

use std::cell::Cell;
use std::rc::Rc;

use runtime::coroutine::{pool_config, set_pool_config, PoolConfig};
use runtime::{block_on, co_bridge, executor, inject_stack_failures, Coroutine, NO_STACK};

/// The only test of this binary, so nothing else creates coroutines while the knobs are set.
#[test]
fn failed_stack_creation_is_an_error_and_the_next_one_works() {
    // Injected: creations 1 and 2 work, 3 fails, 4 works again.
    inject_stack_failures(2, 1);
    let ran = Rc::new(Cell::new(0));
    let mut results = Vec::new();
    for _ in 0..4 {
        let r = ran.clone();
        results.push(Coroutine::try_new(move || r.set(r.get() + 1)).map(|co| co.enter()));
    }
    assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok());
    let err = results[2].as_ref().expect_err("the third creation fails");
    assert_eq!(err.raw_os_error(), Some(libc::ENOMEM), "{err}");
    assert_eq!(ran.get(), 3, "the failed coroutine's body never runs");
    assert_eq!(Rc::strong_count(&ran), 1, "and it is dropped");

    // Real: a stack larger than the address space cannot be mapped.
    let normal = pool_config();
    set_pool_config(PoolConfig {
        stack_size: 1 << 60,
        ..normal
    });
    let err = Coroutine::try_new(|| {}).expect_err("a 2^60-byte stack cannot be mapped");
    log_error(&err);
    set_pool_config(normal);
    let co = Coroutine::try_new(|| {}).expect("a normal stack after the failure");
    co.enter();
    assert!(co.is_finished());

    // The async bridge cannot return an error of its own: it panics with NO_STACK, which the
    // awaiting task catches (the FUSE queue turns it into ENOMEM).
    inject_stack_failures(0, 1);
    let r = block_on(executor::catch_unwind(co_bridge(|| 7)));
    let p = r.expect_err("the bridge's coroutine could not be created");
    assert!(p.message.starts_with(NO_STACK), "{}", p.message);
    assert_eq!(block_on(co_bridge(|| 7)), 7, "the next bridge works");
}

fn log_error(e: &std::io::Error) {
    eprintln!("stack mapping failed as expected: {e}");
}
