//! `coro-fuse IMAGE MOUNTPOINT`: the command-line entry point.
//!
//! QEMU: the `--export type=fuse,...` options of `qemu-storage-daemon` (`qapi/block-export.json`,
//! `BlockExportOptionsFuse`) and `--blockdev` for the image.
//!
//! This file only turns arguments into [`fuse::server::ServerConfig`] and prints errors; the
//! lifecycle (open, mount, serve, drain, flush, unmount) lives in `server.rs`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, ValueEnum};

use block::{AioMode, CacheMode, Format, OpenOptions};
use fuse::server::{self, AllowOther, Lifecycle, ServerConfig, Transport};
use fuse::session::Engine;

mod daemon;

/// Export a disk image through FUSE as one regular file.
///
/// The image appears at MOUNTPOINT: if MOUNTPOINT is a regular file (it may be the image
/// itself) the export is mounted over it; if it is a directory, the image appears inside it
/// under its own file name, with one file `<name>-partN` beside it for each partition of its
/// MBR or GPT table (a damaged table: a warning and none; see --partition). Stop with
/// Ctrl-C, SIGTERM or `umount MOUNTPOINT`; every request in flight is finished and the image
/// flushed first.
///
/// Exit status: 0 stopped cleanly; 1 could not start (image, mountpoint, /dev/fuse, lock);
/// 2 bad arguments; 3 the export failed while running (protocol error, final flush failed).
#[derive(Parser, Debug)]
#[command(name = "coro-fuse", version, about, long_about)]
struct Cli {
    /// The disk image (a regular file or block device), or an NBD export:
    /// `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` (QEMU's URI syntax).
    image: PathBuf,

    /// Where to show the image: a regular file or a directory.
    mountpoint: PathBuf,

    /// Image format; `auto` is raw unless the image starts with the magic of a known format
    /// (a raw image found so refuses writes that would make its first sector look like another
    /// format: pass `-f raw` to lift that). qcow2 is read-write, with backing files opened
    /// read-only. vdi, vpc (VHD; a fixed one is recognised by its footer at the end), vhdx and
    /// vmdk (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, streamOptimized;
    /// extent files beside the descriptor) can only be read: without -r or
    /// --snapshot/--overlay they are refused at start with a message saying so (a writable
    /// export that fails every write would be worse). Other formats are refused by name.
    #[arg(short = 'f', long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,

    /// Export read-only (mode 0400, `ro` mount).
    #[arg(short = 'r', long)]
    read_only: bool,

    /// Writes past the end grow the image (qcow2: to the next multiple of 512 bytes, the unit
    /// QEMU keeps its size in; raw: to the end of the write).
    #[arg(long, conflicts_with = "read_only")]
    growable: bool,

    /// Let other users access the export. `auto`: on when allowed (root, or `user_allow_other`
    /// in /etc/fuse.conf), else off.
    #[arg(long, value_enum, default_value_t = AllowOtherArg::Auto)]
    allow_other: AllowOtherArg,

    /// Host page cache for the image: `writeback` (buffered) or `none` (O_DIRECT).
    #[arg(long, value_enum, default_value_t = CacheArg::Writeback)]
    cache: CacheArg,

    /// How requests that may block (disk reads and writes, flushes, fallocate) are done:
    /// `io_uring` submits them to an io_uring owned by each queue thread's event loop, which
    /// also waits for the loop's fds, and resumes the request when the completion comes, on the
    /// same thread; `threads` hands them to a thread pool, with epoll event loops (QEMU's
    /// `aio=threads`; io_uring loops with `--transport uring|auto`, which needs them). `auto`: io_uring where the kernel allows it (it may be disabled by
    /// `kernel.io_uring_disabled` or seccomp; then threads, with a warning) — except for an
    /// image in memory (tmpfs) or the null driver, where no request waits for a device and
    /// `threads` is measured cheaper.
    #[arg(long, value_enum, default_value_t = AioArg::Auto)]
    aio: AioArg,

    /// What discards do (QEMU's `discard=`; default `ignore`, as QEMU's): `ignore` keeps the
    /// image allocated — a punched hole (fallocate PUNCH_HOLE) still reads as zeros, but is
    /// written as zeros (ZERO_RANGE, or qcow2 zero clusters) and nothing is deallocated;
    /// `unmap` passes them down, so punching a hole deallocates the range in the image.
    #[arg(long, value_enum, default_value_t = DiscardArg::Ignore)]
    discard: DiscardArg,

    /// Writes of all-zero data become zero writes (QEMU's `detect-zeroes=`; default `off`):
    /// `on` writes them as zeros without deallocating (qcow2: zero clusters, no data
    /// cluster); `unmap` also deallocates, but only with `--discard unmap` (with `--discard
    /// ignore` it is accepted, with a warning, and behaves as `on`).
    #[arg(long, value_enum, default_value_t = DetectZeroesArg::Off)]
    detect_zeroes: DetectZeroesArg,

    /// Open the image read-only without taking its locks, even if another process writes it.
    ///
    /// With --snapshot or --overlay, only IMAGE is not locked; the export is writable.
    #[arg(short = 'U', long)]
    force_share: bool,

    /// Create IMAGE of SIZE (e.g. 1G, 512M) if it does not exist: a qcow2 image with `-f qcow2`
    /// or (`-f auto`) a name ending in `.qcow2` — version 3, 64 KiB clusters, 16-bit refcounts,
    /// as `qemu-img create -f qcow2` makes it; SIZE a multiple of 512 — else a sparse raw
    /// image. It is then opened as that format (not probed). An existing IMAGE is exported as
    /// it is.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    create: Option<u64>,

    /// Leave IMAGE untouched: open it read-only (a read lock: other readers may keep it open;
    /// with -U no lock, so a VM writing it is not refused — but then what is read may change)
    /// and send every write to a temporary qcow2 overlay in $TMPDIR (default /var/tmp) whose
    /// backing file is IMAGE. The overlay is unlinked as soon as it is open, so it is gone
    /// after any exit, SIGKILL included. Works over raw, qcow2, vdi, vpc, vhdx and vmdk images.
    #[arg(long, conflicts_with_all = ["read_only", "create", "overlay", "offset", "size"])]
    snapshot: bool,

    /// As --snapshot, but the overlay is FILE and is kept: created if missing (qcow2 v3, its
    /// backing file IMAGE by absolute path, with IMAGE's format recorded, as `qemu-img create
    /// -f qcow2 -b IMAGE -F FMT FILE`); an existing FILE must be a qcow2 image whose backing
    /// file is IMAGE. Fold it back with `qemu-img commit FILE`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["read_only", "create", "offset", "size"])]
    overlay: Option<PathBuf>,

    /// raw: export only SIZE bytes (from --offset). null: the device size (default 1G).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,

    /// null only: every read, write, flush, write-zeroes and discard waits NS nanoseconds
    /// before it completes (QEMU's `null-co` `latency-ns`): the request suspends on its
    /// queue thread's timer, and other requests run meanwhile. `yield`: it suspends once and
    /// is resumed by a bottom half on the next pass of the loop. 0 (the default): complete
    /// inline, never suspend. For benchmarks of requests that wait.
    #[arg(long, value_name = "NS|yield", value_parser = parse_null_latency)]
    null_latency: Option<block::NullLatency>,

    /// raw: the export starts at this byte offset of the image.
    #[arg(long, value_parser = parse_size)]
    offset: Option<u64>,

    /// Export only partition N of the image's MBR (primaries 1-4, logicals from 5) or GPT
    /// table, as a file of that partition's size (it never grows; a directory mountpoint shows
    /// it as `<name>-partN`). Without it, a directory mountpoint shows the whole image and
    /// one `<name>-partN` file per partition.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..),
          conflicts_with_all = ["offset", "size", "create", "growable"])]
    partition: Option<u32>,

    /// NBD only: when the connection to the server drops, requests wait up to SECS seconds
    /// for a reconnect (and are then sent again) before they fail with EIO; reconnection is
    /// tried in the background all the while (QEMU's `reconnect-delay`; default 0: fail at
    /// once).
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    reconnect_delay: f64,

    /// qcow2: bytes of L2 tables to cache (QEMU's `l2-cache-size`; at most 64 tables).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4M")]
    l2_cache_size: u64,

    /// qcow2: bytes of refcount blocks to cache (QEMU's `refcount-cache-size`; at most 64).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1M")]
    refcount_cache_size: u64,

    /// Largest READ/WRITE request the kernel may send (4K to 1M). Bigger requests mean fewer
    /// round trips; QEMU's export uses 64K.
    #[arg(long, value_name = "SIZE", value_parser = parse_request_size, default_value = "1M")]
    max_request: u32,

    /// Queue threads, each with its own /dev/fuse fd and event loop (1 to 64). Default: one
    /// per CPU, at most 4. Measured on 2 cores (docs/performance.md): a second queue thread
    /// halves QD1 latency (a request finds a thread already awake instead of waking a sleeping
    /// one) and lifts 4k QD32 and big sequential I/O, whose kernel copies then run on both
    /// CPUs. Every clone is woken for every request, so beyond the CPU count threads only add
    /// wake-ups; 4 is a conservative cap until measured on bigger machines. QEMU's default is 1.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: Option<u16>,

    /// How requests arrive from the kernel and replies go back: `dev` reads and writes
    /// `/dev/fuse` (one fd per queue thread); `uring` is FUSE over io_uring (Linux 6.14+, and
    /// root must `echo 1 > /sys/module/fuse/parameters/enable_uring`): the kernel puts each
    /// request into a ring entry and takes the reply from it, through each queue thread's own
    /// io_uring, one command per request; `/dev/fuse` still carries INIT, FORGET and
    /// INTERRUPT. When the kernel refuses, `uring` warns and serves over `/dev/fuse`; `auto`
    /// takes `uring` where the kernel allows it. The mounted line says which one serves.
    #[arg(long, value_enum, default_value_t = TransportArg::Dev)]
    transport: TransportArg,

    /// With the io_uring transport: ring entries on each kernel queue (one per CPU), i.e.
    /// requests each CPU's queue can have in flight at once (the kernel queues a CPU's
    /// requests on that CPU's queue only). Each holds a `--max-request` payload buffer.
    #[arg(long, value_name = "N", default_value_t = fuse::transport::uring::DEFAULT_ENTRIES as u16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    uring_entries: u16,

    /// With the io_uring transport: `on` pins each queue thread that serves exactly one kernel
    /// queue to that queue's CPU (as libfuse does), so a request is served on the CPU that
    /// issued it and the round trip wakes no other CPU; `off` lets the scheduler place the
    /// threads. Pinning is what makes a ring win at queue depth 1 (docs/fuse-uring.md).
    #[arg(long, value_enum, value_name = "on|off", default_value_t = OnOff::On)]
    uring_pin: OnOff,

    /// How each FUSE request runs: `coroutine` (a stackful coroutine per request, QEMU's
    /// model) or `async` (a Rust future per request, on the same event loops, queues and thread
    /// pool). With `async`, the raw, file and null drivers are natively async; qcow2, O_DIRECT
    /// alignment padding, growth and truncation run their
    /// coroutine code through a bridge (a future waiting for a coroutine), with a copy of the
    /// request's data. For comparing the two models (docs/comparison.md).
    #[arg(long, value_enum, default_value_t = EngineArg::Coroutine)]
    engine: EngineArg,

    /// Requests each queue thread has in flight at most (1 to 65535). When a queue reaches it,
    /// it stops reading /dev/fuse until one of them replies; the kernel keeps the rest
    /// queued, and its max_background (asynchronous requests queued in the kernel) is set to
    /// threads x N, so submitters beyond that wait in the kernel. Each request in flight holds
    /// at most a 2 MiB payload buffer, a 2 MiB READ buffer and a 256 KiB coroutine stack, so
    /// the requests of all queues hold at most threads x max(N, 64) x 4.25 MiB with 1M
    /// requests (64: buffers the pools keep), on top of the daemon's fixed few MiB and the
    /// qcow2 caches. Default 64: twice the deepest benchmark queue depth (QD32), and the pools'
    /// size, so a saturated queue maps no new buffers (docs/performance.md: peak RSS under a
    /// flood).
    #[arg(long, value_name = "N", default_value_t = fuse::session::DEFAULT_MAX_IN_FLIGHT as u16,
          value_parser = clap::value_parser!(u16).range(1..))]
    max_in_flight: u16,

    /// Test hook: fail allocations, `stack|buffer:AFTER:COUNT` — after AFTER coroutine stacks
    /// (or request buffers) taken, the next COUNT fail with ENOMEM.
    #[arg(long, hide = true, value_name = "RULE")]
    inject_enomem: Vec<server::InjectEnomem>,

    /// Test hook: fail matching requests, `OP[:START-END][:ERRNO][:once]` (blkdebug).
    #[arg(long, hide = true, value_name = "RULE", value_parser = block::Rule::parse)]
    inject_error: Vec<block::Rule>,

    /// Test hook: io_uring entries get payload buffers of SIZE bytes (smaller than the kernel's
    /// minimum, the kernel refuses them: the fallback to /dev/fuse).
    #[arg(long, hide = true, value_name = "SIZE", value_parser = parse_size)]
    inject_uring_payload: Option<u64>,

    /// Measurement hook: each coroutine stack's usable size (default 256K; 4K at least). A
    /// path deeper than this overflows into the stack's guard page: SIGSEGV, the process dies.
    #[arg(long, hide = true, value_name = "SIZE", value_parser = parse_size)]
    coroutine_stack: Option<u64>,

    /// Measurement hook: fill coroutine stacks with a pattern and log, at exit, the most stack
    /// any request used (`coroutine stacks: high-water mark N bytes of SIZE`). Touches every
    /// stack page: not for memory measurements.
    #[arg(long, hide = true)]
    stack_canary: bool,

    /// Test hook: io_uring setup fails as on a kernel without it.
    #[arg(long, hide = true)]
    inject_no_io_uring: bool,

    /// Run in the background: the command returns once the mount is live (exit 0), or fails
    /// with the error and exit status the foreground command would give. Once ready, the
    /// daemon's output (log included) goes to /dev/null. Stop it with SIGTERM (see
    /// --pidfile) or `umount MOUNTPOINT`.
    #[arg(long)]
    daemonize: bool,

    /// Write the export's pid (and a newline) to FILE once the mount is live; removed when
    /// it stops cleanly. With or without --daemonize. Under systemd (`Type=notify`), the
    /// export also sends READY=1 and STOPPING=1 to $NOTIFY_SOCKET.
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,

    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AioArg {
    Auto,
    Threads,
    #[value(name = "io_uring")]
    IoUring,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    Dev,
    Uring,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    Auto,
    Raw,
    Qcow2,
    Null,
    Vdi,
    Vpc,
    Vhdx,
    Vmdk,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    Coroutine,
    Async,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AllowOtherArg {
    On,
    Off,
    Auto,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DiscardArg {
    Ignore,
    Unmap,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DetectZeroesArg {
    Off,
    On,
    Unmap,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CacheArg {
    Writeback,
    None,
}

/// Parses `4096`, `64K`, `512M`, `1G`, `2T` (binary units; optional trailing `B` or `iB`).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(format!("unknown size suffix in '{s}' (use K, M, G, T)")),
            };
            (&t[..t.len() - 1], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 4096, 64K, 1G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Parses `--null-latency`: a number of nanoseconds, or `yield`.
fn parse_null_latency(s: &str) -> Result<block::NullLatency, String> {
    if s == "yield" {
        return Ok(block::NullLatency::YieldOnce);
    }
    let ns: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of nanoseconds or 'yield'"))?;
    Ok(block::NullLatency::Sleep(std::time::Duration::from_nanos(
        ns,
    )))
}

fn parse_request_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    if !(4096..=1 << 20).contains(&n) || n % 4096 != 0 {
        return Err(format!("'{s}' must be a multiple of 4K between 4K and 1M"));
    }
    Ok(n as u32)
}

/// One queue thread per CPU, at most 4 (see `--threads`).
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let nbd = server::is_nbd(&cli.image);
    check_nbd_args(&cli, nbd);
    if cli.create.is_some()
        && matches!(
            cli.format,
            FormatArg::Vdi | FormatArg::Vpc | FormatArg::Vhdx | FormatArg::Vmdk
        )
    {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--create makes raw or qcow2 images only (vdi, vpc, vhdx and vmdk can only be read)",
            )
            .exit();
    }
    if let Some(size) = cli.create {
        let format = match cli.format {
            FormatArg::Qcow2 => Format::Qcow2,
            _ => Format::Auto,
        };
        if server::create_format(&cli.image, format) == Format::Qcow2 {
            if let Err(block::BlockError::Invalid(e) | block::BlockError::Corrupt(e)) =
                block::qcow2::create::check_size(size)
            {
                Cli::command()
                    .error(
                        clap::error::ErrorKind::ValueValidation,
                        format!("--create {size}: {e}"),
                    )
                    .exit();
            }
        }
    }
    // Before anything else: the process has no thread and no event loop yet.
    let daemon = if cli.daemonize {
        match daemon::fork() {
            Ok(daemon::Forked::Parent(code)) => return code,
            Ok(daemon::Forked::Child(d)) => Some(d),
            Err(e) => {
                eprintln!("coro-fuse: --daemonize: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .format_target(false)
        .init();

    let format = match cli.format {
        FormatArg::Auto => Format::Auto,
        FormatArg::Raw => Format::Raw,
        FormatArg::Qcow2 => Format::Qcow2,
        FormatArg::Null => Format::Null,
        FormatArg::Vdi => Format::Vdi,
        FormatArg::Vpc => Format::Vpc,
        FormatArg::Vhdx => Format::Vhdx,
        FormatArg::Vmdk => Format::Vmdk,
    };
    if cli.inject_no_io_uring {
        runtime::ring::inject_setup_failure(usize::MAX);
    }
    // Before the first coroutine: both apply to stacks mapped from now on.
    if let Some(size) = cli.coroutine_stack {
        let stack_size = usize::try_from(size).unwrap_or(usize::MAX).max(4096);
        runtime::coroutine::set_pool_config(runtime::PoolConfig {
            stack_size,
            ..runtime::coroutine::pool_config()
        });
        log::info!("coroutine stacks: {stack_size} bytes");
    }
    runtime::set_stack_canary(cli.stack_canary);
    // Every event loop is created after this: the queue threads start in `server::run`.
    // FUSE over io_uring needs every queue thread's event loop to be an io_uring, whatever
    // path the disk I/O takes: the epoll loops of `--aio threads` (or of `auto` for an image
    // in memory) are then io_uring loops, with the disk I/O still on the thread pool.
    let epoll_loops = cli.transport == TransportArg::Dev;
    let aio = match cli.aio {
        AioArg::Threads => {
            if epoll_loops {
                runtime::set_fd_monitor(runtime::FdMonitor::Epoll);
            }
            AioMode::Threads
        }
        AioArg::IoUring => {
            if let Err(e) = runtime::io_uring_supported() {
                eprintln!("coro-fuse: --aio io_uring: io_uring is not available: {e}");
                return ExitCode::from(1);
            }
            AioMode::IoUring
        }
        // Where nothing waits for a device — an image in memory (tmpfs), the null driver —
        // the ring has nothing to do but watch /dev/fuse, and its polls cost ~5 % more CPU per
        // request than epoll (docs/performance.md): auto takes the thread-pool path there.
        AioArg::Auto if nbd => AioMode::Auto,
        AioArg::Auto if cli.format == FormatArg::Null || block::is_in_memory(&cli.image) => {
            log::info!(
                "--aio auto: nothing waits for a device ({}): epoll loops and the thread pool \
                 (--aio io_uring forces the ring)",
                if cli.format == FormatArg::Null {
                    "the null driver".to_owned()
                } else {
                    format!("'{}' is in memory", cli.image.display())
                }
            );
            if epoll_loops {
                runtime::set_fd_monitor(runtime::FdMonitor::Epoll);
            }
            AioMode::Threads
        }
        AioArg::Auto => AioMode::Auto,
    };
    let overlay = match (&cli.overlay, cli.snapshot) {
        (Some(file), _) => Some(block::overlay::Overlay::File(file.clone())),
        (None, true) => Some(block::overlay::Overlay::Temporary),
        (None, false) => None,
    };
    if cli.force_share && cli.growable && overlay.is_none() {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--force-share opens the image read-only: --growable needs --snapshot or \
                 --overlay",
            )
            .exit();
    }
    if cli.format == FormatArg::Null && overlay.is_some() {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "-f null has no image to put an overlay on",
            )
            .exit();
    }
    if cli.null_latency.is_some() && cli.format != FormatArg::Null {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--null-latency is an option of the null driver: it needs -f null",
            )
            .exit();
    }
    let read_only = cli.read_only || (cli.force_share && overlay.is_none());
    let open = OpenOptions {
        format,
        read_only,
        cache: match cli.cache {
            CacheArg::Writeback => CacheMode::Writeback,
            CacheArg::None => CacheMode::None,
        },
        aio,
        force_share: cli.force_share && overlay.is_none(),
        backing_force_share: cli.force_share && overlay.is_some(),
        offset: cli.offset.unwrap_or(0),
        size: cli.size,
        qcow2: block::Qcow2Options {
            l2_cache_bytes: cli.l2_cache_size,
            refcount_cache_bytes: cli.refcount_cache_size,
        },
        discard: match cli.discard {
            DiscardArg::Ignore => block::Discard::Ignore,
            DiscardArg::Unmap => block::Discard::Unmap,
        },
        detect_zeroes: match cli.detect_zeroes {
            DetectZeroesArg::Off => block::DetectZeroes::Off,
            DetectZeroesArg::On => block::DetectZeroes::On,
            DetectZeroesArg::Unmap => block::DetectZeroes::Unmap,
        },
        null_latency: cli.null_latency.unwrap_or_default(),
    };
    let cfg = ServerConfig {
        image: cli.image,
        mountpoint: cli.mountpoint,
        open,
        growable: cli.growable,
        create: cli.create,
        allow_other: match cli.allow_other {
            AllowOtherArg::On => AllowOther::On,
            AllowOtherArg::Off => AllowOther::Off,
            AllowOtherArg::Auto => AllowOther::Auto,
        },
        max_request: cli.max_request,
        inject: cli.inject_error,
        threads: cli.threads.map(usize::from).unwrap_or_else(default_threads),
        engine: match cli.engine {
            EngineArg::Coroutine => Engine::Coroutine,
            EngineArg::Async => Engine::Async,
        },
        max_in_flight: usize::from(cli.max_in_flight),
        inject_enomem: cli.inject_enomem,
        overlay,
        partition: cli.partition,
        transport: match cli.transport {
            TransportArg::Dev => Transport::Dev,
            TransportArg::Uring => Transport::Uring,
            TransportArg::Auto => Transport::Auto,
        },
        uring_entries: usize::from(cli.uring_entries),
        uring_payload: cli.inject_uring_payload.map(|n| n as usize),
        uring_pin: cli.uring_pin == OnOff::On,
        reconnect_delay: std::time::Duration::from_secs_f64(cli.reconnect_delay),
    };
    let mut hooks = Hooks {
        daemon,
        pidfile: cli.pidfile,
        pid_written: false,
    };
    let result = server::run_with(cfg, &mut hooks);
    if let Some(used) = runtime::stack_high_water() {
        log::info!(
            "coroutine stacks: high-water mark {used} bytes of {}",
            runtime::coroutine::pool_config().stack_size
        );
    }
    if hooks.pid_written {
        if let Some(p) = &hooks.pidfile {
            if let Err(e) = std::fs::remove_file(p) {
                log::warn!("cannot remove pidfile {}: {e}", p.display());
            }
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coro-fuse: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The options that have no meaning for an NBD export are usage errors (exit 2).
fn check_nbd_args(cli: &Cli, nbd: bool) {
    let refuse = |why: &str| -> ! {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, why)
            .exit()
    };
    if !nbd {
        if cli.reconnect_delay != 0.0 {
            refuse("--reconnect-delay is an option of NBD exports (nbd://, nbd+unix://)");
        }
        return;
    }
    if !(0.0..=86400.0).contains(&cli.reconnect_delay) {
        refuse("--reconnect-delay must be between 0 and 86400 seconds");
    }
    if matches!(cli.format, FormatArg::Qcow2 | FormatArg::Null) {
        refuse("an NBD export is exported as raw bytes: -f raw or auto");
    }
    if cli.create.is_some() {
        refuse("--create makes an image file; an NBD export exists on its server");
    }
    if cli.snapshot || cli.overlay.is_some() {
        refuse("--snapshot and --overlay need an image file; not supported over NBD yet");
    }
    if cli.growable {
        refuse("--growable: an NBD export cannot be resized");
    }
    if let Err(e) = block::nbd::NbdUri::parse(&cli.image.to_string_lossy()) {
        Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, e)
            .exit()
    }
}

/// `--pidfile`, `--daemonize` and `NOTIFY_SOCKET`.
struct Hooks {
    daemon: Option<daemon::Daemon>,
    pidfile: Option<PathBuf>,
    pid_written: bool,
}

impl Lifecycle for Hooks {
    fn ready(&mut self) -> Result<(), String> {
        let pid = std::process::id();
        if let Some(p) = &self.pidfile {
            std::fs::write(p, format!("{pid}\n"))
                .map_err(|e| format!("cannot write pidfile {}: {e}", p.display()))?;
            self.pid_written = true;
        }
        if self.daemon.is_some() {
            daemon::notify(&format!("READY=1\nMAINPID={pid}\n"));
        } else {
            daemon::notify("READY=1\n");
        }
        if let Some(d) = &mut self.daemon {
            // The parent is gone (killed?): nobody to tell; keep serving.
            if let Err(e) = d.ready() {
                log::warn!("--daemonize: cannot report ready: {e}");
            }
        }
        Ok(())
    }

    fn stopping(&mut self) {
        daemon::notify("STOPPING=1\n");
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
