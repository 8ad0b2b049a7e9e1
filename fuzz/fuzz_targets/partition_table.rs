//! Fuzz target `partition_table`: MBR and GPT tables (`block::partition`). The body is
//! `block::fuzzing::partition_table`, which `cargo test` also runs on every file of
//! `fuzz/corpus/partition_table/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::fuzzing::partition_table(data));
