//! Fuzz target `vdi_image`: a vdi image in sparse form (`block::fuzzing::expand_sparse`), opened
//! read-only, read and queried. The body is `block::fuzzing::vdi_image`, which `cargo test` also
//! runs on every file of `fuzz/corpus/vdi_image/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::fuzzing::vdi_image(data));
