//! Replays the committed fuzz corpus of the `fuse_request` target (`fuzz/corpus/fuse_request/`:
//! requests captured from a real kernel, hand-made edge cases, and every input that once
//! crashed) through the same body the fuzzer runs, [`fuse::fuzzing::fuse_request`]. This is
//! the part of the fuzzing that runs in every `cargo test`, without cargo-fuzz or nightly.

use std::collections::BTreeSet;
use std::path::PathBuf;

/// The files of `fuzz/corpus/<target>/`, sorted; panics if there are none.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    block::fuzzing::corpus_files(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target),
    )
}

#[test]
fn fuse_request_corpus_replays_cleanly() {
    let files = corpus("fuse_request");
    for (path, bytes) in &files {
        eprintln!("{}", path.display());
        fuse::fuzzing::fuse_request(bytes);
    }
    // The corpus covers every opcode the export handles.
    let opcodes: BTreeSet<u32> = files
        .iter()
        .filter(|(_, b)| b.len() >= 8)
        .map(|(_, b)| u32::from_ne_bytes(b[4..8].try_into().expect("4 bytes")))
        .collect();
    for op in fuse::fuzzing::HANDLED_OPCODES {
        assert!(opcodes.contains(&op), "no corpus file of opcode {op}");
    }
}
