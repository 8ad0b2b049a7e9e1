//! Daemon mode: `--daemonize` returns once the mount is live (or fails as the foreground run
//! would), `--pidfile`, and systemd's `NOTIFY_SOCKET` (READY=1, STOPPING=1).

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tests::*;

/// Leaves nothing behind, even when a test fails: unmounts the mountpoint and kills the pid
/// in the pidfile.
struct Guard {
    mnt: PathBuf,
    pidfile: PathBuf,
    base: usize,
}

impl Guard {
    fn new(mnt: &Path, pidfile: &Path) -> Guard {
        Guard {
            mnt: mnt.to_path_buf(),
            pidfile: pidfile.to_path_buf(),
            base: fuse_mounts_at(mnt),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        detach_fuse_mounts(&self.mnt, self.base);
        if let Some(pid) = read_pid(&self.pidfile) {
            if process_name(pid).as_deref() == Some("coro-fuse") {
                kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn read_pid(pidfile: &Path) -> Option<u32> {
    fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// `/proc/PID/comm`, if the process exists (and is not a zombie we could mistake: comm of a
/// zombie still reads, so callers check the mount too).
fn process_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised name; a zombie ("Z") has exited.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// An empty regular file `mnt` in `dir`, to mount over.
fn mountpoint_in(dir: &Path) -> PathBuf {
    let mnt = dir.join("mnt");
    fs::write(&mnt, b"").unwrap();
    mnt
}

/// A foreground export whose `NOTIFY_SOCKET` is `socket`.
fn start_notifying<S: AsRef<std::ffi::OsStr>>(
    img: &Path,
    mnt: &Path,
    args: &[S],
    socket: &std::ffi::OsStr,
) -> Export {
    Export::try_start_with(None, img, mnt, args, |c| {
        c.env("NOTIFY_SOCKET", socket);
    })
    .unwrap_or_else(|x| panic!("export did not start: {x}"))
}

/// Runs `coro-fuse --daemonize --pidfile PIDFILE IMG MNT` and returns what the command (the
/// parent) printed and how it exited.
fn daemonize(img: &Path, mnt: &Path, pidfile: &Path) -> Output {
    run_timeout(
        coro_fuse()
            .arg("--daemonize")
            .arg("--pidfile")
            .arg(pidfile)
            .arg(img)
            .arg(mnt),
        Duration::from_secs(15),
    )
}

#[test]
fn daemonize_returns_once_mounted_and_sigterm_cleans_up() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("d.img");
    let data = random_image(&img, 1 << 20, 14);
    let mnt = mountpoint_in(dir.path());
    let pidfile = dir.path().join("coro-fuse.pid");
    let _guard = Guard::new(&mnt, &pidfile);
    let base = fuse_mounts_at(&mnt);

    let t0 = Instant::now();
    let out = daemonize(&img, &mnt, &pidfile);
    // Checked at once: no waiting for the mount.
    let mounted = fuse_mounts_at(&mnt) > base;
    assert_eq!(out.code(), Some(0), "--daemonize should exit 0: {out}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "--daemonize took {:?}",
        t0.elapsed()
    );
    assert!(mounted, "not mounted when --daemonize returned: {out}");
    assert!(out.stdout.contains("exported"), "{out}");

    let text = fs::read_to_string(&pidfile).expect("pidfile written");
    assert!(text.ends_with('\n'), "pidfile {text:?}");
    let pid: u32 = text.trim().parse().expect("pidfile holds a pid");
    assert!(alive(pid), "pid {pid} from the pidfile is not running");
    assert_eq!(process_name(pid).as_deref(), Some("coro-fuse"));

    assert!(
        read_all(&mnt) == data,
        "data read through the export differs"
    );

    kill(pid, libc::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || fuse_mounts_at(&mnt) == base),
        "still mounted 10 s after SIGTERM"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !pidfile.exists() && !alive(pid)),
        "after SIGTERM: pidfile exists: {}, pid {pid} alive: {}",
        pidfile.exists(),
        alive(pid)
    );
}

#[test]
fn daemonize_with_a_missing_image_fails_with_the_error() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("missing.img");
    let mnt = mountpoint_in(dir.path());
    let pidfile = dir.path().join("coro-fuse.pid");
    let _guard = Guard::new(&mnt, &pidfile);
    let base = fuse_mounts_at(&mnt);

    let t0 = Instant::now();
    let out = daemonize(&img, &mnt, &pidfile);
    assert_eq!(out.code(), Some(1), "start failure is exit 1: {out}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(
        out.stderr.contains("missing.img"),
        "the error should name the image: {out}"
    );
    assert_eq!(fuse_mounts_at(&mnt), base, "mounted after a failed start");
    assert!(!pidfile.exists(), "pidfile written for a failed start");

    // Bad arguments: 2, as in the foreground.
    let out = run_timeout(
        coro_fuse()
            .arg("--daemonize")
            .arg("--threads")
            .arg("0")
            .arg(&img)
            .arg(&mnt),
        Duration::from_secs(15),
    );
    assert_eq!(out.code(), Some(2), "bad arguments are exit 2: {out}");
}

#[test]
fn notify_socket_gets_ready_and_stopping() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("n.img");
    sparse_image(&img, 1 << 20);
    let mnt = mountpoint_in(dir.path());
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let pidfile = dir.path().join("fg.pid");

    let mut e = start_notifying(
        &img,
        &mnt,
        &["--pidfile".as_ref(), pidfile.as_os_str()],
        sock_path.as_os_str(),
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 10 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg:?}");
    assert!(!msg.contains("MAINPID"), "foreground: no MAINPID: {msg:?}");
    assert!(e.is_mounted(), "READY=1 before the mount is live");
    // Foreground --pidfile: the export's own pid.
    assert_eq!(read_pid(&pidfile), Some(e.pid()), "{}", e.logs());

    let x = e.stop_ok();
    let n = sock.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("STOPPING=1"), "{msg:?}\n{x}");
    assert!(!pidfile.exists(), "pidfile left after a clean stop");
}

#[test]
fn notify_failure_does_not_fail_the_export() {
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("n.img");
    sparse_image(&img, 1 << 20);
    let mnt = mountpoint_in(dir.path());
    let nobody = dir.path().join("nobody-listens.sock");
    let mut e = start_notifying(&img, &mnt, NO_ARGS, nobody.as_os_str());
    assert!(
        wait_until(Duration::from_secs(5), || e
            .stderr()
            .contains("NOTIFY_SOCKET")),
        "no warning about the notify socket\n{}",
        e.logs()
    );
    e.stop_ok();
}

#[test]
fn notify_socket_may_be_abstract() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    require!(fuse_available());
    let dir = workdir();
    let img = dir.path().join("a.img");
    sparse_image(&img, 1 << 20);
    let mnt = mountpoint_in(dir.path());
    let name = format!("coro-fuse-test-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut e = start_notifying(&img, &mnt, NO_ARGS, format!("@{name}").as_ref());
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 10 s");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    e.stop_ok();
}
