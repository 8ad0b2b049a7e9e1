//! Real mounts with a hand-written serve loop: the mount, the session fd and its clones, the
//! request buffer layout and the reply path, without the export or the runtime — what
//! `fuse::mount`, `fuse::sys` and `fuse::transport::buf` promise, seen from the kernel's side.
//! Needs root (or fusermount3) and `/dev/fuse`: a loud SKIP without, a failure under `CI=true`.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use fuse::mount::{Mount, MountError, MountMethod, MountOptions};
use fuse::protocol::abi::*;
use fuse::protocol::reply::{self, InitConfig, Negotiated, Reply};
use fuse::protocol::request::{self, Operation, Request};
use fuse::sys::{self, DevReady, ReadError};
use fuse::transport::buf::RequestBuf;
use zerocopy::IntoBytes;

/// Whether FUSE tests can run here; prints a loud SKIP (or fails under `CI=true`).
fn fuse_available() -> bool {
    if Path::new(sys::DEV_FUSE).exists() {
        return true;
    }
    skip_or_fail("/dev/fuse absent");
    false
}

fn skip_or_fail(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}, and CI=true requires the FUSE tests to run");
    }
    eprintln!("SKIP: {why}");
}

/// `Mount::new`, or `None` after a SKIP when unprivileged without fusermount3.
fn mount_for_test(path: &Path, opts: &MountOptions) -> Option<Mount> {
    match Mount::new(path, opts) {
        Ok(mount) => Some(mount),
        Err(err @ MountError::FusermountMissing { .. }) => {
            skip_or_fail(&err.to_string());
            None
        }
        Err(MountError::DevFuse(err)) if err.kind() == io::ErrorKind::PermissionDenied => {
            skip_or_fail(&err.to_string());
            None
        }
        Err(err) => panic!("mount failed: {err}"),
    }
}

/// The file a test file system serves: `size` bytes of a pattern.
struct TestFs {
    data: Vec<u8>,
    uid: u32,
    gid: u32,
    minor: AtomicU32,
    /// The kernel's INIT and what we agreed on.
    init: Mutex<Option<(fuse_init_in, Negotiated)>>,
    /// Largest READ size seen.
    max_read_seen: AtomicU32,
}

impl TestFs {
    fn new(size: usize) -> Arc<TestFs> {
        Arc::new(TestFs {
            data: (0..size).map(|i| (i % 251) as u8).collect(),
            uid: sys::getuid(),
            gid: sys::getgid(),
            minor: AtomicU32::new(FUSE_KERNEL_MINOR_VERSION),
            init: Mutex::new(None),
            max_read_seen: AtomicU32::new(0),
        })
    }

    fn attr(&self) -> fuse_attr {
        fuse_attr {
            ino: FUSE_ROOT_ID,
            size: self.data.len() as u64,
            blocks: (self.data.len() as u64).div_ceil(512),
            mode: libc::S_IFREG | 0o600,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            blksize: 4096,
            ..Default::default()
        }
    }

    /// Answers one request the way a minimal export would.
    fn handle(&self, fd: BorrowedFd<'_>, req: &Request<'_>) -> io::Result<()> {
        let unique = req.unique();
        let minor = self.minor.load(SeqCst);
        let send = |reply: Reply<'_>| sys::write_reply(fd, &reply.io_slices());
        match req.op {
            Operation::Init(init) => match reply::negotiate_init(&init, &InitConfig::default()) {
                Ok(out) => {
                    if let Some(n) = out.negotiated() {
                        self.minor.store(n.minor, SeqCst);
                        *self.init.lock().unwrap() = Some((init, *n));
                    }
                    send(Reply::ok(unique, &[out.as_bytes()]))
                }
                Err(errno) => send(Reply::err(unique, errno)),
            },
            Operation::Getattr(_) => {
                let out = fuse_attr_out {
                    attr: self.attr(),
                    ..Default::default()
                };
                send(Reply::ok(unique, &[reply::attr_out_bytes(&out, minor)]))
            }
            Operation::Open(_) => {
                let out = fuse_open_out {
                    fh: 1,
                    open_flags: FOPEN_DIRECT_IO,
                    backing_id: 0,
                };
                send(Reply::ok(unique, &[out.as_bytes()]))
            }
            Operation::Read(arg) => {
                self.max_read_seen.fetch_max(arg.size, SeqCst);
                let len = self.data.len() as u64;
                let start = arg.offset.min(len) as usize;
                let end = arg.offset.saturating_add(u64::from(arg.size)).min(len) as usize;
                send(Reply::ok(unique, &[&self.data[start..end]]))
            }
            Operation::Statfs => {
                let out = fuse_statfs_out {
                    st: fuse_kstatfs {
                        blocks: 1,
                        bsize: 4096,
                        frsize: 4096,
                        namelen: 255,
                        ..Default::default()
                    },
                };
                send(Reply::ok(unique, &[reply::statfs_out_bytes(&out, minor)]))
            }
            Operation::Release(_) | Operation::Flush(_) => send(Reply::ok(unique, &[])),
            _ if !req.op.needs_reply() => Ok(()),
            _ => send(Reply::err(unique, libc::ENOSYS)),
        }
    }
}

/// Per-thread controls of a serve loop.
#[derive(Default)]
struct Loop {
    /// Set by the test: stop reading (the thread acknowledges with `parked`).
    pause: AtomicBool,
    parked: AtomicBool,
    served: AtomicUsize,
}

/// How a serve loop ended: `Ok(requests)` after ENODEV.
type LoopEnd = Result<usize, String>;

/// Serves `fd` until the session ends (ENODEV), for at most a minute.
fn serve(fs: &TestFs, fd: BorrowedFd<'_>, ctl: &Loop) -> LoopEnd {
    let mut buf = RequestBuf::take(reply::DEFAULT_MAX_WRITE).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if ctl.pause.load(SeqCst) {
            ctl.parked.store(true, SeqCst);
            thread::sleep(Duration::from_millis(5));
            continue;
        }
        ctl.parked.store(false, SeqCst);
        match sys::poll_dev(fd, Some(Duration::from_millis(50))) {
            Ok(DevReady::TimedOut) => continue,
            Ok(DevReady::Readable | DevReady::Disconnected) => {}
            Err(err) => return Err(format!("poll: {err}")),
        }
        match buf.read(fd) {
            Ok(_) => {}
            Err(ReadError::Unmounted) => return Ok(ctl.served.load(SeqCst)),
            Err(ReadError::WouldBlock) => continue,
            Err(err) if err.should_retry() => continue,
            Err(err) => return Err(err.to_string()),
        };
        let (head, payload) = buf.request();
        let req = request::parse(head, payload, fs.minor.load(SeqCst))
            .map_err(|e| format!("parse: {e}"))?;
        ctl.served.fetch_add(1, SeqCst);
        fs.handle(fd, &req).map_err(|e| format!("reply: {e}"))?;
    }
    Err("the serve loop did not see ENODEV within a minute".to_owned())
}

/// Starts a serve loop on its own thread; its end arrives on `ends`.
fn spawn_serve(
    fs: &Arc<TestFs>,
    fd: OwnedFd,
    name: &'static str,
    ends: &mpsc::Sender<(&'static str, LoopEnd)>,
) -> Arc<Loop> {
    let ctl = Arc::new(Loop::default());
    let (fs, ctl2, ends) = (Arc::clone(fs), Arc::clone(&ctl), ends.clone());
    thread::spawn(move || {
        let end = serve(&fs, fd.as_fd(), &ctl2);
        let _ = ends.send((name, end));
    });
    ctl
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Reads the whole mountpoint from a helper thread, so that a hung FUSE request fails
/// the test instead of hanging it.
fn read_with_timeout(path: &Path) -> io::Result<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    thread::spawn(move || {
        let _ = tx.send(std::fs::read(path));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("reading the FUSE mount hung")
}

fn report_init(fs: &TestFs) {
    if let Some((init, n)) = *fs.init.lock().unwrap() {
        eprintln!(
            "kernel INIT: {}.{}, max_readahead {}, flags {:#x}, flags2 {:#x}; \
             negotiated minor {}, flags {:#x}, max_write {}, max_pages {}",
            init.major,
            init.minor,
            init.max_readahead,
            init.flags,
            init.flags2,
            n.minor,
            n.flags,
            n.max_write,
            n.max_pages
        );
    }
}

#[test]
fn serves_reads_on_the_session_fd_and_a_clone_then_sees_enodev() {
    if !fuse_available() {
        return;
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_path_buf();
    let Some(mount) = mount_for_test(&path, &MountOptions::default()) else {
        return;
    };
    let fs = TestFs::new(4096);
    let (ends_tx, ends) = mpsc::channel();

    // Queue 0 alone: INIT and a first read.
    let session = mount.fd().try_clone_to_owned().unwrap();
    let q0 = spawn_serve(&fs, session, "session", &ends_tx);
    assert_eq!(read_with_timeout(&path).unwrap(), fs.data);
    assert!(fs.init.lock().unwrap().is_some(), "INIT was answered");
    report_init(&fs);

    // Park queue 0: now only the clone can take requests.
    q0.pause.store(true, SeqCst);
    wait_until("the session queue is parked", || q0.parked.load(SeqCst));
    let clone = sys::clone_dev_fuse(mount.fd()).unwrap();
    let q1 = spawn_serve(&fs, clone, "clone", &ends_tx);
    assert_eq!(read_with_timeout(&path).unwrap(), fs.data);
    assert!(q1.served.load(SeqCst) > 0, "the cloned fd served requests");

    // Both queues together.
    q0.pause.store(false, SeqCst);
    for _ in 0..8 {
        assert_eq!(read_with_timeout(&path).unwrap(), fs.data);
    }

    // While mounted, a second mount on the same path is refused.
    let err = Mount::new(&path, &MountOptions::default()).unwrap_err();
    assert!(matches!(err, MountError::AlreadyFuse { .. }), "{err}");
    assert!(err.to_string().contains("is already a FUSE mount"), "{err}");

    // Unmount: both loops read ENODEV and end.
    let method = mount.method();
    mount.unmount().unwrap();
    let mut ended = Vec::new();
    for _ in 0..2 {
        let (name, end) = ends
            .recv_timeout(Duration::from_secs(20))
            .expect("a serve loop did not end after unmount");
        let served = end.unwrap_or_else(|e| panic!("{name} loop failed: {e}"));
        ended.push((name, served));
    }
    eprintln!("{:?} mount; requests served per queue: {ended:?}", method);
    // The mountpoint is the plain (empty) temp file again.
    assert_eq!(std::fs::read(&path).unwrap(), b"");
}

#[test]
fn large_reads_use_the_negotiated_request_size() {
    if !fuse_available() {
        return;
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    let Some(mount) = mount_for_test(file.path(), &MountOptions::default()) else {
        return;
    };
    let fs = TestFs::new(4 << 20);
    let (ends_tx, ends) = mpsc::channel();
    let session = mount.fd().try_clone_to_owned().unwrap();
    spawn_serve(&fs, session, "session", &ends_tx);

    let (tx, rx) = mpsc::channel();
    let path = file.path().to_path_buf();
    thread::spawn(move || {
        // Page-aligned, or the kernel's page limit splits the read one page earlier.
        let mut storage = vec![0u8; (1 << 20) + 4096];
        let skew = storage.as_ptr().align_offset(4096);
        let buf = &mut storage[skew..skew + (1 << 20)];
        let result = std::fs::File::open(path).and_then(|mut f| f.read(buf));
        let _ = tx.send(result.map(|n| buf[..n].to_vec()));
    });
    let got = rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
    assert_eq!(got, fs.data[..got.len()]);
    let negotiated = fs.init.lock().unwrap().map(|(_, n)| n).unwrap();
    let seen = fs.max_read_seen.load(SeqCst);
    eprintln!(
        "one read(2) of 1 MiB: {} bytes back, largest READ {seen}, negotiated max_pages {}",
        got.len(),
        negotiated.max_pages
    );
    // The kernel caps max_pages at fs.fuse.max_pages_limit (256 by default).
    let limit = std::fs::read_to_string("/proc/sys/fs/fuse/max_pages_limit")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(256);
    let expected = (u32::from(negotiated.max_pages).min(limit) * 4096).min(1 << 20);
    assert_eq!(seen, expected, "READs as large as negotiated");
    assert_eq!(got.len(), 1 << 20);

    mount.unmount().unwrap();
    let (_, end) = ends.recv_timeout(Duration::from_secs(20)).unwrap();
    end.unwrap();
}

#[test]
fn directory_mount_unserved_then_unmounted() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(mount) = mount_for_test(dir.path(), &MountOptions::default()) else {
        return;
    };
    let fd = mount.fd().try_clone_to_owned().unwrap();
    // The kernel queued INIT for us.
    assert_eq!(
        sys::poll_dev(fd.as_fd(), Some(Duration::from_secs(5))).unwrap(),
        DevReady::Readable
    );
    mount.unmount().unwrap();
    assert!(sys::is_disconnected(fd.as_fd()).unwrap());
    let mut buf = RequestBuf::take(4096).unwrap();
    assert!(matches!(buf.read(fd.as_fd()), Err(ReadError::Unmounted)));
}

#[test]
fn unmount_after_an_external_unmount_is_not_an_error() {
    if !fuse_available() {
        return;
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    let Some(mount) = mount_for_test(file.path(), &MountOptions::default()) else {
        return;
    };
    if mount.method() == MountMethod::Syscall {
        let c_path = CString::new(file.path().as_os_str().as_bytes()).unwrap();
        sys::umount_detach(&c_path).unwrap();
    } else {
        let out = Command::new("fusermount3")
            .arg("-u")
            .arg(file.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "fusermount3 -u: {out:?}");
    }
    wait_until("the session sees the unmount", || {
        sys::is_disconnected(mount.fd()).unwrap()
    });
    mount.unmount().unwrap();
}

/// Unmounts a hand-made mount when dropped.
struct Detach(CString);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = sys::umount_detach(&self.0);
    }
}

#[test]
fn stale_fuse_mount_is_reported() {
    if !fuse_available() {
        return;
    }
    if sys::geteuid() != 0 {
        eprintln!("SKIP: stale_fuse_mount_is_reported needs root for a hand-made mount");
        return;
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    let c_path = CString::new(file.path().as_os_str().as_bytes()).unwrap();
    let fd = sys::open_dev_fuse().unwrap();
    let opts = MountOptions::default();
    // A mount as `Mount::new` makes it (mount(2) with the session fd), by hand.
    let data = format!(
        "fd={},rootmode={:o},user_id=0,group_id=0",
        fd.as_raw_fd(),
        libc::S_IFREG
    );
    let c = |s: &str| CString::new(s).unwrap();
    sys::mount(
        &c("coro-fuse-test"),
        &c_path,
        &c("fuse"),
        sys::MsFlags::NOSUID | sys::MsFlags::NODEV,
        &c(&data),
    )
    .unwrap();
    let _guard = Detach(c_path);
    // Closing the only fd aborts the connection: the mount stays, its server is gone.
    drop(fd);
    let err = Mount::new(file.path(), &opts).unwrap_err();
    assert!(matches!(err, MountError::StaleFuse { .. }), "{err}");
}

#[test]
fn fusermount3_hands_over_the_session_fd() {
    if !fuse_available() {
        return;
    }
    if Command::new("fusermount3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: fusermount3 not installed; its protocol is not tested here");
        return;
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    let opts = MountOptions {
        fsname: "with,comma".to_owned(),
        ..Default::default()
    };
    let mount = match Mount::new_with(file.path(), &opts, Some(MountMethod::Fusermount)) {
        Ok(mount) => mount,
        Err(err) => panic!("fusermount3 mount failed: {err}"),
    };
    assert_eq!(mount.method(), MountMethod::Fusermount);
    // The fd we received is the session: it has INIT for us, and it is non-blocking.
    assert_eq!(
        sys::poll_dev(mount.fd(), Some(Duration::from_secs(5))).unwrap(),
        DevReady::Readable
    );
    let mut buf = RequestBuf::take(reply::DEFAULT_MAX_WRITE).unwrap();
    buf.read(mount.fd()).unwrap();
    let (head, payload) = buf.request();
    let req = request::parse(head, payload, FUSE_KERNEL_MINOR_VERSION).unwrap();
    assert!(matches!(req.op, Operation::Init(_)), "{req:?}");
    assert!(matches!(buf.read(mount.fd()), Err(ReadError::WouldBlock)));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts.contains("with,comma") && mounts.contains("fuse.coro-fuse"),
        "fsname and subtype reach the kernel"
    );
    mount.unmount().unwrap();
}
