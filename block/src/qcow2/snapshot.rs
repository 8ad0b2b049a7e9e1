//! The internal snapshot table: walking its variable-length entries.
//!
//! QEMU: `docs/interop/qcow2.txt` ("Snapshots"), `block/qcow2-snapshot.c`
//! (`qcow2_do_read_snapshots()`).
//!
//! The table is `nb_snapshots` entries from `snapshots_offset` on, each 40 fixed bytes (the
//! snapshot's L1 table offset and size, the lengths of its id and name, times, and the length
//! of its extra data), then the extra data, the id and the name, padded to 8 bytes; the last
//! entry's padding may be missing at the end of the file. The driver never creates or deletes
//! snapshots; only the refcount repair of a dirty image ([`super::repair`]) reads the table, to
//! count the clusters of each snapshot's L1 table. [`read_table`] is the one walker, pure over
//! a read callback so that the fuzz targets (`crate::fuzzing`) run the same code.
//!
//! Untrusted values are bounded here: extra data of at most [`MAX_EXTRA`] bytes (QEMU's
//! limit), every entry inside the file, at most [`super::header::MAX_SNAPSHOTS`] entries (the
//! header checked that).

use crate::{BlockError, Result};

/// Bytes of the fixed part of an entry.
pub const FIXED_LEN: usize = 40;
/// The most extra data an entry may have (QEMU's limit).
pub const MAX_EXTRA: u64 = 1024;

/// One entry of the snapshot table, as far as the driver needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table (not validated here).
    pub l1_table_offset: u64,
    /// Entries of the snapshot's L1 table.
    pub l1_size: u32,
    /// Host offset of the entry.
    pub offset: u64,
    /// Bytes of the entry without its padding: fixed part, extra data, id, name.
    pub len: u64,
}

/// The big-endian integer of `N` bytes at `at` of the fixed part.
fn be<const N: usize>(fixed: &[u8; FIXED_LEN], at: usize) -> u64 {
    fixed[at..at + N]
        .iter()
        .fold(0, |v, &x| (v << 8) | u64::from(x))
}

fn corrupt(why: String) -> BlockError {
    BlockError::Corrupt(format!("qcow2 snapshot table: {why}"))
}

/// Walks the `count` entries of the table at `start` in a file of `file_len` bytes, reading
/// each fixed part through `read(host_offset, buf)`. Returns the entries and the end of the
/// last one (its padding excluded). Errors: an entry with too much extra data or running past
/// the end of the file ([`BlockError::Corrupt`]), or whatever `read` returns.
pub fn read_table(
    start: u64,
    count: u32,
    file_len: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<(Vec<SnapshotEntry>, u64)> {
    let (mut pos, mut end) = (start, start);
    let mut entries = Vec::new();
    for i in 0..count {
        if pos.saturating_add(FIXED_LEN as u64) > file_len {
            return Err(corrupt(format!(
                "entry {i} at {pos:#x} runs past the end of the file"
            )));
        }
        let mut fixed = [0u8; FIXED_LEN];
        read(pos, &mut fixed)?;
        let extra = be::<4>(&fixed, 36);
        if extra > MAX_EXTRA {
            return Err(corrupt(format!(
                "entry {i} has {extra} bytes of extra data (at most {MAX_EXTRA})"
            )));
        }
        let len = FIXED_LEN as u64 + extra + be::<2>(&fixed, 12) + be::<2>(&fixed, 14);
        end = pos + len;
        if end > file_len {
            return Err(corrupt(format!(
                "entry {i} at {pos:#x} runs past the end of the file"
            )));
        }
        entries.push(SnapshotEntry {
            l1_table_offset: be::<8>(&fixed, 0),
            l1_size: be::<4>(&fixed, 8) as u32,
            offset: pos,
            len,
        });
        pos = end.next_multiple_of(8);
    }
    Ok((entries, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table in memory: entries of (extra, id, name) lengths, each padded to 8 bytes.
    fn table(entries: &[(u32, u16, u16)]) -> Vec<u8> {
        let mut t = Vec::new();
        for (k, &(extra, id, name)) in entries.iter().enumerate() {
            let mut fixed = [0u8; FIXED_LEN];
            fixed[..8].copy_from_slice(&(0x10000 * (k as u64 + 1)).to_be_bytes());
            fixed[8..12].copy_from_slice(&2u32.to_be_bytes());
            fixed[12..14].copy_from_slice(&id.to_be_bytes());
            fixed[14..16].copy_from_slice(&name.to_be_bytes());
            fixed[36..40].copy_from_slice(&extra.to_be_bytes());
            t.extend_from_slice(&fixed);
            t.resize(t.len() + extra as usize + id as usize + name as usize, 0xaa);
            t.resize(t.len().next_multiple_of(8), 0);
        }
        t
    }

    fn walk(t: &[u8], count: u32, file_len: u64) -> Result<(Vec<SnapshotEntry>, u64)> {
        read_table(0, count, file_len, |pos, buf| {
            let pos = pos as usize;
            buf.copy_from_slice(&t[pos..pos + buf.len()]);
            Ok(())
        })
    }

    #[test]
    fn entries_are_walked_with_their_padding() {
        let t = table(&[(16, 1, 5), (0, 2, 3)]);
        let (entries, end) = walk(&t, 2, t.len() as u64).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].len, 40 + 16 + 1 + 5);
        assert_eq!(entries[1].offset, 64);
        assert_eq!(entries[1].l1_table_offset, 0x20000);
        assert_eq!(end, 64 + 45);
        // The last entry's padding may be missing.
        assert!(walk(&t, 2, 64 + 45).is_ok());
        assert!(walk(&t, 2, 64 + 44).is_err());
    }

    #[test]
    fn too_much_extra_data_and_short_files_are_errors() {
        let t = table(&[(1025, 0, 0)]);
        let e = walk(&t, 1, t.len() as u64).unwrap_err();
        assert!(e.to_string().contains("1025 bytes of extra data"), "{e}");
        let t = table(&[(0, 1, 1)]);
        // A fixed part cut by the end of the file is refused before it is read.
        assert!(walk(&t, 1, 20).is_err());
        // More entries than the file holds.
        assert!(walk(&t, 3, t.len() as u64).is_err());
    }
}
