//! Fuzz target `vmdk_image`: a vmdk image in memory (a sparse file, or a descriptor, a NUL and
//! the extent bytes), opened read-only and read. The body is `block::fuzzing::vmdk_image`,
//! which `cargo test` also runs on every file of `fuzz/corpus/vmdk_image/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::fuzzing::vmdk_image(data));
