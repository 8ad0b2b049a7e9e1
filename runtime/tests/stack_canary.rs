//! The stack canary (`set_stack_canary`) finds how deep a coroutine's stack went. Its own test
//! binary, because the knob is process-wide and must be on before the first stack is mapped.

use std::hint::black_box;

use runtime::{set_stack_canary, stack_high_water, Coroutine};

/// Uses about `n` KiB of stack: a local array the optimiser cannot drop.
#[inline(never)]
fn deep(n: usize) -> u8 {
    let mut a = [0u8; 16 * 1024];
    black_box(&mut a);
    if n > 16 {
        a[0] ^= deep(n - 16);
    }
    black_box(a[100])
}

#[test]
fn the_high_water_mark_follows_the_deepest_coroutine() {
    assert_eq!(stack_high_water(), None, "off by default");
    set_stack_canary(true);
    let shallow = Coroutine::new(|| {
        black_box(1 + 1);
    });
    shallow.enter();
    let low = stack_high_water().expect("on");
    assert!(
        low < 8 * 1024,
        "an empty coroutine uses a few hundred bytes, not {low}"
    );
    let co = Coroutine::new(|| {
        black_box(deep(64));
    });
    co.enter();
    let high = stack_high_water().expect("on");
    assert!(
        (64 * 1024..128 * 1024).contains(&high),
        "64 KiB of locals: {high} bytes used"
    );
    // A later, shallower coroutine (on the same, reused stack) does not lower the mark.
    let again = Coroutine::new(|| {
        black_box(2 + 2);
    });
    again.enter();
    assert_eq!(stack_high_water(), Some(high));
}
