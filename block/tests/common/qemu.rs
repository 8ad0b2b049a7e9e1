//! Driving the real `qemu-img`/`qemu-io` from block-level tests, and their outputs as oracles.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use block::{open_image, BlockBackend, BlockStatus, OpenOptions};

use super::{co, skip};

/// Whether qemu-img and qemu-io can run; skips loudly (or fails under CI) when not.
pub fn have_qemu(test: &str) -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: qemu-img/qemu-io are required when CI=true"
        );
        skip(test, "qemu-img or qemu-io not found");
    }
    ok
}

/// Runs a command that must succeed; returns its stdout. A QEMU lock conflict is retried for
/// up to 5 s: the image lock goes with the last reference to the file's fd, which a thread-pool
/// job or an abandoned ring request may still hold for a moment after the driver was dropped.
pub fn run(cmd: &mut Command) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut out = cmd.output().expect("run a qemu tool");
    while !out.status.success()
        && String::from_utf8_lossy(&out.stderr).contains("Failed to get")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
        out = cmd.output().expect("run a qemu tool");
    }
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f qcow2 -o OPTS DIR/NAME SIZE`; returns the path.
pub fn create_qcow2(dir: &Path, name: &str, opts: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", opts])
        .arg(&path)
        .arg(size.to_string()));
    path
}

/// `qemu-img ARGS…` in `dir` (so that relative backing names stay relative).
pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    run(Command::new("qemu-img").current_dir(dir).args(args))
}

/// Runs qemu-io commands (`write -P 0xab 1M 64k`, …) on an image of `format`.
pub fn qemu_io(format: &str, path: &Path, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(path));
}

/// The oracle: `qemu-img convert -O raw` of the image (and its backing chain).
pub fn oracle_bytes(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("oracle.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(path)
        .arg(&raw));
    let bytes = std::fs::read(&raw).expect("read the oracle");
    std::fs::remove_file(&raw).expect("remove the oracle");
    bytes
}

/// `qemu-img map --output=json`: (start, length, data, zero) per extent, for the whole chain.
pub fn oracle_map(path: &Path) -> Vec<(u64, u64, bool, bool)> {
    let json = run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(path));
    let num = |obj: &str, key: &str| -> u64 {
        let at = obj.find(&format!("\"{key}\":")).expect("key") + key.len() + 3;
        let digits: String = obj[at..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().expect("a number")
    };
    let flag = |obj: &str, key: &str| obj.contains(&format!("\"{key}\": true"));
    json.split('{')
        .skip(1)
        .map(|obj| {
            (
                num(obj, "start"),
                num(obj, "length"),
                flag(obj, "data"),
                flag(obj, "zero"),
            )
        })
        .collect()
}

/// Opens an image read-only, format probed.
pub fn open_ro(path: &Path) -> Arc<BlockBackend> {
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    open_image(path, &opts).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Reads the whole image through the backend in requests of assorted sizes.
pub fn read_all(blk: &Arc<BlockBackend>, seed: u64) -> Vec<u8> {
    let b = blk.clone();
    co(move || {
        let size = b.size();
        let mut out = vec![0u8; size as usize];
        let mut rng = super::Lcg(seed);
        let mut pos = 0u64;
        while pos < size {
            let len = match rng.below(3) {
                0 => 1 + rng.below(5000),
                1 => 1 + rng.below(300_000),
                _ => 3 << 20,
            }
            .min(size - pos);
            b.co_pread(pos, &mut out[pos as usize..(pos + len) as usize])
                .unwrap_or_else(|e| panic!("read {pos}+{len}: {e}"));
            pos += len;
        }
        out
    })
}

/// Our block status (through the chain) per 512-byte sector.
pub fn our_map(blk: &Arc<BlockBackend>) -> Vec<BlockStatus> {
    let b = blk.clone();
    co(move || {
        let size = b.size();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < size {
            let (status, n) = b.co_block_status(pos, size - pos).expect("block status");
            assert_ne!(status, BlockStatus::Unallocated, "the backend looks below");
            out.extend(std::iter::repeat_n(status, n.div_ceil(512) as usize));
            pos += n;
        }
        out
    })
}

/// Our block status agrees with `qemu-img map` sector by sector: data is data, the rest zero.
pub fn check_map(blk: &Arc<BlockBackend>, path: &Path) {
    let ours = our_map(blk);
    for (start, len, data, _zero) in oracle_map(path) {
        let want = if data {
            BlockStatus::Data
        } else {
            BlockStatus::Zero
        };
        for s in start / 512..(start + len).div_ceil(512) {
            assert_eq!(ours[s as usize], want, "sector {s} of {}", path.display());
        }
    }
}

/// The first `n` bytes of a file.
pub fn head(path: &Path, n: usize) -> Vec<u8> {
    let mut b = std::fs::read(path).expect("read the image");
    b.truncate(n);
    b
}

/// Overwrites bytes of a file in place.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open to patch");
    f.write_all_at(bytes, offset).expect("patch");
}

/// Where header extension `ty` starts in a qcow2 image (its type field), if present.
pub fn find_extension(path: &Path, ty: u32) -> Option<u64> {
    let h = head(path, 65536);
    let len = u32::from_be_bytes(h[100..104].try_into().ok()?) as usize;
    let mut off = len;
    while off + 8 <= h.len() {
        let t = u32::from_be_bytes(h[off..off + 4].try_into().ok()?);
        let l = u32::from_be_bytes(h[off + 4..off + 8].try_into().ok()?) as usize;
        if t == ty {
            return Some(off as u64);
        }
        if t == 0 {
            return None;
        }
        off += 8 + l.div_ceil(8) * 8;
    }
    None
}

/// `dir/name` as a path.
pub fn at(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// `qemu-img create -q -f FMT -o OPTS DIR/NAME SIZE` (OPTS may be empty); returns the path.
pub fn create(dir: &Path, name: &str, fmt: &str, opts: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", fmt]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    run(cmd.arg(&path).arg(size.to_string()));
    path
}

/// The oracle for an image of a stated format: `qemu-img convert -f FMT -O raw`.
pub fn oracle_bytes_of(path: &Path, fmt: &str) -> Vec<u8> {
    let raw = path.with_extension("oracle.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(path)
        .arg(&raw));
    let bytes = std::fs::read(&raw).expect("read the oracle");
    std::fs::remove_file(&raw).expect("remove the oracle");
    bytes
}

/// `qemu-img info -f FMT`'s virtual size.
pub fn virtual_size(path: &Path, fmt: &str) -> u64 {
    let json = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt])
        .arg(path));
    // The top node's comes last (its children's come first).
    let at = json.rfind("\"virtual-size\":").expect("virtual-size") + 15;
    json[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .expect("a number")
}

/// Our block status agrees with `qemu-img map -f FMT` sector by sector: data is data, the
/// rest zero.
pub fn check_map_of(blk: &Arc<BlockBackend>, path: &Path, fmt: &str) {
    let ours = our_map(blk);
    let json = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", fmt])
        .arg(path));
    for obj in json.split('{').skip(1) {
        let num = |key: &str| -> u64 {
            let at = obj.find(&format!("\"{key}\":")).expect("key") + key.len() + 3;
            obj[at..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .expect("a number")
        };
        let (start, len) = (num("start"), num("length"));
        let want = if obj.contains("\"data\": true") {
            BlockStatus::Data
        } else {
            BlockStatus::Zero
        };
        for s in start / 512..(start + len).div_ceil(512) {
            assert_eq!(ours[s as usize], want, "sector {s} of {}", path.display());
        }
    }
}

/// Opens an image read-only with a stated format.
pub fn open_ro_as(path: &Path, format: block::Format) -> block::Result<Arc<BlockBackend>> {
    let opts = OpenOptions {
        read_only: true,
        format,
        ..OpenOptions::default()
    };
    open_image(path, &opts)
}
