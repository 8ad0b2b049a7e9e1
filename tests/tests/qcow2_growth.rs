//! Growing a qcow2 export by a number of bytes that is not a multiple of 512. qcow2 stores its
//! size in sectors for QEMU: a growth to `end` must leave the size at `end` rounded *up* to 512
//! (data kept, zeros after), or the bytes past the last whole sector are acknowledged and then
//! lost at the next open (`qemu-img` rounds the size down). A truncate to an unaligned size is
//! refused with EINVAL, as QEMU does. Raw stays byte-granular. `qemu-img` is the oracle.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tests::*;

const MIB: u64 = 1024 * 1024;

/// `qemu-img convert -O raw`.
fn qemu_read(img: &Path, fmt: &str) -> Vec<u8> {
    let raw = img.with_extension("converted.raw");
    sh!("qemu-img", "convert", "-f", fmt, "-O", "raw", img, &raw).ok();
    let v = read_all(&raw);
    fs::remove_file(&raw).expect("remove the converted image");
    v
}

/// The stopped qcow2 export `q` holds `want` (its size too): `qemu-img check` passes,
/// `qemu-img convert` reads it, and so does the export restarted on `mnt`.
fn check_and_restart(q: &Path, mnt: &Path, want: &[u8]) {
    let want_size = want.len() as u64;
    let out = run(tool("qemu-img").args(["check", "-f", "qcow2"]).arg(q));
    assert_eq!(out.code(), Some(0), "qemu-img check: {out}");
    let back = qemu_read(q, "qcow2");
    assert_eq!(back.len() as u64, want_size, "the size qemu-img reads");
    assert_same_bytes(&back, want, "qemu-img convert");
    let mut e = Export::start(q, mnt, &["--growable"]);
    assert_eq!(file_size(e.path()), want_size, "size after a restart");
    assert_same_bytes(&read_all(e.path()), want, "contents after a restart");
    e.stop_ok();
}

/// The reported bug: 700 bytes written at 1 MiB of a 1 MiB growable qcow2 export were
/// acknowledged, but after a restart the size was 1049088 and 188 of them were gone.
#[test]
fn qcow2_growing_write_of_700_bytes_survives_a_restart() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = disk_workdir();
    let q = dir.path().join("g.qcow2");
    sh!("qemu-img", "create", "-q", "-f", "qcow2", &q, "1M").ok();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    let data = random_bytes(700, 700);
    // 1 MiB + 700 rounded up to a whole sector.
    let want_size = MIB + 1024;
    let mut want = vec![0u8; want_size as usize];
    want[MIB as usize..MIB as usize + 700].copy_from_slice(&data);

    let mut e = Export::start(&q, &mnt, &["--growable"]);
    let f = open_rw(e.path());
    assert_eq!(f.write_at(&data, MIB).expect("growing write"), 700);
    f.sync_all().expect("fsync");
    assert_eq!(
        f.metadata().expect("fstat").len(),
        want_size,
        "size after a 700-byte growing write at 1 MiB (qcow2 rounds growth up to 512)"
    );
    drop(f);
    e.stop_ok();

    check_and_restart(&q, &mnt, &want);
}

/// The other ways to grow a qcow2 export (fallocate mode 0, ZERO_RANGE without KEEP_SIZE) round
/// up the same way; a truncate to an unaligned size is EINVAL and changes nothing; an aligned
/// one works. Checked through the mount, by `qemu-img`, and after a restart.
#[test]
fn qcow2_growth_rounds_up_to_a_sector_and_unaligned_truncate_is_refused() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = disk_workdir();
    let q = dir.path().join("g.qcow2");
    create_qcow2(&q, "cluster_size=4096", "1M");
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    let mut e = Export::start(&q, &mnt, &["--growable"]);
    let f = open_rw(e.path());
    let size = || f.metadata().expect("fstat").len();

    fallocate(&f, 0, MIB, 1).expect("fallocate(0) at EOF");
    assert_eq!(size(), MIB + 512, "fallocate(0) of 1 byte at EOF");
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, MIB + 600, 1000).expect("zero range past EOF");
    assert_eq!(
        size(),
        MIB + 1600_u64.next_multiple_of(512),
        "ZERO_RANGE past EOF"
    );
    let before = size();
    let err = f
        .set_len(before + 100)
        .expect_err("an unaligned truncate is refused");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    assert_eq!(size(), before, "a refused truncate changes nothing");
    f.set_len(2 * MIB).expect("an aligned truncate");
    let tail = random_bytes(3, 5);
    f.write_all_at(&tail, 2 * MIB)
        .expect("growing write of 5 bytes");
    let want_size = 2 * MIB + 512;
    assert_eq!(size(), want_size, "a 5-byte growing write");
    f.sync_all().expect("fsync");
    drop(f);
    e.stop_ok();

    let mut want = vec![0u8; want_size as usize];
    want[2 * MIB as usize..2 * MIB as usize + 5].copy_from_slice(&tail);
    check_and_restart(&q, &mnt, &want);
}

/// Raw stays byte-granular: the same 700-byte write grows the file to exactly 1 MiB + 700,
/// and an unaligned truncate works.
#[test]
fn raw_growing_write_is_byte_granular() {
    require!(fuse_available(), have_tools(&["qemu-img"]));
    let dir = disk_workdir();
    let img = dir.path().join("g.img");
    sparse_image(&img, MIB);
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").expect("mountpoint");
    let data = random_bytes(700, 700);
    let mut e = Export::start(&img, &mnt, &["--growable", "-f", "raw"]);
    let f = open_rw(e.path());
    assert_eq!(f.write_at(&data, MIB).expect("growing write"), 700);
    f.sync_all().expect("fsync");
    assert_eq!(f.metadata().expect("fstat").len(), MIB + 700);
    f.set_len(MIB + 701)
        .expect("an unaligned truncate of a raw export");
    drop(f);
    e.stop_ok();
    let mut want = vec![0u8; (MIB + 701) as usize];
    want[MIB as usize..MIB as usize + 700].copy_from_slice(&data);
    assert_same_bytes(&read_all(&img), &want, "the raw file");
    let mut e = Export::start(&img, &mnt, &["--growable", "-f", "raw"]);
    assert_eq!(file_size(e.path()), MIB + 701, "size after a restart");
    assert_same_bytes(&read_all(e.path()), &want, "contents after a restart");
    e.stop_ok();
}
