//! Property tests (proptest) of the qcow2 driver against untrusted bytes: whatever the header,
//! L1 or L2 tables say, opening, reading every cluster and asking block status return `Ok` or a
//! clean error — never a panic, never a hang.
//!
//! The properties:
//! - `header_parse_never_panics_on_random_bytes`: `Header::parse` on random bytes (half of them
//!   with the qcow2 magic) and a random file length;
//! - `header_parse_never_panics_on_mutated_headers`: on a valid header (extensions, a backing
//!   file name) with a few bytes overwritten, biased towards the fields;
//! - `mutated_tables_never_panic`: a real image from `qemu-img` (data, zero and compressed
//!   clusters, 4 KiB clusters so that tables are small) with random 8-byte entries written over
//!   its L1 and L2 tables, then opened and read cluster by cluster with block status;
//! - `snapshot_table_walk_never_panics`: `snapshot::read_table` over random tables, counts,
//!   offsets and file lengths; what it returns lies inside the file;
//! - `backing_names_round_trip_or_are_refused`: any bytes as a backing file name (the
//!   `backing_name` fuzz body: a name without NUL of 1..=1023 bytes comes back unchanged, others
//!   are refused; the resolved path stays under the image's directory unless absolute);
//! - `mutated_refcounts_and_snapshots_never_panic`: a real image with an internal snapshot,
//!   random values written over its refcount table, refcount blocks, snapshot table and the
//!   snapshot's L1 table, the dirty bit set in half the cases (so that a writable open rebuilds
//!   the refcounts from all of them), then the `qcow2_image` fuzz body in memory: opened
//!   read-only (the bytes must not change) and writable, read and written.
//!
//! Case counts are kept small (the whole file runs in a few seconds); failing inputs are not
//! persisted to files (no `proptest-regressions/` in the repository): proptest prints the
//! minimal failing case, which is enough to write a regression test from.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use block::qcow2::{snapshot, Header};
use block::{open_image, Format, OpenOptions};
use common::qemu::{have_qemu, qemu_img, qemu_io};
use common::{co, disk_dir};
use proptest::prelude::*;
use proptest::test_runner::Config;

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A valid v3 header with extensions (backing format, feature table) and a backing file name,
/// 64 KiB clusters, refcount table at 0x10000, L1 at 0x30000.
fn valid_header() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes());
    put(8, &0x300u64.to_be_bytes()); // backing file name offset
    put(16, &8u32.to_be_bytes()); // ... and size
    put(20, &16u32.to_be_bytes());
    put(24, &(1u64 << 30).to_be_bytes());
    put(36, &8u32.to_be_bytes());
    put(40, &0x30000u64.to_be_bytes());
    put(48, &0x10000u64.to_be_bytes());
    put(56, &1u32.to_be_bytes());
    put(96, &4u32.to_be_bytes());
    put(100, &112u32.to_be_bytes());
    // Extensions: backing format "qcow2", a one-entry feature table, end.
    put(112, &0xe279_2acau32.to_be_bytes());
    put(116, &5u32.to_be_bytes());
    put(120, b"qcow2");
    put(128, &0x6803_f857u32.to_be_bytes());
    put(132, &48u32.to_be_bytes());
    put(136, &[0, 0]);
    put(138, b"dirty bit");
    put(0x300, b"base.img");
    b
}

const HEADER_FILE_LEN: u64 = 0x40000;

proptest! {
    #![proptest_config(config(400))]

    #[test]
    fn header_parse_never_panics_on_random_bytes(
        mut bytes in prop::collection::vec(any::<u8>(), 0..1024),
        magic in any::<bool>(),
        file_len in 0u64..(1 << 40),
    ) {
        if magic && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(b"QFI\xfb");
        }
        let _ = Header::parse(&bytes, file_len);
    }

    #[test]
    fn header_parse_never_panics_on_mutated_headers(
        edits in prop::collection::vec((0usize..400, any::<u8>()), 1..12),
        cut in 0usize..4096,
        file_len in prop_oneof![Just(HEADER_FILE_LEN), 0u64..(1 << 20), any::<u64>()],
    ) {
        let mut b = valid_header();
        prop_assert!(Header::parse(&b, HEADER_FILE_LEN).is_ok(), "the base case is valid");
        for (pos, byte) in edits {
            b[pos] = byte;
        }
        b.truncate(cut.max(1));
        let _ = Header::parse(&b, file_len);
    }
}

/// Big-endian u64 at `off` of `b`.
fn be64(b: &[u8], off: u64) -> u64 {
    let off = off as usize;
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// A 1 MiB image with 4 KiB clusters: data, zero and compressed clusters, and the host
/// offsets of its L1 table entries and L2 tables.
fn sample_image(dir: &Path) -> (Vec<u8>, Vec<u64>) {
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "plain.qcow2",
            "1M",
        ],
    );
    qemu_io(
        "qcow2",
        &dir.join("plain.qcow2"),
        &[
            "write -P 0x41 0 64k",
            "write -z 64k 8k",
            "write -P 0x42 600k 12k",
        ],
    );
    qemu_img(
        dir,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "plain.qcow2",
            "s.qcow2",
        ],
    );
    qemu_io(
        "qcow2",
        &dir.join("s.qcow2"),
        &["write -P 0x43 900k 8k", "write -z 4k 4k"],
    );
    let bytes = std::fs::read(dir.join("s.qcow2")).expect("read the sample");
    let l1_offset = be64(&bytes, 40);
    let l1_size = u32::from_be_bytes(bytes[36..40].try_into().expect("4 bytes")) as u64;
    // Every L1 entry and every entry of every L2 table it points to.
    let mut targets = Vec::new();
    for i in 0..l1_size {
        let at = l1_offset + 8 * i;
        targets.push(at);
        let l2 = be64(&bytes, at) & 0x00ff_ffff_ffff_fe00;
        if l2 != 0 && l2 + 4096 <= bytes.len() as u64 {
            targets.extend((0..512).map(|j| l2 + 8 * j));
        }
    }
    (bytes, targets)
}

/// Interesting L1/L2 entries: flags set and cleared, offsets inside, past and around the file.
fn entry(file_len: u64) -> impl Strategy<Value = u64> {
    let flags = prop_oneof![
        Just(0u64),
        Just(1 << 63),
        Just(1 << 62),
        Just(3 << 62),
        Just(1)
    ];
    let offset = prop_oneof![
        0..file_len + 8192,
        (0..file_len / 512).prop_map(|s| s * 512),
        (0..file_len / 4096).prop_map(|c| c * 4096),
        any::<u64>(),
    ];
    prop_oneof![
        (flags, offset).prop_map(|(f, o)| f | (o & !(3 << 62))),
        any::<u64>()
    ]
}

/// Opens the image, reads every cluster, walks block status; returns how many reads failed
/// (`usize::MAX` when the open failed).
fn exercise(path: &Path) -> usize {
    let opts = OpenOptions {
        format: Format::Qcow2,
        read_only: true,
        ..OpenOptions::default()
    };
    let Ok(blk) = open_image(path, &opts) else {
        return usize::MAX;
    };
    co(move || {
        let size = blk.size();
        let mut failed = 0;
        let mut buf = vec![0u8; 4096];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(4096) as usize;
            if blk.co_pread(pos, &mut buf[..n]).is_err() {
                failed += 1;
            }
            pos += n as u64;
        }
        // One read across everything: runs of clusters, merged lookups.
        let mut all = vec![0u8; size as usize];
        let _ = blk.co_pread(0, &mut all);
        let mut pos = 0;
        while pos < size {
            match blk.co_block_status(pos, size - pos) {
                Ok((_, n)) => pos += n.max(1),
                Err(_) => pos += 4096,
            }
        }
        failed
    })
}

#[test]
fn mutated_tables_never_panic() {
    if !have_qemu("mutated_tables_never_panic") {
        return;
    }
    let dir = disk_dir();
    let (bytes, targets) = sample_image(dir.path());
    assert!(targets.len() > 1, "the sample has L2 tables");
    assert_eq!(
        exercise(&dir.path().join("s.qcow2")),
        0,
        "the sample reads cleanly"
    );
    let path = dir.path().join("mutated.qcow2");
    let file_len = bytes.len() as u64;
    let mut runner = proptest::test_runner::TestRunner::new(config(96));
    let (refused, failing) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let strategy = prop::collection::vec((0..targets.len(), entry(file_len)), 1..6);
    runner
        .run(&strategy, |edits| {
            let mut b = bytes.clone();
            for (t, value) in edits {
                let at = targets[t] as usize;
                b[at..at + 8].copy_from_slice(&value.to_be_bytes());
            }
            std::fs::write(&path, &b).expect("write the mutated image");
            match exercise(&path) {
                usize::MAX => refused.fetch_add(1, Ordering::Relaxed),
                0 => 0,
                _ => failing.fetch_add(1, Ordering::Relaxed),
            };
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // The mutations must bite: some images have requests that fail cleanly.
    let (refused, failing) = (refused.into_inner(), failing.into_inner());
    assert!(
        failing > 0,
        "refused at open: {refused}, with failing reads: {failing}"
    );
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn snapshot_table_walk_never_panics(
        table in prop::collection::vec(any::<u8>(), 0..600),
        small in prop::collection::vec((0usize..600, 0u8..16), 0..8),
        count in prop_oneof![0u32..6, any::<u32>()],
        start in prop_oneof![0u64..64, any::<u64>()],
        file_len in prop_oneof![0u64..700, any::<u64>()],
    ) {
        // Small length bytes make long walks likely.
        let mut table = table;
        for (at, v) in small {
            if at < table.len() {
                table[at] = v;
            }
        }
        let count = count.min(65536);
        let read = |pos: u64, buf: &mut [u8]| {
            buf.fill(0);
            let from = (pos.saturating_sub(start)).min(table.len() as u64) as usize;
            let n = (table.len() - from).min(buf.len());
            buf[..n].copy_from_slice(&table[from..from + n]);
            Ok(())
        };
        if let Ok((entries, end)) = snapshot::read_table(start, count, file_len, read) {
            prop_assert_eq!(entries.len(), count as usize);
            prop_assert!(end >= start && (count == 0 || end <= file_len));
            for e in entries {
                prop_assert!(e.offset >= start && e.offset + e.len <= end);
            }
        }
    }

    #[test]
    fn backing_names_round_trip_or_are_refused(
        name in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..1100),
            "[a-z./:]{0,40}".prop_map(String::into_bytes),
        ],
    ) {
        block::fuzzing::backing_name(&name);
    }
}

/// A 256 KiB image with 4 KiB clusters and one internal snapshot (its L1 table and the clusters
/// it shares with the active one), data written after the snapshot; the (offset, width) of every
/// refcount table entry, refcount block entry, byte of the snapshot table and entry of the
/// snapshot's L1 table.
fn snapshot_image(dir: &Path) -> (Vec<u8>, Vec<(u64, u8)>) {
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "s.qcow2",
            "256K",
        ],
    );
    let path = dir.join("s.qcow2");
    qemu_io(
        "qcow2",
        &path,
        &["write -P 0x51 0 16k", "write -P 0x52 200k 8k"],
    );
    qemu_img(dir, &["snapshot", "-c", "snap1", "s.qcow2"]);
    qemu_io("qcow2", &path, &["write -P 0x53 4k 8k", "write -z 200k 4k"]);
    let b = std::fs::read(&path).expect("read the sample");
    let be32 =
        |off: u64| u32::from_be_bytes(b[off as usize..off as usize + 4].try_into().expect("4"));
    let mut targets = Vec::new();
    let rt = be64(&b, 48);
    for i in 0..(4096 / 8) {
        let at = rt + 8 * i;
        let block = be64(&b, at);
        if block == 0 && i > 0 {
            break;
        }
        targets.push((at, 8));
        if block != 0 && block + 4096 <= b.len() as u64 {
            // The used part of the block: one entry per cluster of the file.
            let used = (b.len() as u64 / 4096).min(2048);
            targets.extend((0..used).map(|k| (block + 2 * k, 2)));
        }
    }
    let (nb, snaps) = (be32(60), be64(&b, 64));
    assert_eq!(nb, 1, "the sample has a snapshot");
    targets.extend((0..48).map(|k| (snaps + k, 1)));
    let (l1, l1_size) = (be64(&b, snaps), be32(snaps + 8));
    targets.extend((0..u64::from(l1_size)).map(|k| (l1 + 8 * k, 8)));
    (b, targets)
}

#[test]
fn mutated_refcounts_and_snapshots_never_panic() {
    if !have_qemu("mutated_refcounts_and_snapshots_never_panic") {
        return;
    }
    let dir = disk_dir();
    let (bytes, targets) = snapshot_image(dir.path());
    block::fuzzing::qcow2_image(&bytes);
    let file_len = bytes.len() as u64;
    let mut runner = proptest::test_runner::TestRunner::new(config(64));
    let strategy = (
        prop::collection::vec((0..targets.len(), entry(file_len)), 1..6),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(edits, dirty)| {
            let mut b = bytes.clone();
            for (t, value) in edits {
                let (at, width) = targets[t];
                let (at, width) = (at as usize, width as usize);
                b[at..at + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
            }
            if dirty {
                b[79] |= 1; // incompatible feature bit 0: the refcounts must be rebuilt
            }
            block::fuzzing::qcow2_image(&b);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}
