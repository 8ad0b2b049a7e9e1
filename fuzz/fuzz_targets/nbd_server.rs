//! Fuzz target `nbd_server`: an NBD server's handshake answers and replies, against the
//! handshake and a live connection of the `nbd` driver (`block::nbd`). The body is
//! `block::fuzzing::nbd_server`, which `cargo test` also runs on every file of
//! `fuzz/corpus/nbd_server/`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::fuzzing::nbd_server(data));
