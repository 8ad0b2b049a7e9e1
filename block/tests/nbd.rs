//! The `nbd` driver against real servers — `qemu-nbd` (the image file it serves is the
//! oracle) and `nbdkit` (memory plugin; error and delay filters) — on Unix sockets and
//! loopback TCP, and against a fake server that lies (wrong cookie, short payload, oversized
//! length, bad magic): every lie is EIO, never a hang or a panic.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::nbd::proto::*;
use block::{open_nbd, BlockBackend, BlockStatus, NbdOptions, OpenOptions};
use common::{co, pattern, Lcg};
use runtime::IoThread;

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

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

impl Server {
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: {tool} is required when CI=true"
        );
        common::skip(test, &format!("{tool} not found"));
    }
    ok
}

/// Waits until something accepts connections at `sock`.
fn wait_unix(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(sock).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the server exited: {st}");
        }
        assert!(Instant::now() < deadline, "no server at {}", sock.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `qemu-nbd -t -k SOCK -f raw IMG` (persistent: it outlives each client).
fn qemu_nbd_unix(img: &Path, sock: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new("qemu-nbd")
        .args(["-t", "-f", "raw", "-k"])
        .arg(sock)
        .args(extra)
        .arg(img)
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    wait_unix(sock, &mut child);
    Server {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    }
}

/// `nbdkit -f -U SOCK ARGS…`.
fn nbdkit(sock: &Path, args: &[&str]) -> Server {
    let mut child = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(sock)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    wait_unix(sock, &mut child);
    Server {
        child,
        uri: format!("nbd+unix:///?socket={}", sock.display()),
    }
}

fn open(uri: &str, delay: Duration) -> Arc<BlockBackend> {
    let nbd = NbdOptions {
        reconnect_delay: delay,
        ..NbdOptions::default()
    };
    open_with(uri, nbd)
}

fn open_with(uri: &str, nbd: NbdOptions) -> Arc<BlockBackend> {
    open_nbd(uri, &OpenOptions::default(), nbd, &[]).expect("open the NBD export")
}

/// Opens on an iothread, so that the reader coroutine lives on a loop that always polls.
fn open_on(io: &IoThread, uri: &str, delay: Duration) -> Arc<BlockBackend> {
    let nbd = NbdOptions {
        reconnect_delay: delay,
        ..NbdOptions::default()
    };
    open_on_with(io, uri, nbd)
}

fn open_on_with(io: &IoThread, uri: &str, nbd: NbdOptions) -> Arc<BlockBackend> {
    let uri = uri.to_owned();
    io.run_sync(move || open_with(&uri, nbd))
}

fn errno(e: &block::BlockError) -> i32 {
    e.errno()
}

fn image(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
    let data = pattern(len, 3);
    (common::image(dir, "disk.img", &data), data)
}

// ---------------------------------------------------------------------------------------------
// qemu-nbd
// ---------------------------------------------------------------------------------------------

#[test]
fn qemu_nbd_reads_writes_zeroes_and_flushes_like_the_file() {
    if !have("qemu-nbd", "qemu_nbd_reads_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, mut model) = image(dir.path(), 4 << 20);
    let srv = qemu_nbd_unix(&img, &dir.path().join("s.sock"), &[]);
    let blk = open(&srv.uri, Duration::ZERO);
    assert_eq!(blk.size(), model.len() as u64);
    assert_eq!(blk.format_name(), "nbd");
    let b = blk.clone();
    let got = co(move || {
        let mut buf = vec![0; 4 << 20];
        b.co_pread(0, &mut buf).map(|()| buf)
    })
    .unwrap();
    assert!(got == model, "the export reads as the file");

    let mut rng = Lcg(7);
    for i in 0..40 {
        let off = rng.below(model.len() as u64 - 70_000);
        let len = 1 + rng.below(70_000) as usize;
        let data = pattern(len, i as u8);
        model[off as usize..off as usize + len].copy_from_slice(&data);
        let b = blk.clone();
        co(move || b.co_pwrite(off, &data)).unwrap();
    }
    let b = blk.clone();
    co(move || b.co_pwrite_zeroes(1 << 20, 200_000, false)).unwrap();
    model[1 << 20..(1 << 20) + 200_000].fill(0);
    let b = blk.clone();
    co(move || b.co_flush()).unwrap();
    assert!(
        std::fs::read(&img).unwrap() == model,
        "the file holds the writes"
    );
    let b = blk.clone();
    co(move || b.close()).unwrap();
}

#[test]
fn qemu_nbd_over_tcp() {
    if !have("qemu-nbd", "qemu_nbd_over_tcp") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, model) = image(dir.path(), 1 << 20);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("qemu-nbd")
        .args([
            "-t",
            "--shared=4",
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-x",
            "disk",
        ])
        .arg(&img)
        .spawn()
        .expect("start qemu-nbd");
    let srv = Server {
        child,
        uri: format!("nbd://127.0.0.1:{port}/disk"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let blk = open(&srv.uri, Duration::ZERO);
    let b = blk.clone();
    let got = co(move || {
        let mut buf = vec![0; 1 << 20];
        b.co_pread(0, &mut buf).map(|()| buf)
    })
    .unwrap();
    assert!(got == model);
    // A name the server does not have is a clear open error.
    let e = open_nbd(
        &format!("nbd://127.0.0.1:{port}/nope"),
        &OpenOptions::default(),
        NbdOptions::default(),
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("no export 'nope'"), "{e}");
}

#[test]
fn block_status_matches_qemu_img_map() {
    if !have("qemu-nbd", "block_status") || !common::qemu::have_qemu("block_status") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    for (off, len) in [(0u64, 4096usize), (1 << 20, 65536), (5 << 20, 12288)] {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&vec![0xab; len], off).unwrap();
    }
    drop(f);
    let srv = qemu_nbd_unix(&img, &dir.path().join("s.sock"), &[]);
    let blk = open(&srv.uri, Duration::ZERO);
    let json = common::qemu::run(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw", "-U"])
            .arg(&img),
    );
    let map = parse_map(&json);
    let b = blk.clone();
    let ours = co(move || {
        let mut out = Vec::new();
        let mut off = 0;
        while off < b.size() {
            let (s, n) = b.co_block_status(off, b.size() - off).unwrap();
            out.push((off, n, s == BlockStatus::Data));
            off += n;
        }
        out
    });
    // Compare byte by byte at 4 KiB granularity.
    let data_at = |list: &[(u64, u64, bool)], at: u64| {
        list.iter()
            .find(|(s, l, _)| *s <= at && at < s + l)
            .map(|e| e.2)
            .unwrap()
    };
    let oracle = map;
    for at in (0..8 << 20).step_by(4096) {
        assert_eq!(
            data_at(&ours, at),
            data_at(&oracle, at),
            "at {at}: {ours:?} vs {oracle:?}"
        );
    }
}

/// `qemu-img map --output=json` → (start, length, data).
fn parse_map(json: &str) -> Vec<(u64, u64, bool)> {
    let num = |obj: &str, key: &str| -> u64 {
        let at = obj.find(&format!("\"{key}\":")).expect("key") + key.len() + 3;
        let digits: String = obj[at..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().expect("a number")
    };
    json.split('{')
        .skip(1)
        .map(|o| {
            (
                num(o, "start"),
                num(o, "length"),
                o.contains("\"data\": true"),
            )
        })
        .collect()
}

#[test]
fn many_requests_in_flight_from_two_threads() {
    if !have("qemu-nbd", "many_requests") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = image(dir.path(), 8 << 20);
    let srv = qemu_nbd_unix(&img, &dir.path().join("s.sock"), &[]);
    let home = IoThread::spawn("nbd-home").unwrap();
    let blk = open_on(&home, &srv.uri, Duration::ZERO);
    let workers: Vec<IoThread> = (0..2)
        .map(|i| IoThread::spawn(&format!("nbd-worker-{i}")).unwrap())
        .collect();
    // Each worker runs 32 coroutines; each writes its own 64 KiB stripe, then reads it back.
    let (tx, rx) = std::sync::mpsc::channel();
    for (w, io) in workers.iter().enumerate() {
        for c in 0..32u64 {
            let (b, tx) = (blk.clone(), tx.clone());
            io.spawn_co(move || {
                let stripe = (w as u64 * 32 + c) * 65536;
                let data = pattern(65536, (w * 32 + c as usize) as u8);
                let mut back = vec![0; 65536];
                let r = b
                    .co_pwrite(stripe, &data)
                    .and_then(|()| b.co_pread(stripe, &mut back))
                    .map(|()| back == data);
                tx.send(r.map_err(|e| e.to_string())).unwrap();
            });
        }
    }
    for _ in 0..64 {
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a request hung");
        assert_eq!(r, Ok(true));
    }
    let b = blk.clone();
    home.run_sync(move || runtime::spawn(move || b.close()).join().unwrap().unwrap());
    for io in workers {
        io.stop();
    }
    home.stop();
}

#[test]
fn read_only_server_makes_a_read_only_export() {
    if !have("nbdkit", "read_only_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = nbdkit(&dir.path().join("s.sock"), &["-r", "memory", "1M"]);
    let blk = open(&srv.uri, Duration::ZERO);
    assert!(blk.is_read_only());
    let b = blk.clone();
    let e = co(move || b.co_pwrite(0, &[1; 512])).unwrap_err();
    assert_eq!(errno(&e), libc::EROFS);
}

#[test]
fn nbdkit_memory_trim_and_zeroes_read_back_as_zeros() {
    if !have("nbdkit", "nbdkit_memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = nbdkit(&dir.path().join("s.sock"), &["memory", "64M"]);
    let blk = open(&srv.uri, Duration::ZERO);
    let b = blk.clone();
    co(move || {
        b.co_pwrite(0, &vec![9; 1 << 20]).unwrap();
        let (s, _) = b.co_block_status(0, 1 << 20).unwrap();
        assert_eq!(s, BlockStatus::Data);
        b.co_pdiscard(0, 512 << 10).unwrap();
        b.co_pwrite_zeroes(512 << 10, 256 << 10, true).unwrap();
        let mut back = vec![1; 1 << 20];
        b.co_pread(0, &mut back).unwrap();
        assert!(back[..768 << 10].iter().all(|&x| x == 0));
        assert!(back[768 << 10..].iter().all(|&x| x == 9));
        let (s, n) = b.co_block_status(32 << 20, 1 << 20).unwrap();
        assert_eq!(
            (s, n),
            (BlockStatus::Zero, 1 << 20),
            "never written: a hole"
        );
    });
}

#[test]
fn server_errors_fail_that_request_only() {
    if !have("nbdkit", "server_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = nbdkit(
        &dir.path().join("s.sock"),
        &[
            "--filter=error",
            "memory",
            "1M",
            "error-pread=ENOSPC",
            "error-pread-rate=100%",
        ],
    );
    let blk = open(&srv.uri, Duration::ZERO);
    let b = blk.clone();
    co(move || {
        let e = b.co_pread(0, &mut [0; 4096]).unwrap_err();
        assert_eq!(errno(&e), libc::ENOSPC);
        b.co_pwrite(0, &[5; 4096]).expect("writes still work");
        b.co_flush().unwrap();
    });
}

#[test]
fn requests_overlap_on_a_slow_server() {
    if !have("nbdkit", "slow_server") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = nbdkit(
        &dir.path().join("s.sock"),
        &["--filter=delay", "memory", "1M", "rdelay=200ms"],
    );
    let home = IoThread::spawn("nbd-home").unwrap();
    let blk = open_on(&home, &srv.uri, Duration::ZERO);
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..16u64 {
        let (b, tx) = (blk.clone(), tx.clone());
        home.spawn_co(move || {
            let r = b.co_pread(i * 4096, &mut [0; 4096]);
            tx.send(r.is_ok()).unwrap();
        });
    }
    for _ in 0..16 {
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(1600),
        "16 reads of 0.2 s each took {took:?}: they did not overlap"
    );
    home.stop();
}

#[test]
fn a_server_killed_mid_request_is_eio_not_a_hang() {
    if !have("nbdkit", "server_killed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let srv = nbdkit(
        &dir.path().join("s.sock"),
        &["--filter=delay", "memory", "1M", "rdelay=5"],
    );
    let home = IoThread::spawn("nbd-home").unwrap();
    let blk = open_on(&home, &srv.uri, Duration::ZERO);
    let (tx, rx) = std::sync::mpsc::channel();
    let b = blk.clone();
    home.spawn_co(move || {
        let r = b.co_pread(0, &mut [0; 4096]);
        tx.send(r.map_err(|e| e.errno())).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    srv.kill();
    let r = rx
        .recv_timeout(Duration::from_secs(4))
        .expect("the read hung");
    assert_eq!(r, Err(libc::EIO));
    assert!(start.elapsed() < Duration::from_secs(2));
    // New requests fail at once too.
    let b = blk.clone();
    let r = home.run_sync(move || {
        runtime::spawn(move || b.co_pread(0, &mut [0; 512]).map_err(|e| e.errno()))
            .join()
            .unwrap()
    });
    assert_eq!(r, Err(libc::EIO));
    home.stop();
}

#[test]
fn reconnect_within_the_delay_continues_beyond_it_fails() {
    if !have("qemu-nbd", "reconnect") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, model) = image(dir.path(), 1 << 20);
    let sock = dir.path().join("s.sock");
    let srv = qemu_nbd_unix(&img, &sock, &[]);
    let home = IoThread::spawn("nbd-home").unwrap();
    let blk = open_on(&home, &srv.uri, Duration::from_secs(3));
    let read = |blk: &Arc<BlockBackend>| {
        let b = blk.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        home.spawn_co(move || {
            let mut buf = vec![0; 65536];
            let r = b.co_pread(65536, &mut buf).map(|()| buf);
            tx.send(r.map_err(|e| e.errno())).unwrap();
        });
        rx
    };
    srv.kill();
    let _ = std::fs::remove_file(&sock);
    let pending = read(&blk);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        pending.try_recv().is_err(),
        "the read waits for the reconnect"
    );
    let srv = qemu_nbd_unix(&img, &sock, &[]);
    let got = pending
        .recv_timeout(Duration::from_secs(5))
        .expect("the read completes after the reconnect");
    assert_eq!(got.unwrap(), model[65536..131072]);

    // Beyond the delay: EIO, about when the delay ends.
    srv.kill();
    let _ = std::fs::remove_file(&sock);
    let start = Instant::now();
    let pending = read(&blk);
    let got = pending
        .recv_timeout(Duration::from_secs(8))
        .expect("no hang");
    assert_eq!(got, Err(libc::EIO));
    let took = start.elapsed();
    assert!(
        took > Duration::from_millis(2000) && took < Duration::from_secs(6),
        "failed after {took:?}, the delay is 3 s"
    );
    home.stop();
}

// ---------------------------------------------------------------------------------------------
// A lying server
// ---------------------------------------------------------------------------------------------

/// What the fake server answers to the first request after the handshake.
#[derive(Clone, Copy, Debug)]
enum Lie {
    WrongCookie,
    BadMagic,
    ShortPayloadThenClose,
    OversizedLength,
    ChunkOutsideRead,
    DataChunkLongerThanRead,
    SecondReplyToFinishedRequest,
    NoDoneEver,
    /// Two data chunks over the first half of the read, none over the second: as many bytes
    /// as the read, but not its range.
    OverlapAndGap,
    /// Never answers, but keeps the connection open.
    Silent,
}

fn be(v: &mut Vec<u8>, x: u64, n: usize) {
    v.extend_from_slice(&x.to_be_bytes()[8 - n..]);
}

/// Accepts one client and runs a valid handshake: structured replies, base:allocation
/// (context id 1), GO with a 1 MiB writable export that takes flushes.
fn fake_handshake(listener: &UnixListener) -> UnixStream {
    let (s, _) = listener.accept().unwrap();
    handshake_on(s, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH)
}

/// The handshake of [`fake_handshake`] on an accepted `s`, with transmission flags `tflags`.
fn handshake_on(mut s: UnixStream, tflags: u16) -> UnixStream {
    let mut hello = Vec::new();
    be(&mut hello, INIT_MAGIC, 8);
    be(&mut hello, OPTS_MAGIC, 8);
    be(
        &mut hello,
        u64::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
        2,
    );
    s.write_all(&hello).unwrap();
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).unwrap();
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let opt = be32(&h[8..12]);
        let mut data = vec![0u8; be32(&h[12..16]) as usize];
        s.read_exact(&mut data).unwrap();
        let reply = |s: &mut UnixStream, ty: u32, payload: &[u8]| {
            let mut r = Vec::new();
            be(&mut r, REP_MAGIC, 8);
            be(&mut r, u64::from(opt), 4);
            be(&mut r, u64::from(ty), 4);
            be(&mut r, payload.len() as u64, 4);
            r.extend_from_slice(payload);
            s.write_all(&r).unwrap();
        };
        match opt {
            OPT_STRUCTURED_REPLY => reply(&mut s, REP_ACK, &[]),
            OPT_SET_META_CONTEXT => {
                let mut p = 1u32.to_be_bytes().to_vec();
                p.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                reply(&mut s, REP_META_CONTEXT, &p);
                reply(&mut s, REP_ACK, &[]);
            }
            OPT_GO => {
                let mut p = Vec::new();
                be(&mut p, u64::from(INFO_EXPORT), 2);
                be(&mut p, 1 << 20, 8);
                be(&mut p, u64::from(tflags), 2);
                reply(&mut s, REP_INFO, &p);
                reply(&mut s, REP_ACK, &[]);
                break;
            }
            _ => reply(&mut s, REP_ERR_UNSUP, &[]),
        }
    }
    s
}

/// A structured reply chunk's header.
fn chunk(flags: u16, ty: u16, cookie: u64, length: u64) -> Vec<u8> {
    let mut r = Vec::new();
    be(&mut r, u64::from(STRUCTURED_REPLY_MAGIC), 4);
    be(&mut r, u64::from(flags), 2);
    be(&mut r, u64::from(ty), 2);
    be(&mut r, cookie, 8);
    be(&mut r, length, 4);
    r
}

/// Serves one client: a valid handshake, then lies in reply to the first request.
fn fake_server(listener: UnixListener, lie: Lie) {
    let mut s = fake_handshake(&listener);
    let mut req = [0u8; 28];
    if s.read_exact(&mut req).is_err() {
        return;
    }
    let cookie = be64(&req[8..16]);
    let offset = be64(&req[16..24]);
    let len = u64::from(be32(&req[24..28]));
    let mut out = match lie {
        Lie::WrongCookie => chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie ^ 0x55_0000, 0),
        Lie::BadMagic => vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        Lie::ShortPayloadThenClose => {
            let mut r = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len);
            be(&mut r, offset, 8);
            r.extend(std::iter::repeat_n(1u8, len as usize / 2));
            r
        }
        Lie::OversizedLength => chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 0xffff_fff0),
        Lie::ChunkOutsideRead => {
            let mut r = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len);
            be(&mut r, offset + 1, 8);
            r.extend(std::iter::repeat_n(1u8, len as usize));
            r
        }
        Lie::DataChunkLongerThanRead => {
            let mut r = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + 2 * len);
            be(&mut r, offset, 8);
            r.extend(std::iter::repeat_n(1u8, 2 * len as usize));
            r
        }
        Lie::SecondReplyToFinishedRequest => {
            let mut r = chunk(0, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
            be(&mut r, offset, 8);
            be(&mut r, len, 4);
            r.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0));
            r.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0));
            r
        }
        Lie::NoDoneEver => {
            let mut r = chunk(0, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
            be(&mut r, offset, 8);
            be(&mut r, len, 4);
            r
        }
        Lie::OverlapAndGap => {
            let half = len / 2;
            let mut r = Vec::new();
            for flags in [0, REPLY_FLAG_DONE] {
                r.extend(chunk(flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + half));
                be(&mut r, offset, 8);
                r.extend(std::iter::repeat_n(1u8, half as usize));
            }
            r
        }
        Lie::Silent => Vec::new(),
    };
    let _ = s.write_all(&out);
    out.clear();
    if matches!(lie, Lie::ShortPayloadThenClose | Lie::NoDoneEver) {
        // Hang up (NoDoneEver: after a while, as a server that dies would).
        std::thread::sleep(Duration::from_millis(100));
        return;
    }
    // Keep the connection open: the client must not wait for more.
    let mut sink = [0u8; 4096];
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

#[test]
fn a_lying_server_gets_eio_and_a_closed_connection() {
    for lie in [
        Lie::WrongCookie,
        Lie::BadMagic,
        Lie::ShortPayloadThenClose,
        Lie::OversizedLength,
        Lie::ChunkOutsideRead,
        Lie::DataChunkLongerThanRead,
        Lie::SecondReplyToFinishedRequest,
        Lie::NoDoneEver,
        Lie::OverlapAndGap,
        Lie::Silent,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || fake_server(listener, lie));
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let home = IoThread::spawn("nbd-home").unwrap();
        // Silent: a short reply timeout turns the silence into EIO well within the wait below.
        let nbd = NbdOptions {
            reply_timeout: Duration::from_millis(500),
            ..NbdOptions::default()
        };
        let blk = open_on_with(&home, &uri, nbd);
        let start = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        let b = blk.clone();
        home.spawn_co(move || {
            let mut buf = vec![0; 4096];
            let r = b.co_pread(8192, &mut buf);
            tx.send(r.map_err(|e| e.errno())).unwrap();
        });
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{lie:?}: the read hung"));
        if matches!(lie, Lie::SecondReplyToFinishedRequest) {
            // The read itself was answered correctly (a hole); the extra reply then kills
            // the connection, so the next request fails.
            assert_eq!(r, Ok(()), "{lie:?}");
            std::thread::sleep(Duration::from_millis(100));
            let b = blk.clone();
            let r = home.run_sync(move || {
                runtime::spawn(move || b.co_pread(0, &mut [0; 512]).map_err(|e| e.errno()))
                    .join()
                    .unwrap()
            });
            assert_eq!(r, Err(libc::EIO), "{lie:?}: the connection is closed");
        } else {
            assert_eq!(r, Err(libc::EIO), "{lie:?}");
        }
        if matches!(lie, Lie::Silent) {
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(400),
                "{lie:?}: failed after {took:?}, before the 0.5 s reply timeout"
            );
        }
        drop(blk);
        home.stop();
        server.join().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// An honest fake server: what the driver sends
// ---------------------------------------------------------------------------------------------

/// Serves one client honestly until it disconnects: reads are holes, writes and flushes
/// succeed, block status answers one extent with `status_flags`. Returns how many
/// NBD_CMD_FLUSH requests came.
fn honest_server(listener: UnixListener, status_flags: u32) -> usize {
    serve_honestly(fake_handshake(&listener), status_flags)
}

/// The request loop of [`honest_server`] on a negotiated `s`.
fn serve_honestly(mut s: UnixStream, status_flags: u32) -> usize {
    let mut flushes = 0;
    loop {
        let mut req = [0u8; 28];
        if s.read_exact(&mut req).is_err() {
            return flushes;
        }
        let ty = be16(&req[6..8]);
        let cookie = be64(&req[8..16]);
        let offset = be64(&req[16..24]);
        let len = be32(&req[24..28]);
        let out = match ty {
            CMD_READ => {
                let mut r = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
                be(&mut r, offset, 8);
                be(&mut r, u64::from(len), 4);
                r
            }
            CMD_WRITE => {
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).unwrap();
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
            }
            CMD_FLUSH => {
                flushes += 1;
                chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
            }
            CMD_BLOCK_STATUS => {
                let mut r = chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, 12);
                be(&mut r, 1, 4); // the context id of base:allocation
                be(&mut r, u64::from(len), 4);
                be(&mut r, u64::from(status_flags), 4);
                r
            }
            CMD_DISC => return flushes,
            other => panic!("the driver sent command {other}"),
        };
        if s.write_all(&out).is_err() {
            return flushes;
        }
    }
}

/// Starts [`honest_server`] on a fresh socket: (its URI, the thread returning the flush
/// count, the directory to keep alive).
fn start_honest_server(
    status_flags: u32,
) -> (String, std::thread::JoinHandle<usize>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("honest.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || honest_server(listener, status_flags));
    (
        format!("nbd+unix:///?socket={}", sock.display()),
        server,
        dir,
    )
}

#[test]
fn a_flush_after_writes_reaches_the_server_and_none_without_writes() {
    // Written: exactly one flush (the close has nothing new to flush).
    let (uri, server, _dir) = start_honest_server(0);
    let blk = open(&uri, Duration::ZERO);
    let b = blk.clone();
    co(move || {
        b.co_pwrite(0, &[7; 4096]).unwrap();
        b.co_flush().unwrap();
        b.close().unwrap();
    });
    drop(blk);
    assert_eq!(server.join().unwrap(), 1, "one flush after the writes");

    // Only read: no flush at all, neither asked for nor at the close.
    let (uri, server, _dir) = start_honest_server(0);
    let blk = open(&uri, Duration::ZERO);
    let b = blk.clone();
    co(move || {
        b.co_pread(0, &mut [0; 4096]).unwrap();
        b.co_flush().unwrap();
        b.close().unwrap();
    });
    drop(blk);
    assert_eq!(
        server.join().unwrap(),
        0,
        "nothing written, nothing flushed"
    );
}

#[test]
fn only_the_zero_flag_means_zeros_in_block_status() {
    for (flags, want) in [
        (0, BlockStatus::Data),
        (STATE_HOLE, BlockStatus::Data), // allocated nowhere, contents unknown
        (STATE_ZERO, BlockStatus::Zero),
        (STATE_HOLE | STATE_ZERO, BlockStatus::Zero),
    ] {
        let (uri, server, _dir) = start_honest_server(flags);
        let blk = open(&uri, Duration::ZERO);
        let b = blk.clone();
        let got = co(move || {
            let r = b.co_block_status(0, 65536).unwrap();
            b.close().unwrap();
            r
        });
        assert_eq!(got, (want, 65536), "flags {flags:#x}");
        drop(blk);
        server.join().unwrap();
    }
}

#[test]
fn a_reconnect_to_an_export_with_other_flags_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        // First connection: a writable export that takes flushes, closed at once.
        let (s, _) = listener.accept().unwrap();
        drop(handshake_on(s, FLAG_HAS_FLAGS | FLAG_SEND_FLUSH));
        // Every later one: the same size, but read-only and without flush.
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let s = handshake_on(s, FLAG_HAS_FLAGS | FLAG_READ_ONLY);
                    serve_honestly(s, 0);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let home = IoThread::spawn("nbd-home").unwrap();
    let blk = open_on(&home, &uri, Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(100)); // the first connection is gone
    let (tx, rx) = std::sync::mpsc::channel();
    let b = blk.clone();
    home.spawn_co(move || {
        let r = b.co_pread(0, &mut [0; 4096]);
        tx.send(r.map_err(|e| e.errno())).unwrap();
    });
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the read hung");
    assert_eq!(
        r,
        Err(libc::EIO),
        "the other export was not taken for the first"
    );
    drop(blk);
    home.stop();
    // The server thread ends by its own deadline; a reconnect attempt still in progress
    // when the driver closed may leave it waiting, so it is not joined.
    drop(server);
}
