//! Image format detection: is this file raw, or something we must not export as raw?
//!
//! QEMU: `bdrv_probe_all()` in `block.c` and the `bdrv_probe` callback of each format driver
//! (`qcow2_probe()`, `vmdk_probe()`, `vdi_probe()`, `vhdx_probe()`, `vpc_probe()`,
//! `qed_probe()`, `block_crypto_probe_luks()`, `dmg_probe()`, `parallels_probe()`,
//! `bochs_probe()`).
//!
//! Exporting a qcow2 file as raw would show the guest its metadata, and a write could corrupt
//! it, so a format we do not implement is refused by name. QEMU scores candidates; we only need
//! "which magic matches", checked against the first 512 bytes and, for dmg and a fixed VHD
//! (whose footer is only at the end), the last 512.
//!
//! A raw image found by probing is *probed*: like QEMU, its raw driver refuses writes that would
//! make the first sector match one of these magics (see `raw.rs`), so a guest cannot turn its
//! disk into, say, a qcow2 image whose backing file is a host file. A backing file is never
//! probed as raw (`qcow2/backing.rs`).

use std::sync::Arc;

use crate::backend::{BackendOptions, BlockBackend};
use crate::{BlockDriver, Result};

/// Bytes at the start of the file that identify a format.
const MAGICS: &[(usize, &[u8], &str)] = &[
    (0, b"QFI\xfb\x00\x00\x00\x01", "qcow"),
    (0, b"QFI\xfb", "qcow2"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"), // 0xbeda107f little-endian
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
];

/// The format whose magic `head` (the file's first bytes) starts with, if any.
pub fn match_magic(head: &[u8]) -> Option<&'static str> {
    MAGICS
        .iter()
        .find(|(off, magic, _)| head.get(*off..*off + magic.len()) == Some(*magic))
        .map(|&(_, _, name)| name)
}

/// Probes the node: `Some(format)` if it is a known non-raw format. Runs its reads through a
/// temporary read-only [`BlockBackend`], so O_DIRECT alignment is taken care of; callable outside
/// a coroutine (the file driver then reads inline).
pub fn probe(node: &Arc<dyn BlockDriver>) -> Result<Option<&'static str>> {
    let blk = BlockBackend::new(
        node.clone(),
        BackendOptions {
            read_only: true,
            write_beyond_eof: false,
            ..BackendOptions::default()
        },
    )?;
    let len = blk.size();
    let mut head = vec![0u8; len.min(512) as usize];
    blk.co_pread(0, &mut head)?;
    if let Some(format) = match_magic(&head) {
        return Ok(Some(format));
    }
    // dmg: a 512-byte "koly" trailer at the end. QEMU: dmg_probe() via read_uint32() at -512.
    if len >= 1024 {
        let mut tail = [0u8; 4];
        blk.co_pread(len - 512, &mut tail)?;
        if &tail == b"koly" {
            return Ok(Some("dmg"));
        }
    }
    // A fixed VHD: its only footer is at the end (QEMU's probe misses it; see `vpc.rs`).
    if len >= 512 {
        let mut tail = [0u8; 512];
        blk.co_pread(len - 512, &mut tail)?;
        if crate::vpc::is_fixed_footer(&tail) {
            return Ok(Some("vpc"));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics() {
        assert_eq!(match_magic(b"QFI\xfb\x00\x00\x00\x03rest"), Some("qcow2"));
        assert_eq!(match_magic(b"QFI\xfb\x00\x00\x00\x01rest"), Some("qcow"));
        assert_eq!(match_magic(b"KDMV\x01\x00"), Some("vmdk"));
        assert_eq!(match_magic(b"vhdxfile...."), Some("vhdx"));
        assert_eq!(match_magic(b"conectix...."), Some("vpc"));
        assert_eq!(match_magic(b"QED\0...."), Some("qed"));
        assert_eq!(match_magic(b"LUKS\xba\xbe\x00\x01"), Some("luks"));
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda107fu32.to_le_bytes());
        assert_eq!(match_magic(&vdi), Some("vdi"));
        assert_eq!(match_magic(&[0u8; 512]), None);
        assert_eq!(match_magic(b"QF"), None, "a short file is raw");
    }
}
