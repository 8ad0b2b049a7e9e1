//! [`block::partition::read_partitions`] on tables made by the real tools: `sfdisk` (MBR with
//! primaries, an extended partition and logicals) and `sgdisk` (GPT with a gap), checked
//! against the numbers the tools were given; then damaged copies (a GPT header byte flipped,
//! two MBR entries made to overlap) are refused, never read as a wrong window.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use block::partition::{read_partitions, Table, TableKind};

const MIB: u64 = 1 << 20;

/// Whether `tool` is there; without it the test is skipped loudly, or fails under `CI=true`.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is missing under CI=true (.ci/run installs it)"
        );
        eprintln!("\n*** SKIPPED: {tool} is not installed ***\n");
    }
    found
}

fn disk(path: &Path, size: u64) {
    fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn parse(path: &Path) -> Result<Option<Table>, block::partition::TableError> {
    let f = fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    read_partitions(&mut |off, buf| f.read_exact_at(buf, off), size)
}

/// (number, offset, size) of each partition.
fn windows(t: &Table) -> Vec<(u32, u64, u64)> {
    t.partitions
        .iter()
        .map(|p| (p.number, p.offset, p.size))
        .collect()
}

#[test]
fn mbr_from_sfdisk() {
    if !have("sfdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    disk(&img, 64 * MIB);
    // Sectors: 1: 2048+16384, 2: 18432+16384, extended from 34816 to the end, logicals 5 and 6.
    let script = "label: dos\nstart=2048, size=16384, type=83\nstart=18432, size=16384, type=83\n\
                  start=34816, type=5\nstart=36864, size=8192, type=83\nstart=47104, size=8192, type=83\n";
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(&img)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    let t = parse(&img).unwrap().expect("a table");
    assert_eq!(t.kind, TableKind::Mbr);
    let s = 512;
    assert_eq!(
        windows(&t),
        vec![
            (1, 2048 * s, 16384 * s),
            (2, 18432 * s, 16384 * s),
            (5, 36864 * s, 8192 * s),
            (6, 47104 * s, 8192 * s),
        ],
        "the extended partition is not listed; logicals are 5 and 6"
    );

    // Entry 2 made to start inside entry 1: refused, no windows.
    let bad = dir.path().join("overlap.img");
    fs::copy(&img, &bad).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&bad).unwrap();
    f.write_all_at(&10000u32.to_le_bytes(), 0x1BE + 16 + 8)
        .unwrap();
    let e = parse(&bad).expect_err("overlapping entries are refused");
    assert!(e.to_string().contains("overlap"), "{e}");
}

#[test]
fn gpt_from_sgdisk() {
    if !have("sgdisk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("gpt.img");
    disk(&img, 64 * MIB);
    let out = Command::new("sgdisk")
        .args([
            "-n",
            "1:2048:+8M",
            "-n",
            "2:0:+4M",
            "-n",
            "4:40960:+4M",
            "-c",
            "1:boot",
        ])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sgdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = parse(&img).unwrap().expect("a table");
    assert_eq!(t.kind, TableKind::Gpt);
    let s = 512;
    // 8M = 16384 sectors; partition 2 starts right after 1; entry 3 is empty (numbering kept).
    assert_eq!(
        windows(&t),
        vec![
            (1, 2048 * s, 16384 * s),
            (2, 18432 * s, 8192 * s),
            (4, 40960 * s, 8192 * s),
        ]
    );
    assert!(
        matches!(&t.partitions[0].kind, block::partition::Kind::Gpt { name, .. } if name == "boot"),
        "{:?}",
        t.partitions[0].kind
    );

    // A flipped byte in the primary header (its disk GUID): the header CRC no longer matches.
    let bad = dir.path().join("crc.img");
    fs::copy(&img, &bad).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&bad)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 512 + 56).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], 512 + 56).unwrap();
    let e = parse(&bad).expect_err("a bad header CRC is refused");
    assert!(e.to_string().contains("CRC"), "{e}");
}

#[test]
fn an_unpartitioned_disk_has_no_table() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("plain.img");
    disk(&img, 4 * MIB);
    assert!(parse(&img).unwrap().is_none());
}
