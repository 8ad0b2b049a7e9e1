//! Fuzz target: `Header::parse` on arbitrary first-cluster bytes and file lengths must return
//! `Ok` or an error, never panic. The first 8 bytes of the input are the file length.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (len, head) = data.split_at(8);
    let file_len = u64::from_le_bytes(len.try_into().unwrap_or([0; 8]));
    let _ = block::qcow2::Header::parse(head, file_len);
});
