//! `co_wait_fd`: a coroutine yields until a socket is readable or writable (QEMU's
//! `qio_channel_yield`), on epoll and io_uring loops alike.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use runtime::{co_wait_fd, spawn, FdReady, IoThread};

/// Reads exactly `buf.len()` bytes from a non-blocking socket, yielding on EAGAIN.
fn co_read_exact(s: &UnixStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match (&*s).read(&mut buf[done..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                co_wait_fd(s.as_fd(), FdReady::Readable)?
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[test]
fn a_coroutine_waits_for_bytes_another_thread_writes() {
    let (a, mut b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let reader = spawn(move || {
        let mut buf = [0u8; 5];
        co_read_exact(&a, &mut buf).map(|()| buf)
    });
    assert!(
        !reader.is_finished(),
        "nothing written yet: the coroutine waits"
    );
    let writer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        b.write_all(b"hel").unwrap();
        thread::sleep(Duration::from_millis(20));
        b.write_all(b"lo").unwrap();
        b
    });
    assert_eq!(&reader.join().unwrap().unwrap(), b"hello");
    drop(writer.join().unwrap());
}

#[test]
fn a_reader_and_a_writer_of_one_socket_wait_at_once_on_one_thread() {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let a = std::rc::Rc::new(a);
    // Fill `a`'s send buffer so that the writer must wait for room.
    let chunk = vec![7u8; 64 * 1024];
    let mut queued = 0usize;
    loop {
        match (&*a).write(&chunk) {
            Ok(n) => queued += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    let ra = a.clone();
    let reader = spawn(move || {
        let mut buf = [0u8; 4];
        co_read_exact(&ra, &mut buf).map(|()| buf)
    });
    let wa = a.clone();
    let writer = spawn(move || loop {
        match (&*wa).write(b"more") {
            Ok(n) => return n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                co_wait_fd(wa.as_fd(), FdReady::Writable).unwrap()
            }
            Err(e) => panic!("{e}"),
        }
    });
    assert!(!reader.is_finished() && !writer.is_finished());
    // The peer drains what was queued and answers: both waits end.
    let peer = thread::spawn(move || {
        b.set_nonblocking(false).unwrap();
        let mut sink = vec![0u8; queued];
        (&b).read_exact(&mut sink).unwrap();
        (&b).write_all(b"pong").unwrap();
        b
    });
    assert_eq!(&reader.join().unwrap().unwrap(), b"pong");
    assert_eq!(writer.join().unwrap(), 4);
    drop(peer.join().unwrap());
}

#[test]
fn shutdown_wakes_waiters_on_other_threads() {
    let (a, _b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let a = std::sync::Arc::new(a);
    let io = IoThread::spawn("fd-waiter").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let theirs = a.clone();
    io.run_sync(move || {
        runtime::Coroutine::new(move || {
            let mut buf = [0u8; 1];
            let r = co_read_exact(&theirs, &mut buf);
            tx.send(r.map_err(|e| e.kind())).unwrap();
        })
        .enter();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "it waits"
    );
    a.shutdown(Shutdown::Both).unwrap();
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the waiter woke");
    assert_eq!(r, Err(ErrorKind::UnexpectedEof));
    io.stop();
}
