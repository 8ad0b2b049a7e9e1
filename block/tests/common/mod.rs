//! Helpers shared by the block layer's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

/// Runs `f` in a coroutine on this thread and waits for it (polling this thread's context).
pub fn co<T: 'static>(f: impl FnOnce() -> T + 'static) -> T {
    match runtime::spawn(f).join() {
        Ok(v) => v,
        Err(p) => panic!("{p}"),
    }
}

/// A temporary directory on the disk filesystem (inside `target/`), where O_DIRECT and holes
/// work; `/tmp` may be a tmpfs.
pub fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temporary directory in target/")
}

/// Deterministic bytes that differ at every offset of interest.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

/// Creates `dir/name` with `contents`.
pub fn image(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("create the image");
    path
}

/// A small deterministic pseudo-random generator (no dependency, reproducible failures).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Says loudly that (part of) a test did not run, and why. Writes to the stderr handle itself:
/// libtest captures `eprintln!` of passing tests, not this.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
}

pub mod qemu;
