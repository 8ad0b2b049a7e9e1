//! Fuzz target `fuse_request`: one FUSE request, parsed under every protocol minor, whole and split. The body is `fuse::fuzzing::fuse_request`, which `cargo test` also runs on
//! every file of `fuzz/corpus/fuse_request/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuse::fuzzing::fuse_request(data));
