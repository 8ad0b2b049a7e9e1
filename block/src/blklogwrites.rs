//! `blklogwrites`: a filter that records every write, write-zeroes, discard, truncate and flush
//! its parent sends to its child, in the order they complete, for crash-consistency tests.
//!
//! QEMU: `block/blklogwrites.c` — which appends each request to a second image in the
//! dm-log-writes format, to be replayed by an outside tool. Here the log stays in memory
//! ([`BlklogwritesDriver::log`]) and the replaying is the test's (`block/tests/qcow2_crash.rs`
//! replays every state a power cut could leave). Reads and block status pass through unlogged.
//!
//! What the log says about durability: a [`LoggedOp::Flush`] carries `durable`, the number of
//! log entries that had completed when the flush was *issued* — those, and no others, are
//! guaranteed on disk once it completes (`fdatasync` says nothing about writes completing
//! while it runs). A request that fails is not logged (the tests that use the log inject no
//! errors). `close` is logged as a flush: the file driver's `close` is an `fdatasync`.
//!
//! Like [`crate::blkdebug`] it is compiled into the library, not only under `cfg(test)`, so
//! that integration tests can stack it under a format driver.
//!
//! ```
//! use block::{BlklogwritesDriver, BlockDriver, LoggedOp, NullDriver};
//! use std::sync::Arc;
//!
//! let log = BlklogwritesDriver::new(Arc::new(NullDriver::new(1 << 20, false)));
//! log.co_pwritev(4096, &[1; 512]).unwrap();
//! log.co_flush().unwrap();
//! let entries = log.log();
//! assert_eq!(entries[0], LoggedOp::Write { offset: 4096, data: vec![1; 512] });
//! assert_eq!(entries[1], LoggedOp::Flush { durable: 1 });
//! ```

use std::sync::{Arc, Mutex, MutexGuard};

use crate::{BlockDriver, BlockStatus, Result};

/// One completed request. QEMU: a `struct log_write_entry` of `block/blklogwrites.c`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoggedOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Truncate {
        size: u64,
    },
    /// A completed flush: the first `durable` entries of the log are on disk.
    Flush {
        durable: usize,
    },
}

/// The write-logging filter. QEMU: `BDRVBlkLogWritesState`.
pub struct BlklogwritesDriver {
    child: Arc<dyn BlockDriver>,
    /// Completed requests in completion order. Held only to push or copy, never across a
    /// yield.
    log: Mutex<Vec<LoggedOp>>,
}

impl BlklogwritesDriver {
    pub fn new(child: Arc<dyn BlockDriver>) -> BlklogwritesDriver {
        BlklogwritesDriver {
            child,
            log: Mutex::new(Vec::new()),
        }
    }

    fn entries(&self) -> MutexGuard<'_, Vec<LoggedOp>> {
        // Nothing panics while the lock is held; a poisoned log is still consistent.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the log so far.
    pub fn log(&self) -> Vec<LoggedOp> {
        self.entries().clone()
    }

    /// How many requests have completed so far (the log's length).
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether nothing was logged yet.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// The child node.
    pub fn child(&self) -> &Arc<dyn BlockDriver> {
        &self.child
    }

    /// Appends `op` if `res` says the request succeeded; returns `res`.
    fn record(&self, res: Result<()>, op: impl FnOnce() -> LoggedOp) -> Result<()> {
        if res.is_ok() {
            self.entries().push(op());
        }
        res
    }

    /// Runs a flush-like request (`flush`, `close`) and logs it with what it made durable.
    fn flush_with(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let durable = self.len();
        let res = f();
        self.record(res, || LoggedOp::Flush { durable })
    }
}

impl BlockDriver for BlklogwritesDriver {
    fn format_name(&self) -> &'static str {
        "blklogwrites"
    }

    fn getlength(&self) -> u64 {
        self.child.getlength()
    }

    fn request_alignment(&self) -> u64 {
        self.child.request_alignment()
    }

    fn min_mem_alignment(&self) -> u64 {
        self.child.min_mem_alignment()
    }

    fn is_read_only(&self) -> bool {
        self.child.is_read_only()
    }

    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.child.co_preadv(offset, buf)
    }

    fn co_pwritev(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let res = self.child.co_pwritev(offset, buf);
        self.record(res, || LoggedOp::Write {
            offset,
            data: buf.to_vec(),
        })
    }

    fn co_flush(&self) -> Result<()> {
        self.flush_with(|| self.child.co_flush())
    }

    fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let res = self.child.co_pwrite_zeroes(offset, len, may_unmap);
        self.record(res, || LoggedOp::WriteZeroes { offset, len })
    }

    fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        let res = self.child.co_pdiscard(offset, len);
        self.record(res, || LoggedOp::Discard { offset, len })
    }

    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        self.child.co_block_status(offset, len)
    }

    fn co_truncate(&self, size: u64) -> Result<()> {
        let res = self.child.co_truncate(size);
        self.record(res, || LoggedOp::Truncate { size })
    }

    fn close(&self) -> Result<()> {
        self.flush_with(|| self.child.close())
    }

    /// A filter is transparent: block status through the chain looks below its child.
    fn backing_node(&self) -> Option<&dyn BlockDriver> {
        self.child.backing_node()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NullDriver;

    #[test]
    fn every_kind_is_logged_in_completion_order() {
        let log = BlklogwritesDriver::new(Arc::new(NullDriver::new(1 << 20, false)));
        log.co_pwritev(0, &[7; 3]).expect("write");
        log.co_pwrite_zeroes(512, 1024, true).expect("zeroes");
        log.co_flush().expect("flush");
        log.co_pdiscard(4096, 4096).expect("discard");
        let mut buf = [0u8; 16];
        log.co_preadv(0, &mut buf).expect("read (not logged)");
        log.close().expect("close");
        assert_eq!(
            log.log(),
            vec![
                LoggedOp::Write {
                    offset: 0,
                    data: vec![7; 3]
                },
                LoggedOp::WriteZeroes {
                    offset: 512,
                    len: 1024
                },
                LoggedOp::Flush { durable: 2 },
                LoggedOp::Discard {
                    offset: 4096,
                    len: 4096
                },
                LoggedOp::Flush { durable: 4 },
            ]
        );
    }

    #[test]
    fn failed_requests_are_not_logged() {
        let log = BlklogwritesDriver::new(Arc::new(NullDriver::new(4096, true)));
        assert!(log.co_pwritev(0, &[1]).is_err(), "read-only null");
        assert!(log.is_empty());
    }
}
