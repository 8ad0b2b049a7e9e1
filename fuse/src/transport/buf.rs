//! The crate's one buffer type, [`Buf`], and its one pool; and [`RequestBuf`], the layout a
//! request is read into.
//!
//! Every byte that crosses `/dev/fuse` in bulk lives in a [`Buf`]: requests (WRITE data, and
//! every other request, since the kernel refuses reads into less than `max_write` + 80 bytes)
//! and READ replies. Small ones (≤ 128 KiB) are heap memory; large ones are huge-page mappings
//! (`sys::HugePages`: the kernel copies in and out of them much faster). Each thread keeps the
//! buffers its requests gave back ([`take`], [`give_back`]), so a loaded queue maps nothing new
//! per request. QEMU allocates each request's buffer from its own pool too (`FuseQueue`'s
//! `request_buf`, and the bounce buffer `blk_blockalign` gives a WRITE).
//!
//! # The request layout
//!
//! ```text
//! RequestBuf:  [ page 0 ............ | in_header | write_in ][ page 1: WRITE data … ]
//!                                    ^ read(2) starts here   ^ page-aligned
//! ```
//!
//! A request is read with one `read(2)` starting 80 bytes before a page boundary: a WRITE's
//! `fuse_in_header` and `fuse_write_in` (80 bytes together) fill the end of page 0, so its data
//! starts exactly on page 1, aligned for the block layer (`O_DIRECT` takes it without a bounce
//! buffer), and every other request is contiguous too. QEMU reads into two iovecs instead and
//! copies each WRITE's data to an aligned bounce buffer.

use std::cell::RefCell;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::BorrowedFd;

use crate::protocol::abi::FUSE_WRITE;
use crate::protocol::request::{request_buffer_size, WRITE_HEADER_SIZE};
use crate::sys::{HugePages, ReadError};

/// Page size: WRITE data starts on a page boundary (enough for `O_DIRECT` on every common
/// device).
pub const PAGE: usize = 4096;

/// Buffers up to this size are heap memory; larger ones huge-page mappings.
const SMALL: usize = 128 * 1024;

/// Buffers each thread keeps per class. Large: a queue at its default bound (64 in flight) holds
/// a request buffer and possibly a READ buffer for each, so 128 keeps a saturated queue from
/// mapping and unmapping per request; small: the same number.
const MAX_POOLED: usize = 128;

/// A buffer of bytes: heap memory for small sizes, a huge-page mapping for large ones.
pub enum Buf {
    Small(Vec<u8>),
    Large(HugePages),
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Buf::Small(v) => v,
            Buf::Large(b) => b,
        }
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::Small(v) => v,
            Buf::Large(b) => b,
        }
    }
}

thread_local! {
    /// This thread's buffers, by class.
    static SMALL_POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static LARGE_POOL: RefCell<Vec<HugePages>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of exactly `len` initialised bytes (contents unspecified), from this thread's pool
/// when it has one. Fails (ENOMEM) instead of aborting when no memory can be had.
pub fn take(len: usize) -> io::Result<Buf> {
    if len <= SMALL {
        take_small(len)
    } else {
        take_large(len)
    }
}

/// Heap memory, with room rounded up to a power of two so that it fits the next sizes too.
fn take_small(len: usize) -> io::Result<Buf> {
    let mut v = SMALL_POOL
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_default();
    if v.capacity() < len {
        let want = SMALL.min(len.next_power_of_two()).max(len);
        // Fallible: no memory is an ENOMEM reply, not an abort.
        v.try_reserve_exact(want - v.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
    }
    v.resize(len, 0);
    Ok(Buf::Small(v))
}

/// A huge-page buffer whatever the size: page-aligned (request buffers need that).
fn take_large(len: usize) -> io::Result<Buf> {
    let pooled = LARGE_POOL.with(|p| {
        let mut p = p.borrow_mut();
        let i = p.iter().rposition(|b| b.capacity() >= len)?;
        Some(p.swap_remove(i))
    });
    let mut b = match pooled {
        Some(b) => b,
        None => HugePages::new(len)?,
    };
    b.set_len(len);
    Ok(Buf::Large(b))
}

/// Returns a buffer to this thread's pool (or frees it, when the pool is full).
pub fn give_back(b: Buf) {
    match b {
        Buf::Small(v) => SMALL_POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < MAX_POOLED {
                p.push(v);
            }
        }),
        Buf::Large(b) => LARGE_POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < MAX_POOLED {
                p.push(b);
            }
        }),
    }
}

/// Bytes a request buffer needs for a session with `max_write`: the spare room in front of the
/// read start, plus what the kernel insists a read buffer holds.
pub fn request_buf_size(max_write: u32) -> usize {
    PAGE + request_buffer_size(max_write) - WRITE_HEADER_SIZE
}

/// A buffer one request is read into, laid out so that WRITE data starts on a page boundary
/// (see the module doc).
pub struct RequestBuf {
    buf: Buf,
    /// Bytes of the request read (0 until [`RequestBuf::set_len`]).
    len: usize,
}

impl RequestBuf {
    /// A buffer from the pool that the kernel accepts for a session with `max_write` (size it
    /// for the `max_write` offered in INIT: the kernel never sends more, and the read of INIT
    /// itself comes before any negotiation).
    pub fn take(max_write: u32) -> io::Result<RequestBuf> {
        Ok(RequestBuf {
            buf: take_large(request_buf_size(max_write))?,
            len: 0,
        })
    }

    /// Reads one request from a `/dev/fuse` fd into this buffer; returns its length.
    pub fn read(&mut self, fd: BorrowedFd<'_>) -> Result<usize, ReadError> {
        let n = crate::sys::read_request(fd, self.read_area())?;
        self.set_len(n);
        Ok(n)
    }

    /// Where `read(2)` puts the request: from 80 bytes before the first page boundary.
    pub fn read_area(&mut self) -> &mut [u8] {
        &mut self.buf[PAGE - WRITE_HEADER_SIZE..]
    }

    /// Records that a read put `len` bytes in [`RequestBuf::read_area`].
    ///
    /// # Panics
    ///
    /// If `len` is larger than the read area (not a length a read into it returned).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.buf.len() - (PAGE - WRITE_HEADER_SIZE));
        self.len = len;
    }

    /// The request's bytes as `(header_and_args, write_payload)` for `request::parse`: a
    /// WRITE's data apart (page-aligned, no copy), every other request in one piece.
    pub fn request(&self) -> (&[u8], &[u8]) {
        let start = PAGE - WRITE_HEADER_SIZE;
        let bytes = &self.buf[start..start + self.len];
        let opcode = bytes.get(4..8).map(|o| [o[0], o[1], o[2], o[3]]);
        if self.len > WRITE_HEADER_SIZE && opcode.map(u32::from_ne_bytes) == Some(FUSE_WRITE) {
            bytes.split_at(WRITE_HEADER_SIZE)
        } else {
            (bytes, &[])
        }
    }

    /// Gives the memory back to this thread's pool.
    pub fn give_back(self) {
        give_back(self.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::abi::*;
    use crate::protocol::request::{self, Operation};
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use zerocopy::IntoBytes;

    fn header(opcode: u32, len: usize) -> fuse_in_header {
        fuse_in_header {
            len: len as u32,
            opcode,
            unique: 9,
            nodeid: 1,
            ..Default::default()
        }
    }

    /// Sends `bytes` through a socket and reads them back into `buf`, as a queue reads.
    fn through_socket(buf: &mut RequestBuf, bytes: &[u8]) -> usize {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        tx.write_all(bytes).unwrap();
        buf.read(rx.as_fd()).unwrap()
    }

    #[test]
    fn buffer_is_as_large_as_the_kernel_requires() {
        let mut buf = RequestBuf::take(1 << 20).unwrap();
        assert!(buf.read_area().len() >= request_buffer_size(1 << 20));
        buf.give_back();
        let mut small = RequestBuf::take(4096).unwrap();
        assert!(small.read_area().len() >= FUSE_MIN_READ_BUFFER);
        small.give_back();
    }

    #[test]
    fn write_data_lands_page_aligned() {
        let mut buf = RequestBuf::take(1 << 16).unwrap();
        let data = vec![0xa5u8; 12345];
        let arg = fuse_write_in {
            size: data.len() as u32,
            offset: 4096,
            ..Default::default()
        };
        let mut bytes = header(FUSE_WRITE, WRITE_HEADER_SIZE + data.len())
            .as_bytes()
            .to_vec();
        bytes.extend_from_slice(arg.as_bytes());
        bytes.extend_from_slice(&data);
        let n = through_socket(&mut buf, &bytes);
        assert_eq!(n, bytes.len());
        let (head, payload) = buf.request();
        assert_eq!(head.len(), WRITE_HEADER_SIZE);
        assert_eq!(
            payload.as_ptr() as usize % PAGE,
            0,
            "payload is page-aligned"
        );
        let req = request::parse(head, payload, FUSE_KERNEL_MINOR_VERSION).unwrap();
        let Operation::Write {
            arg: got,
            data: got_data,
        } = req.op
        else {
            panic!("not a write: {req:?}");
        };
        assert_eq!(got, arg);
        assert_eq!(got_data, &data[..]);
        assert_eq!(got_data.as_ptr(), payload.as_ptr(), "no copy");
    }

    #[test]
    fn other_requests_are_contiguous() {
        let mut buf = RequestBuf::take(1 << 16).unwrap();
        let arg = fuse_getattr_in::default();
        let mut bytes = header(FUSE_GETATTR, 56).as_bytes().to_vec();
        bytes.extend_from_slice(arg.as_bytes());
        let n = through_socket(&mut buf, &bytes);
        let (head, payload) = buf.request();
        assert_eq!((head.len(), payload.len()), (n, 0));
        let req = request::parse(head, payload, FUSE_KERNEL_MINOR_VERSION).unwrap();
        assert_eq!(req.op, Operation::Getattr(arg));

        // SETATTR is 40 + 88 bytes: longer than a WRITE's head, still one piece.
        let arg = fuse_setattr_in {
            valid: FATTR_SIZE,
            size: 1 << 30,
            ..Default::default()
        };
        let len = 40 + core::mem::size_of::<fuse_setattr_in>();
        let mut bytes = header(FUSE_SETATTR, len).as_bytes().to_vec();
        bytes.extend_from_slice(arg.as_bytes());
        through_socket(&mut buf, &bytes);
        let (head, payload) = buf.request();
        assert_eq!((head, payload.len()), (&bytes[..], 0));
        let req = request::parse(head, payload, FUSE_KERNEL_MINOR_VERSION).unwrap();
        assert_eq!(req.op, Operation::Setattr(arg));

        // A long LOOKUP name, after a WRITE used the same buffer.
        let name = format!("{}\0", "n".repeat(300));
        let mut bytes = header(FUSE_LOOKUP, 40 + name.len()).as_bytes().to_vec();
        bytes.extend_from_slice(name.as_bytes());
        through_socket(&mut buf, &bytes);
        let (head, payload) = buf.request();
        let req = request::parse(head, payload, FUSE_KERNEL_MINOR_VERSION).unwrap();
        let Operation::Lookup { name: got } = req.op else {
            panic!("not a lookup");
        };
        assert_eq!(got.to_bytes().len(), 300);
        buf.give_back();
    }

    #[test]
    fn the_pool_reuses_and_resizes() {
        let a = take(3 << 20).unwrap();
        assert_eq!(a.len(), 3 << 20);
        let ptr = a.as_ptr();
        give_back(a);
        let b = take(1 << 20).unwrap();
        assert_eq!(b.len(), 1 << 20);
        assert_eq!(
            b.as_ptr(),
            ptr,
            "a pooled large buffer is reused for a smaller size"
        );
        give_back(b);
        let s = take(100).unwrap();
        assert!(matches!(s, Buf::Small(_)));
        assert_eq!(s.len(), 100);
        give_back(s);
        let s = take(5000).unwrap();
        assert_eq!(s.len(), 5000);
        give_back(s);
    }
}
