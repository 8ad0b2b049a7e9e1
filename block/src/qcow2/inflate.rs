//! Decompressing a deflate-compressed qcow2 cluster (raw deflate) with `miniz_oxide`.
//!
//! QEMU: `qcow2_zlib_decompress()` in `block/qcow2-threads.c`, which runs zlib's `inflate()`
//! with `windowBits = -12` (raw deflate, no zlib header) into a cluster-sized buffer and
//! succeeds when that buffer is full — the compressed data on disk is rounded up to sectors,
//! so bytes after the end of the stream are normal. We do the same: success means `out` is
//! full, whether or not the stream's final block was reached. Malformed input is an `Err`.

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

type Result<T> = std::result::Result<T, &'static str>;

/// Decompresses raw deflate `input` into all of `out`.
pub fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut state = DecompressorOxide::new();
    // The whole output buffer is available at once; no zlib header; all input is here.
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _read, written) = decompress(&mut state, input, out, 0, flags);
    match status {
        _ if written == out.len() => Ok(()),
        TINFLStatus::Done => Err("compressed stream ends before the cluster is full"),
        TINFLStatus::FailedCannotMakeProgress | TINFLStatus::NeedsMoreInput => {
            Err("compressed stream is truncated")
        }
        _ => Err("compressed stream is malformed"),
    }
}

#[cfg(test)]
mod tests {
    use super::inflate_raw;

    #[test]
    fn stored_block_fills_the_output() {
        // A final stored block of 5 bytes: header bits 1 (final) + 00 (stored), LEN, NLEN.
        let input = [
            0x01, 0x05, 0x00, 0xfa, 0xff, b'h', b'e', b'l', b'l', b'o', 0xde, 0xad,
        ];
        let mut out = [0u8; 5];
        inflate_raw(&input, &mut out).expect("valid");
        assert_eq!(&out, b"hello");
        let mut longer = [0u8; 6];
        assert!(
            inflate_raw(&input, &mut longer).is_err(),
            "stream ends before the buffer"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x1234_5678_9abc_def0;
        for _ in 0..3000 {
            let mut input = vec![0u8; (x % 300) as usize];
            for b in input.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let mut out = vec![0u8; 4096];
            let _ = inflate_raw(&input, &mut out);
        }
    }
}
