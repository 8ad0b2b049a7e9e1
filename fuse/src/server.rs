//! The export's lifecycle: open the image, mount, serve until told to stop, drain, flush,
//! unmount.
//!
//! QEMU: `fuse_export_create()` / `fuse_export_shutdown()` / `fuse_export_delete()` in
//! `block/export/fuse.c`, and `qemu-storage-daemon`'s main loop with its signal handling.
//!
//! Stopping, in every case, is: stop reading requests, wait until the requests in flight have
//! replied (`wait_while(in_flight > 0)`, QEMU's drain), flush the image, then unmount — unless
//! the kernel already unmounted us (`umount` from outside: reads return ENODEV). SIGINT and
//! SIGTERM arrive through a signalfd watched by the main `AioContext`, so a signal is just
//! another event in the loop: no async-signal-safety puzzles, no busy loop.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use block::{BlockBackend, Format, OpenOptions};
use runtime::{wait_while, AioContext, IoThread};

use crate::export::{Export, ExportConfig, Window};
use crate::mount::{self, Mount, MountOptions};
use crate::protocol::reply::InitConfig;
use crate::session::{Engine, Session, SessionState};
use crate::sys;
use crate::transport::dev::DevQueue;

/// `--allow-other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowOther {
    On,
    Off,
    /// On when permitted (root, or `user_allow_other` in /etc/fuse.conf).
    Auto,
}

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub open: OpenOptions,
    /// Writes and fallocates past the end grow the image (the export's `growable`).
    pub growable: bool,
    /// Create the image (this size; qcow2 or sparse raw, see [`create_format`]) if it does not
    /// exist.
    pub create: Option<u64>,
    pub allow_other: AllowOther,
    /// Largest READ/WRITE the kernel may send (bytes; 4 KiB to 1 MiB).
    pub max_request: u32,
    /// Error-injection rules (tests only; the hidden `--inject-error`).
    pub inject: Vec<block::Rule>,
    /// Queue threads: queue 0 on the main thread, the others on iothreads with cloned fds.
    pub threads: usize,
    /// Coroutines or async tasks per request.
    pub engine: Engine,
    /// Requests each queue may have in flight (`--max-in-flight`); also sets the kernel's
    /// `max_background` (see [`max_background_for`]).
    pub max_in_flight: usize,
    /// Allocation failures to inject (tests only; the hidden `--inject-enomem`).
    pub inject_enomem: Vec<InjectEnomem>,
    /// `--snapshot` / `--overlay FILE`: the image is opened read-only and every write goes to a
    /// qcow2 overlay over it ([`block::overlay`]).
    pub overlay: Option<block::overlay::Overlay>,
    /// `--partition N`: export only partition N of the image's MBR or GPT table.
    pub partition: Option<u32>,
    /// `--transport`: how requests arrive (`/dev/fuse`, or FUSE over io_uring).
    pub transport: Transport,
    /// `--uring-entries`: ring entries per kernel queue with the io_uring transport.
    pub uring_entries: usize,
    /// Test hook (hidden `--inject-uring-payload`): ring payload buffers of this size.
    pub uring_payload: Option<usize>,
    /// `--uring-pin`: pin each queue thread serving one kernel queue to that queue's CPU.
    pub uring_pin: bool,
    /// `image` is an NBD URI: how long requests wait for a reconnect (`--reconnect-delay`).
    pub reconnect_delay: std::time::Duration,
}

/// Whether `image` names an NBD export (`nbd://…`, `nbd+unix://…`) rather than a file.
pub fn is_nbd(image: &Path) -> bool {
    image.to_str().is_some_and(block::nbd::is_nbd_uri)
}

/// `--transport`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// Cloned `/dev/fuse` fds, read and written per request (`transport::dev`).
    #[default]
    Dev,
    /// FUSE over io_uring (`transport::uring`); `/dev/fuse`, with a warning, when the kernel
    /// or the event loops cannot.
    Uring,
    /// io_uring when the kernel allows it (`enable_uring` on), else `/dev/fuse`.
    Auto,
}

/// `--inject-enomem WHAT:AFTER:COUNT`: after `after` allocations of `what`, fail `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectEnomem {
    pub what: Allocation,
    pub after: usize,
    pub count: usize,
}

/// What `--inject-enomem` makes fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// A request's coroutine stack (`runtime::inject_stack_failures`).
    Stack,
    /// A request's buffer (`transport::inject_request_buf_failures`).
    Buffer,
}

impl std::str::FromStr for InjectEnomem {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("'{s}': expected stack|buffer:AFTER:COUNT");
        let mut parts = s.split(':');
        let what = match parts.next() {
            Some("stack") => Allocation::Stack,
            Some("buffer") => Allocation::Buffer,
            _ => return Err(usage()),
        };
        let mut num = || -> Result<usize, String> {
            parts.next().and_then(|p| p.parse().ok()).ok_or_else(usage)
        };
        let (after, count) = (num()?, num()?);
        if parts.next().is_some() {
            return Err(usage());
        }
        Ok(InjectEnomem { what, after, count })
    }
}

/// The `max_background` announced in INIT for `queues` queues of `max_in_flight` each: their
/// sum, so the kernel never holds more asynchronous requests (O_DIRECT AIO, readahead) than the
/// queues can take at once — past it, submitters sleep in the kernel instead of piling
/// requests (each pinning its caller's pages) into its pending list. Synchronous requests are
/// not counted by the kernel; the per-queue bound covers them. At most `u16::MAX`, the ABI's
/// field (and libfuse's and QEMU's value).
pub fn max_background_for(queues: usize, max_in_flight: usize) -> u16 {
    u16::try_from(queues.saturating_mul(max_in_flight)).unwrap_or(u16::MAX)
}

/// Why the export could not start or did not end cleanly.
#[derive(Debug)]
pub enum ServerError {
    /// Before serving: the image, the mountpoint, /dev/fuse. Exit code 1.
    Start(String),
    /// While serving or stopping. Exit code 3.
    Failed(String),
}

impl ServerError {
    /// The process exit code (see `coro-fuse --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            ServerError::Start(_) => 1,
            ServerError::Failed(_) => 3,
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Start(m) | ServerError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ServerError {}

fn start_err(e: impl fmt::Display) -> ServerError {
    ServerError::Start(e.to_string())
}

/// `1073741824` → `1 GiB`, `1536` → `1.5 KiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The format `--create` makes IMAGE in for `-f format`: qcow2 when asked for, or with `-f
/// auto` when the name ends in `.qcow2`; raw otherwise.
pub fn create_format(image: &Path, format: Format) -> Format {
    match format {
        Format::Qcow2 => Format::Qcow2,
        Format::Auto if image.extension().is_some_and(|e| e == "qcow2") => Format::Qcow2,
        _ => Format::Raw,
    }
}

/// `--create`: makes `path` (`format`: [`Format::Raw`] sparse, or an empty [`Format::Qcow2`]
/// image as `qemu-img create -f qcow2` makes it) unless it exists. Returns whether it did.
fn create_image(path: &Path, size: u64, format: Format) -> Result<bool, ServerError> {
    let exists = |e: &io::Error| e.kind() == io::ErrorKind::AlreadyExists;
    let made = if format == Format::Qcow2 {
        match block::qcow2::create_qcow2(path, size) {
            Ok(()) => Ok(()),
            Err(block::BlockError::Open { source, .. }) if exists(&source) => Err(source),
            Err(e) => return Err(start_err(format!("cannot create {}: {e}", path.display()))),
        }
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|f| {
                f.set_len(size).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot size the new image: {e}"))
                })
            })
    };
    match made {
        Ok(()) => {
            log::info!(
                "created {} ({}, {})",
                path.display(),
                human_size(size),
                if format == Format::Qcow2 {
                    "qcow2"
                } else {
                    "sparse raw"
                }
            );
            Ok(true)
        }
        Err(e) if exists(&e) => {
            log::info!(
                "{} exists; exporting it as it is (--create ignored)",
                path.display()
            );
            Ok(false)
        }
        Err(e) => Err(start_err(format!("cannot create {}: {e}", path.display()))),
    }
}

/// What the caller of [`run_with`] is told about the export's life (`--pidfile`,
/// `--daemonize`, systemd's `NOTIFY_SOCKET`, in `main.rs`).
pub trait Lifecycle {
    /// The mount is live and requests are being served. An `Err` stops the export at once
    /// (drained, flushed, unmounted) and `run_with` returns it as a start failure.
    fn ready(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Shutdown has begun (signal, `umount`, or a failure): no new requests are read.
    fn stopping(&mut self) {}
}

/// No hooks.
struct Quiet;

impl Lifecycle for Quiet {}

/// Runs an export until it is stopped. Blocks; returns when everything is flushed and
/// unmounted.
pub fn run(cfg: ServerConfig) -> Result<(), ServerError> {
    run_with(cfg, &mut Quiet)
}

/// [`run`], telling `hooks` when the export is ready and when it starts stopping.
///
/// The phases, each a function below: open the image, build the export, mount, start one queue
/// per thread, serve until a signal / `umount` / a fault, then stop (drain, flush, unmount).
pub fn run_with(cfg: ServerConfig, hooks: &mut dyn Lifecycle) -> Result<(), ServerError> {
    // Signals first: threads created later (the thread pool's workers) inherit the mask, so
    // SIGINT/SIGTERM can only be picked up by our signalfd.
    let signals = sys::SignalFd::new(&[libc::SIGINT, libc::SIGTERM])
        .map_err(|e| start_err(format!("cannot set up signal handling: {e}")))?;
    let threads = cfg.threads.max(1);
    // Before any event loop exists: the io_uring transport needs rings of 128-byte SQEs.
    let ring_wanted = ring_wanted(cfg.transport);
    if ring_wanted {
        runtime::ring::set_ring_sqe128(true);
    }
    let image = open_image(&cfg)?;
    let iothreads = spawn_iothreads(threads)?;
    let ring = ring_wanted && rings_ready(cfg.transport, &iothreads);
    let (export, files) = build_export(&cfg, &image.blk, ring)?;
    let writable = export.config().writable;
    let init = export.config().init;
    let mount = Mount::new(
        &cfg.mountpoint,
        &MountOptions {
            allow_other: export.config().allow_other,
            read_only: !writable,
            max_read: init.max_write,
            fsname: cfg.image.display().to_string(),
            ..MountOptions::default()
        },
    )
    .map_err(start_err)?;
    let ctx = AioContext::current();
    let max_in_flight = cfg.max_in_flight.max(1);
    let session = Arc::new(
        Session::new(export.clone(), threads, cfg.engine).with_max_in_flight(max_in_flight),
    );
    log_setup(&cfg, &image.blk, &session, &ctx);
    // The after-INIT hook must be armed before any queue reads: INIT is the first request.
    if ring {
        plan_ring(&cfg, &mount, &session, &iothreads)?;
    } else {
        // Nothing to start after INIT; the hook only tells the main loop INIT is done.
        session.set_after_init(Box::new(|_| {}));
    }
    let queues = start_queues(&mount, &session, iothreads, init.max_write)?;

    let s = session.clone();
    let sigfd = Rc::new(signals);
    let sf = sigfd.clone();
    ctx.set_fd_handler(
        sigfd.as_raw_fd(),
        Some(Rc::new(move || {
            while let Some(sig) = sf.read() {
                log::info!("got signal {sig}; stopping");
                s.stop(SessionState::Stopping);
            }
        })),
        None,
    )
    .map_err(start_err)?;

    // The mount is live; the kernel's INIT comes at once. Waiting for it lets the mounted line
    // say which transport serves (bounded: a kernel that never sends INIT is not our hang).
    crate::session::poll_until(&ctx, std::time::Duration::from_secs(10), || {
        session.init_replied() || session.state() != SessionState::Running
    });
    println!(
        "exported {}{} ({}, {}, {}) at {}{} via {}; Ctrl-C or umount to stop",
        cfg.image.display(),
        match cfg.partition {
            Some(n) => format!(" partition {n}"),
            None => String::new(),
        },
        image.shown_format,
        human_size(files.window.map_or_else(|| image.blk.size(), |w| w.size)),
        if writable { "read-write" } else { "read-only" },
        cfg.mountpoint.display(),
        match files.partitions.len() {
            0 => String::new(),
            1 => " with 1 partition file".to_owned(),
            n => format!(" with {n} partition files"),
        },
        session.transport_name()
    );
    let not_ready = hooks.ready().err();
    if let Some(e) = &not_ready {
        log::error!("{e}; stopping");
        session.stop(SessionState::Stopping);
    }

    session.wait_stopped(&ctx);
    let state = session.state();
    hooks.stopping();
    let _ = ctx.set_fd_handler(sigfd.as_raw_fd(), None, None);
    let flushed = shutdown(&cfg, &ctx, &session, queues, mount, &image.blk);
    flushed?;
    if let Some(e) = not_ready {
        return Err(ServerError::Start(e));
    }
    if state == SessionState::Halted {
        return Err(ServerError::Failed(
            "the export halted after a malformed request or a /dev/fuse error (see above)".into(),
        ));
    }
    Ok(())
}

/// The image, opened as configured.
struct OpenImage {
    blk: Arc<BlockBackend>,
    /// For the mounted line: "raw", or "raw + qcow2 overlay".
    shown_format: String,
}

/// Phase 1: creates the image if asked (`--create`), then opens it — through a qcow2 overlay
/// with `--snapshot` / `--overlay`.
fn open_image(cfg: &ServerConfig) -> Result<OpenImage, ServerError> {
    if let Some(uri) = cfg.image.to_str().filter(|_| is_nbd(&cfg.image)) {
        let nbd = block::NbdOptions {
            read_only: false,
            reconnect_delay: cfg.reconnect_delay,
            ..block::NbdOptions::default()
        };
        let blk = block::open_nbd(uri, &cfg.open, nbd, &cfg.inject).map_err(start_err)?;
        // Through a raw window (--offset/--size) the top node is raw; the data comes over NBD.
        let shown_format = "nbd".to_owned();
        return Ok(OpenImage { blk, shown_format });
    }
    let mut open = cfg.open;
    if let Some(size) = cfg.create {
        let format = create_format(&cfg.image, cfg.open.format);
        // An image we just made is not probed: it is opened in the format we made it in (no
        // probing warning, and a raw one may be written anywhere).
        if create_image(&cfg.image, size, format)? && open.format == Format::Auto {
            open.format = format;
        }
    }
    let Some(overlay) = &cfg.overlay else {
        let blk = block::open_image_with(&cfg.image, &open, &cfg.inject).map_err(start_err)?;
        let shown_format = blk.format_name().to_owned();
        return Ok(OpenImage { blk, shown_format });
    };
    let o = block::overlay::open_with_overlay(&cfg.image, &open, &cfg.inject, overlay)
        .map_err(start_err)?;
    match overlay {
        block::overlay::Overlay::Temporary => log::info!(
            "--snapshot: '{}' ({}) is opened read-only; writes go to a temporary \
             overlay {} (already unlinked: discarded at exit)",
            cfg.image.display(),
            o.image_format,
            o.overlay.display()
        ),
        block::overlay::Overlay::File(_) => log::info!(
            "--overlay: '{}' ({}) is opened read-only; writes go to {} overlay {}",
            cfg.image.display(),
            o.image_format,
            if o.created { "the new" } else { "the existing" },
            o.overlay.display()
        ),
    }
    Ok(OpenImage {
        blk: o.blk,
        shown_format: format!("{} + qcow2 overlay", o.image_format),
    })
}

/// The file a directory mountpoint shows for an NBD export: the export's name (its last
/// path component), or `nbd` for the default export.
fn nbd_file_name(image: &Path) -> std::ffi::OsString {
    let uri = image
        .to_str()
        .and_then(|s| block::nbd::NbdUri::parse(s).ok());
    let export = uri.map(|u| u.export).unwrap_or_default();
    match export.rsplit('/').next() {
        Some(name) if !name.is_empty() && name != "." && name != ".." => name.into(),
        _ => "nbd".into(),
    }
}

/// Phase 2: the export — which files it shows (mountpoint kind, partitions), whether it is
/// writable, what INIT offers (`max_background` from the in-flight bound).
fn build_export(
    cfg: &ServerConfig,
    blk: &Arc<BlockBackend>,
    ring: bool,
) -> Result<(Arc<Export>, Files), ServerError> {
    let meta = std::fs::metadata(&cfg.mountpoint)
        .map_err(|e| start_err(format!("mountpoint {}: {e}", cfg.mountpoint.display())))?;
    let image_name = if is_nbd(&cfg.image) {
        Some(nbd_file_name(&cfg.image))
    } else {
        cfg.image.file_name().map(|n| n.to_os_string())
    };
    let files = exported_files(cfg, blk, image_name, meta.is_dir())?;
    let allow_other = match cfg.allow_other {
        AllowOther::On => true,
        AllowOther::Off => false,
        AllowOther::Auto => mount::allow_other_auto(),
    };
    for rule in &cfg.inject_enomem {
        match rule.what {
            Allocation::Stack => runtime::inject_stack_failures(rule.after, rule.count),
            Allocation::Buffer => {
                crate::transport::inject_request_buf_failures(rule.after, rule.count)
            }
        }
    }
    let mut init = InitConfig::default();
    if ring {
        init.flags |= crate::protocol::abi::FUSE_OVER_IO_URING;
    }
    init.max_background = max_background_for(cfg.threads.max(1), cfg.max_in_flight.max(1));
    // The kernel's own ratio (3/4), as before.
    init.congestion_threshold = (u32::from(init.max_background) * 3 / 4) as u16;
    if let Some(mw) = std::env::var("CORO_FUSE_MAX_WRITE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        init.max_write = mw;
    }
    let export = Arc::new(Export::new(
        blk.clone(),
        ExportConfig {
            writable: !blk.is_read_only(),
            growable: cfg.growable,
            allow_other,
            dir_entry: files.dir_entry.clone(),
            window: files.window,
            partitions: files.partitions.clone(),
            init,
        },
    ));
    Ok((export, files))
}

/// What the log says once the export is set up: the bound and its memory ceiling, the engine,
/// the event loops.
fn log_setup(cfg: &ServerConfig, blk: &BlockBackend, session: &Session, ctx: &AioContext) {
    let threads = cfg.threads.max(1);
    let init = session.export.config().init;
    log::info!(
        "at most {} requests in flight per queue ({threads} queue(s), max_background {}); \
         requests in flight hold at most {}",
        session.max_in_flight(),
        init.max_background,
        human_size(crate::session::rss_ceiling_bytes(
            threads,
            session.max_in_flight(),
            init.max_write as usize
        ))
    );
    log::info!(
        "engine: {}{}",
        cfg.engine.name(),
        match (cfg.engine, blk.is_natively_async()) {
            (Engine::Coroutine, _) => "",
            (Engine::Async, true) => " (block layer: native async)",
            (Engine::Async, false) => " (block layer: through the coroutine bridge)",
        }
    );
    log::info!(
        "event loops: {}",
        if ctx.has_io_uring() {
            "io_uring (disk I/O submitted to each queue thread's ring)"
        } else {
            "epoll (disk I/O on the thread pool)"
        }
    );
}

/// The queues serving an export: queue 0 on the main thread, the others on iothreads.
struct Queues {
    main: Rc<DevQueue>,
    iothreads: Vec<IoThread>,
}

/// Phase 4: queue 0 reads the mount's fd on this thread; queues 1.. run on iothreads, each
/// reading its own clone of the session fd (QEMU: "fuse: Implement multi-threading").
fn start_queues(
    mount: &Mount,
    session: &Arc<Session>,
    iothreads: Vec<IoThread>,
    max_write: u32,
) -> Result<Queues, ServerError> {
    let fd = mount.fd().try_clone_to_owned().map_err(start_err)?;
    let main = DevQueue::new(0, fd, session.clone(), max_write);
    main.attach(&AioContext::current()).map_err(start_err)?;
    for (n, io) in iothreads.iter().enumerate() {
        let i = n + 1;
        let fd = sys::clone_dev_fuse(mount.fd())
            .map_err(|e| start_err(format!("cannot clone /dev/fuse for queue {i}: {e}")))?;
        let s = session.clone();
        io.run_sync(move || DevQueue::start_here(i, fd, s, max_write))
            .map_err(start_err)?;
    }
    Ok(Queues { main, iothreads })
}

/// The queue threads beyond the main one (queue 0), each with its event loop; their queues
/// start in [`start_queues`].
fn spawn_iothreads(threads: usize) -> Result<Vec<IoThread>, ServerError> {
    (1..threads)
        .map(|i| IoThread::spawn(&format!("queue-{i}")).map_err(start_err))
        .collect()
}

/// Whether to try FUSE over io_uring: `--transport uring|auto` and the kernel allows it (the
/// `enable_uring` parameter). Otherwise says why `/dev/fuse` serves — a warning when
/// `uring` was asked for, a note for `auto`.
fn ring_wanted(t: Transport) -> bool {
    if t == Transport::Dev {
        return false;
    }
    let why = match crate::transport::uring::kernel_enabled() {
        Some(true) => match runtime::io_uring_supported() {
            Ok(()) => return true,
            Err(e) => format!("io_uring is not available ({e})"),
        },
        Some(false) => format!(
            "the kernel has it switched off ({} is N; as root: echo 1 > {0})",
            crate::transport::uring::ENABLE_PARAM
        ),
        None => "this kernel has no FUSE over io_uring (Linux 6.14+ with CONFIG_FUSE_IO_URING)"
            .to_owned(),
    };
    if t == Transport::Uring {
        log::warn!("--transport uring: {why}; serving over /dev/fuse");
    } else {
        log::info!("--transport auto: {why}; serving over /dev/fuse");
    }
    false
}

/// Whether every queue thread's event loop can carry the ring's commands (an io_uring of
/// 128-byte SQEs). Decided before INIT offers the ring: once the kernel grants it, every
/// kernel queue must get entries, or its requests wait forever.
fn rings_ready(t: Transport, iothreads: &[IoThread]) -> bool {
    let main = runtime::uring::sqe128_available();
    let others = iothreads
        .iter()
        .all(|io| io.run_sync(runtime::uring::sqe128_available));
    if main && others {
        return true;
    }
    let why = "an event loop has no io_uring of 128-byte SQEs (io_uring setup failed, or the \
               epoll loops were chosen)";
    if t == Transport::Uring {
        log::warn!("--transport uring: {why}; serving over /dev/fuse");
    } else {
        log::info!("--transport auto: {why}; serving over /dev/fuse");
    }
    false
}

/// Plans the io_uring transport on every queue thread (which kernel queues each serves) and
/// arms the session's after-INIT hook, which starts them all once the INIT reply granted the
/// ring — or, if the kernel did not grant it, drops the plans and says so.
fn plan_ring(
    cfg: &ServerConfig,
    mount: &Mount,
    session: &Arc<Session>,
    iothreads: &[IoThread],
) -> Result<(), ServerError> {
    use crate::transport::uring::{self, UringQueue};
    let cpus = uring::possible_cpus().map_err(start_err)?;
    let threads = iothreads.len() + 1;
    let entries = cfg.uring_entries.max(1);
    let mut remotes = vec![AioContext::current().remote()];
    for t in 0..threads {
        let fd = sys::clone_dev_fuse(mount.fd())
            .map_err(|e| start_err(format!("cannot clone /dev/fuse for the ring: {e}")))?;
        let qids = uring::qids_for_thread(t, threads, cpus);
        let s = session.clone();
        let payload = cfg.uring_payload;
        let pin = cfg.uring_pin;
        let plan = move || UringQueue::prepare_here(t, fd, s, qids, entries, payload, pin);
        match t {
            0 => plan(),
            _ => {
                let io = &iothreads[t - 1];
                remotes.push(io.run_sync(|| AioContext::current().remote()));
                io.run_sync(plan)
            }
        }
        .map_err(start_err)?;
    }
    let transport = cfg.transport;
    session.set_after_init(Box::new(move |n| {
        if n.flags & crate::protocol::abi::FUSE_OVER_IO_URING == 0 {
            let why = "the kernel did not grant FUSE over io_uring in INIT";
            if transport == Transport::Uring {
                log::warn!("--transport uring: {why}; serving over /dev/fuse");
            } else {
                log::info!("--transport auto: {why}; serving over /dev/fuse");
            }
            for r in remotes {
                r.schedule_oneshot(UringQueue::forget_here);
            }
            return;
        }
        log::info!(
            "transport: io_uring, {entries} entries on each of {cpus} kernel queues, over \
             {threads} queue thread(s); /dev/fuse for INIT, FORGET and INTERRUPT"
        );
        for r in remotes {
            r.schedule_oneshot(UringQueue::start_here);
        }
    }));
    session.set_transport_name(format!(
        "io_uring ({entries} entries x {cpus} kernel queues)"
    ));
    Ok(())
}

/// Phase 6: stop reading, wait for the requests in flight (QEMU's drain), flush and close the
/// image, unmount (unless the kernel already did), stop the iothreads. Returns whether the
/// flush worked.
fn shutdown(
    cfg: &ServerConfig,
    ctx: &AioContext,
    session: &Session,
    queues: Queues,
    mount: Mount,
    blk: &Arc<BlockBackend>,
) -> Result<(), ServerError> {
    queues.main.detach(ctx);
    for io in &queues.iothreads {
        io.run_sync(DevQueue::stop_here);
    }
    wait_while(ctx, || session.in_flight() > 0);
    let flushed = flush(blk);
    let served = session.served();
    log::info!(
        "requests served per queue (engine: {}): {served:?}",
        cfg.engine.name()
    );
    if session.transport_name() != "/dev/fuse" {
        log::info!(
            "requests that arrived in io_uring entries: {}",
            session.ring_served()
        );
    }
    log::info!(
        "peak in flight per queue (bound {}): {:?}",
        session.max_in_flight(),
        session.peak_in_flight()
    );
    drop(queues.main);
    // After an external umount this finds the session over and leaves the path alone.
    if let Err(e) = mount.unmount() {
        log::warn!("unmounting {}: {e}", cfg.mountpoint.display());
    }
    // The unmount ended the ring's pending commands (ENOTCONN): let every entry's coroutine
    // return on its own thread before the threads go (a thread leaving with registered
    // entries would strand its kernel queue).
    if session.ring_entries() > 0
        && !session.wait_ring_entries(ctx, std::time::Duration::from_secs(10))
    {
        log::warn!(
            "{} io_uring entries still registered 10 s after the unmount",
            session.ring_entries()
        );
    }
    for io in queues.iothreads {
        io.stop();
    }
    println!(
        "stopped: {} {}; {} requests served",
        cfg.image.display(),
        if flushed.is_ok() {
            "flushed"
        } else {
            "NOT flushed"
        },
        served.iter().sum::<u64>()
    );
    flushed
}

/// What the export shows, from the mountpoint's kind and the image's partition table.
#[derive(Clone)]
struct Files {
    /// Directory mode: the name of the main file.
    dir_entry: Option<std::ffi::OsString>,
    /// `--partition N`: the main file is that window of the image.
    window: Option<Window>,
    /// Directory mode without `--partition`: `<name>-partN` beside the image.
    partitions: Vec<(std::ffi::OsString, Window)>,
}

/// Decides the files of the export (QEMU has no partitions; the model is `qemu-nbd
/// --partition`, removed in QEMU 6.0, and nbdkit's partition filter). A directory mountpoint
/// shows the image as `<name>` and each partition of its MBR or GPT table as
/// `<name>-partN`; a damaged or overlapping table is a warning and no partition files, never
/// a wrong window. `--partition N` shows only partition N (a missing table or partition is
/// an error). The table is read once, here: repartitioning through the export changes the
/// files at the next start.
fn exported_files(
    cfg: &ServerConfig,
    blk: &Arc<BlockBackend>,
    image_name: Option<std::ffi::OsString>,
    dir_mode: bool,
) -> Result<Files, ServerError> {
    let image = cfg.image.display();
    let mut name = match (dir_mode, image_name) {
        (false, _) => None,
        (true, Some(n)) => Some(n),
        (true, None) => {
            return Err(start_err(format!(
                "{image} has no file name to show in the directory"
            )))
        }
    };
    let part_name = |base: &std::ffi::OsString, n: u32| {
        let mut s = base.clone();
        s.push(format!("-part{n}"));
        s
    };
    let mut files = Files {
        dir_entry: None,
        window: None,
        partitions: Vec::new(),
    };
    if let Some(n) = cfg.partition {
        let table = match read_partition_table(blk) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(start_err(format!(
                    "--partition {n}: {image} has no partition table"
                )))
            }
            Err(e) => {
                return Err(start_err(format!(
                    "--partition {n}: the partition table of {image} is not usable: {e}"
                )))
            }
        };
        let Some(p) = table.partitions.iter().find(|p| p.number == n) else {
            let have: Vec<String> = table
                .partitions
                .iter()
                .map(|p| p.number.to_string())
                .collect();
            return Err(start_err(format!(
                "--partition {n}: {image} has no partition {n} (its {} table has {})",
                table_kind_name(table.kind),
                if have.is_empty() {
                    "none".to_owned()
                } else {
                    have.join(", ")
                }
            )));
        };
        log::info!(
            "--partition {n}: {} partition {n}, bytes {}..{} ({})",
            table_kind_name(table.kind),
            p.offset,
            p.offset + p.size,
            human_size(p.size)
        );
        files.window = Some(Window {
            offset: p.offset,
            size: p.size,
        });
        files.dir_entry = name.take().map(|b| part_name(&b, n));
        return Ok(files);
    }
    let Some(base) = name else {
        return Ok(files);
    };
    match read_partition_table(blk) {
        Ok(None) => {}
        Ok(Some(t)) => {
            for p in &t.partitions {
                log::info!(
                    "partition {}: bytes {}..{} ({}) as {}",
                    p.number,
                    p.offset,
                    p.offset + p.size,
                    human_size(p.size),
                    part_name(&base, p.number).to_string_lossy()
                );
                files.partitions.push((
                    part_name(&base, p.number),
                    Window {
                        offset: p.offset,
                        size: p.size,
                    },
                ));
            }
            if !files.partitions.is_empty() {
                log::info!(
                    "{} partition table: {} partition file(s) beside the image; the whole \
                     image keeps at least its current size while they are exported",
                    table_kind_name(t.kind),
                    files.partitions.len()
                );
            }
        }
        Err(e) => log::warn!(
            "the partition table of {image} is damaged ({e}); showing the whole image only, \
             no partition files"
        ),
    }
    files.dir_entry = Some(base);
    Ok(files)
}

fn table_kind_name(k: block::partition::TableKind) -> &'static str {
    match k {
        block::partition::TableKind::Mbr => "MBR",
        block::partition::TableKind::Gpt => "GPT",
    }
}

/// Reads the image's partition table through the block layer (in a coroutine: reads may
/// yield).
fn read_partition_table(
    blk: &Arc<BlockBackend>,
) -> Result<Option<block::partition::Table>, block::partition::TableError> {
    let b = blk.clone();
    let size = blk.size();
    let read = move || {
        let mut read = |offset: u64, buf: &mut [u8]| {
            b.co_pread(offset, buf)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        };
        block::partition::read_partitions(&mut read, size)
    };
    match runtime::spawn(read).join() {
        Ok(r) => r,
        Err(p) => Err(block::partition::TableError::Io(io::Error::other(format!(
            "reading the partition table panicked: {p}"
        )))),
    }
}

/// Flushes and closes the image from the main thread (in a coroutine, since both may yield):
/// closing lets a driver release what it holds in the image (qcow2 returns its reserved
/// clusters), so that a cleanly stopped export leaves a clean image. QEMU: `blk_unref()`.
fn flush(blk: &Arc<BlockBackend>) -> Result<(), ServerError> {
    let b = blk.clone();
    match runtime::spawn(move || b.co_flush().and_then(|()| b.close())).join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ServerError::Failed(format!("final flush failed: {e}"))),
        Err(p) => Err(ServerError::Failed(format!("final flush: {p}"))),
    }
}
