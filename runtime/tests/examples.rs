//! The teaching examples (`runtime/examples/NN_*.rs`) print what their module doc promises.
//!
//! Each example's doc has an "Expected output" block (```` ```text ````); this test runs the
//! example's binary and compares its stdout with that block, line for line. The binaries are
//! the ones `cargo test -p runtime` (and `cargo build --all-targets`) builds next to this
//! test's own binary, in `target/<profile>/examples/`. Running `cargo test --test examples`
//! alone does not build examples: the test then says so instead of running a stale binary.

use std::path::Path;

#[path = "support/examples.rs"]
mod support;

const EXAMPLES: &[&str] = &[
    "01_event_loop",
    "02_coroutine",
    "03_cross_thread_wake",
    "04_thread_pool",
    "05_comutex_fairness",
    "06_drain",
];

#[test]
fn every_teaching_example_prints_its_expected_output() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in EXAMPLES {
        support::check(dir, name);
    }
}

#[test]
fn every_numbered_example_is_checked() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut numbered: Vec<String> = std::fs::read_dir(&dir)
        .expect("read examples/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.as_bytes().first().is_some_and(u8::is_ascii_digit) && n.ends_with(".rs"))
        .map(|n| n.trim_end_matches(".rs").to_owned())
        .collect();
    numbered.sort();
    assert_eq!(numbered, EXAMPLES, "add new examples to EXAMPLES");
}
