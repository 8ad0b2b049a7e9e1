//! Fuzz target `qcow2_image`: a whole qcow2 image in memory, opened read-only, then writable; read and written. The body is `block::fuzzing::qcow2_image`, which `cargo test` also runs on
//! every file of `fuzz/corpus/qcow2_image/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::fuzzing::qcow2_image(data));
