//! Fuzz target `backing_name`: a backing file name in a qcow2 header, and its resolution. The body is `block::fuzzing::backing_name`, which `cargo test` also runs on
//! every file of `fuzz/corpus/backing_name/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::fuzzing::backing_name(data));
