//! Shared by `runtime/tests/examples.rs` and `block/tests/examples.rs` (through `#[path]`):
//! runs a teaching example's binary and compares its stdout with the "Expected output" block
//! of its module doc.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// The lines of the first ```` ```text ```` block after "Expected output" in `source`'s `//!`
/// doc comment.
fn expected_output(source: &str) -> Vec<String> {
    let doc: Vec<&str> = source
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .map(|l| {
            l.strip_prefix("//! ")
                .unwrap_or(l.trim_start_matches("//!"))
        })
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
pub fn check(crate_dir: &Path, name: &str) {
    let source_path = crate_dir.join("examples").join(format!("{name}.rs"));
    let source = std::fs::read_to_string(&source_path).expect("read the example");
    let bin = examples_dir().join(name);
    assert!(
        bin.exists() && modified(&bin) >= modified(&source_path),
        "{} is missing or older than its source: build the examples first \
         (`cargo test -p CRATE` does; `--test examples` alone does not)",
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
