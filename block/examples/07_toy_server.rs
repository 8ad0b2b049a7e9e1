//! # 07 — a toy request server: one coroutine per request, I/O through the block layer
//!
//! What it teaches: the shape of the FUSE export, without the kernel. A socket plays
//! `/dev/fuse`: an fd handler on the event loop reads requests from it, starts **one coroutine
//! per request**, and each coroutine parses its request, does the I/O through a
//! [`block::BlockBackend`] (whose `co_` methods may yield while a worker thread or io_uring does
//! the syscall) and writes its reply on the same socket. The loop stays free while requests
//! wait. At the end the server stops reading, **drains** the backend (no request in flight) and
//! closes it (flush) — the teardown order of examples 06 and of the real export.
//!
//! The request format is one text line: `WRITE <offset> <text>`, `READ <offset> <length>` or
//! `QUIT`; the reply is one line, `OK …` or `ERR …`. The client is a plain thread that sends a
//! request and waits for its reply, so the output below is deterministic; a client that sent
//! several lines at once would get one coroutine per line, running side by side.
//!
//! Why this example lives in `block/examples/` and not with 01–06 in `runtime/examples/`: it
//! opens an image through `block::open_image`, and `runtime` must not depend on `block` (the
//! dependencies point `fuse -> block -> runtime`). The runtime part is the same as in 01–06.
//!
//! QEMU: `block/export/fuse.c` (`read_from_fuse_export()`: an fd handler that reads one
//! request and processes it in a coroutine; `fuse_export_drained_begin()` removes the handler),
//! `block/block-backend.c` (`blk_co_pread()`, `blk_co_pwrite()`, `blk_drain()`).
//!
//! Run: `cargo run -p block --example 07_toy_server`
//!
//! Expected output:
//!
//! ```text
//! client: > WRITE 0 hello, block layer
//! server: request 1 in its own coroutine: WRITE 0 hello, block layer
//! client: < OK wrote 18 bytes at 0
//! client: > READ 7 5
//! server: request 2 in its own coroutine: READ 7 5
//! client: < OK "block"
//! client: > READ 4090 10
//! server: request 3 in its own coroutine: READ 4090 10
//! client: < ERR the image ends at 4096 (EINVAL)
//! client: > FROB 1
//! server: request 4 in its own coroutine: FROB 1
//! client: < ERR unknown request
//! client: > QUIT
//! server: request 5 in its own coroutine: QUIT
//! client: < OK bye
//! server: stopped reading; drained (in flight: 0); closed the image
//! ```
//!
//! Exercise: stop counting reads as in flight. In `block/src/backend.rs`,
//! `BlockBackend::co_pread`, delete the first line (`let _req = self.enter();`). This example
//! still prints the same — its client waits for every reply, so nothing is in flight when the
//! server drains — which is exactly why such a bug survives: a drain that races a read returns
//! while the read still runs, and the image is closed under it.
//! `cargo test -p block --test concurrency drain_waits_for_requests_in_flight_on_another_thread`
//! catches it ("the requests never started", after its 10 s deadline). Revert the change
//! afterwards. (The runtime rule underneath, "a drain waits for guards dropped on other
//! threads", is `runtime/tests/aio.rs` `in_flight_drain_waits_for_guards_dropped_on_other_threads`.)

use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;

use block::{open_image, BlockBackend, BlockError, Format, OpenOptions};
use runtime::{AioContext, Coroutine};

/// Serves one request line; returns the reply line and whether the client asked to stop.
/// Runs in a coroutine: the `co_` calls may yield.
fn serve(blk: &BlockBackend, line: &str) -> (String, bool) {
    let words: Vec<&str> = line.splitn(3, ' ').collect();
    let reply = match words.as_slice() {
        ["WRITE", offset, text] => match offset.parse::<u64>() {
            Ok(offset) => blk
                .co_pwrite(offset, text.as_bytes())
                .map(|()| format!("OK wrote {} bytes at {offset}", text.len())),
            Err(_) => Ok("ERR bad offset".to_owned()),
        },
        ["READ", offset, len] => match (offset.parse::<u64>(), len.parse::<usize>()) {
            (Ok(offset), Ok(len)) if len <= 4096 => {
                let mut buf = vec![0u8; len];
                blk.co_pread(offset, &mut buf)
                    .map(|()| format!("OK {:?}", String::from_utf8_lossy(&buf)))
            }
            _ => Ok("ERR bad offset or length".to_owned()),
        },
        ["QUIT"] => return ("OK bye".to_owned(), true),
        _ => Ok("ERR unknown request".to_owned()),
    };
    let reply = reply.unwrap_or_else(|e| match e {
        BlockError::OutOfRange { size, .. } => format!("ERR the image ends at {size} (EINVAL)"),
        e => format!("ERR {e}"),
    });
    (reply, false)
}

/// The client: sends each request, waits for its reply. A plain thread with blocking I/O.
fn client(sock: UnixStream) {
    let mut reader = BufReader::new(sock.try_clone().expect("clone the socket"));
    let mut sock = sock;
    for request in [
        "WRITE 0 hello, block layer",
        "READ 7 5",
        "READ 4090 10",
        "FROB 1",
        "QUIT",
    ] {
        println!("client: > {request}");
        writeln!(sock, "{request}").expect("send");
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("receive");
        println!("client: < {}", reply.trim_end());
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The image: a 4 KiB raw file in a temporary directory, opened as the CLI opens images.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 4096])?;
    let opts = OpenOptions {
        format: Format::Raw,
        ..OpenOptions::default()
    };
    let blk: Arc<BlockBackend> = open_image(&path, &opts)?;

    // The "device": one end of a socket pair for us, the other for the client thread.
    let (server_sock, client_sock) = UnixStream::pair()?;
    server_sock.set_nonblocking(true)?; // the loop must never block in read()
    let client = std::thread::spawn(move || client(client_sock));

    let ctx = AioContext::current();
    let sock = Rc::new(server_sock);
    let quit = Rc::new(Cell::new(false));
    let pending = Rc::new(RefCell::new(Vec::<u8>::new())); // bytes of a partial line
    let next_id = Cell::new(1);

    // The fd handler: read what is there, start one coroutine per complete line.
    let (s, q, p, b) = (sock.clone(), quit.clone(), pending.clone(), blk.clone());
    let on_readable = Rc::new(move || {
        let mut chunk = [0u8; 512];
        let n = match (&*s).read(&mut chunk) {
            Ok(0) => return q.set(true), // the client hung up
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => panic!("read the socket: {e}"),
        };
        let mut buf = p.borrow_mut();
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            let id = next_id.replace(next_id.get() + 1);
            let (s, q, b) = (s.clone(), q.clone(), b.clone());
            // One coroutine per request, entered at once: it runs until it finishes or its
            // I/O yields; a yielded one is resumed later by the loop, on this thread.
            Coroutine::new(move || {
                println!("server: request {id} in its own coroutine: {line}");
                let (reply, stop) = serve(&b, &line);
                // A short line fits the socket buffer: this write does not block.
                (&*s)
                    .write_all(format!("{reply}\n").as_bytes())
                    .expect("reply");
                if stop {
                    q.set(true);
                }
            })
            .enter();
        }
    });
    ctx.set_fd_handler(sock.as_raw_fd(), Some(on_readable), None)?;

    // The loop: poll until the client said QUIT (or hung up).
    while !quit.get() {
        ctx.poll(true);
    }

    // Teardown: stop taking requests, wait for those in flight, then flush and close.
    ctx.set_fd_handler(sock.as_raw_fd(), None, None)?;
    blk.drain(&ctx);
    let in_flight = blk.in_flight();
    blk.close()?;
    client.join().expect("the client thread");
    println!("server: stopped reading; drained (in flight: {in_flight}); closed the image");
    Ok(())
}
