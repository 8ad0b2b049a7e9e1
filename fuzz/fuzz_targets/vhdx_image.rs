//! Fuzz target `vhdx_image`: a vhdx image in sparse form (`block::fuzzing::expand_sparse`), opened
//! read-only, read and queried. The body is `block::fuzzing::vhdx_image`, which `cargo test` also
//! runs on every file of `fuzz/corpus/vhdx_image/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::fuzzing::vhdx_image(data));
