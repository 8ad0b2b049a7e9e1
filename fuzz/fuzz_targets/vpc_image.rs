//! Fuzz target `vpc_image`: a vpc image in sparse form (`block::fuzzing::expand_sparse`), opened
//! read-only, read and queried. The body is `block::fuzzing::vpc_image`, which `cargo test` also
//! runs on every file of `fuzz/corpus/vpc_image/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::fuzzing::vpc_image(data));
