//! Fuzz target `qcow2_header`: the qcow2 header, its extensions and the snapshot table. The body is `block::fuzzing::qcow2_header`, which `cargo test` also runs on
//! every file of `fuzz/corpus/qcow2_header/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::fuzzing::qcow2_header(data));
