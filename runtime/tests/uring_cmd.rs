//! `IORING_OP_URING_CMD` with the 80-byte command area, from a coroutine and from an async
//! task, on a ring of 128-byte SQEs; refused (not sent) on a ring of 64-byte ones.
//!
//! The command used is the socket one every kernel since 6.7 has: `SOCKET_URING_OP_SIOCINQ`
//! (bytes of the next datagram waiting on a UDP socket). It completes at once; a command the
//! driver keeps in flight (FUSE) is tested in `fuse/tests/uring_transport.rs`.
//!
//! `set_ring_sqe128` is process-wide, so the one test here runs its cases one after the other,
//! each on a new thread (a new context and ring).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::thread;

use runtime::ring::set_ring_sqe128;
use runtime::uring::{self, UringCmd};
use runtime::{block_on, executor, spawn, spawn_local};

/// `SOCKET_URING_OP_SIOCINQ` (include/uapi/linux/io_uring.h).
const SOCKET_URING_OP_SIOCINQ: u32 = 0;

/// A UDP socket with one datagram of `len` bytes waiting.
fn socket_with_datagram(len: usize) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(&vec![7u8; len], s.local_addr().unwrap()).unwrap();
    s
}

fn siocinq(s: &UdpSocket) -> UringCmd {
    UringCmd {
        fd: s.as_raw_fd(),
        cmd_op: SOCKET_URING_OP_SIOCINQ,
        cmd: [0; 80],
        addr: 0,
        len: 0,
    }
}

fn coroutine_case() -> i32 {
    let s = socket_with_datagram(123);
    assert!(uring::sqe128_available());
    let cmd = siocinq(&s);
    // Outside a coroutine it declines.
    // SAFETY: the command points at no memory.
    assert!(unsafe { uring::co_uring_cmd(&cmd) }.is_none());
    // SAFETY: as above.
    spawn(move || unsafe { uring::co_uring_cmd(&cmd) }.expect("ring"))
        .join()
        .unwrap()
}

fn async_case() -> i32 {
    let s = socket_with_datagram(45);
    block_on(async move {
        let task = spawn_local(async move {
            // SAFETY: the command points at no memory.
            let op = unsafe { executor::uring::uring_cmd_owned(s, |s| siocinq(s)) }
                .map_err(|_| "full")
                .unwrap();
            let (_s, r) = op.await;
            r.unwrap() as i32
        });
        task.await.expect("task panicked")
    })
}

#[test]
fn uring_cmd_from_a_coroutine_and_a_task_and_refused_on_a_64_byte_ring() {
    set_ring_sqe128(true);
    assert_eq!(thread::spawn(coroutine_case).join().unwrap(), 123);
    assert_eq!(thread::spawn(async_case).join().unwrap(), 45);
    // Ordinary I/O still works on the big ring.
    thread::spawn(|| {
        let tf = tempfile::tempfile().unwrap();
        spawn(move || {
            use std::os::fd::AsFd;
            let n = uring::co_write(tf.as_fd(), b"hello", 0)
                .expect("ring")
                .unwrap();
            assert_eq!(n, 5);
            let mut b = [0u8; 5];
            let n = uring::co_read(tf.as_fd(), &mut b, 0)
                .expect("ring")
                .unwrap();
            assert_eq!((n, &b), (5, b"hello"));
        })
        .join()
        .unwrap();
    })
    .join()
    .unwrap();

    set_ring_sqe128(false);
    thread::spawn(|| {
        assert!(!uring::sqe128_available());
        let s = socket_with_datagram(9);
        let cmd = siocinq(&s);
        // SAFETY: the command points at no memory.
        let r = spawn(move || unsafe { uring::co_uring_cmd(&cmd) }).join();
        assert_eq!(
            r.unwrap(),
            None,
            "a 128-byte SQE is not pushed on a 64-byte ring"
        );
        // SAFETY: as above.
        let op = unsafe { executor::uring::uring_cmd_owned(s, |s| siocinq(s)) };
        assert!(op.is_err(), "the task gets its socket back");
    })
    .join()
    .unwrap();
}
