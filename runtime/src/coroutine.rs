//! Stackful coroutines on corosensei: create, enter, yield, self, wake — and the stack pool.
//!
//! QEMU: `util/qemu-coroutine.c` (`qemu_coroutine_create`, `qemu_aio_coroutine_enter`,
//! `qemu_coroutine_yield`, `qemu_coroutine_self`, `qemu_in_coroutine`, the coroutine pool) and
//! `util/async.c` (`aio_co_wake`, `aio_co_schedule`).
//!
//! ## The model
//!
//! A coroutine is a function with its own stack that can stop in the middle ([`co_yield`]) and be
//! continued later ([`Coroutine::enter`]). Entering runs it *on the caller's thread, inside the
//! caller's call*: `enter` returns when the coroutine yields or finishes. Code that may yield is
//! marked with a `co_` prefix, as QEMU marks it `coroutine_fn`.
//!
//! **A coroutine never changes thread.** It belongs to the thread that created it (its *home*),
//! whose [`AioContext`] runs it. [`Coroutine`] is the local handle (it can enter; it is `!Send`):
//!
//! ```compile_fail
//! fn assert_send<T: Send>() {}
//! assert_send::<runtime::Coroutine>();
//! ```
//!
//! [`CoWaker`] is the `Send` handle: it can only wake. Waking ([`CoWaker::wake`], QEMU's
//! `aio_co_wake`) does one of three things:
//! - from another thread: queue the coroutine on its home context, which enters it from its next
//!   `poll()` (a message, not a jump — QEMU's `aio_co_schedule`);
//! - from home, inside another coroutine: enter it right after the current coroutine yields
//!   (QEMU's `co_queue_wakeup`), so coroutines never nest by accident;
//! - from home, outside any coroutine: enter it at once.
//!
//! Misuse aborts the process with a message, as QEMU does: entering a coroutine that is running
//! ("re-entered recursively"), entering or waking one that has finished, waking one that already
//! has a wake-up pending. These are logic errors that would otherwise corrupt a stack.
//!
//! A panic inside a coroutine is caught at its boundary: [`spawn`] hands it to whoever joins, a
//! [`Coroutine::new`] coroutine has it logged. It never unwinds into the event loop.
//!
//! ## Stacks
//!
//! Stacks come from corosensei's `DefaultStack`: `mmap`ed, with a guard page below, so an overflow
//! is a clean SIGSEGV rather than silent corruption. Finished coroutines return their stack to a
//! per-thread pool (at most [`PoolConfig::max_pooled`], 256 by default), so a request costs no
//! `mmap`. The default size is 256 KiB: the request handlers keep their buffers on the heap and
//! their deepest path (FUSE dispatch → block layer → qcow2 → thread-pool submit) uses a few KiB,
//! so this leaves a wide margin while a pool of 256 stays at 64 MiB of *address space*; only the
//! pages a coroutine actually touched cost memory. QEMU uses 1 MiB because its coroutines also
//! run arbitrary device emulation code. Change it with [`set_pool_config`].
//!
//! Mapping a stack can fail (`ENOMEM` from memory, `RLIMIT_AS` or `vm.max_map_count`).
//! [`Coroutine::try_new`] returns that error, so a server answers the one request and keeps
//! going; [`Coroutine::new`] and [`spawn`] abort, as QEMU does, and are for code that has no one
//! to answer. [`inject_stack_failures`] makes creations fail on purpose, for tests.
//!
//! How much of its stack a path really uses is measured with a canary fill
//! ([`set_stack_canary`]): each new stack is filled with a pattern, each coroutine that returns
//! has its stack scanned for the deepest overwritten word, and [`stack_high_water`] reports the
//! most any coroutine used. It is off by default; off, it costs one relaxed load per finished
//! coroutine (`scripts/memory-at-scale.sh` measures the paths; `docs/comparison.md` has them).
//!
//! Suspended coroutines left when a thread exits are leaked with a warning, not unwound: their
//! destructors would run in a dying thread, against a context that no longer polls.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use corosensei::stack::DefaultStack;
use corosensei::{CoroutineResult, Yielder};

use crate::aio::{self, AioContext, Remote, Resume, Shared};

type Body = corosensei::Coroutine<(), (), (), DefaultStack>;

const SUSPENDED: u8 = 0; // created, or yielded
const RUNNING: u8 = 1;
const FINISHED: u8 = 2;

/// The part of a coroutine that handles (and other threads) share.
struct CoShared {
    home: Arc<Shared>,
    /// Index into the home thread's coroutine table.
    slot: u32,
    state: AtomicU8,
    /// A wake-up is pending (QEMU: `Coroutine::scheduled`).
    scheduled: AtomicBool,
}

/// Stack pool settings. QEMU: `COROUTINE_STACK_SIZE`, `POOL_MIN_BATCH_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Usable stack size in bytes (a guard page is added).
    pub stack_size: usize,
    /// Stacks kept per thread for reuse; finished coroutines beyond that unmap theirs.
    pub max_pooled: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            stack_size: 256 * 1024,
            max_pooled: 256,
        }
    }
}

static STACK_SIZE: AtomicUsize = AtomicUsize::new(256 * 1024);
static MAX_POOLED: AtomicUsize = AtomicUsize::new(256);
static LIVE_STACKS: AtomicUsize = AtomicUsize::new(0);
/// [`set_stack_canary`]: fill new stacks, scan returned ones.
static CANARY: AtomicBool = AtomicBool::new(false);
/// The deepest use [`set_stack_canary`] found, in bytes from the stack's top.
static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);
/// The fill pattern: unlikely as a return address, a pointer or a small integer.
const CANARY_WORD: u64 = 0x5afe_57ac_ca4a_21e5;

/// Measurement hook: when on, every coroutine stack mapped from now on is filled with a pattern
/// (which touches all its pages: memory measurements must leave it off), and every coroutine
/// that returns has its stack scanned for the deepest word no longer holding the pattern;
/// [`stack_high_water`] reports the most used. Turn it on before the first coroutine is
/// created: a stack mapped before holds no pattern and would count as wholly used.
pub fn set_stack_canary(on: bool) {
    CANARY.store(on, Ordering::Relaxed);
}

/// The most stack any finished coroutine used, in bytes (rounded up to 8), since
/// [`set_stack_canary`] was turned on; `None` when it is off.
pub fn stack_high_water() -> Option<usize> {
    CANARY
        .load(Ordering::Relaxed)
        .then(|| HIGH_WATER.load(Ordering::Relaxed))
}

/// The usable words of a stack: above the guard page, up to its top.
fn stack_words(stack: &DefaultStack) -> (*mut u64, usize) {
    use corosensei::stack::Stack;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let bottom = stack.limit().get() + page; // `limit` includes the guard page
    let top = stack.base().get();
    (bottom as *mut u64, (top - bottom) / 8)
}

#[cold]
fn canary_fill(stack: &DefaultStack) {
    let (bottom, words) = stack_words(stack);
    // SAFETY: `[bottom, bottom + words)` is the stack's read-write mapping (corosensei's
    // `DefaultStack` maps everything above the guard page read-write), 8-aligned (page-aligned
    // bottom), and no coroutine runs on this new stack yet, so nothing else refers to it.
    unsafe { std::slice::from_raw_parts_mut(bottom, words) }.fill(CANARY_WORD);
}

#[cold]
fn canary_scan(stack: &DefaultStack) {
    let (bottom, words) = stack_words(stack);
    // SAFETY: as in `canary_fill`; the coroutine that ran on this stack has returned, so the
    // memory is not being written while we read it.
    let mem = unsafe { std::slice::from_raw_parts(bottom, words) };
    let untouched = mem.iter().position(|&w| w != CANARY_WORD).unwrap_or(words);
    HIGH_WATER.fetch_max((words - untouched) * 8, Ordering::Relaxed);
}

/// Changes the stack pool settings for coroutines created from now on, in every thread.
pub fn set_pool_config(cfg: PoolConfig) {
    STACK_SIZE.store(cfg.stack_size, Ordering::Relaxed);
    MAX_POOLED.store(cfg.max_pooled, Ordering::Relaxed);
}

/// The current stack pool settings.
pub fn pool_config() -> PoolConfig {
    PoolConfig {
        stack_size: STACK_SIZE.load(Ordering::Relaxed),
        max_pooled: MAX_POOLED.load(Ordering::Relaxed),
    }
}

/// The number of coroutine stacks currently mapped in the whole process (in use or pooled).
pub fn mapped_stacks() -> usize {
    LIVE_STACKS.load(Ordering::Relaxed)
}

struct Slot {
    shared: Arc<CoShared>,
    body: Option<Body>,
    /// Set by the body when it first runs; valid while the body is alive.
    yielder: *const Yielder<(), ()>,
}

/// Per-thread coroutine state. Borrowed only briefly: never across a stack switch.
struct Table {
    slots: Vec<Slot>,
    /// Slots whose coroutine finished, ready for reuse.
    free: Vec<u32>,
    /// Slot of the innermost coroutine running on this thread; an `enter` saves the outer one
    /// in its own frame and restores it afterwards.
    current: Option<u32>,
    /// That coroutine's `Yielder` (null before its body stored it), for `co_yield`.
    current_yielder: *const Yielder<(), ()>,
    stacks: Vec<(usize, DefaultStack)>,
    /// Wake-ups issued from inside a coroutine for coroutines of this thread; run after the
    /// current coroutine yields. QEMU: `Coroutine::co_queue_wakeup`.
    deferred: VecDeque<CoWaker>,
    /// An `enter` further up this thread's stack is running the deferred wake-ups.
    draining: bool,
}

impl Table {
    /// Thread exit: suspended coroutines are leaked (see the module doc), pooled stacks unmapped.
    fn release(&mut self) {
        let suspended: Vec<Body> = self
            .slots
            .iter_mut()
            .filter_map(|s| s.body.take())
            .collect();
        if !suspended.is_empty() {
            log::warn!(
                "{} coroutine(s) still suspended at thread exit; leaking them",
                suspended.len()
            );
            std::mem::forget(suspended);
        }
        LIVE_STACKS.fetch_sub(self.stacks.len(), Ordering::Relaxed);
        self.stacks.clear();
        self.deferred.clear();
    }
}

/// Runs `Table::release` when the thread exits. The table itself has no destructor, so each
/// access to it is a plain thread-local access: a thread-local with a destructor pays a
/// registration check on every access, measurable on the enter/yield path.
struct TableRelease;

impl Drop for TableRelease {
    fn drop(&mut self) {
        let _ = TABLE.try_with(|t| t.borrow_mut().release());
    }
}

thread_local! {
    static TABLE: ManuallyDrop<RefCell<Table>> = const {
        ManuallyDrop::new(RefCell::new(Table {
            slots: Vec::new(),
            free: Vec::new(),
            current: None,
            current_yielder: std::ptr::null(),
            stacks: Vec::new(),
            deferred: VecDeque::new(),
            draining: false,
        }))
    };
    static RELEASE: TableRelease = const { TableRelease };
}

#[cold]
fn fatal(msg: fmt::Arguments<'_>) -> ! {
    eprintln!("coro-fuse: fatal coroutine error: {msg}");
    std::process::abort();
}

/// A coroutine of this thread. Clone freely; entering needs this `!Send` handle.
///
/// QEMU: `Coroutine *`.
#[derive(Clone)]
pub struct Coroutine {
    shared: Arc<CoShared>,
    _not_send: PhantomData<*const ()>,
}

/// A `Send + Sync` handle that can only wake its coroutine. QEMU: passing a `Coroutine *` to
/// `aio_co_wake()` from any thread.
#[derive(Clone)]
pub struct CoWaker {
    shared: Arc<CoShared>,
}

impl Coroutine {
    /// Creates a coroutine that will run `f` on a pooled stack when first entered. A panic in `f`
    /// is caught and logged; use [`spawn`] to receive it.
    ///
    /// QEMU: `qemu_coroutine_create()`.
    ///
    /// Aborts if no stack can be mapped (see [`Coroutine::try_new`] for the fallible form).
    pub fn new(f: impl FnOnce() + 'static) -> Coroutine {
        match Self::try_new(f) {
            Ok(co) => co,
            Err(e) => fatal(format_args!("{NO_STACK}: {e}")),
        }
    }

    /// Like [`Coroutine::new`], but when no stack can be had — `mmap` fails with `ENOMEM`
    /// (memory, `RLIMIT_AS`, `vm.max_map_count`) or [`inject_stack_failures`] says so — returns
    /// the error instead of aborting, and `f` is dropped unrun. For code that can answer a
    /// failure (a request replies `ENOMEM`) rather than lose the process.
    ///
    /// QEMU: `qemu_coroutine_create()` cannot fail (it aborts when the allocation does).
    pub fn try_new(f: impl FnOnce() + 'static) -> io::Result<Coroutine> {
        Self::create(move || {
            if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
                log::error!("{}", CoPanic::from_payload(p));
            }
        })
    }

    /// `f` must not unwind (the callers catch panics). A closure bigger than corosensei moves
    /// onto the new stack (1 KiB) is boxed first; the size is known at compile time, so the
    /// common small closure pays nothing.
    fn create<F: FnOnce() + 'static>(f: F) -> io::Result<Coroutine> {
        const MAX_INLINE: usize = 512;
        if std::mem::size_of::<F>() > MAX_INLINE {
            return Coroutine::create_inline(Box::new(f));
        }
        Coroutine::create_inline(f)
    }

    fn create_inline(f: impl FnOnce() + 'static) -> io::Result<Coroutine> {
        let home = AioContext::with_current(|ctx| ctx.shared().clone());
        RELEASE.with(|_| {}); // registers the thread-exit release (cheap after the first time)
        let cfg_size = STACK_SIZE.load(Ordering::Relaxed);
        if FAIL_STACKS.fire() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let stack = loop {
                match t.stacks.pop() {
                    Some((size, stack)) if size == cfg_size => break stack,
                    Some(_) => LIVE_STACKS.fetch_sub(1, Ordering::Relaxed), // size changed
                    None => break new_stack(cfg_size)?,
                };
            };
            let slot = match t.free.pop() {
                Some(i) => {
                    let s = &mut t.slots[i as usize];
                    // Reuse the shared block when no stale handle can still observe it.
                    if Arc::strong_count(&s.shared) == 1 && Arc::ptr_eq(&s.shared.home, &home) {
                        s.shared.state.store(SUSPENDED, Ordering::Relaxed);
                        s.shared.scheduled.store(false, Ordering::Relaxed);
                    } else {
                        s.shared = Arc::new(CoShared::new(home, i));
                    }
                    i
                }
                None => {
                    let i = u32::try_from(t.slots.len()).unwrap_or_else(|_| {
                        fatal(format_args!("more than 4 billion coroutines on one thread"))
                    });
                    let shared = Arc::new(CoShared::new(home, i));
                    t.slots.push(Slot {
                        shared,
                        body: None,
                        yielder: std::ptr::null(),
                    });
                    i
                }
            };
            let body = Body::with_stack(stack, move |yielder: &Yielder<(), ()>, ()| {
                TABLE.with(|t| {
                    let mut t = t.borrow_mut();
                    t.slots[slot as usize].yielder = yielder;
                    t.current_yielder = yielder;
                });
                f();
            });
            let s = &mut t.slots[slot as usize];
            s.body = Some(body);
            Ok(Coroutine {
                shared: s.shared.clone(),
                _not_send: PhantomData,
            })
        })
    }

    /// The coroutine running on this thread, if any. QEMU: `qemu_coroutine_self()`.
    pub fn current() -> Option<Coroutine> {
        TABLE.with(|t| {
            let t = t.borrow();
            let slot = t.current?;
            Some(Coroutine {
                shared: t.slots[slot as usize].shared.clone(),
                _not_send: PhantomData,
            })
        })
    }

    /// Runs the coroutine until it yields or finishes, then runs the coroutines it woke.
    ///
    /// Aborts if the coroutine is running, has finished, or belongs to another thread.
    ///
    /// QEMU: `qemu_coroutine_enter()`.
    #[inline]
    pub fn enter(&self) {
        enter_shared(&self.shared);
    }

    /// Wakes the coroutine; see the module documentation. QEMU: `aio_co_wake()`.
    pub fn wake(&self) {
        wake_shared(&self.shared);
    }

    /// A `Send` handle that can wake this coroutine from any thread.
    pub fn waker(&self) -> CoWaker {
        CoWaker {
            shared: self.shared.clone(),
        }
    }

    /// Whether the coroutine has returned.
    pub fn is_finished(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) == FINISHED
    }
}

impl PartialEq for Coroutine {
    /// Same coroutine (handle identity, as comparing `Coroutine *` in QEMU).
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for Coroutine {}

impl fmt::Debug for Coroutine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coroutine")
            .field("home", &self.shared.home.name)
            .field("slot", &self.shared.slot)
            .field("state", &self.shared.state.load(Ordering::Relaxed))
            .finish()
    }
}

/// `co 3@main`: slot 3 of the coroutine table of the thread (context) `main`. For trace lines:
/// a slot is reused once its coroutine has finished, so the name is unique among the
/// coroutines alive at one time, not forever.
impl fmt::Display for Coroutine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "co {}@{}", self.shared.slot, self.shared.home.name)
    }
}

/// The same name as its coroutine's ([`Coroutine`]'s `Display`).
impl fmt::Display for CoWaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "co {}@{}", self.shared.slot, self.shared.home.name)
    }
}

/// The running coroutine's name (`co 3@main`), or `no coroutine`, looked up only when
/// formatted: for `log::trace!` lines at yield points, which cost a level check when tracing
/// is off.
pub(crate) struct Running;

impl fmt::Display for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Coroutine::current() {
            Some(co) => co.fmt(f),
            None => f.write_str("no coroutine"),
        }
    }
}

impl CoWaker {
    /// The running coroutine's waker. Panics outside a coroutine.
    pub fn current() -> CoWaker {
        match Coroutine::current() {
            Some(co) => co.waker(),
            None => panic!("CoWaker::current() called outside a coroutine"),
        }
    }

    /// Wakes the coroutine; see the module documentation. QEMU: `aio_co_wake()`.
    pub fn wake(self) {
        wake_shared(&self.shared);
    }
}

impl CoShared {
    fn new(home: Arc<Shared>, slot: u32) -> CoShared {
        CoShared {
            home,
            slot,
            state: AtomicU8::new(SUSPENDED),
            scheduled: AtomicBool::new(false),
        }
    }
}

#[cold]
fn new_stack(size: usize) -> io::Result<DefaultStack> {
    let s = DefaultStack::new(size)?;
    LIVE_STACKS.fetch_add(1, Ordering::Relaxed);
    if CANARY.load(Ordering::Relaxed) {
        canary_fill(&s);
    }
    Ok(s)
}

/// What [`Coroutine::new`] aborts with, and [`crate::co_bridge`] panics with, when no stack can
/// be had. A caller that catches the panic can recognise it by this prefix of
/// [`CoPanic::message`] (the FUSE queue replies `ENOMEM` then).
pub const NO_STACK: &str = "cannot create a coroutine stack";

/// Set by [`inject_stack_failures`].
static FAIL_STACKS: crate::fault::FailAfter = crate::fault::FailAfter::new();

/// Test hook: after the next `after` coroutine creations (any thread), the following `count`
/// fail with `ENOMEM` as if the stack could not be mapped — whether or not a pooled stack was
/// free. [`Coroutine::try_new`] returns the error; [`Coroutine::new`] and [`spawn`] abort.
/// `count == 0` disarms it.
pub fn inject_stack_failures(after: usize, count: usize) {
    FAIL_STACKS.arm(after, count);
}

fn wake_shared(co: &Arc<CoShared>) {
    if co.state.load(Ordering::Acquire) == FINISHED {
        fatal(format_args!("woke a coroutine that has already finished"));
    }
    if co.scheduled.swap(true, Ordering::AcqRel) {
        fatal(format_args!(
            "woke a coroutine that already has a wake-up pending"
        ));
    }
    if !aio::is_current(&co.home) {
        co.home.push_remote(Remote::Resume(co.clone()));
    } else {
        let waker = CoWaker { shared: co.clone() };
        let now = TABLE.with(|t| {
            let mut t = t.borrow_mut();
            if t.current.is_none() {
                return Some(waker);
            }
            t.deferred.push_back(waker);
            None
        });
        if let Some(w) = now {
            enter_shared(&w.shared);
        }
    }
}

impl Resume for CoShared {
    /// A coroutine whose wake-up came through its home context's queue: enter it.
    fn resume(self: Arc<Self>) {
        enter_shared(&self);
    }
}

/// A coroutine's `Waker`, so that code written for futures (an io_uring completion, a
/// `std::task::Waker` slot) can wake a coroutine: `wake()` is [`CoWaker::wake`].
impl std::task::Wake for CoShared {
    fn wake(self: Arc<Self>) {
        wake_shared(&self);
    }
}

impl CoWaker {
    /// The coroutine's wake as a `std::task::Waker`, for a slot that holds one (an io_uring
    /// completion). No allocation: the waker is the coroutine's shared block. Crate-private:
    /// waking a coroutine twice, or after it finished, aborts, which generic future code does
    /// not expect of a `Waker`.
    pub(crate) fn into_waker(self) -> std::task::Waker {
        std::task::Waker::from(self.shared)
    }
}

fn enter_shared(co: &Arc<CoShared>) {
    if !aio::is_current(&co.home) {
        fatal(format_args!(
            "entered a coroutine from thread {:?}, but it belongs to context '{}'",
            std::thread::current().name().unwrap_or("unnamed"),
            co.home.name
        ));
    }
    match co.state.load(Ordering::Acquire) {
        RUNNING => fatal(format_args!("co-routine re-entered recursively")),
        FINISHED => fatal(format_args!(
            "entered a coroutine that has already finished"
        )),
        _ => {}
    }
    co.scheduled.store(false, Ordering::Release);
    co.state.store(RUNNING, Ordering::Release);

    let slot = co.slot as usize;
    let (mut body, outer, outer_yielder) = TABLE.with(|t| {
        let mut t = t.borrow_mut();
        let yielder = t.slots[slot].yielder;
        let outer = t.current.replace(co.slot);
        let outer_yielder = std::mem::replace(&mut t.current_yielder, yielder);
        (t.slots[slot].body.take(), outer, outer_yielder)
    });
    let result = match body.as_mut() {
        Some(b) => b.resume(()),
        None => fatal(format_args!("coroutine slot {slot} has no body")),
    };
    let mut next = TABLE.with(|t| {
        let mut t = t.borrow_mut();
        t.current = outer;
        t.current_yielder = outer_yielder;
        match result {
            CoroutineResult::Yield(()) => {
                t.slots[slot].body = body;
                co.state.store(SUSPENDED, Ordering::Release);
            }
            CoroutineResult::Return(()) => {
                co.state.store(FINISHED, Ordering::Release);
                t.slots[slot].yielder = std::ptr::null();
                t.free.push(co.slot);
                if let Some(b) = body {
                    let stack = b.into_stack();
                    if CANARY.load(Ordering::Relaxed) {
                        canary_scan(&stack);
                    }
                    if t.stacks.len() < MAX_POOLED.load(Ordering::Relaxed) {
                        t.stacks.push((STACK_SIZE.load(Ordering::Relaxed), stack));
                    } else {
                        LIVE_STACKS.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
        // Only the outermost enter runs the deferred wake-ups, and only one loop at a time,
        // so a chain of hand-offs (A wakes B wakes C ...) iterates instead of recursing.
        if t.current.is_none() && !t.draining && !t.deferred.is_empty() {
            t.draining = true;
            t.deferred.pop_front()
        } else {
            None
        }
    });
    if next.is_none() {
        return;
    }

    // Run the wake-ups this coroutine issued for its neighbours (QEMU: the `pending` loop in
    // `qemu_aio_coroutine_enter`).
    while let Some(w) = next {
        enter_shared(&w.shared);
        next = TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let n = t.deferred.pop_front();
            t.draining = n.is_some();
            n
        });
    }
}

/// Whether the caller runs inside a coroutine. QEMU: `qemu_in_coroutine()`.
pub fn in_coroutine() -> bool {
    TABLE.with(|t| t.borrow().current.is_some())
}

/// Suspends the running coroutine; [`Coroutine::enter`] or a wake continues it. Panics outside a
/// coroutine.
///
/// QEMU: `qemu_coroutine_yield()`.
#[inline]
pub fn co_yield() {
    let yielder = TABLE.with(|t| t.borrow().current_yielder);
    if yielder.is_null() {
        panic!("co_yield() called outside a coroutine");
    }
    // SAFETY: the pointer is the innermost running coroutine's, stored by its body when it
    // started (and restored by `enter` around nested coroutines), and points at the `Yielder` corosensei passed to that body, which
    // lives (on the coroutine's stack) until the body returns. We are inside that body, so it is
    // alive; and we are on its thread, which `Yielder` requires.
    unsafe { (*yielder).suspend(()) };
}

/// A coroutine panicked; the payload's message, if it had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoPanic {
    pub message: String,
}

impl CoPanic {
    pub(crate) fn from_payload(p: Box<dyn Any + Send>) -> CoPanic {
        let message = if let Some(s) = p.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = p.downcast_ref::<String>() {
            s.clone()
        } else {
            "(non-string panic payload)".to_owned()
        };
        CoPanic { message }
    }
}

impl fmt::Display for CoPanic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coroutine panicked: {}", self.message)
    }
}

impl std::error::Error for CoPanic {}

struct JoinState<T> {
    result: RefCell<Option<Result<T, CoPanic>>>,
    waiter: Cell<Option<CoWaker>>,
}

/// The result of a coroutine started with [`spawn`].
pub struct JoinHandle<T> {
    state: Rc<JoinState<T>>,
    co: Coroutine,
}

/// Creates a coroutine running `f`, enters it at once, and returns a handle to its result.
/// A panic in `f` becomes `Err(CoPanic)` for the joiner. Aborts if no stack can be mapped.
pub fn spawn<T: 'static>(f: impl FnOnce() -> T + 'static) -> JoinHandle<T> {
    let state = Rc::new(JoinState {
        result: RefCell::new(None),
        waiter: Cell::new(None),
    });
    let s = state.clone();
    let co = Coroutine::create(move || {
        let r = catch_unwind(AssertUnwindSafe(f)).map_err(CoPanic::from_payload);
        *s.result.borrow_mut() = Some(r);
        if let Some(w) = s.waiter.take() {
            w.wake();
        }
    })
    .unwrap_or_else(|e| fatal(format_args!("{NO_STACK}: {e}")));
    co.enter();
    JoinHandle { state, co }
}

impl<T> JoinHandle<T> {
    /// Whether the coroutine has finished.
    pub fn is_finished(&self) -> bool {
        self.state.result.borrow().is_some()
    }

    /// The coroutine (to enter or wake it by hand).
    pub fn coroutine(&self) -> &Coroutine {
        &self.co
    }

    /// The result if the coroutine has finished, else the handle back.
    pub fn try_join(self) -> Result<Result<T, CoPanic>, JoinHandle<T>> {
        let r = self.state.result.borrow_mut().take();
        r.ok_or(self)
    }

    /// Waits for the result: inside a coroutine by yielding, outside by polling this thread's
    /// context (like `AIO_WAIT_WHILE`).
    pub fn join(self) -> Result<T, CoPanic> {
        if in_coroutine() {
            while !self.is_finished() {
                self.state.waiter.set(Some(CoWaker::current()));
                co_yield();
            }
        } else {
            assert!(
                !aio::in_task_poll(),
                "JoinHandle::join() inside an async task would poll its own loop from inside a poll"
            );
            // The coroutine lives on this thread, so whatever finishes it runs in this loop:
            // a plain poll loop sees it (no `aio_wait` kick needed).
            let ctx = AioContext::current();
            while !self.is_finished() {
                ctx.poll(true);
            }
        }
        match self.state.result.borrow_mut().take() {
            Some(r) => r,
            None => unreachable!("joined coroutine has no result"),
        }
    }
}
