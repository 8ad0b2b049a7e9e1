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

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<AtomicBool>);

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Lets held requests (and all later ones) go on.
    pub fn open(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_open(&self) -> bool {
        self.0.load(Ordering::Acquire)
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

    /// Parses `OP[:START-END][:ERRNO][:once][:panic]`, e.g. `read:4096-8192:EIO:once` or `flush`.
    /// OP is `read`, `write`, `flush` or `any`; ERRNO a number or EIO, ENOSPC, EROFS, EINVAL,
    /// EPERM. The form of the CLI's hidden `--inject-error` option, for tests.
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
        for part in parts {
            if part == "once" {
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

    /// Applies the first matching rule: waits for its gate, sleeps for its delay, then fails with
    /// its errno. QEMU: `rule_check()`.
    fn check(&self, op: BlkdebugOp, offset: u64, len: u64) -> Result<()> {
        let hit = {
            let mut rules = self.rules();
            let found = rules.iter().position(|(_, r)| r.matches(op, offset, len));
            match found {
                Some(i) if rules[i].1.once => Some(rules.remove(i).1),
                Some(i) => Some(rules[i].1.clone()),
                None => None,
            }
        };
        let Some(rule) = hit else { return Ok(()) };
        let sleep = |d: Duration| {
            if runtime::in_coroutine() {
                runtime::co_sleep(d);
            } else {
                std::thread::sleep(d);
            }
        };
        if let Some(gate) = &rule.hold {
            while !gate.is_open() {
                sleep(Duration::from_millis(1));
            }
        }
        if let Some(delay) = rule.delay {
            sleep(delay);
        }
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
