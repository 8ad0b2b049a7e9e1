//! `blkdebug`: a filter that makes chosen requests fail (or wait), for tests.
//!
//! QEMU: `block/blkdebug.c` — much simpler: no config file, no event/state machine, no named
//! breakpoints. Rules are added and removed at run time from any thread; each request checks
//! them and, if one matches, fails with its errno instead of reaching the child (or sleeps
//! first, with [`Rule::delay`] — which QEMU's blkdebug does not have; tests use it to keep
//! requests in flight while they drain — or waits until the test opens a [`Gate`], with
//! [`Rule::hold`], like QEMU's `break`/`resume`).
//!
//! It is compiled into the library, not only under `cfg(test)`, because the FUSE and end-to-end
//! tests stack it under a real export; the CLI may expose it later through a hidden option.
//!
//! ```
//! use block::{BlkdebugDriver, BlkdebugOp, BlockDriver, NullDriver, Rule};
//! use std::sync::Arc;
//!
//! let dbg = BlkdebugDriver::new(Arc::new(NullDriver::new(1 << 20, false)));
//! dbg.add_rule(Rule::new(BlkdebugOp::Read).range(4096..8192).errno(libc::EIO).once());
//! let mut buf = [0u8; 512];
//! assert_eq!(dbg.co_preadv(4096, &mut buf).map_err(|e| e.errno()), Err(libc::EIO));
//! assert!(dbg.co_preadv(4096, &mut buf).is_ok()); // `once`: the rule is gone
//! ```

use std::fmt;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::{BlockDriver, BlockError, BlockStatus, Result};

/// Which requests a rule applies to. QEMU: the `iotype` of `inject-error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkdebugOp {
    Read,
    /// Writes, write-zeroes, discards and truncates.
    Write,
    Flush,
    /// Every request, block status included.
    Any,
}

/// One injection rule. Build it with [`Rule::new`] and the builder methods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub op: BlkdebugOp,
    /// Requests overlapping this byte range match (flushes and truncates match any range).
    pub range: Range<u64>,
    /// The errno to fail with; 0 = do not fail (useful with `delay`).
    pub errno: i32,
    /// Remove the rule after it fired once. QEMU: `once=on`.
    pub once: bool,
    /// Sleep this long (yielding, in a coroutine) before failing or passing the request on.
    pub delay: Option<Duration>,
    /// Panic instead of failing: tests that a panicking request is caught (EIO to the client,
    /// the export keeps serving) in both engines. Not in QEMU.
    pub panic: bool,
    /// Hold the request until this gate opens, before the delay and the errno apply.
    /// QEMU's blkdebug has `break`/`resume` for this.
    pub hold: Option<Gate>,
}

/// Keeps the requests of a [`Rule::hold`] rule waiting until [`Gate::open`]: a test keeps a
/// request in flight exactly as long as it needs to, instead of for a guessed delay.
///
/// A held request costs nothing while it waits: a coroutine yields with its waker on the gate's
/// list, a future returns `Pending` with its `Waker` there, and [`Gate::open`] wakes them all
/// (from any thread). That is what lets the memory measurements (`scripts/memory-at-scale.sh`)
/// hold tens of thousands of requests in the real daemon and look at what each one costs.
///
/// A gate made by [`Gate::released_by`] (the CLI's `hold=PATH`) opens itself when PATH
/// appears: a watcher thread, started by the first held request, looks every 20 ms and logs
/// how many requests the gate holds whenever that number changed (`blkdebug: gate PATH: N
/// request(s) held`).
#[derive(Clone, Default)]
pub struct Gate(Arc<GateInner>);

#[derive(Default)]
struct GateInner {
    open: AtomicBool,
    /// Requests waiting at the gate now.
    held: AtomicUsize,
    /// Who to wake on [`Gate::open`]. Pushed under the lock after checking `open` under it,
    /// so an `open` cannot slip between the check and the push.
    waiters: Mutex<Vec<Waiter>>,
    /// `Gate::released_by`: the file whose appearance opens the gate.
    release: Option<PathBuf>,
    watcher: OnceLock<()>,
}

enum Waiter {
    Co(runtime::CoWaker),
    Task(std::task::Waker),
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    /// A gate that opens itself when `path` exists (see the type's doc): for a test or script
    /// that holds requests in a daemon it runs as another process.
    pub fn released_by(path: PathBuf) -> Gate {
        Gate(Arc::new(GateInner {
            release: Some(path),
            ..GateInner::default()
        }))
    }

    /// Lets held requests (and all later ones) go on.
    pub fn open(&self) {
        // Release: pairs with the Acquire loads in `is_open`, so a request that sees the gate
        // open also sees what the opener did before.
        self.0.open.store(true, Ordering::Release);
        let waiters = std::mem::take(&mut *self.waiters());
        for w in waiters {
            match w {
                Waiter::Co(w) => w.wake(),
                Waiter::Task(w) => w.wake(),
            }
        }
    }

    /// How many requests wait at the gate now.
    pub fn held(&self) -> usize {
        self.0.held.load(Ordering::Relaxed)
    }

    fn is_open(&self) -> bool {
        self.0.open.load(Ordering::Acquire)
    }

    fn waiters(&self) -> MutexGuard<'_, Vec<Waiter>> {
        // Nothing panics while the lock is held; a poisoned list is still consistent.
        self.0.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the gate is open: in a coroutine by yielding, elsewhere by sleeping.
    fn co_wait(&self) {
        if self.is_open() {
            return;
        }
        self.start_watcher();
        if !runtime::in_coroutine() {
            while !self.is_open() {
                std::thread::sleep(Duration::from_millis(1));
            }
            return;
        }
        self.0.held.fetch_add(1, Ordering::Relaxed);
        loop {
            {
                let mut w = self.waiters();
                if self.is_open() {
                    break;
                }
                w.push(Waiter::Co(runtime::CoWaker::current()));
            }
            runtime::co_yield();
        }
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }

    /// Waits until the gate is open, as a future.
    fn wait_async(&self) -> GateWait<'_> {
        self.start_watcher();
        GateWait {
            gate: self,
            counted: false,
        }
    }

    /// Starts the thread that opens a [`Gate::released_by`] gate, once.
    fn start_watcher(&self) {
        let Some(path) = self.0.release.clone() else {
            return;
        };
        self.0.watcher.get_or_init(|| {
            let gate = self.clone();
            let spawned = std::thread::Builder::new()
                .name("blkdebug-gate".into())
                .spawn(move || gate.watch(&path));
            if let Err(e) = spawned {
                log::error!("blkdebug: cannot start the gate's watcher: {e}; opening it");
                self.open();
            }
        });
    }

    /// The watcher thread: logs the number held when it changed, opens the gate when `path`
    /// exists.
    fn watch(&self, path: &std::path::Path) {
        let mut logged = usize::MAX;
        loop {
            let held = self.held();
            if path.exists() {
                log::info!(
                    "blkdebug: gate {}: released {held} request(s)",
                    path.display()
                );
                self.open();
                return;
            }
            if held != logged {
                log::info!("blkdebug: gate {}: {held} request(s) held", path.display());
                logged = held;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// [`Gate::wait_async`]'s future.
struct GateWait<'a> {
    gate: &'a Gate,
    /// Counted in `held` (registered at least once).
    counted: bool,
}

impl Future for GateWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.gate.is_open() {
            let mut w = self.gate.waiters();
            if !self.gate.is_open() {
                w.push(Waiter::Task(cx.waker().clone()));
                drop(w);
                if !self.counted {
                    self.gate.0.held.fetch_add(1, Ordering::Relaxed);
                    self.counted = true;
                }
                return Poll::Pending;
            }
        }
        if std::mem::take(&mut self.counted) {
            self.gate.0.held.fetch_sub(1, Ordering::Relaxed);
        }
        Poll::Ready(())
    }
}

impl Drop for GateWait<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.gate.0.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("open", &self.is_open())
            .field("held", &self.held())
            .field("release", &self.0.release)
            .finish()
    }
}

impl PartialEq for Gate {
    fn eq(&self, other: &Gate) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Gate {}

impl Rule {
    /// A rule for `op` on every offset, failing with `EIO`, repeatedly, without delay.
    pub fn new(op: BlkdebugOp) -> Rule {
        Rule {
            op,
            range: 0..u64::MAX,
            errno: libc::EIO,
            once: false,
            delay: None,
            panic: false,
            hold: None,
        }
    }

    pub fn range(mut self, range: Range<u64>) -> Rule {
        self.range = range;
        self
    }

    pub fn errno(mut self, errno: i32) -> Rule {
        self.errno = errno;
        self
    }

    pub fn once(mut self) -> Rule {
        self.once = true;
        self
    }

    pub fn panic(mut self) -> Rule {
        self.panic = true;
        self
    }

    pub fn hold(mut self, gate: &Gate) -> Rule {
        self.hold = Some(gate.clone());
        self
    }

    pub fn delay(mut self, delay: Duration) -> Rule {
        self.delay = Some(delay);
        self
    }

    /// Parses `OP[:START-END][:ERRNO][:once][:panic][:hold=PATH]`, e.g.
    /// `read:4096-8192:EIO:once`, `flush` or `read:hold=/tmp/go`. OP is `read`, `write`, `flush`
    /// or `any`; ERRNO a number or EIO, ENOSPC, EROFS, EINVAL, EPERM. `hold=PATH` holds every
    /// matching request at a [`Gate::released_by`] PATH, then passes it on (unless an ERRNO
    /// is given too). The form of the CLI's hidden `--inject-error` option, for tests.
    pub fn parse(spec: &str) -> std::result::Result<Rule, String> {
        let mut parts = spec.split(':');
        let op = match parts.next().unwrap_or("") {
            "read" => BlkdebugOp::Read,
            "write" => BlkdebugOp::Write,
            "flush" => BlkdebugOp::Flush,
            "any" => BlkdebugOp::Any,
            other => return Err(format!("unknown operation '{other}' in '{spec}'")),
        };
        let mut rule = Rule::new(op);
        let mut errno_given = false;
        for part in parts {
            if let Some(path) = part.strip_prefix("hold=") {
                if path.is_empty() {
                    return Err(format!("'hold=' needs a path in '{spec}'"));
                }
                rule.hold = Some(Gate::released_by(PathBuf::from(path)));
            } else if part == "once" {
                rule.once = true;
            } else if part == "panic" {
                rule.panic = true;
            } else if let Some((a, b)) = part.split_once('-') {
                let (a, b) = (a.parse::<u64>(), b.parse::<u64>());
                match (a, b) {
                    (Ok(a), Ok(b)) if a < b => rule.range = a..b,
                    _ => return Err(format!("bad range '{part}' in '{spec}'")),
                }
            } else {
                errno_given = true;
                rule.errno = match part {
                    "EIO" => libc::EIO,
                    "ENOSPC" => libc::ENOSPC,
                    "EROFS" => libc::EROFS,
                    "EINVAL" => libc::EINVAL,
                    "EPERM" => libc::EPERM,
                    n => n
                        .parse()
                        .map_err(|_| format!("bad errno '{n}' in '{spec}'"))?,
                };
            }
        }
        if rule.hold.is_some() && !errno_given {
            rule.errno = 0;
        }
        Ok(rule)
    }

    fn matches(&self, op: BlkdebugOp, offset: u64, len: u64) -> bool {
        let op_matches = self.op == BlkdebugOp::Any || self.op == op;
        let ranged = matches!(op, BlkdebugOp::Read | BlkdebugOp::Write) && len != u64::MAX;
        let overlaps = !ranged
            || (offset < self.range.end && offset.saturating_add(len.max(1)) > self.range.start);
        op_matches && overlaps
    }
}

/// Identifies a rule for [`BlkdebugDriver::remove_rule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

/// The error-injecting filter. QEMU: `BDRVBlkdebugState`.
pub struct BlkdebugDriver {
    child: Arc<dyn BlockDriver>,
    /// Held only to look at the rules, never across a yield.
    rules: Mutex<Vec<(RuleId, Rule)>>,
    next_id: AtomicU64,
    injected: AtomicU64,
}

impl BlkdebugDriver {
    pub fn new(child: Arc<dyn BlockDriver>) -> BlkdebugDriver {
        BlkdebugDriver {
            child,
            rules: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    fn rules(&self) -> MutexGuard<'_, Vec<(RuleId, Rule)>> {
        // Nothing panics while the lock is held; a poisoned list is still consistent.
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a rule; rules are checked in the order added, the first match wins.
    pub fn add_rule(&self, rule: Rule) -> RuleId {
        let id = RuleId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.rules().push((id, rule));
        id
    }

    /// Removes a rule; returns whether it was still there.
    pub fn remove_rule(&self, id: RuleId) -> bool {
        let mut rules = self.rules();
        let before = rules.len();
        rules.retain(|(i, _)| *i != id);
        rules.len() != before
    }

    /// Whether a rule is still there (a [`Rule::once`] rule is gone from its first hit on:
    /// tests wait for that to know a request has reached the point the rule holds it at).
    pub fn has_rule(&self, id: RuleId) -> bool {
        self.rules().iter().any(|(i, _)| *i == id)
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.rules().clear();
    }

    /// How many requests failed by injection so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The child node.
    pub fn child(&self) -> &Arc<dyn BlockDriver> {
        &self.child
    }

    /// The first rule matching a request (a `once` rule is removed as it fires).
    fn hit(&self, op: BlkdebugOp, offset: u64, len: u64) -> Option<Rule> {
        let mut rules = self.rules();
        let found = rules.iter().position(|(_, r)| r.matches(op, offset, len));
        match found {
            Some(i) if rules[i].1.once => Some(rules.remove(i).1),
            Some(i) => Some(rules[i].1.clone()),
            None => None,
        }
    }

    /// Applies the first matching rule: waits for its gate, sleeps for its delay, then fails with
    /// its errno. QEMU: `rule_check()`.
    fn check(&self, op: BlkdebugOp, offset: u64, len: u64) -> Result<()> {
        let Some(rule) = self.hit(op, offset, len) else {
            return Ok(());
        };
        if let Some(gate) = &rule.hold {
            gate.co_wait();
        }
        if let Some(delay) = rule.delay {
            if runtime::in_coroutine() {
                runtime::co_sleep(delay);
            } else {
                std::thread::sleep(delay);
            }
        }
        self.fire(&rule, op, offset, len)
    }

    /// [`BlkdebugDriver::check`] for the async engine, which drives this filter natively (the
    /// gate and the delay are awaited): `AsyncPath` calls it before the child's I/O.
    pub async fn check_async(&self, op: BlkdebugOp, offset: u64, len: u64) -> Result<()> {
        let Some(rule) = self.hit(op, offset, len) else {
            return Ok(());
        };
        if let Some(gate) = &rule.hold {
            gate.wait_async().await;
        }
        if let Some(delay) = rule.delay {
            runtime::executor::sleep(delay).await;
        }
        self.fire(&rule, op, offset, len)
    }

    /// The end of a matching rule: a panic, an errno, or (errno 0) nothing.
    fn fire(&self, rule: &Rule, op: BlkdebugOp, offset: u64, len: u64) -> Result<()> {
        if rule.panic {
            panic!("blkdebug: injected panic in {op:?} at {offset}+{len}");
        }
        if rule.errno == 0 {
            return Ok(());
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        log::debug!(
            "blkdebug: injecting errno {} into {op:?} at {offset}+{len}",
            rule.errno
        );
        Err(BlockError::Io(io::Error::from_raw_os_error(rule.errno)))
    }
}

impl BlockDriver for BlkdebugDriver {
    fn format_name(&self) -> &'static str {
        "blkdebug"
    }

    fn getlength(&self) -> u64 {
        self.child.getlength()
    }

    fn request_alignment(&self) -> u64 {
        self.child.request_alignment()
    }

    fn size_granularity(&self) -> u64 {
        self.child.size_granularity()
    }

    fn min_mem_alignment(&self) -> u64 {
        self.child.min_mem_alignment()
    }

    fn is_read_only(&self) -> bool {
        self.child.is_read_only()
    }

    fn co_preadv(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(BlkdebugOp::Read, offset, buf.len() as u64)?;
        self.child.co_preadv(offset, buf)
    }

    fn co_pwritev(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check(BlkdebugOp::Write, offset, buf.len() as u64)?;
        self.child.co_pwritev(offset, buf)
    }

    fn co_flush(&self) -> Result<()> {
        self.check(BlkdebugOp::Flush, 0, u64::MAX)?;
        self.child.co_flush()
    }

    fn co_pwrite_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check(BlkdebugOp::Write, offset, len)?;
        self.child.co_pwrite_zeroes(offset, len, may_unmap)
    }

    fn co_pdiscard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(BlkdebugOp::Write, offset, len)?;
        self.child.co_pdiscard(offset, len)
    }

    fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        // Only `Any` rules reach block status (QEMU's blkdebug has a separate `block-status`
        // iotype).
        self.check(BlkdebugOp::Any, offset, len)?;
        self.child.co_block_status(offset, len)
    }

    fn co_truncate(&self, size: u64) -> Result<()> {
        self.check(BlkdebugOp::Write, 0, u64::MAX)?;
        self.child.co_truncate(size)
    }

    fn close(&self) -> Result<()> {
        self.child.close()
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
    fn rules_match_op_and_range() {
        let r = Rule::new(BlkdebugOp::Read).range(100..200);
        assert!(r.matches(BlkdebugOp::Read, 150, 1));
        assert!(r.matches(BlkdebugOp::Read, 0, 101), "overlap from below");
        assert!(
            !r.matches(BlkdebugOp::Read, 0, 100),
            "ends where the range starts"
        );
        assert!(!r.matches(BlkdebugOp::Read, 200, 10));
        assert!(!r.matches(BlkdebugOp::Write, 150, 1));
        assert!(Rule::new(BlkdebugOp::Flush)
            .range(5..6)
            .matches(BlkdebugOp::Flush, 0, u64::MAX));
        assert!(Rule::new(BlkdebugOp::Any).matches(BlkdebugOp::Write, 7, 1));
    }

    #[test]
    fn remove_and_count() {
        let dbg = BlkdebugDriver::new(Arc::new(NullDriver::new(4096, false)));
        let id = dbg.add_rule(Rule::new(BlkdebugOp::Write).errno(libc::ENOSPC));
        assert_eq!(
            dbg.co_pwritev(0, &[1]).map_err(|e| e.errno()),
            Err(libc::ENOSPC)
        );
        assert_eq!(
            dbg.co_pwritev(0, &[1]).map_err(|e| e.errno()),
            Err(libc::ENOSPC)
        );
        assert_eq!(dbg.injected(), 2);
        assert!(dbg.remove_rule(id));
        assert!(!dbg.remove_rule(id));
        assert!(dbg.co_pwritev(0, &[1]).is_ok());
    }
}
