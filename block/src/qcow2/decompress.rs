//! Decompressing one compressed qcow2 cluster, by the image's compression type: deflate
//! (`inflate`) or zstd (`ruzstd`, a pure-Rust decoder).
//!
//! QEMU: `block/qcow2-threads.c` (`qcow2_zlib_decompress()`, `qcow2_zstd_decompress()`) and the
//! "Compressed Clusters Descriptor" of `docs/interop/qcow2.txt`.
//!
//! The on-disk length of a compressed cluster is only known to a sector (the L2 entry counts
//! 512-byte sectors), so the input may end with bytes that belong to nobody. Both decoders
//! therefore stop when the cluster buffer is full, and a cluster decompresses to *exactly* the
//! cluster size: less is an error (the stream ended early), more is an error (the data is not a
//! cluster).
//!
//! zstd framing, as QEMU writes it: one zstd frame per cluster, no length prefix, padded to a
//! sector. QEMU's reader accepts a *sequence* of frames that together fill the cluster (it loops
//! over `ZSTD_decompressStream()` until the output is full, and fails if the last frame was not
//! complete), so we do the same: decode frame after frame (skipping skippable frames) until the
//! cluster is full; the frame that fills it must end there. Decoding proceeds in steps of at
//! most 64 KiB of output plus one block, each drained into the cluster at once, so a crafted
//! frame that expands to gigabytes fails after a cluster's worth, and the decoder's window is
//! capped at [`MAX_ZSTD_WINDOW`]. Frame checksums are not verified (`ruzstd` is built without
//! its hash feature); the cluster was sector-exact data from QEMU, corruption shows as a
//! malformed stream or a wrong length.

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use ruzstd::io::Read;

use super::header::{COMPRESSION_DEFLATE, COMPRESSION_ZSTD};
use super::inflate;

/// Largest zstd window accepted: QEMU's frames have the content size (≤ 2 MiB clusters) as
/// window; this leaves room without letting a crafted header allocate 100s of MiB.
pub const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// Decompresses `input` (a compressed cluster and its sector padding) into all of `out`.
pub fn decompress(compression_type: u8, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match compression_type {
        COMPRESSION_DEFLATE => inflate::inflate_raw(input, out).map_err(str::to_owned),
        COMPRESSION_ZSTD => zstd_decompress(input, out),
        // The header check refuses other types at open.
        other => Err(format!("unknown compression type {other}")),
    }
}

/// QEMU: `qcow2_zstd_decompress()`.
fn zstd_decompress(mut input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut decoder = FrameDecoder::new();
    decoder.set_max_window_size(MAX_ZSTD_WINDOW);
    let mut filled = 0;
    while filled < out.len() {
        if input.is_empty() {
            return Err("zstd data ends before the cluster is full".into());
        }
        match decoder.reset(&mut input) {
            Ok(()) => {}
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                input = usize::try_from(length)
                    .ok()
                    .and_then(|n| input.get(n..))
                    .ok_or("zstd skippable frame is truncated")?;
                continue;
            }
            Err(e) => return Err(format!("bad zstd frame: {e}")),
        }
        loop {
            let finished = decoder
                .decode_blocks(&mut input, BlockDecodingStrategy::UptoBytes(64 << 10))
                .map_err(|e| format!("bad zstd data: {e}"))?;
            filled += decoder
                .read(&mut out[filled..])
                .map_err(|e| format!("zstd: {e}"))?;
            if decoder.can_collect() > 0 {
                return Err("zstd data decompresses to more than a cluster".into());
            }
            if finished {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zstd frame holding `data` as one raw block (no compression needed to build it):
    /// magic, descriptor (single segment, 1-byte content size), content size, block header.
    fn raw_frame(data: &[u8]) -> Vec<u8> {
        assert!(data.len() < 256);
        let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x20, data.len() as u8];
        let header = ((data.len() as u32) << 3) | 1; // raw block, last
        f.extend_from_slice(&header.to_le_bytes()[..3]);
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn frames_fill_the_cluster_and_padding_is_ignored() {
        let mut input = raw_frame(b"hello ");
        // A skippable frame between the two data frames.
        input.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 0xaa, 0xbb]);
        input.extend_from_slice(&raw_frame(b"world"));
        input.extend_from_slice(&[0; 40]); // sector padding
        let mut out = [0u8; 11];
        decompress(COMPRESSION_ZSTD, &input, &mut out).expect("two frames");
        assert_eq!(&out, b"hello world");
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let frame = raw_frame(b"0123456789");
        let mut short = [0u8; 11];
        assert!(
            decompress(COMPRESSION_ZSTD, &frame, &mut short).is_err(),
            "ends early"
        );
        let mut padded = frame.clone();
        padded.extend_from_slice(&[0; 16]);
        assert!(
            decompress(COMPRESSION_ZSTD, &padded, &mut short).is_err(),
            "padding"
        );
        let mut small = [0u8; 9];
        assert!(
            decompress(COMPRESSION_ZSTD, &frame, &mut small).is_err(),
            "too long"
        );
        assert!(decompress(7, &frame, &mut small).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x0123_4567_89ab_cdef;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = raw_frame(&[7u8; 200]);
        for i in 0..3000 {
            let mut input = base.clone();
            if i % 3 == 0 {
                input = (0..(next() % 300)).map(|_| next() as u8).collect();
                if i % 2 == 0 && input.len() >= 4 {
                    input[..4].copy_from_slice(&[0x28, 0xb5, 0x2f, 0xfd]);
                }
            } else {
                for _ in 0..1 + next() % 6 {
                    let at = (next() as usize) % input.len();
                    input[at] = next() as u8;
                }
            }
            let mut out = vec![0u8; 200 + (next() % 3) as usize];
            let _ = decompress(COMPRESSION_ZSTD, &input, &mut out);
        }
    }
}
