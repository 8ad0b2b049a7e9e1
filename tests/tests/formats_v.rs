//! The read-only formats vdi (static, dynamic), vpc (fixed, dynamic) and vhdx (fixed, dynamic)
//! through a real mount, each image made by `qemu-img create` and written by `qemu-io`:
//!
//! - probed (`-f auto`) and exported read-only with `-r`: the mounted file equals `qemu-img
//!   convert -f FMT -O raw`; SEEK_DATA/SEEK_HOLE agree with `qemu-img map` (vdi, vpc) or with
//!   the blocks written (vhdx: QEMU has no block status for it and maps everything as data);
//! - `--snapshot`: writes are accepted and read back, the image file is unchanged byte for
//!   byte after the export stops;
//! - without `-r` or `--snapshot`: the export refuses to start (exit 1), saying to pass `-r` or
//!   `--snapshot`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tests::*;

const MIB: u64 = 1024 * 1024;

/// An image made by qemu-img and written by qemu-io: (format, create options, size, block
/// size for the vhdx layout check).
struct Case {
    fmt: &'static str,
    opts: &'static str,
    size: u64,
}

const CASES: &[Case] = &[
    Case {
        fmt: "vdi",
        opts: "static=off",
        size: 12 * MIB,
    },
    Case {
        fmt: "vdi",
        opts: "static=on",
        size: 8 * MIB,
    },
    Case {
        fmt: "vpc",
        opts: "subformat=dynamic",
        size: 10 * MIB,
    },
    Case {
        fmt: "vpc",
        opts: "subformat=fixed",
        size: 10 * MIB,
    },
    Case {
        fmt: "vhdx",
        opts: "subformat=dynamic,block_size=1M",
        size: 12 * MIB,
    },
    Case {
        fmt: "vhdx",
        opts: "subformat=fixed,block_size=1M",
        size: 8 * MIB,
    },
];

/// Offsets and lengths written by qemu-io (inside any of the sizes above; none ends exactly
/// at the end of the image, which qemu-io refuses for vdi).
const WRITES: &[(u64, u64)] = &[
    (4096, 65536),
    (1536 * 1024, MIB),
    (5 * MIB, 512),
    (7 * MIB + 4096, 4096),
];

fn make(dir: &Path, c: &Case) -> PathBuf {
    let img = dir.join(format!("disk.{}", c.fmt));
    run(tool("qemu-img")
        .args(["create", "-q", "-f", c.fmt, "-o", c.opts])
        .arg(&img)
        .arg(c.size.to_string()))
    .ok();
    let mut io = tool("qemu-io");
    io.args(["-f", c.fmt]);
    for (i, &(off, len)) in WRITES.iter().enumerate() {
        io.args(["-c", &format!("write -P {} {off} {len}", 0x41 + i)]);
    }
    run(io.arg(&img)).ok();
    img
}

fn qemu_raw(img: &Path, fmt: &str) -> Vec<u8> {
    let out = img.with_extension("oracle.raw");
    run(tool("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(img)
        .arg(&out))
    .ok();
    let bytes = read_all(&out);
    fs::remove_file(&out).unwrap();
    bytes
}

/// Data extents, merged: from `qemu-img map -f FMT` for vdi and vpc; for vhdx (QEMU reports
/// all data) the 1 MiB blocks the writes touched (a fixed image's other blocks are in the zero
/// state: QEMU creates them so).
fn data_extents(img: &Path, c: &Case) -> Vec<(u64, u64)> {
    let mut raw: Vec<(u64, u64)> = Vec::new();
    if c.fmt == "vhdx" {
        for &(off, len) in WRITES {
            for b in off / MIB..(off + len).div_ceil(MIB) {
                raw.push((b * MIB, MIB));
            }
        }
        raw.sort_unstable();
        raw.dedup();
    } else {
        let out = sh!("qemu-img", "map", "--output=json", "-f", c.fmt, img).ok();
        let num = |obj: &str, key: &str| -> u64 {
            let at = obj.find(&format!("\"{key}\":")).expect("key") + key.len() + 3;
            let digits: String = obj[at..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().expect("a number")
        };
        for obj in out.stdout.split('{').skip(1) {
            if obj.contains("\"data\": true") {
                raw.push((num(obj, "start"), num(obj, "length")));
            }
        }
    }
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for (start, len) in raw {
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => extents.push((start, len)),
        }
    }
    extents
}

fn mountpoint(dir: &Path) -> PathBuf {
    let mnt = dir.join("mnt");
    fs::write(&mnt, b"").unwrap();
    mnt
}

/// Read-only export: probed, bytes and seeks as QEMU sees the image.
#[test]
fn read_only_exports_equal_qemu() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    for c in CASES {
        let what = format!("{} {}", c.fmt, c.opts);
        let dir = workdir();
        let img = make(dir.path(), c);
        let want = qemu_raw(&img, c.fmt);
        let mnt = mountpoint(dir.path());
        let mut e = Export::start(&img, &mnt, &["-r"]);
        assert!(
            e.logs().contains(c.fmt),
            "{what}: the log should name the probed format: {}",
            e.logs()
        );
        assert_eq!(file_size(e.path()), want.len() as u64, "{what}: size");
        assert_same_bytes(&read_all(e.path()), &want, &what);
        assert_seek_matches(e.path(), &data_extents(&img, c), want.len() as u64, &what);
        let w = fs::OpenOptions::new().write(true).open(e.path());
        assert!(w.is_err(), "{what}: a read-only export opened for writing");
        e.stop_ok();
    }
}

/// `--snapshot`: writes go to a temporary qcow2 overlay; the image does not change.
#[test]
fn snapshot_accepts_writes_and_leaves_the_image_untouched() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    for c in CASES {
        let what = format!("{} {}", c.fmt, c.opts);
        let dir = workdir();
        let img = make(dir.path(), c);
        let before = read_all(&img);
        let mut want = qemu_raw(&img, c.fmt);
        let mnt = mountpoint(dir.path());
        let tmp = dir.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let tmp2 = tmp.clone();
        let mut e = Export::try_start_with(None, &img, &mnt, &["--snapshot"], |cmd| {
            cmd.env("TMPDIR", &tmp2);
        })
        .unwrap_or_else(|x| panic!("{what}: export did not start: {x}"));
        let f = open_rw(e.path());
        for (i, (off, len)) in [(0u64, 4096usize), (MIB - 100, 300), (3 * MIB, 100_000)]
            .into_iter()
            .enumerate()
        {
            let data = random_bytes(i as u64 + 1, len);
            f.write_all_at(&data, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
        drop(f);
        assert_same_bytes(&read_all(e.path()), &want, &what);
        e.stop_ok();
        assert!(read_all(&img) == before, "{what}: the image changed");
        assert_eq!(
            fs::read_dir(&tmp).unwrap().count(),
            0,
            "{what}: overlay left behind"
        );
    }
}

/// A writable export of a read-only format is refused at start, naming the way out.
#[test]
fn writable_export_is_refused_with_the_way_out() {
    require!(fuse_available(), have_tools(&["qemu-img", "qemu-io"]));
    for c in CASES.iter().step_by(2) {
        let dir = workdir();
        let img = make(dir.path(), c);
        let before = read_all(&img);
        let mnt = mountpoint(dir.path());
        for extra in [&[][..], &["-f", c.fmt][..]] {
            let mut args = vec![arg(&img), arg(&mnt)];
            args.extend(extra.iter().map(std::ffi::OsString::from));
            let out = coro_fuse_expect_exit(&args, Some(&mnt));
            assert_eq!(out.code(), Some(1), "{out}");
            assert!(
                out.stderr.contains(c.fmt)
                    && out.stderr.contains("-r")
                    && out.stderr.contains("--snapshot"),
                "the error should name the format and the way out: {out}"
            );
            assert_eq!(fuse_mounts_at(&mnt), 0);
        }
        assert!(read_all(&img) == before, "the image changed");
    }
}
