//! `coro-fuse nbd+unix:///…?socket=… MNT`: an NBD export served by `qemu-nbd` or `nbdkit`,
//! mounted and used by real clients. The oracle is the image file qemu-nbd serves (read
//! after the server is gone) and `qemu-img map` of it; nbdkit's delay filter holds requests
//! so that the server can be killed mid-I/O. Both engines (`--engine async` reaches the driver
//! through the coroutine bridge).

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tests::*;

/// A server process, killed when dropped.
struct Server {
    child: Child,
    uri: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_socket(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(sock).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the NBD server exited: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "no NBD server at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `qemu-nbd -t -f raw -k SOCK [EXTRA] IMG`, persistent (it outlives each client).
fn qemu_nbd(img: &Path, sock: &Path, extra: &[&str]) -> Server {
    let _ = fs::remove_file(sock);
    let mut child = tool("qemu-nbd")
        .args(["-t", "-f", "raw", "-k"])
        .arg(sock)
        .args(extra)
        .arg(img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    wait_socket(sock, &mut child);
    Server {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    }
}

fn nbdkit(sock: &Path, args: &[&str]) -> Server {
    let _ = fs::remove_file(sock);
    let mut child = tool("nbdkit")
        .args(["-f", "-U"])
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    wait_socket(sock, &mut child);
    Server {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    }
}

/// Mounts `uri` at a regular file `dir/mnt` (the URI is passed as it is, not as a path).
fn mount(dir: &Path, uri: &str, args: &[&str]) -> Export {
    let mnt = dir.join("mnt");
    fs::write(&mnt, b"").unwrap();
    match Export::try_start_in(Some(dir), Path::new(uri), &mnt, args) {
        Ok(e) => e,
        Err(x) => panic!("export did not start: {x}"),
    }
}

fn served_image(dir: &Path, size: usize) -> (PathBuf, Vec<u8>) {
    let img = dir.join("served.img");
    let data = random_image(&img, size, 11);
    (img, data)
}

fn reads_and_writes_like_the_served_image(engine: &str) {
    require!(
        fuse_available(),
        have_tools(&["qemu-nbd", "fio", "qemu-img"])
    );
    let dir = workdir();
    let (img, data) = served_image(dir.path(), 16 << 20);
    let srv = qemu_nbd(&img, &dir.path().join("nbd.sock"), &[]);
    let mut e = mount(dir.path(), &srv.uri, &["--engine", engine]);
    // The mounted line comes just after INIT, a moment after the mount appears.
    wait_until(Duration::from_secs(15), || e.stdout().contains("exported"));
    assert!(
        e.stdout().contains("(nbd, 16 MiB, read-write)"),
        "{}",
        e.stdout()
    );
    assert_same_bytes(&read_all(e.path()), &data, "the export before any write");
    fio_randwrite_verify(dir.path(), &e, 4 << 20);
    // dd with odd sizes, then what the mount shows must be what the server's file holds.
    let f = open_rw(e.path());
    let junk = random_bytes(5, 300_000);
    f.write_all_at(&junk, 12_345).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let seen = read_all(e.path());
    e.stop_ok();
    drop(srv);
    assert_same_bytes(
        &read_all(&img),
        &seen,
        "the served file after the export stopped",
    );
    assert_eq!(&seen[12_345..12_345 + junk.len()], &junk[..]);
}

#[test]
fn reads_and_writes_like_the_served_image_coroutine() {
    reads_and_writes_like_the_served_image("coroutine");
}

#[test]
fn reads_and_writes_like_the_served_image_async() {
    reads_and_writes_like_the_served_image("async");
}

#[test]
fn qemu_img_compare_finds_the_export_equal_to_the_image() {
    require!(fuse_available(), have_tools(&["qemu-nbd", "qemu-img"]));
    let dir = workdir();
    let (img, _) = served_image(dir.path(), 8 << 20);
    let srv = qemu_nbd(&img, &dir.path().join("nbd.sock"), &["-r"]);
    let e = mount(dir.path(), &srv.uri, &[]);
    let out = run(tool("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(e.path()));
    assert!(out.success(), "{out}");
}

/// The data/hole extents of `path` by SEEK_DATA/SEEK_HOLE.
fn seek_map(path: &Path, size: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).unwrap();
    let mut out = Vec::new();
    let mut off = 0i64;
    while (off as u64) < size {
        // SAFETY: lseek on an fd we own; no memory is passed.
        let data = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE from data at {data}: {hole}");
        out.push((data as u64, (hole - data) as u64));
        off = hole;
    }
    out
}

#[test]
fn seek_data_and_hole_match_qemu_img_map() {
    require!(fuse_available(), have_tools(&["qemu-nbd", "qemu-img"]));
    let dir = workdir();
    if !supports_holes(dir.path()) {
        skip("the work directory has no holes");
        return;
    }
    let img = dir.path().join("sparse.img");
    sparse_image(&img, 16 << 20);
    let f = open_rw(&img);
    for (off, len) in [
        (0u64, 8192usize),
        (3 << 20, 65536),
        (9 << 20, 4096),
        ((16 << 20) - 4096, 4096),
    ] {
        f.write_all_at(&random_bytes(off, len), off).unwrap();
    }
    drop(f);
    let srv = qemu_nbd(&img, &dir.path().join("nbd.sock"), &["-r"]);
    let e = mount(dir.path(), &srv.uri, &[]);
    let json = run(tool("qemu-img")
        .args(["map", "--output=json", "-U", "-f", "raw"])
        .arg(&img))
    .ok()
    .stdout;
    // Merge qemu-img's data extents.
    let mut want: Vec<(u64, u64)> = Vec::new();
    for obj in json.split('{').skip(1) {
        let num = |key: &str| -> u64 {
            let at = obj.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
            obj[at..]
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap()
        };
        if obj.contains("\"data\": true") {
            let (s, l) = (num("start"), num("length"));
            match want.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => want.push((s, l)),
            }
        }
    }
    assert!(want.len() >= 3, "the image has data extents: {want:?}");
    assert_eq!(seek_map(e.path(), 16 << 20), want);
}

#[test]
fn a_read_only_server_makes_a_read_only_mount() {
    require!(fuse_available(), have_tools(&["qemu-nbd"]));
    let dir = workdir();
    let (img, data) = served_image(dir.path(), 4 << 20);
    let srv = qemu_nbd(&img, &dir.path().join("nbd.sock"), &["-r"]);
    let e = mount(dir.path(), &srv.uri, &[]);
    wait_until(Duration::from_secs(15), || e.stdout().contains("exported"));
    assert!(e.stdout().contains("read-only"), "{}", e.stdout());
    assert!(e.logs().contains("exports it read-only"), "{}", e.logs());
    assert!(fs::OpenOptions::new().write(true).open(e.path()).is_err());
    assert_same_bytes(&read_all(e.path()), &data, "the read-only export");
}

#[test]
fn a_directory_mountpoint_shows_the_export_by_name() {
    require!(fuse_available(), have_tools(&["qemu-nbd"]));
    let dir = workdir();
    let (img, data) = served_image(dir.path(), 1 << 20);
    let sock = dir.path().join("nbd.sock");
    let srv = qemu_nbd(&img, &sock, &["-r", "-x", "disk0"]);
    let mnt = dir.path().join("mntdir");
    fs::create_dir(&mnt).unwrap();
    let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
    let e = Export::try_start_in(Some(dir.path()), Path::new(&uri), &mnt, NO_ARGS)
        .unwrap_or_else(|x| panic!("{x}"));
    assert_same_bytes(&read_all(&mnt.join("disk0")), &data, "MNT/disk0");
    drop(e);
    drop(srv);
}

#[test]
fn a_server_killed_mid_read_gives_eio_not_a_hang() {
    require!(fuse_available(), have_tools(&["nbdkit"]));
    let dir = workdir();
    let srv = nbdkit(
        &dir.path().join("nbd.sock"),
        &["--filter=delay", "memory", "16M", "rdelay=5"],
    );
    let mut e = mount(dir.path(), &srv.uri, &[]);
    let path = e.path().to_owned();
    let reader = std::thread::spawn(move || {
        // FOPEN_DIRECT_IO: every read reaches the export, no page cache in between.
        let mut f = fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; 4096];
        let start = Instant::now();
        (f.read(&mut buf).map_err(|e| e.raw_os_error()), start)
    });
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    drop(srv);
    let (r, _) = reader.join().unwrap();
    assert_eq!(r.err(), Some(Some(libc::EIO)), "the read fails with EIO");
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "{:?}",
        killed.elapsed()
    );
    assert!(e.logs().contains("connection closed"), "{}", e.logs());
    e.stop_ok();
}

#[test]
fn reconnect_delay_waits_for_a_restarted_server_then_fails() {
    require!(fuse_available(), have_tools(&["qemu-nbd"]));
    let dir = workdir();
    let (img, data) = served_image(dir.path(), 4 << 20);
    let sock = dir.path().join("nbd.sock");
    let srv = qemu_nbd(&img, &sock, &[]);
    let mut e = mount(dir.path(), &srv.uri, &["--reconnect-delay", "4"]);
    let read_at = |off: u64| {
        let path = e.path().to_owned();
        std::thread::spawn(move || {
            let f = fs::File::open(&path).unwrap();
            let mut buf = vec![0u8; 65536];
            let start = Instant::now();
            let r = f.read_exact_at(&mut buf, off).map(|()| buf);
            (r.map_err(|e| e.raw_os_error()), start.elapsed())
        })
    };
    // Within the delay: the read waits, then completes from the restarted server.
    drop(srv);
    let pending = read_at(1 << 20);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!pending.is_finished(), "the read waits for the reconnect");
    let srv = qemu_nbd(&img, &sock, &[]);
    let (r, _) = pending.join().unwrap();
    assert_eq!(r.unwrap(), data[1 << 20..(1 << 20) + 65536]);
    assert!(e.logs().contains("reconnected"), "{}", e.logs());
    // Beyond it: EIO after about the delay.
    drop(srv);
    let (r, took) = read_at(2 << 20).join().unwrap();
    assert_eq!(r.err(), Some(Some(libc::EIO)));
    assert!(
        took > Duration::from_secs(3) && took < Duration::from_secs(8),
        "EIO after {took:?}; the delay is 4 s"
    );
    e.stop_ok();
}

#[test]
fn options_without_meaning_for_nbd_are_usage_errors() {
    let uri = "nbd+unix:///?socket=/nonexistent.sock";
    for args in [
        vec!["--create", "1M"],
        vec!["-f", "qcow2"],
        vec!["--snapshot"],
        vec!["--growable"],
    ] {
        let mut all = args.clone();
        all.extend([uri, "/nonexistent-mnt"]);
        let out = coro_fuse_expect_exit(&all, None);
        assert_eq!(out.code(), Some(2), "{args:?}: {out}");
    }
    let out = coro_fuse_expect_exit(&["--reconnect-delay", "3", "/x.img", "/y"], None);
    assert_eq!(out.code(), Some(2), "{out}");
    // A server that is not there: exit 1 naming it.
    let dir = workdir();
    let mnt = dir.path().join("mnt");
    fs::write(&mnt, b"").unwrap();
    let out = coro_fuse_expect_exit(&[uri, mnt.to_str().unwrap()], Some(&mnt));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.all().contains("nonexistent.sock"), "{out}");
}
