//! The vhdx driver against images made by the real `qemu-img`/`qemu-io` (fixed, dynamic, block
//! and log size variants): every byte equals `qemu-img convert -O raw`, the size equals `qemu-img
//! info`'s, block status matches what was written (QEMU has no vhdx block status: `qemu-img
//! map` calls all of it data); headers and region tables with bad CRC-32C, truncated files and
//! BAT entries past the end fail cleanly; a log that needs replaying is refused.
//!
//! Differencing images: no tool here makes one (`qemu-img` refuses, Hyper-V is not here), so
//! [`make_differencing`] turns a `qemu-img`-made dynamic image into one by the spec: sets
//! `has_parent`, adds a parent locator, and writes payload blocks (fully and partially present,
//! with a sector bitmap) and BAT entries itself. The expected bytes are the parent's (by
//! `qemu-img convert`) overlaid with what the builder put in the child; libvhdi's `vhdimount`
//! (an independent reader of differencing vhdx) must read the same.
//!
//! Needs `qemu-img` and `qemu-io` in PATH: without them each test says SKIPPED loudly, and
//! fails when `CI=true`.

mod common;

use std::path::{Path, PathBuf};

use block::vhdx::header::{crc32c, Guid, BAT_GUID, FILE_PARAMETERS, METADATA_GUID, PARENT_LOCATOR};
use block::{BlockError, BlockStatus, Format};
use common::qemu::{
    create, have_qemu, head, open_ro, open_ro_as, oracle_bytes_of, our_map, patch, qemu_io,
    read_all, virtual_size,
};
use common::{co, disk_dir};

const MIB: u64 = 1 << 20;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Writes at the start, across a block boundary, a lone sector, the end; zeros over data.
fn populate(path: &Path, size: u64, bs: u64) -> Vec<(u64, u64)> {
    let end = format!("write -P 0x5e {} 4k", size - 4096);
    let cross = format!("write -P 0xcd {} 1M", bs - 512 * 1024);
    qemu_io(
        "vhdx",
        path,
        &["write -P 0xab 4k 64k", &cross, "write -P 0x11 5M 512", &end],
    );
    // The blocks written (every block touched is allocated whole).
    let mut blocks: Vec<u64> = [
        4096,
        bs - 512 * 1024,
        bs + 512 * 1024 - 1,
        5 * MIB,
        size - 1,
    ]
    .iter()
    .map(|o| o / bs)
    .collect();
    blocks.dedup();
    blocks
        .iter()
        .map(|b| (b * bs, ((b + 1) * bs).min(size)))
        .collect()
}

/// The image's block size, as our driver read it from the metadata.
fn block_size(path: &Path) -> u64 {
    let blk = open_ro(path);
    let node: &dyn std::any::Any = &**blk.driver();
    let vhdx = node
        .downcast_ref::<block::vhdx::VhdxDriver>()
        .expect("a vhdx node");
    u64::from(vhdx.metadata().block_size)
}

fn roundtrip(opts: &str, size: u64, bs_opt: Option<u64>) {
    let test = format!("vhdx {opts} {size}");
    if !have_qemu(&test) {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vhdx", "vhdx", opts, size);
    let fixed = opts.contains("fixed");
    let bs = block_size(&path);
    if let Some(want) = bs_opt {
        assert_eq!(bs, want);
    }
    let written = populate(&path, size, bs);
    let blk = open_ro(&path);
    assert_eq!(blk.format_name(), "vhdx", "probed");
    assert_eq!(blk.size(), virtual_size(&path, "vhdx"));
    let expected = oracle_bytes_of(&path, "vhdx");
    for seed in [1, 2] {
        assert!(
            read_all(&blk, seed) == expected,
            "{test}: bytes differ from qemu-img convert"
        );
    }
    // Block status: data where a block was written; elsewhere zeros (a dynamic image's
    // blocks not present, or a fixed one's in the zero state) or, in a fixed image, data
    // (its preallocated blocks read as zeros: the bytes were compared above).
    let map = our_map(&blk);
    for (s, status) in map.iter().enumerate() {
        let pos = s as u64 * 512;
        if written.iter().any(|&(a, b)| (a..b).contains(&pos)) {
            assert_eq!(*status, BlockStatus::Data, "{test}: sector {s}");
        } else if !fixed {
            assert_eq!(*status, BlockStatus::Zero, "{test}: sector {s}");
        }
    }
}

#[test]
fn dynamic_default() {
    roundtrip("", 64 * MIB, None);
}

#[test]
fn dynamic_1m_blocks() {
    roundtrip("block_size=1M", 12 * MIB, Some(MIB));
}

#[test]
fn dynamic_8m_blocks_big_log() {
    roundtrip("block_size=8M,log_size=4M", 20 * MIB, Some(8 * MIB));
}

#[test]
fn fixed() {
    roundtrip("subformat=fixed,block_size=1M", 10 * MIB, Some(MIB));
}

#[test]
fn without_zero_state() {
    roundtrip("block_state_zero=off,block_size=2M", 8 * MIB, Some(2 * MIB));
}

#[test]
fn writable_open_is_refused() {
    if !have_qemu("vhdx writable") {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vhdx", "vhdx", "", 8 * MIB);
    let e = block::open_image(&path, &block::OpenOptions::default()).expect_err("writable");
    assert!(
        matches!(e, BlockError::ReadOnlyFormat { format: "vhdx", .. }),
        "{e:?}"
    );
}

/// Rewrites the CRC-32C of the 4 KiB header at `at`.
fn fix_header_crc(path: &Path, at: u64) {
    let b = std::fs::read(path).unwrap();
    let mut h = b[at as usize..at as usize + 4096].to_vec();
    h[4..8].fill(0);
    let c = crc32c(&h);
    patch(path, at + 4, &c.to_le_bytes());
}

/// The region (offset, length) with `guid` in the region table.
fn region(path: &Path, guid: Guid) -> (u64, u64) {
    let b = head(path, 256 * 1024);
    let rt = &b[192 * 1024..];
    (0..le32(rt, 8) as usize)
        .map(|i| 16 + i * 32)
        .find(|&e| rt[e..e + 16] == guid.0)
        .map(|e| (le64(rt, e + 16), u64::from(le32(rt, e + 24))))
        .expect("region")
}

#[test]
fn corrupt_images_fail_cleanly() {
    if !have_qemu("vhdx corrupt") {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vhdx", "vhdx", "block_size=1M", 8 * MIB);
    qemu_io(
        "vhdx",
        &path,
        &["write -P 0xab 0 4k", "write -P 0xcd 3M 4k"],
    );
    let copy = |name: &str| {
        let p = dir.path().join(name);
        std::fs::copy(&path, &p).unwrap();
        p
    };
    let refused = |p: &PathBuf, what: &str| {
        let e = open_ro_as(p, Format::Vhdx).expect_err(what);
        let msg = e.to_string();
        assert!(msg.contains("vhdx"), "{what}: {msg}");
        msg
    };
    // Both headers with a bad checksum; one bad header is fine (the other is used).
    let p = copy("h1.vhdx");
    patch(&p, 64 * 1024 + 200, &[1]);
    assert!(
        open_ro_as(&p, Format::Vhdx).is_ok(),
        "one valid header is enough"
    );
    patch(&p, 128 * 1024 + 200, &[1]);
    refused(&p, "no valid header");
    // The region table's CRC.
    let p = copy("rt.vhdx");
    patch(&p, 192 * 1024 + 100, &[1]);
    refused(&p, "region table crc");
    // Bad file signature.
    let p = copy("sig.vhdx");
    patch(&p, 0, b"vhdxfilX");
    refused(&p, "signature");
    // A BAT entry past the end of the file.
    let (bat, _) = region(&path, BAT_GUID);
    let p = copy("bat.vhdx");
    patch(&p, bat + 8, &((4096 * MIB) | 6).to_le_bytes());
    assert!(refused(&p, "BAT past EOF").contains("truncated"));
    // A BAT entry in an invalid state: EIO at the read, the rest readable.
    let p = copy("state.vhdx");
    patch(&p, bat + 16, &4u64.to_le_bytes());
    let blk = open_ro_as(&p, Format::Vhdx).expect("opens");
    let b = blk.clone();
    let (ok, bad) = co(move || {
        let mut buf = vec![0u8; 4096];
        let ok = b.co_pread(0, &mut buf).map(|()| buf[0]);
        (ok, b.co_pread(2 * MIB, &mut buf))
    });
    assert_eq!(ok.ok(), Some(0xab));
    assert!(matches!(bad, Err(BlockError::Corrupt(_))), "{bad:?}");
    // A huge virtual size in the metadata.
    let (meta, _) = region(&path, METADATA_GUID);
    let m = head(&path, (meta + MIB) as usize);
    let md = &m[meta as usize..];
    let size_item = (0..usize::from(u16::from_le_bytes([md[10], md[11]])))
        .map(|i| 32 + i * 32)
        .find(|&e| md[e..e + 16] == block::vhdx::header::VIRTUAL_DISK_SIZE.0)
        .map(|e| u64::from(le32(md, e + 16)))
        .expect("size item");
    let p = copy("size.vhdx");
    patch(&p, meta + size_item, &u64::MAX.to_le_bytes());
    refused(&p, "huge size");
    // Truncated inside the header section, and inside the data.
    for (name, len) in [("short1.vhdx", 100_000), ("short2.vhdx", 3 * MIB + 100)] {
        let p = copy(name);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len)
            .unwrap();
        assert!(open_ro_as(&p, Format::Vhdx).is_err(), "{name}");
    }
}

/// A header whose log GUID names a valid log entry: QEMU replays it on a writable open; we
/// refuse, naming `qemu-img check -r all`. A log GUID with no entry in the log opens (QEMU:
/// nothing to replay).
#[test]
fn log_that_needs_replay_is_refused() {
    if !have_qemu("vhdx log") {
        return;
    }
    let dir = disk_dir();
    let path = create(dir.path(), "img.vhdx", "vhdx", "", 8 * MIB);
    let guid = [0x5au8; 16];
    let h = head(&path, 192 * 1024);
    // The current header: the higher sequence number.
    let seq = |at: usize| le64(&h, at + 8);
    let cur = if seq(64 * 1024) > seq(128 * 1024) {
        64 * 1024
    } else {
        128 * 1024
    };
    let log_offset = le64(&h, cur + 72);
    patch(&path, cur as u64 + 48, &guid);
    fix_header_crc(&path, cur as u64);
    assert!(open_ro_as(&path, Format::Vhdx).is_ok(), "an empty log");
    let mut entry = vec![0u8; 64];
    entry[..4].copy_from_slice(b"loge");
    entry[8..12].copy_from_slice(&4096u32.to_le_bytes());
    entry[16..24].copy_from_slice(&1u64.to_le_bytes());
    entry[32..48].copy_from_slice(&guid);
    patch(&path, log_offset, &entry);
    let e = open_ro_as(&path, Format::Vhdx).expect_err("log to replay");
    assert!(e.to_string().contains("qemu-img check -r all"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Differencing images, built by the spec over a qemu-img-made dynamic image.

/// What the builder puts in each payload block of the child.
#[derive(Clone, Copy, Debug)]
enum Child {
    /// Not present: reads the parent.
    Parent,
    /// Fully present with this byte.
    Full(u8),
    /// Zero state.
    Zero,
    /// Partially present: sectors `i` with `i % 3 == 0` or inside the first 64 KiB hold this
    /// byte, the others read the parent.
    Partial(u8),
}

fn partial_has(sector: u64) -> bool {
    sector.is_multiple_of(3) || sector < 128
}

/// UTF-16LE bytes.
fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// A parent locator item with `pairs`.
fn locator(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut head = block::vhdx::header::PARENT_TYPE_VHDX.0.to_vec();
    head.extend_from_slice(&0u16.to_le_bytes());
    head.extend_from_slice(&(pairs.len() as u16).to_le_bytes());
    let mut strings = Vec::new();
    let base = 20 + 12 * pairs.len();
    for (k, v) in pairs {
        let (k, v) = (utf16(k), utf16(v));
        let ko = base + strings.len();
        strings.extend_from_slice(&k);
        let vo = base + strings.len();
        strings.extend_from_slice(&v);
        head.extend_from_slice(&(ko as u32).to_le_bytes());
        head.extend_from_slice(&(vo as u32).to_le_bytes());
        head.extend_from_slice(&(k.len() as u16).to_le_bytes());
        head.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    head.extend_from_slice(&strings);
    head
}

/// The data write GUID of `parent`'s current header, braced.
fn data_write_guid(parent: &Path) -> String {
    let h = head(parent, 192 * 1024);
    let seq = |at: usize| le64(&h, at + 8);
    let cur = if seq(64 * 1024) > seq(128 * 1024) {
        64 * 1024
    } else {
        128 * 1024
    };
    Guid(h[cur + 32..cur + 48].try_into().unwrap()).to_braced()
}

/// Turns `child` (a fresh dynamic vhdx with 1 MiB blocks and 512-byte sectors) into a
/// differencing image of `parent_name` with `blocks`; returns the bytes it should read as,
/// given the parent's.
fn make_differencing(
    child: &Path,
    pairs: &[(&str, &str)],
    blocks: &[Child],
    parent_bytes: &[u8],
) -> Vec<u8> {
    let bs = MIB;
    let cr = (1u64 << 23) * 512 / bs;
    // Metadata: set has_parent, add the locator after the last item.
    let (meta, meta_len) = region(child, METADATA_GUID);
    let m = head(child, (meta + meta_len) as usize)[meta as usize..].to_vec();
    let count = usize::from(u16::from_le_bytes([m[10], m[11]]));
    let mut free = 0u64;
    for e in (0..count).map(|i| 32 + i * 32) {
        let (off, len) = (u64::from(le32(&m, e + 16)), u64::from(le32(&m, e + 20)));
        free = free.max(off + len);
        if m[e..e + 16] == FILE_PARAMETERS.0 {
            let bits = le32(&m, off as usize + 4) | 2;
            patch(child, meta + off + 4, &bits.to_le_bytes());
            assert_eq!(le32(&m, off as usize), bs as u32, "1 MiB blocks");
        }
    }
    let loc = locator(pairs);
    let loc_off = free.next_multiple_of(4096);
    patch(child, meta + loc_off, &loc);
    let mut entry = PARENT_LOCATOR.0.to_vec();
    entry.extend_from_slice(&(loc_off as u32).to_le_bytes());
    entry.extend_from_slice(&(loc.len() as u32).to_le_bytes());
    entry.extend_from_slice(&4u32.to_le_bytes()); // required
    entry.extend_from_slice(&0u32.to_le_bytes());
    patch(child, meta + 32 + count as u64 * 32, &entry);
    patch(child, meta + 10, &(count as u16 + 1).to_le_bytes());

    // Payload blocks and the sector bitmap, appended 1 MiB aligned.
    let (bat, _) = region(child, BAT_GUID);
    let mut end = std::fs::metadata(child)
        .unwrap()
        .len()
        .next_multiple_of(MIB);
    let bitmap_off = end;
    end += MIB;
    let mut bitmap = vec![0u8; MIB as usize];
    let mut expected = parent_bytes.to_vec();
    let spb = bs / 512;
    for (b, kind) in blocks.iter().enumerate() {
        let b = b as u64;
        let range = (b * bs) as usize..((b + 1) * bs) as usize;
        let entry = match *kind {
            Child::Parent => 0,
            Child::Zero => {
                expected[range].fill(0);
                2
            }
            Child::Full(byte) => {
                patch(child, end, &vec![byte; bs as usize]);
                expected[range].fill(byte);
                end += bs;
                (end - bs) | 6
            }
            Child::Partial(byte) => {
                let mut data = vec![0xeeu8; bs as usize]; // never read where absent
                for s in (0..spb).filter(|&s| partial_has(s)) {
                    let r = (s * 512) as usize..((s + 1) * 512) as usize;
                    data[r.clone()].fill(byte);
                    expected[range.start + r.start..range.start + r.end].fill(byte);
                    let bit = (b % cr) * spb + s;
                    bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
                }
                patch(child, end, &data);
                end += bs;
                (end - bs) | 7
            }
        };
        patch(child, bat + b * 8, &entry.to_le_bytes());
    }
    patch(child, bitmap_off, &bitmap);
    patch(child, bat + cr * 8, &(bitmap_off | 6).to_le_bytes());
    expected
}

/// Parent (qemu-img made and written) and child (built) in `dir`; returns (child, expected).
fn diff_pair(
    dir: &Path,
    size: u64,
    blocks: &[Child],
    pairs: Option<Vec<(&str, String)>>,
) -> (PathBuf, Vec<u8>) {
    let parent = create(dir, "parent.vhdx", "vhdx", "block_size=1M", size);
    qemu_io(
        "vhdx",
        &parent,
        &["write -P 0x31 0 3M", "write -P 0x32 5M 2M"],
    );
    let parent_bytes = oracle_bytes_of(&parent, "vhdx");
    let child = create(
        dir,
        "child.vhdx",
        "vhdx",
        "block_size=1M,block_state_zero=off",
        size,
    );
    // Lower case: libvhdi (an oracle below) parses only that; we accept either case.
    let linkage = data_write_guid(&parent).to_lowercase();
    let pairs = pairs.unwrap_or_else(|| {
        vec![
            ("parent_linkage", linkage.clone()),
            ("relative_path", ".\\parent.vhdx".to_owned()),
            ("absolute_win32_path", "C:\\nowhere\\parent.vhdx".to_owned()),
        ]
    });
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let expected = make_differencing(&child, &pairs, blocks, &parent_bytes);
    (child, expected)
}

/// The bytes libvhdi's `vhdimount` shows for `image` (the last layer of its chain), or `None`
/// (loudly) without vhdimount or FUSE — which fails under `CI=true`.
fn libvhdi_read(image: &Path, dir: &Path) -> Option<Vec<u8>> {
    let have = std::process::Command::new("vhdimount")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
        && Path::new("/dev/fuse").exists();
    if !have {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "vhdimount (libvhdi-utils) and /dev/fuse are required when CI=true"
        );
        common::skip("vhdx libvhdi oracle", "vhdimount or /dev/fuse not found");
        return None;
    }
    /// Unmounts when dropped, also when an assertion fails.
    struct Mounted(PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&self.0)
                .status();
        }
    }
    let mnt = dir.join("libvhdi");
    std::fs::create_dir_all(&mnt).unwrap();
    let status = std::process::Command::new("vhdimount")
        .arg(image)
        .arg(&mnt)
        .output()
        .expect("run vhdimount");
    assert!(
        status.status.success(),
        "vhdimount: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let guard = Mounted(mnt.clone());
    let mut layers: Vec<PathBuf> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    layers.sort();
    let bytes = std::fs::read(layers.last().expect("a layer")).expect("read the layer");
    drop(guard);
    Some(bytes)
}

const LAYOUT: &[Child] = &[
    Child::Parent,
    Child::Full(0xa1),
    Child::Partial(0xb2),
    Child::Zero,
    Child::Parent,
    Child::Partial(0xc3),
    Child::Full(0xd4),
    Child::Parent,
];

#[test]
fn differencing_reads_through_to_the_parent() {
    if !have_qemu("vhdx differencing") {
        return;
    }
    let dir = disk_dir();
    let size = 8 * MIB;
    let (child, expected) = diff_pair(dir.path(), size, LAYOUT, None);
    let blk = open_ro(&child);
    assert_eq!(blk.format_name(), "vhdx");
    assert_eq!(blk.size(), size);
    for seed in [1, 2, 3] {
        let got = read_all(&blk, seed);
        if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
            panic!(
                "byte {i} (block {}): {:#x} != {:#x}",
                i as u64 / MIB,
                got[i],
                expected[i]
            );
        }
    }
    // Block status through the chain: the child's present sectors and full blocks are data,
    // its zero block zeros, the rest whatever the parent has (data where it was written).
    let map = our_map(&blk);
    let parent_data = |pos: u64| pos < 3 * MIB || (5 * MIB..7 * MIB).contains(&pos);
    for (s, status) in map.iter().enumerate() {
        let pos = s as u64 * 512;
        let b = (pos / MIB) as usize;
        let own = match LAYOUT[b] {
            Child::Full(_) => Some(BlockStatus::Data),
            Child::Zero => Some(BlockStatus::Zero),
            Child::Partial(_) if partial_has((pos % MIB) / 512) => Some(BlockStatus::Data),
            _ => None,
        };
        let want = own.unwrap_or(if parent_data(pos) {
            BlockStatus::Data
        } else {
            BlockStatus::Zero
        });
        assert_eq!(*status, want, "sector {s}");
    }
    // A second, independent reader: libvhdi's vhdimount shows the chain as the last layer.
    if let Some(theirs) = libvhdi_read(&child, dir.path()) {
        assert!(
            theirs == expected,
            "libvhdi reads the differencing image otherwise"
        );
    }
    // The child's node reports the parent's ranges unallocated.
    let b = blk.clone();
    let (st, n) = co(move || b.driver().co_block_status(0, MIB)).expect("status");
    assert_eq!((st, n), (BlockStatus::Unallocated, MIB));
}

#[test]
fn differencing_parent_problems_are_clear_errors() {
    if !have_qemu("vhdx differencing errors") {
        return;
    }
    let dir = disk_dir();
    // The parent changed since: linkage mismatch.
    let wrong = vec![
        (
            "parent_linkage",
            "{00000000-1111-2222-3333-444444444444}".to_owned(),
        ),
        ("relative_path", ".\\parent.vhdx".to_owned()),
    ];
    let (child, _) = diff_pair(dir.path(), 8 * MIB, LAYOUT, Some(wrong));
    let e = open_ro_as(&child, Format::Vhdx).expect_err("linkage");
    assert!(e.to_string().contains("modified"), "{e}");
    // No parent where the locator says.
    let dir = disk_dir();
    let missing = vec![
        (
            "parent_linkage",
            "{00000000-1111-2222-3333-444444444444}".to_owned(),
        ),
        ("relative_path", ".\\gone.vhdx".to_owned()),
        ("absolute_win32_path", "D:\\gone.vhdx".to_owned()),
    ];
    let (child, _) = diff_pair(dir.path(), 8 * MIB, LAYOUT, Some(missing));
    let e = open_ro_as(&child, Format::Vhdx).expect_err("missing");
    assert!(e.to_string().contains("gone.vhdx"), "{e}");
    // A sector bitmap entry far past the end of the file: EIO on the partially present
    // blocks only.
    let dir = disk_dir();
    let (child, expected) = diff_pair(dir.path(), 8 * MIB, LAYOUT, None);
    let (bat, _) = region(&child, BAT_GUID);
    patch(&child, bat + 4096 * 8, &((1u64 << 50) | 6).to_le_bytes());
    let blk = open_ro(&child);
    let b = blk.clone();
    let (full, partial) = co(move || {
        let mut buf = vec![0u8; 4096];
        let full = b.co_pread(MIB, &mut buf).map(|()| buf.clone());
        (full, b.co_pread(2 * MIB, &mut buf))
    });
    assert!(full.expect("a full block reads") == expected[MIB as usize..MIB as usize + 4096]);
    assert!(
        matches!(partial, Err(BlockError::Corrupt(_))),
        "{partial:?}"
    );
    drop(blk);
    // A differencing image without a path to find its parent (the driver alone).
    let file: std::sync::Arc<dyn block::BlockDriver> = std::sync::Arc::new(
        block::FileDriver::open(
            &child,
            &block::FileOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("file"),
    );
    assert!(block::vhdx::VhdxDriver::open(file).is_err());
}

/// The qcow2 overlay of `--snapshot` over a differencing vhdx: the backing opener opens the
/// vhdx chain; reads through the overlay equal the chain's.
#[test]
fn overlay_over_differencing() {
    if !have_qemu("vhdx overlay") {
        return;
    }
    let dir = disk_dir();
    let (child, expected) = diff_pair(dir.path(), 8 * MIB, LAYOUT, None);
    let opened = block::overlay::open_with_overlay(
        &child,
        &block::OpenOptions::default(),
        &[],
        &block::overlay::Overlay::File(dir.path().join("top.qcow2")),
    )
    .expect("overlay");
    assert_eq!(opened.image_format, "vhdx");
    let blk = opened.blk;
    assert!(!blk.is_read_only());
    assert!(read_all(&blk, 5) == expected);
    let b = blk.clone();
    co(move || b.co_pwrite(MIB, &[0x99; 4096])).expect("write to the overlay");
    blk.close().expect("close");
    drop(blk);
    // (QEMU cannot read a differencing vhdx, so qemu-img cannot check this chain.)
    let reopened = open_ro(&dir.path().join("top.qcow2"));
    let mut want = expected.clone();
    want[MIB as usize..MIB as usize + 4096].fill(0x99);
    assert!(read_all(&reopened, 6) == want);
}
