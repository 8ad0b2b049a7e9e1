//! The teaching examples (`runtime/examples/NN_*.rs`) print what their module doc promises.
//!
//! Each example's doc has an "Expected output" block (```` ```text ````); this test runs the
//! example's binary and compares its stdout with that block, line for line. The binaries are
//! the ones `cargo test -p runtime` (and `cargo build --all-targets`) builds next to this
//! test's own binary, in `target/<profile>/examples/`. Running `cargo test --test examples`
//! alone does not build examples: the test then says so instead of running a stale binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

const EXAMPLES: &[&str] = &[
    "01_event_loop",
    "02_coroutine",
    "03_cross_thread_wake",
    "04_thread_pool",
    "05_comutex_fairness",
    "06_drain",
];

/// The lines of the first ```` ```text ```` block after "Expected output" in `source`'s `//!`
/// doc comment.
fn expected_output(source: &str) -> Vec<String> {
    let doc: Vec<&str> = source
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .map(|l| l.strip_prefix("//! ").unwrap_or(l.trim_start_matches("//!")))
        .collect();
    let start = doc
        .iter()
        .position(|l| l.starts_with("Expected output"))
        .expect("the module doc has an \"Expected output\" paragraph");
    let open = start
        + doc[start..]
            .iter()
            .position(|l| *l == "```text")
            .expect("a ```text block follows \"Expected output\"");
    doc[open + 1..]
        .iter()
        .take_while(|l| **l != "```")
        .map(|l| l.to_string())
        .collect()
}

/// `target/<profile>/examples/`, next to `target/<profile>/deps/` where this test runs from.
fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps")
        .join("examples")
}

fn modified(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Runs example `name` of the crate in `crate_dir` and compares its stdout with its doc.
fn check(crate_dir: &Path, name: &str) {
    let source_path = crate_dir.join("examples").join(format!("{name}.rs"));
    let source = std::fs::read_to_string(&source_path).expect("read the example");
    let bin = examples_dir().join(name);
    assert!(
        bin.exists() && modified(&bin) >= modified(&source_path),
        "{} is missing or older than its source: build the examples first \
         (`cargo test -p runtime` does; `--test examples` alone does not)",
        bin.display()
    );
    let out = Command::new(&bin).output().expect("run the example");
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        got,
        expected_output(&source),
        "{name}: stdout differs from the \"Expected output\" in its doc"
    );
}

#[test]
fn every_teaching_example_prints_its_expected_output() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in EXAMPLES {
        check(dir, name);
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
