//! Image locking: coro-fuse against itself, and against the real qemu-io / qemu-img.
//!
//! OFD locks belong to an open file, not to a process, so two opens in this one test process
//! conflict exactly like two coro-fuse processes would.
//!
//! The tests run one at a time ([`serial`]): spawning qemu-io forks this process, and between
//! `fork` and `exec` the child holds a copy of every descriptor — and so every OFD lock — of the
//! parent (`O_CLOEXEC` only closes them at `exec`). A test that closes an image and reopens it
//! while another test forks can then find its own old lock still held.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::Duration;

use block::{open_image, BlockError, FileDriver, FileOptions, Format, OpenOptions, Perm};
use common::{co, disk_dir, image, pattern, skip};

/// Serialises the tests of this binary; see the module documentation.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn rw() -> OpenOptions {
    OpenOptions {
        format: Format::Raw,
        ..OpenOptions::default()
    }
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..rw()
    }
}

fn force_share() -> OpenOptions {
    OpenOptions {
        force_share: true,
        ..rw()
    }
}

fn expect_locked(path: &Path, opts: &OpenOptions, detail: &str) {
    match open_image(path, opts) {
        Err(e @ BlockError::Locked { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(
                    "image is locked by another process (qemu or coro-fuse); use \
                     -U/--force-share to open it read-only without locking"
                ),
                "{msg}"
            );
            assert!(
                msg.contains(&path.display().to_string()),
                "names the file: {msg}"
            );
            assert!(msg.contains(detail), "expected {detail:?} in {msg}");
            assert_eq!(e.errno(), libc::EAGAIN);
        }
        Err(e) => panic!("expected a lock conflict, got: {e}"),
        Ok(_) => panic!("{opts:?} open of a locked image succeeded"),
    }
}

#[test]
fn a_second_open_is_refused_and_force_share_is_allowed() {
    let _serial = serial();
    let dir = disk_dir();
    let path = image(dir.path(), "lock.img", &pattern(65_536, 1));
    let first = open_image(&path, &rw()).expect("first open");
    expect_locked(&path, &rw(), "Failed to get \"write\" lock");
    expect_locked(&path, &ro(), "Failed to get shared \"write\" lock");

    let shared = open_image(&path, &force_share()).expect("-U opens without locking");
    assert!(shared.is_read_only(), "-U implies read-only");
    let (a, b) = (first.clone(), shared.clone());
    co(move || {
        a.co_pwrite(0, b"visible").expect("write");
        let mut buf = [0u8; 7];
        b.co_pread(0, &mut buf).expect("read through the -U open");
        assert_eq!(&buf, b"visible");
    });

    // What the lock bytes say, seen from a -U open (which holds none itself).
    let probe = FileDriver::open(
        &path,
        &FileOptions {
            force_share: true,
            ..Default::default()
        },
    )
    .expect("probe");
    let (perm, unshared) = probe.lock_holders().expect("GETLK");
    assert_eq!(
        perm,
        Perm::CONSISTENT_READ.union(Perm::WRITE).union(Perm::RESIZE)
    );
    assert_eq!(unshared, Perm::WRITE.union(Perm::RESIZE));

    drop(first);
    open_image(&path, &rw()).expect("the lock went away with the first open");
}

#[test]
fn read_only_opens_coexist_and_keep_writers_out() {
    let _serial = serial();
    let dir = disk_dir();
    let path = image(dir.path(), "ro-lock.img", &pattern(4096, 2));
    let a = open_image(&path, &ro()).expect("first read-only open");
    let b = open_image(&path, &ro()).expect("a second read-only open");
    expect_locked(&path, &rw(), "Failed to get \"write\" lock");
    drop((a, b));
    open_image(&path, &rw()).expect("writable once the readers are gone");
}

fn have(tool: &str) -> bool {
    match Command::new(tool).arg("--version").output() {
        Ok(out) => out.status.success(),
        Err(_) => false,
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run a qemu tool")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `qemu-io -f raw IMG` reading commands from a pipe: it holds the image (read-write) until
/// its stdin closes. Returns once it has served one read, i.e. once it surely has the image open.
fn hold_with_qemu_io(path: &Path) -> Child {
    let mut child = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-io");
    let stdin = child.stdin.as_mut().expect("stdin");
    stdin.write_all(b"read 0 512\n").expect("send a command");
    stdin.flush().expect("flush");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    assert!(
        line.contains("read 512/512 bytes"),
        "qemu-io did not open the image: {line:?}"
    );
    child
}

fn release(mut child: Child) {
    drop(child.stdin.take()); // EOF: qemu-io quits
    let status = child.wait().expect("wait for qemu-io");
    assert!(status.success(), "qemu-io exited with {status}");
}

#[test]
fn qemu_io_holding_the_image_keeps_coro_fuse_out() {
    let _serial = serial();
    if !have("qemu-io") {
        skip(
            "qemu-io interop",
            "qemu-io is not installed (apt-get install qemu-utils)",
        );
        return;
    }
    let dir = disk_dir();
    let path = image(dir.path(), "qemu-held.img", &pattern(65_536, 3));
    let qemu = hold_with_qemu_io(&path);
    expect_locked(&path, &rw(), "Failed to get shared \"write\" lock");
    expect_locked(&path, &ro(), "Failed to get shared \"write\" lock");
    let shared = open_image(&path, &force_share()).expect("-U still works");
    let data = co(move || {
        let mut buf = vec![0u8; 512];
        shared.co_pread(512, &mut buf).map(|()| buf)
    })
    .expect("read");
    assert_eq!(data, &pattern(65_536, 3)[512..1024]);
    release(qemu);
    open_image(&path, &rw()).expect("free again after qemu-io quit");
}

#[test]
fn coro_fuse_holding_the_image_keeps_qemu_writers_out() {
    let _serial = serial();
    if !have("qemu-io") || !have("qemu-img") {
        skip(
            "qemu-io/qemu-img interop",
            "qemu-io or qemu-img is not installed",
        );
        return;
    }
    let dir = disk_dir();
    let path = image(dir.path(), "ours.img", &pattern(65_536, 4));
    let blk = open_image(&path, &rw()).expect("open");

    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 512"])
        .arg(&path));
    assert!(
        !out.status.success(),
        "qemu-io wrote to an image we hold: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("Failed to get \"write\" lock"),
        "{}",
        text(&out)
    );

    let copy = dir.path().join("copy.img");
    let out = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&path)
        .arg(&copy));
    assert!(
        !out.status.success(),
        "qemu-img convert read an image in use: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("Failed to get shared \"write\" lock"),
        "{}",
        text(&out)
    );

    // Readers that share writing are let in, as they are with QEMU itself.
    let out = run(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 512"])
        .arg(&path));
    assert!(out.status.success(), "qemu-io -r: {}", text(&out));
    let out = run(Command::new("qemu-img")
        .args(["info", "-f", "raw"])
        .arg(&path));
    eprintln!(
        "measured: `qemu-img info` on an image coro-fuse holds read-write: exit {} ({})",
        out.status,
        text(&out).lines().next().unwrap_or("")
    );

    blk.close().expect("close");
    drop(blk);
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 512"])
        .arg(&path));
    assert!(out.status.success(), "after close: {}", text(&out));
}
