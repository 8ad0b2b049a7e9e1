//! The `null-co` driver: a device of a given size that reads as zeros and forgets writes.
//!
//! QEMU: `block/null.c` (`null-co` with `read-zeroes=on`). Benchmarks use it to measure the
//! transport (FUSE, coroutines, the event loop) without any storage underneath.
//!
//! ## Latency: requests that suspend
//!
//! By default every request completes inline: the coroutine (or future) that asked never
//! yields, so a benchmark on it measures how requests are *created*, not how they wait. A
//! [`NullLatency`] makes reads, writes, flushes, write-zeroes and discards wait before they
//! complete, the way a device would:
//!
//! - [`NullLatency::Sleep`]`(d)` — QEMU's `latency-ns`: the request arms a timer on its
//!   thread's `AioContext` for `d` and suspends (`co_sleep` in a coroutine, the executor's
//!   `sleep` in a task); the timer resumes it. Other requests run meanwhile. The latency is a
//!   lower bound: an epoll loop sleeps in whole milliseconds (`epoll_wait`'s timeout is rounded
//!   up), so a lone request waits about 1 ms for any latency below that; requests that arrive
//!   while the loop is awake share its wake-ups.
//! - [`NullLatency::YieldOnce`] — QEMU's `null-aio` with `latency-ns=0`, whose completion
//!   comes from a one-shot bottom half: the request suspends once and the next pass of its
//!   loop resumes it (a coroutine: a one-shot BH wakes it; a task: it wakes itself, and the
//!   executor's ready-queue BH polls it again). The cheapest real suspension.
//!
//! Block status and truncate never wait (QEMU's `null_co_block_status` does not either).
//! Called outside any coroutine or task (a flush at close, a `co_wrapper` from a plain thread),
//! `Sleep` blocks the thread with `std::thread::sleep` and `YieldOnce` does nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// How long each read, write, flush, write-zeroes and discard of a [`NullDriver`] waits
/// before it completes (see the [module documentation](self)).
///
/// QEMU: `null-co`'s `latency-ns` option (and `null-aio`'s bottom-half completion for
/// [`NullLatency::YieldOnce`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NullLatency {
    /// Complete inline, never suspend (QEMU `latency-ns=0`).
    #[default]
    Inline,
    /// Suspend once; a bottom half resumes the request on the next pass of its loop.
    YieldOnce,
    /// Suspend on the context's timer for this long (QEMU `latency-ns`); zero is `Inline`.
    Sleep(Duration),
}

/// The `null-co` driver. QEMU: `BDRVNullState`.
pub struct NullDriver {
    /// Only `co_truncate` changes it, under the backend's resize lock; the backend caches the
    /// value (with its own ordering), so Relaxed suffices here.
    size: AtomicU64,
    read_only: bool,
    latency: NullLatency,
}

impl NullDriver {
    /// A null device of `size` bytes whose requests complete inline.
    pub fn new(size: u64, read_only: bool) -> NullDriver {
        NullDriver::with_latency(size, read_only, NullLatency::Inline)
    }

    /// A null device of `size` bytes whose requests wait as `latency` says.
    pub fn with_latency(size: u64, read_only: bool, latency: NullLatency) -> NullDriver {
        let latency = match latency {
            NullLatency::Sleep(d) if d.is_zero() => NullLatency::Inline,
            l => l,
        };
        NullDriver {
            size: AtomicU64::new(size),
            read_only,
            latency,
        }
    }

    /// The latency the requests of this device wait.
    pub fn latency(&self) -> NullLatency {
        self.latency
    }

    /// The wait of one request in the coroutine engine. QEMU: `null_co_common()`.
    fn co_wait(&self) {
        match self.latency {
            NullLatency::Inline => {}
            NullLatency::YieldOnce => {
                if runtime::in_coroutine() {
                    let me = runtime::CoWaker::current();
                    runtime::AioContext::with_current(|ctx| {
                        ctx.schedule_oneshot(move || me.wake())
                    });
                    runtime::co_yield();
                }
            }
            NullLatency::Sleep(d) => {
                if runtime::in_coroutine() {
                    runtime::co_sleep(d);
                } else {
                    std::thread::sleep(d);
                }
            }
        }
    }

    /// The wait of one request in the async engine: the same suspension as [`Self::co_wait`],
    /// as a future.
    pub(crate) async fn wait_async(&self) {
        match self.latency {
            NullLatency::Inline => {}
            NullLatency::YieldOnce => runtime::executor::yield_now().await,
            NullLatency::Sleep(d) => runtime::executor::sleep(d).await,
        }
    }

    /// The async engine's forms of the data operations: the same checks, the same wait.
    pub(crate) async fn preadv_async(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        self.wait_async().await;
        Ok(())
    }

    pub(crate) async fn pwritev_async(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.wait_async().await;
        Ok(())
    }

    pub(crate) async fn flush_async(&self) -> Result<()> {
        self.wait_async().await;
        Ok(())
    }

    pub(crate) async fn pwrite_zeroes_async(
        &self,
        _off: u64,
        _len: u64,
        _unmap: bool,
    ) -> Result<()> {
        self.check_writable()?;
        self.wait_async().await;
        Ok(())
    }

    pub(crate) async fn pdiscard_async(&self, _offset: u64, _len: u64) -> Result<()> {
        self.check_writable()?;
        self.wait_async().await;
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        "null-co"
    }

    fn getlength(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn co_preadv(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        self.co_wait();
        Ok(())
    }

    fn co_pwritev(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.co_wait();
        Ok(())
    }

    fn co_flush(&self) -> Result<()> {
        self.co_wait();
        Ok(())
    }

    fn co_pwrite_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.co_wait();
        Ok(())
    }

    fn co_pdiscard(&self, _offset: u64, _len: u64) -> Result<()> {
        self.check_writable()?;
        self.co_wait();
        Ok(())
    }

    fn co_block_status(&self, _offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        Ok((BlockStatus::Zero, len.max(1)))
    }

    fn co_truncate(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }
}
