//! Stack reuse: 100k create/finish cycles map no new stacks once the pool is warm. Its own test
//! binary, so no other test maps stacks meanwhile.

use runtime::coroutine::{mapped_stacks, pool_config};
use runtime::{co_yield, Coroutine};

fn count_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

#[test]
fn pooled_stacks_are_reused_not_remapped() {
    // Warm up: 64 coroutines alive at once, then all finish.
    let cos: Vec<Coroutine> = (0..64).map(|_| Coroutine::new(co_yield)).collect();
    for co in &cos {
        co.enter();
    }
    for co in &cos {
        co.enter();
    }
    drop(cos);
    let stacks = mapped_stacks();
    assert_eq!(stacks, 64);
    let maps = count_maps();

    for _ in 0..100_000 {
        let co = Coroutine::new(|| {
            let buf = [1u8; 512];
            std::hint::black_box(&buf);
        });
        co.enter();
        assert!(co.is_finished());
    }
    for _ in 0..1000 {
        let cos: Vec<Coroutine> = (0..32).map(|_| Coroutine::new(co_yield)).collect();
        cos.iter().for_each(Coroutine::enter);
        cos.iter().for_each(Coroutine::enter);
    }
    assert_eq!(
        mapped_stacks(),
        stacks,
        "stacks were mapped instead of reused"
    );
    // Mappings may vary a little with the allocator; stacks would add thousands.
    let after = count_maps();
    assert!(after <= maps + 8, "mappings grew from {maps} to {after}");
    assert!(pool_config().max_pooled >= 64);

    // A thread's pooled stacks are unmapped when it exits.
    let before = mapped_stacks();
    std::thread::spawn(|| {
        let cos: Vec<Coroutine> = (0..10).map(|_| Coroutine::new(co_yield)).collect();
        cos.iter().for_each(Coroutine::enter);
        cos.iter().for_each(Coroutine::enter);
        assert!(mapped_stacks() >= 10);
    })
    .join()
    .expect("thread");
    assert_eq!(
        mapped_stacks(),
        before,
        "an exited thread's stacks stayed mapped"
    );
}
