//! FUSE over io_uring on a real mount: INIT on `/dev/fuse` granting `FUSE_OVER_IO_URING`,
//! ring entries registered on every kernel queue from two threads (each with an AioContext
//! whose ring has 128-byte SQEs), a small in-memory file served over the ring while a client
//! reads and writes it from every CPU; then an outside `umount` that must end every queue.
//! Also: a server thread that exits with its entries still registered (the kernel cancels
//! them when the ring closes; `umount` must not hang), and the refusals (parameter off: INIT
//! has no offer and REGISTER gets `EOPNOTSUPP`; REGISTER before the INIT reply: `EAGAIN`; a
//! payload buffer too small: `EINVAL`, after which the kernel falls back to `/dev/fuse`; a
//! 64-byte SQE: `EINVAL`).
//!
//! Needs root, `/dev/fuse` and `/sys/module/fuse/parameters/enable_uring` on; otherwise each
//! test prints `SKIP: …` and passes, unless `CI=true`. The tests share process-wide settings
//! (`set_ring_sqe128`, the kernel parameter), so they run one at a time (a mutex). Every mount
//! is unmounted (lazily) by a guard even when a test fails.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use fuse::mount::{Mount, MountOptions};
use fuse::protocol::abi::*;
use fuse::protocol::reply::{self, InitConfig, Negotiated, Reply, OFFERED_INIT_FLAGS};
use fuse::protocol::request::{self, Operation, Request};
use fuse::sys::{self, DevReady, ReadError};
use fuse::transport::buf::RequestBuf;
use fuse::transport::uring::{self as ut, RingEntry, RingHandler, UringError};
use zerocopy::IntoBytes;

static SERIAL: Mutex<()> = Mutex::new(());

const FILE_SIZE: usize = 64 * 1024;

fn skip_or_fail(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}, and CI=true requires the FUSE io_uring tests to run");
    }
    eprintln!("SKIP: {why}");
}

/// Whether this machine can run the tests (root, /dev/fuse, enable_uring on).
fn available() -> bool {
    if sys::geteuid() != 0 {
        skip_or_fail("not root");
        return false;
    }
    if !Path::new(sys::DEV_FUSE).exists() {
        skip_or_fail("/dev/fuse absent");
        return false;
    }
    match ut::kernel_enabled() {
        Some(true) => true,
        Some(false) => {
            skip_or_fail(&format!("{} is off", ut::ENABLE_PARAM));
            false
        }
        None => {
            skip_or_fail("the kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING)");
            false
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(&p) && l.contains(" - fuse"))
}

/// Unmounts lazily on drop, whatever happened.
struct LazyUnmount(PathBuf);

impl Drop for LazyUnmount {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.0.as_os_str().as_bytes()) {
            while is_mounted(&self.0) {
                if sys::umount_detach(&c).is_err() {
                    break;
                }
            }
        }
    }
}

/// A mount over a regular file in a temporary directory, with its guard.
struct TestMount {
    mount: Option<Mount>,
    path: PathBuf,
    _guard: LazyUnmount,
    _dir: tempfile::TempDir,
}

fn mount() -> TestMount {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file");
    std::fs::write(&path, b"").unwrap();
    let mount = Mount::new(&path, &MountOptions::default()).expect("mount");
    TestMount {
        mount: Some(mount),
        _guard: LazyUnmount(path.clone()),
        path,
        _dir: dir,
    }
}

impl TestMount {
    fn fd(&self) -> BorrowedFd<'_> {
        self.mount.as_ref().expect("mounted").fd()
    }
}

/// Reads requests on `fd` until one parses (the first one after a mount is INIT).
fn read_one(fd: BorrowedFd<'_>, buf: &mut RequestBuf) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no request on /dev/fuse");
        match sys::poll_dev(fd, Some(Duration::from_millis(50))) {
            Ok(DevReady::TimedOut) => continue,
            Ok(_) => {}
            Err(e) => panic!("poll: {e}"),
        }
        match buf.read(fd) {
            Ok(len) => return len,
            Err(e) if e.should_retry() || matches!(e, ReadError::WouldBlock) => continue,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Reads INIT and answers it, granting io_uring if `uring`. Returns the kernel's 64-bit INIT
/// flags and the negotiation. `before_reply` runs between reading and answering.
fn answer_init(fd: BorrowedFd<'_>, uring: bool, before_reply: impl FnOnce()) -> (u64, Negotiated) {
    let mut buf = RequestBuf::take(reply::DEFAULT_MAX_WRITE).unwrap();
    read_one(fd, &mut buf);
    let (head, payload) = buf.request();
    let req = request::parse(head, payload, FUSE_KERNEL_MINOR_VERSION).expect("parse INIT");
    let Operation::Init(init) = req.op else {
        panic!("first request is not INIT: {:?}", req.op);
    };
    let kernel_flags = u64::from(init.flags) | (u64::from(init.flags2) << 32);
    let mut cfg = InitConfig::default();
    if uring {
        cfg.flags = OFFERED_INIT_FLAGS | FUSE_OVER_IO_URING;
    }
    let out = reply::negotiate_init(&init, &cfg).expect("negotiate");
    let n = *out.negotiated().expect("a session");
    before_reply();
    sys::write_reply(fd, &Reply::ok(req.unique(), &[out.as_bytes()]).io_slices()).unwrap();
    (kernel_flags, n)
}

/// The in-memory file.
struct MemFile {
    data: Mutex<Vec<u8>>,
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

impl MemFile {
    fn new() -> Arc<MemFile> {
        Arc::new(MemFile {
            data: Mutex::new((0..FILE_SIZE).map(pattern).collect()),
        })
    }

    /// Answers `req`, with the reply body built in `buf`.
    fn answer<'b>(&self, req: &Request<'_>, minor: u32, buf: &'b mut Vec<u8>) -> Reply<'b> {
        let unique = req.unique();
        buf.clear();
        match &req.op {
            Operation::Getattr(_) | Operation::Setattr(_) => {
                let out = fuse_attr_out {
                    attr: fuse_attr {
                        ino: FUSE_ROOT_ID,
                        size: FILE_SIZE as u64,
                        blocks: (FILE_SIZE as u64).div_ceil(512),
                        mode: libc::S_IFREG | 0o644,
                        nlink: 1,
                        blksize: 4096,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                buf.extend_from_slice(reply::attr_out_bytes(&out, minor));
            }
            Operation::Lookup { .. } => return Reply::err(unique, libc::ENOENT),
            Operation::Open(_) => {
                let out = fuse_open_out {
                    fh: 1,
                    open_flags: FOPEN_DIRECT_IO,
                    backing_id: 0,
                };
                buf.extend_from_slice(out.as_bytes());
            }
            Operation::Read(arg) => {
                let d = self.data.lock().unwrap();
                let start = (arg.offset as usize).min(d.len());
                let end = (arg.offset as usize + arg.size as usize).min(d.len());
                buf.extend_from_slice(&d[start..end]);
            }
            Operation::Write { arg, data } => {
                let mut d = self.data.lock().unwrap();
                let start = (arg.offset as usize).min(d.len());
                let end = (start + data.len()).min(d.len());
                d[start..end].copy_from_slice(&data[..end - start]);
                let out = fuse_write_out {
                    size: (end - start) as u32,
                    padding: 0,
                };
                buf.extend_from_slice(out.as_bytes());
            }
            Operation::Flush(_) | Operation::Release(_) | Operation::Fsync(_) => {}
            _ => return Reply::err(unique, libc::ENOSYS),
        }
        Reply::ok(unique, &[&buf[..]])
    }
}

/// The ring handler of one entry.
struct Handler {
    fs: Arc<MemFile>,
    minor: u32,
    buf: Vec<u8>,
}

impl RingHandler for Handler {
    fn handle<'h>(&'h mut self, req: &Request<'_>) -> Reply<'h> {
        self.fs.answer(req, self.minor, &mut self.buf)
    }
}

/// Serves `/dev/fuse` (INTERRUPT, FORGET, and everything when the ring is not in use) until
/// ENODEV; returns the opcodes it saw.
fn spawn_dev_reader(
    fd: OwnedFd,
    fs: Arc<MemFile>,
    minor: u32,
) -> thread::JoinHandle<Result<Vec<u32>, String>> {
    thread::spawn(move || {
        let mut buf = RequestBuf::take(reply::DEFAULT_MAX_WRITE).unwrap();
        let mut out = Vec::new();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match sys::poll_dev(fd.as_fd(), Some(Duration::from_millis(50))) {
                Ok(DevReady::TimedOut) => continue,
                Ok(_) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            let _len = match buf.read(fd.as_fd()) {
                Ok(len) => len,
                Err(ReadError::Unmounted) => return Ok(seen),
                Err(e) if e.should_retry() || matches!(e, ReadError::WouldBlock) => continue,
                Err(e) => return Err(e.to_string()),
            };
            let (head, payload) = buf.request();
            let req = request::parse(head, payload, minor).map_err(|e| e.to_string())?;
            seen.push(req.header.opcode);
            if req.op.needs_reply() && !matches!(req.op, Operation::Interrupt(_)) {
                let reply = fs.answer(&req, minor, &mut out);
                sys::write_reply(fd.as_fd(), &reply.io_slices()).map_err(|e| e.to_string())?;
            }
        }
        Err("the /dev/fuse reader saw no ENODEV within a minute".into())
    })
}

/// What a queue thread reports: requests served per (qid, entry), or the first error.
type QueueEnd = Result<Vec<(u16, u64)>, String>;

/// A queue thread: an AioContext with a 128-byte-SQE ring, `entries` ring entries on each
/// of `qids`, one coroutine each, on its own clone of the session fd. With `stop`, it leaves
/// as soon as the flag is set, its commands still in flight; else when every entry ended.
fn spawn_queue_thread(
    session: BorrowedFd<'_>,
    qids: Vec<u16>,
    entries: usize,
    n: Negotiated,
    fs: Arc<MemFile>,
    stop: Option<Arc<AtomicBool>>,
    ends: mpsc::Sender<QueueEnd>,
) {
    let fd = sys::clone_dev_fuse(session).expect("clone /dev/fuse");
    let payload = ut::payload_size(n.max_write, n.max_pages, 4096);
    thread::spawn(move || {
        let end = (|| {
            let ctx = runtime::AioContext::current();
            if !runtime::uring::sqe128_available() {
                return Err("no 128-byte SQE ring".to_owned());
            }
            let fd = Rc::new(fd);
            let mut handles = Vec::new();
            for &qid in &qids {
                for _ in 0..entries {
                    let (fd, fs) = (fd.clone(), fs.clone());
                    handles.push(runtime::spawn(move || {
                        let mut e = RingEntry::new(qid, payload).map_err(|e| e.to_string())?;
                        let mut h = Handler {
                            fs,
                            minor: n.minor,
                            buf: Vec::new(),
                        };
                        ut::co_serve_entry(fd.as_fd(), &mut e, n.minor, &mut h)
                            .map(|served| (qid, served))
                            .map_err(|e| e.to_string())
                    }));
                }
            }
            if let Some(stop) = stop {
                while !stop.load(SeqCst) {
                    ctx.poll(false);
                    thread::sleep(Duration::from_millis(2));
                }
                return Ok(Vec::new());
            }
            let mut out = Vec::new();
            for h in handles {
                out.push(
                    h.join()
                        .map_err(|_| "entry coroutine panicked".to_owned())??,
                );
            }
            Ok(out)
        })();
        let _ = ends.send(end);
    });
}

/// Runs `f` on a helper thread and fails the test if it takes longer than `secs`.
fn with_timeout<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} hung for {secs} s"))
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below the set's capacity (CPU_SETSIZE, 1024) on this machine.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is a valid cpu_set_t of the given size.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(rc, 0, "sched_setaffinity({cpu})");
}

/// Writes a block from every CPU (so every kernel queue gets requests) and reads the file
/// back; returns the expected contents and the file as read.
fn client(path: PathBuf, nr_cpus: usize) -> (Vec<u8>, Vec<u8>) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut expect: Vec<u8> = (0..FILE_SIZE).map(pattern).collect();
    for cpu in 0..nr_cpus {
        pin_to_cpu(cpu);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let block: Vec<u8> = (0..8192).map(|i| (i * 7 + cpu * 13 + 1) as u8).collect();
        let at = 4096 + cpu * 8192;
        f.seek(SeekFrom::Start(at as u64)).unwrap();
        f.write_all(&block).expect("write");
        expect[at..at + block.len()].copy_from_slice(&block);
        let mut back = vec![0u8; block.len()];
        f.seek(SeekFrom::Start(at as u64)).unwrap();
        f.read_exact(&mut back).expect("read back");
        assert_eq!(back, block, "read back on cpu {cpu}");
    }
    let got = std::fs::read(&path).expect("read all");
    (expect, got)
}

#[test]
fn serves_a_file_over_the_ring_on_every_queue_and_umount_ends_the_queues() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !available() {
        return;
    }
    runtime::ring::set_ring_sqe128(true);
    let nr = ut::possible_cpus().expect("possible cpus");
    let m = mount();
    let (offered, n) = answer_init(m.fd(), true, || {});
    ut::check_offered(offered).expect("INIT offers io_uring");
    assert_ne!(n.flags & FUSE_OVER_IO_URING, 0, "granted");
    eprintln!(
        "INIT: kernel flags {offered:#x}, granted {:#x}, minor {}, max_write {}, max_pages {}, \
         payload {} bytes, {nr} queue(s)",
        n.flags,
        n.minor,
        n.max_write,
        n.max_pages,
        ut::payload_size(n.max_write, n.max_pages, 4096)
    );
    let fs = MemFile::new();
    let dev = spawn_dev_reader(sys::clone_dev_fuse(m.fd()).unwrap(), fs.clone(), n.minor);

    // Two queue threads share the kernel queues: qid % 2.
    let (tx, rx) = mpsc::channel();
    let threads = 2.min(nr);
    for t in 0..threads {
        let qids: Vec<u16> = (0..nr as u16)
            .filter(|q| *q as usize % threads == t)
            .collect();
        spawn_queue_thread(m.fd(), qids, 2, n, fs.clone(), None, tx.clone());
    }

    let path = m.path.clone();
    let (expect, got) = with_timeout(30, "the client", move || client(path, nr));
    assert_eq!(got.len(), FILE_SIZE);
    assert!(got == expect, "file contents differ from what was written");

    // Umount from outside while every entry waits in the kernel.
    let path = m.path.clone();
    let st = with_timeout(20, "umount", move || {
        Command::new("umount").arg(&path).status().expect("umount")
    });
    assert!(st.success(), "umount: {st}");
    let mut served = vec![0u64; nr];
    for _ in 0..threads {
        let end = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a queue thread did not end after umount");
        for (qid, s) in end.expect("queue thread") {
            served[qid as usize] += s;
        }
    }
    eprintln!("requests served over the ring per queue: {served:?}");
    assert!(
        served.iter().all(|&s| s > 0),
        "every queue served: {served:?}"
    );
    let seen = dev.join().unwrap().expect("/dev/fuse reader");
    eprintln!("opcodes seen on /dev/fuse after INIT: {seen:?}");
    assert!(
        !seen
            .iter()
            .any(|&op| matches!(op, FUSE_READ | FUSE_WRITE | FUSE_GETATTR | FUSE_OPEN)),
        "file requests came over /dev/fuse: {seen:?}"
    );
    assert!(!is_mounted(&m.path));
}

#[test]
fn register_before_init_is_eagain_and_a_thread_exit_with_entries_in_flight_does_not_hang_umount() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !available() {
        return;
    }
    runtime::ring::set_ring_sqe128(true);
    let nr = ut::possible_cpus().expect("possible cpus");
    let m = mount();
    // Our context (a 128-byte-SQE ring) on this thread.
    let _ctx = runtime::AioContext::current();
    let early = sys::clone_dev_fuse(m.fd()).unwrap();
    let (_, n) = answer_init(m.fd(), true, || {
        let r = runtime::spawn(move || {
            let mut e = RingEntry::new(0, 1 << 20).unwrap();
            e.co_register(early.as_fd())
        })
        .join()
        .unwrap();
        match r {
            Err(UringError::Kernel { errno, .. }) => assert_eq!(errno, libc::EAGAIN),
            other => panic!("REGISTER before the INIT reply: {other:?}"),
        }
    });
    let fs = MemFile::new();
    let dev = spawn_dev_reader(sys::clone_dev_fuse(m.fd()).unwrap(), fs.clone(), n.minor);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    spawn_queue_thread(
        m.fd(),
        (0..nr as u16).collect(),
        1,
        n,
        fs,
        Some(stop.clone()),
        tx,
    );
    let path = m.path.clone();
    let len = with_timeout(20, "stat over the ring", move || {
        std::fs::metadata(path).expect("stat").len()
    });
    assert_eq!(len, FILE_SIZE as u64);
    // The queue thread leaves with its REGISTER/COMMIT commands in flight: its ring closes,
    // the kernel cancels them (ENOTCONN), the leaked entries stay allocated.
    stop.store(true, SeqCst);
    rx.recv_timeout(Duration::from_secs(10))
        .expect("queue thread did not leave")
        .expect("queue thread");
    // umount(2) itself, not umount(8): the tool first stats the mountpoint, and that
    // GETATTR would wait forever on a queue whose entries are gone (the kernel keeps the
    // connection and queues requests until it is aborted; see docs/fuse-uring.md).
    let path = CString::new(m.path.as_os_str().as_bytes()).unwrap();
    let rc = with_timeout(20, "umount(2) after the queue thread left", move || {
        // SAFETY: a NUL-terminated path; no flags.
        let rc = unsafe { libc::umount2(path.as_ptr(), 0) };
        if rc == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    });
    assert_eq!(rc, 0, "umount2 errno");
    dev.join().unwrap().expect("/dev/fuse reader");
    assert!(!is_mounted(&m.path));
}

/// Restores the kernel parameter on drop.
struct ParamGuard(&'static str);

impl Drop for ParamGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(ut::ENABLE_PARAM, self.0);
    }
}

#[test]
fn refusals_give_clear_errors() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !available() {
        return;
    }
    let nr = ut::possible_cpus().expect("possible cpus");

    // 1. Parameter off: INIT does not offer io_uring, and REGISTER is refused.
    {
        let _restore = ParamGuard("1");
        std::fs::write(ut::ENABLE_PARAM, "0").expect("turn enable_uring off");
        runtime::ring::set_ring_sqe128(true);
        let m = mount();
        let (offered, n) = answer_init(m.fd(), true, || {});
        assert!(matches!(
            ut::check_offered(offered),
            Err(UringError::NotOffered)
        ));
        assert_eq!(
            n.flags & FUSE_OVER_IO_URING,
            0,
            "not granted when not offered"
        );
        let fd = sys::clone_dev_fuse(m.fd()).unwrap();
        let r = thread::spawn(move || {
            runtime::spawn(move || {
                let mut e = RingEntry::new(0, 1 << 20).unwrap();
                e.co_register(fd.as_fd()).map_err(|e| e.to_string())
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        let msg = r.expect_err("REGISTER with the parameter off");
        eprintln!("parameter off: {msg}");
        assert!(
            msg.contains("REGISTER") && msg.contains("not supported"),
            "{msg}"
        );
        drop(m);
    }

    // 2. The parameter on, io_uring granted, but a bad REGISTER.
    runtime::ring::set_ring_sqe128(true);
    let m = mount();
    let (_, n) = answer_init(m.fd(), true, || {});
    let fd = Arc::new(sys::clone_dev_fuse(m.fd()).unwrap());
    let max = ut::payload_size(n.max_write, n.max_pages, 4096);
    let fd2 = fd.clone();
    let errnos = thread::spawn(move || {
        let register = |qid: u16, payload: usize| {
            let fd = fd2.clone();
            runtime::spawn(move || {
                let mut e = RingEntry::new(qid, payload).unwrap();
                match e.co_register(fd.as_fd()) {
                    Err(UringError::Kernel { errno, .. }) => errno,
                    other => panic!("expected a refusal, got {other:?}"),
                }
            })
            .join()
            .unwrap()
        };
        // A payload buffer one byte short of the kernel's max_payload_sz.
        let short = register(0, max - 1);
        // A queue id past the last possible CPU.
        let bad_qid = register(nr as u16, max);
        (short, bad_qid)
    })
    .join()
    .unwrap();
    assert_eq!(
        errnos,
        (libc::EINVAL, libc::EINVAL),
        "(short payload, bad qid)"
    );

    // 3. A 64-byte SQE: refused by us (no 128-byte ring) and by the kernel (EINVAL).
    runtime::ring::set_ring_sqe128(false);
    let fd3 = fd.clone();
    let (ours, kernel) = thread::spawn(move || {
        runtime::spawn(move || {
            let mut e = RingEntry::new(0, max).unwrap();
            let ours = matches!(e.co_register(fd3.as_fd()), Err(UringError::NoRing));
            let sqe = io_uring::opcode::UringCmd16::new(
                io_uring::types::Fd(std::os::fd::AsRawFd::as_raw_fd(&*fd3)),
                FUSE_IO_URING_CMD_REGISTER,
            )
            .build();
            // SAFETY: the SQE points at no memory (addr 0): the kernel refuses it first.
            let kernel = unsafe { runtime::uring::co_submit(sqe) }.expect("ring");
            (ours, kernel)
        })
        .join()
        .unwrap()
    })
    .join()
    .unwrap();
    runtime::ring::set_ring_sqe128(true);
    assert!(ours, "co_register on a 64-byte ring is NoRing");
    assert_eq!(
        kernel,
        -libc::EINVAL,
        "the kernel refuses a 64-byte FUSE uring_cmd"
    );

    // After a failed REGISTER the kernel gives up on the ring for this connection: requests
    // come over /dev/fuse again.
    let fs = MemFile::new();
    let dev = spawn_dev_reader(sys::clone_dev_fuse(m.fd()).unwrap(), fs, n.minor);
    let path = m.path.clone();
    let got = with_timeout(20, "read after the failed REGISTER", move || {
        std::fs::read(path).expect("read")
    });
    assert_eq!(got.len(), FILE_SIZE);
    let path = m.path.clone();
    let st = with_timeout(20, "umount", move || {
        Command::new("umount").arg(&path).status().expect("umount")
    });
    assert!(st.success());
    let seen = dev.join().unwrap().expect("/dev/fuse reader");
    assert!(
        seen.contains(&FUSE_READ),
        "READ came over /dev/fuse: {seen:?}"
    );
}
