//! The end-to-end harness for `coro-fuse`: real mounts, real clients.
//!
//! Every test in `tests/tests/*.rs` starts one or more `coro-fuse` processes through [`Export`],
//! a guard that waits until the export is mounted and, when dropped (also when the test
//! panics), detaches the mount and ends the process, so a failing test never leaves a mount
//! behind.
//!
//! # Which binary
//!
//! `CORO_FUSE=/path/to/coro-fuse` runs that binary as it is. Without it, the harness runs
//! `cargo build -p fuse --bin coro-fuse` once per test binary (a no-op when it is up to date;
//! `--release` when the tests themselves are a release build) in the target directory the
//! tests were built in, and uses `<target>/<profile>/coro-fuse`. `CORO_FUSE_NO_BUILD=1` skips
//! that build and uses whatever binary is there.
//!
//! # Prerequisites and skips
//!
//! The tests need root (mount, losetup, runuser), `/dev/fuse`, and some tools (`qemu-img`,
//! `qemu-io`, `fio`, `mkfs.ext4`, `e2fsck`, `losetup`, `runuser`, `dd`, `fallocate`). When one
//! is missing, the test says `SKIP: …` on stderr (uncaptured, so it is seen) and passes —
//! unless `CI=true`, where a missing prerequisite fails the test: CI must not go green without
//! having run the suite.
//!
//! # Work directories
//!
//! [`workdir`] is on tmpfs (`/dev/shm`) when there is one: fast, and it supports holes and
//! `SEEK_DATA`/`SEEK_HOLE`. Tests that need a property of the backing filesystem check it
//! ([`supports_holes`], [`supports_o_direct`]) or use [`disk_workdir`].

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// How long a started export may take to appear as a mount.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping export may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// After this long an export is killed (SIGKILL aborts the FUSE connection), so a test blocked
/// in a syscall on a hung export fails instead of hanging the suite.
pub const WATCHDOG: Duration = Duration::from_secs(150);
/// Default time limit of a client command ([`run`]).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// No extra `coro-fuse` options: `Export::start(&img, &mnt, NO_ARGS)`.
pub const NO_ARGS: &[&str] = &[];

/// `statfs.f_type` of a FUSE mount.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

// ---------------------------------------------------------------------------------------------
// Skipping
// ---------------------------------------------------------------------------------------------

/// True when running under CI (`CI=true`): missing prerequisites are failures there.
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI").as_deref(),
        Ok("true") | Ok("1") | Ok("TRUE") | Ok("True")
    )
}

/// The running test's name (libtest names the test thread after the test).
pub fn test_name() -> String {
    thread::current().name().unwrap_or("?").to_string()
}

/// Writes a line to the real stderr, past libtest's output capture, so it is seen even when
/// the test passes.
pub fn loud(msg: &str) {
    let mut e = io::stderr().lock();
    let _ = writeln!(e, "{msg}");
}

/// Reports a missing prerequisite: panics under CI, else prints a loud SKIP line. Returns
/// `false` so callers can write `if !cond { return skip(..) }`-style code via [`require!`].
pub fn skip(reason: &str) -> bool {
    if in_ci() {
        panic!("{reason} (CI=true: a missing prerequisite is a failure, not a skip)");
    }
    loud(&format!("SKIP: {}: {reason}", test_name()));
    false
}

/// `require!(cond)` returns from the test when `cond` is false (the condition functions of
/// this crate print the SKIP line or panic under CI themselves).
#[macro_export]
macro_rules! require {
    ($($cond:expr),+ $(,)?) => {
        $( if !$cond { return; } )+
    };
}

/// True if `/dev/fuse` can be opened. If not: prints `SKIP: /dev/fuse absent — end-to-end
/// tests did not run` (once per test binary) — or panics when `CI=true`.
pub fn fuse_available() -> bool {
    static OK: OnceLock<Result<(), String>> = OnceLock::new();
    let r = OK.get_or_init(|| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map(drop)
            .map_err(|e| e.to_string())
    });
    match r {
        Ok(()) => true,
        Err(e) => {
            let msg = format!("/dev/fuse absent — end-to-end tests did not run ({e})");
            if in_ci() {
                panic!("{msg} (CI=true: CI must not pass without FUSE)");
            }
            static SAID: OnceLock<()> = OnceLock::new();
            SAID.get_or_init(|| loud(&format!("SKIP: {msg}")));
            false
        }
    }
}

/// True if we are root (mount, losetup, runuser need it); else a SKIP (or a CI failure).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        true
    } else {
        skip("needs root")
    }
}

/// The full path of an executable named `name`: `$PATH`, then the sbin directories (which a
/// non-login PATH may lack).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = [
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
    ];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// True if every tool is installed; else a SKIP naming the missing ones (or a CI failure).
pub fn have_tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| find_tool(n).is_none())
        .collect();
    if missing.is_empty() {
        true
    } else {
        skip(&format!(
            "{} not installed — this test did not run",
            missing.join(", ")
        ))
    }
}

/// A `Command` for a tool found by [`find_tool`] (or the bare name, which then fails to spawn
/// with a clear message).
pub fn tool(name: &str) -> Command {
    Command::new(find_tool(name).unwrap_or_else(|| PathBuf::from(name)))
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// The workspace root (`tests/..`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `coro-fuse` binary under test (see the crate docs for how it is found and built).
pub fn coro_fuse_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("CORO_FUSE") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "CORO_FUSE={} is not a file", p.display());
            return p;
        }
        // <target>/<profile>/deps/<test binary>
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir
            .parent()
            .expect("<target>/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name() == Some(OsStr::new("release"));
        let bin = profile_dir.join("coro-fuse");
        if std::env::var_os("CORO_FUSE_NO_BUILD").is_none() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut c = Command::new(cargo);
            c.args([
                "build",
                "--quiet",
                "-p",
                "fuse",
                "--bin",
                "coro-fuse",
                "--target-dir",
            ])
            .arg(&target_dir)
            .current_dir(workspace_root());
            if release {
                c.arg("--release");
            }
            let out = c.output().expect("running cargo build for coro-fuse");
            assert!(
                out.status.success(),
                "`cargo build -p fuse --bin coro-fuse` failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            bin.is_file(),
            "{} missing (set CORO_FUSE to the binary)",
            bin.display()
        );
        bin
    })
}

/// A `Command` for `coro-fuse`.
pub fn coro_fuse() -> Command {
    Command::new(coro_fuse_bin())
}

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

/// What a finished process left: its status and output.
#[derive(Debug, Clone)]
pub struct Output {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics (showing everything) unless the command succeeded.
    #[track_caller]
    pub fn ok(self) -> Output {
        assert!(self.success(), "command failed: {self}");
        self
    }

    /// Panics (showing everything) if the command succeeded.
    #[track_caller]
    pub fn fails(self) -> Output {
        assert!(!self.success(), "command should have failed: {self}");
        self
    }

    /// stdout and stderr together.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` -> {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.status,
            tail(&self.stdout, 4000),
            tail(&self.stderr, 4000)
        )
    }
}

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        s
    } else {
        let mut i = s.len() - n;
        while !s.is_char_boundary(i) {
            i += 1;
        }
        &s[i..]
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn read_to_string_lossy(f: &mut File) -> String {
    let mut v = Vec::new();
    let _ = f.seek(SeekFrom::Start(0));
    let _ = f.read_to_end(&mut v);
    String::from_utf8_lossy(&v).into_owned()
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` (stdin closed, output captured) for at most `timeout`. On timeout, `on_timeout`
/// runs first (e.g. to detach a mount), then the process is killed and the test fails with
/// `why` and the output.
#[track_caller]
fn run_bounded(
    cmd: &mut Command,
    timeout: Duration,
    why: &str,
    on_timeout: impl FnOnce(),
) -> Output {
    let what = describe(cmd);
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"));
    match wait_timeout(&mut child, timeout) {
        Some(status) => Output {
            what,
            status,
            stdout: read_to_string_lossy(&mut out),
            stderr: read_to_string_lossy(&mut err),
        },
        None => {
            on_timeout();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{what}` {why} {timeout:?} (killed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
                read_to_string_lossy(&mut out),
                read_to_string_lossy(&mut err)
            );
        }
    }
}

/// Runs `cmd` (stdin closed) to completion within `timeout`; on timeout kills it and panics.
#[track_caller]
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    run_bounded(cmd, timeout, "did not finish within", || {})
}

/// Runs `cmd` within [`COMMAND_TIMEOUT`].
#[track_caller]
pub fn run(cmd: &mut Command) -> Output {
    run_timeout(cmd, COMMAND_TIMEOUT)
}

/// fio random writes of 512 B–128 KiB with crc32c verification through the export `e`: libaio,
/// O_DIRECT, QD16, two jobs on disjoint halves of `2 * job_bytes`. Runs in `dir`, where fio
/// leaves its verify state files; panics (with the daemon's log) unless fio ran clean. Returns
/// fio's output.
#[track_caller]
pub fn fio_randwrite_verify(dir: &Path, e: &Export, job_bytes: u64) -> Output {
    let mut fio = tool("fio");
    fio.current_dir(dir).args([
        "--name=verify",
        &format!("--filename={}", e.path().display()),
        "--rw=randwrite",
        "--bsrange=512-128k",
        "--ioengine=libaio",
        "--direct=1",
        "--iodepth=16",
        "--numjobs=2",
        &format!("--size={job_bytes}"),
        &format!("--offset_increment={job_bytes}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=0",
        "--verify_state_save=0",
        "--group_reporting",
    ]);
    let out = run(&mut fio);
    assert!(out.success(), "fio failed\n{out}\n{}", e.logs());
    assert!(out.stdout.contains("err= 0"), "fio reported errors: {out}");
    assert!(
        !out.all().contains("verify: bad"),
        "fio verification failed: {out}"
    );
    out
}

/// `sh!("prog", arg, arg, …)`: runs a tool (found by [`find_tool`]) with arguments of any
/// `AsRef<OsStr>` type within [`COMMAND_TIMEOUT`]; returns its [`Output`].
#[macro_export]
macro_rules! sh {
    ($prog:expr $(, $a:expr)* $(,)?) => {{
        let mut c = $crate::tool($prog);
        $( c.arg($a); )*
        $crate::run(&mut c)
    }};
}

/// Runs `coro-fuse ARGS` expecting it to exit by itself (an error case) within 15 s. If it
/// does not — it is serving, so the test's expectation is already wrong — the mount at
/// `mountpoint` (if given) is detached, the process killed, and the test fails.
#[track_caller]
pub fn coro_fuse_expect_exit<S: AsRef<OsStr>>(args: &[S], mountpoint: Option<&Path>) -> Output {
    let mut cmd = coro_fuse();
    cmd.args(args);
    let base = mountpoint.map(fuse_mounts_at).unwrap_or(0);
    let why = "was expected to exit but is still running after";
    run_bounded(&mut cmd, Duration::from_secs(15), why, || {
        if let Some(m) = mountpoint {
            detach_fuse_mounts(m, base);
        }
    })
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// User + system CPU seconds used so far by process `pid` (from /proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

// ---------------------------------------------------------------------------------------------
// Mounts
// ---------------------------------------------------------------------------------------------

fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// `path` made absolute without touching `path` itself (it may be a dead FUSE mount): its
/// parent is canonicalised.
pub fn abs_path(path: &Path) -> PathBuf {
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().expect("cwd").join(path)
    };
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => fs::canonicalize(parent)
            .unwrap_or_else(|_| parent.to_path_buf())
            .join(name),
        _ => path,
    }
}

/// The (mountpoint, fstype) pairs of /proc/self/mountinfo.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines()
        .filter_map(|l| {
            let mut halves = l.splitn(2, " - ");
            let left: Vec<&str> = halves.next()?.split(' ').collect();
            let fstype = halves.next()?.split(' ').next()?.to_string();
            let mp = PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(left.get(4)?)));
            Some((mp, fstype))
        })
        .collect()
}

/// How many FUSE mounts (fstype `fuse` or `fuse.*`) are stacked at `path`.
pub fn fuse_mounts_at(path: &Path) -> usize {
    let p = abs_path(path);
    mounts()
        .iter()
        .filter(|(mp, t)| *mp == p && (t == "fuse" || t.starts_with("fuse.")))
        .count()
}

/// The fstype of the topmost mount at `path`, if any.
pub fn fstype_at(path: &Path) -> Option<String> {
    let p = abs_path(path);
    mounts()
        .into_iter()
        .rev()
        .find(|(mp, _)| *mp == p)
        .map(|(_, t)| t)
}

/// `statfs(path).f_type`.
pub fn statfs_type(path: &Path) -> io::Result<i64> {
    let c = cstr(path);
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated string and st a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// `umount2(path, MNT_DETACH)`.
pub fn umount_lazy(path: &Path) -> io::Result<()> {
    let c = cstr(path);
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches FUSE mounts at `path` until no more than `keep` are left.
pub fn detach_fuse_mounts(path: &Path, keep: usize) {
    for _ in 0..8 {
        if fuse_mounts_at(path) <= keep {
            return;
        }
        if umount_lazy(path).is_err() {
            return;
        }
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

// ---------------------------------------------------------------------------------------------
// The export guard
// ---------------------------------------------------------------------------------------------

/// How an export process ended.
#[derive(Debug, Clone)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Exited {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "coro-fuse {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            tail(&self.stdout, 4000),
            tail(&self.stderr, 4000)
        )
    }
}

/// A running `coro-fuse ARGS IMAGE MOUNTPOINT`. Dropping it detaches the mount (if still
/// there), sends SIGTERM, waits up to 10 s, then SIGKILLs — and, when the test is panicking,
/// prints the daemon's output.
pub struct Export {
    child: Option<Child>,
    pid: u32,
    image: PathBuf,
    mnt: PathBuf,
    file: PathBuf,
    base_mounts: usize,
    logs: TempDir,
    exited: Option<Exited>,
    watchdog: Option<mpsc::Sender<()>>,
    cmdline: String,
}

/// Arguments every export gets from the environment, unless a test sets them itself:
/// `CORO_FUSE_THREADS=N` runs the whole suite with `--threads N` (test.sh runs it with 1 and
/// 4), `CORO_FUSE_ENGINE=E` with `--engine E` (test.sh runs it with `async`),
/// `CORO_FUSE_AIO=A` with `--aio A` (`threads`, `io_uring` or `auto`; test.sh runs both
/// engines with `threads` and with io_uring), `CORO_FUSE_TRANSPORT=T` with `--transport T`
/// (test.sh runs the suite with `uring`).
fn extra_args<S: AsRef<OsStr>>(args: &[S]) -> Vec<String> {
    let mut extra = Vec::new();
    for (var, flag) in [
        ("CORO_FUSE_THREADS", "--threads"),
        ("CORO_FUSE_ENGINE", "--engine"),
        ("CORO_FUSE_AIO", "--aio"),
        ("CORO_FUSE_TRANSPORT", "--transport"),
    ] {
        let own = args.iter().any(|a| a.as_ref() == flag);
        match std::env::var(var) {
            Ok(v) if !own && !v.is_empty() => extra.extend([flag.to_owned(), v]),
            _ => {}
        }
    }
    extra
}

/// The engine the suite runs exports with (`CORO_FUSE_ENGINE`, default `coroutine`).
pub fn engine_under_test() -> String {
    match std::env::var("CORO_FUSE_ENGINE") {
        Ok(e) if !e.is_empty() => e,
        _ => "coroutine".to_owned(),
    }
}

impl Export {
    /// Starts an export and waits for its mount; panics (with the daemon's output) if it
    /// exits or does not mount within [`MOUNT_TIMEOUT`].
    #[track_caller]
    pub fn start<S: AsRef<OsStr>>(image: &Path, mountpoint: &Path, args: &[S]) -> Export {
        match Export::try_start(image, mountpoint, args) {
            Ok(e) => e,
            Err(x) => panic!("export did not start: {x}"),
        }
    }

    /// Starts an export; `Err` with the exit status and output if the process exits before
    /// the mount appears. Panics if it neither mounts nor exits within [`MOUNT_TIMEOUT`].
    pub fn try_start<S: AsRef<OsStr>>(
        image: &Path,
        mountpoint: &Path,
        args: &[S],
    ) -> Result<Export, Exited> {
        Export::try_start_in(None, image, mountpoint, args)
    }

    /// Like [`Export::try_start`], but runs `coro-fuse` in directory `cwd` (when given) and
    /// passes `image` and `mountpoint` as they are, so they may be relative to `cwd`.
    pub fn try_start_in<S: AsRef<OsStr>>(
        cwd: Option<&Path>,
        image: &Path,
        mountpoint: &Path,
        args: &[S],
    ) -> Result<Export, Exited> {
        Export::try_start_with(cwd, image, mountpoint, args, |_| {})
    }

    /// Like [`Export::try_start_in`], and `customize` may change the `Command` last (add a
    /// `pre_exec` hook, say) before it is spawned.
    pub fn try_start_with<S: AsRef<OsStr>>(
        cwd: Option<&Path>,
        image: &Path,
        mountpoint: &Path,
        args: &[S],
        customize: impl FnOnce(&mut Command),
    ) -> Result<Export, Exited> {
        let bin = coro_fuse_bin();
        let (image_arg, mnt_arg) = match cwd {
            Some(_) => (image.to_path_buf(), mountpoint.to_path_buf()),
            None => (abs_path(image), abs_path(mountpoint)),
        };
        let in_cwd = |p: &Path| match cwd {
            Some(d) if p.is_relative() => abs_path(&d.join(p)),
            _ => abs_path(p),
        };
        let mnt = in_cwd(mountpoint);
        let image = in_cwd(image);
        let dir_mode = fs::metadata(&mnt).map(|m| m.is_dir()).unwrap_or(false);
        let file = if dir_mode {
            mnt.join(image.file_name().expect("image has a file name"))
        } else {
            mnt.clone()
        };
        let logs = tempfile::Builder::new()
            .prefix("coro-fuse-log.")
            .tempdir()
            .expect("tempdir");
        let out = File::create(logs.path().join("stdout")).expect("log file");
        let err = File::create(logs.path().join("stderr")).expect("log file");
        let base_mounts = fuse_mounts_at(&mnt);
        let mut cmd = Command::new(bin);
        cmd.args(extra_args(args))
            .args(args)
            .arg(&image_arg)
            .arg(&mnt_arg);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        customize(&mut cmd);
        let cmdline = describe(&cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{cmdline}`: {e}"));
        let pid = child.id();
        let mut e = Export {
            child: Some(child),
            pid,
            image,
            mnt,
            file,
            base_mounts,
            logs,
            exited: None,
            watchdog: None,
            cmdline,
        };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if fuse_mounts_at(&e.mnt) > e.base_mounts {
                break;
            }
            if let Some(status) = e.child.as_mut().unwrap().try_wait().expect("try_wait") {
                e.child = None;
                let x = Exited {
                    status,
                    stdout: e.stdout(),
                    stderr: e.stderr(),
                };
                e.exited = Some(x.clone());
                return Err(x);
            }
            if Instant::now() >= deadline {
                panic!(
                    "`{}` did not mount within {MOUNT_TIMEOUT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    e.cmdline,
                    e.stdout(),
                    e.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        e.arm_watchdog();
        Ok(e)
    }

    fn arm_watchdog(&mut self) {
        let (tx, rx) = mpsc::channel::<()>();
        let pid = self.pid;
        let mnt = self.mnt.clone();
        let name = test_name();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(WATCHDOG) {
                loud(&format!(
                    "WATCHDOG: {name}: export at {} still running after {WATCHDOG:?}; killing coro-fuse (pid {pid}) so blocked I/O fails",
                    mnt.display()
                ));
                kill(pid, libc::SIGKILL);
            }
        });
        self.watchdog = Some(tx);
    }

    /// The exported file: the mountpoint itself (file mode) or `MNT/<image name>` (directory
    /// mode).
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The mountpoint, absolute.
    pub fn mountpoint(&self) -> &Path {
        &self.mnt
    }

    /// The image, absolute.
    pub fn image(&self) -> &Path {
        &self.image
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command line it was started with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// What the daemon printed on stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(self.logs.path().join("stdout")).unwrap_or_default()
    }

    /// What the daemon printed on stderr so far (its log).
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.logs.path().join("stderr")).unwrap_or_default()
    }

    /// Both logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "`{}`\n--- coro-fuse stdout ---\n{}\n--- coro-fuse stderr ---\n{}",
            self.cmdline,
            tail(&self.stdout(), 6000),
            tail(&self.stderr(), 6000)
        )
    }

    /// True while our mount is at the mountpoint.
    pub fn is_mounted(&self) -> bool {
        fuse_mounts_at(&self.mnt) > self.base_mounts
    }

    /// True while the process runs (an exited process is reaped).
    pub fn is_running(&mut self) -> bool {
        if self.child.is_none() {
            return false;
        }
        self.wait_exit(Duration::ZERO).is_none()
    }

    /// Sends a signal to the daemon (if still running).
    pub fn signal(&self, sig: i32) {
        if self.child.is_some() {
            kill(self.pid, sig);
        }
    }

    /// Waits up to `timeout` for the process to exit on its own; `None` if it is still running.
    /// Once it has exited, returns the same result every time.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Exited> {
        if let Some(x) = &self.exited {
            return Some(x.clone());
        }
        let child = self.child.as_mut()?;
        let status = wait_timeout(child, timeout)?;
        self.child = None;
        self.watchdog = None;
        let x = Exited {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        };
        self.exited = Some(x.clone());
        Some(x)
    }

    /// SIGTERM, then waits for the exit ([`STOP_TIMEOUT`]; after that SIGKILL and a panic).
    #[track_caller]
    pub fn stop(&mut self) -> Exited {
        self.stop_with(libc::SIGTERM)
    }

    /// Like [`Export::stop`] with another signal (SIGINT).
    #[track_caller]
    pub fn stop_with(&mut self, sig: i32) -> Exited {
        if let Some(x) = &self.exited {
            return x.clone();
        }
        self.signal(sig);
        match self.wait_exit(STOP_TIMEOUT) {
            Some(x) => x,
            None => {
                let logs = self.logs();
                detach_fuse_mounts(&self.mnt, self.base_mounts);
                kill(self.pid, libc::SIGKILL);
                let _ = self.wait_exit(Duration::from_secs(10));
                panic!("coro-fuse did not exit within {STOP_TIMEOUT:?} of signal {sig} (killed)\n{logs}");
            }
        }
    }

    /// Stops the export and asserts a clean exit (status 0, mount gone).
    #[track_caller]
    pub fn stop_ok(&mut self) -> Exited {
        let x = self.stop();
        assert_eq!(
            x.code(),
            Some(0),
            "coro-fuse should exit 0 when stopped: {x}"
        );
        wait_until(Duration::from_secs(5), || !self.is_mounted());
        assert!(!self.is_mounted(), "still mounted after a clean stop\n{x}");
        x
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        detach_fuse_mounts(&self.mnt, self.base_mounts);
        if self.child.is_some() {
            kill(self.pid, libc::SIGTERM);
            if self.wait_exit(STOP_TIMEOUT).is_none() {
                kill(self.pid, libc::SIGKILL);
                let _ = self.wait_exit(Duration::from_secs(10));
            }
        }
        self.watchdog = None;
        if panicking {
            eprintln!(
                "==== daemon output of the failed test ====\n{}",
                self.logs()
            );
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Work directories and images
// ---------------------------------------------------------------------------------------------

/// A fresh directory for one test, on tmpfs (`/dev/shm`) when available.
pub fn workdir() -> TempDir {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new()
        .prefix("coro-fuse-test.")
        .tempdir_in(shm);
    match b {
        Ok(d) => d,
        Err(_) => disk_workdir(),
    }
}

/// A fresh directory on the system temporary directory (usually a disk filesystem).
pub fn disk_workdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("coro-fuse-test.")
        .tempdir()
        .expect("tempdir")
}

/// True if files in `dir` can have holes that `SEEK_HOLE` reports.
pub fn supports_holes(dir: &Path) -> bool {
    let p = dir.join(".hole-probe");
    let r = (|| -> io::Result<bool> {
        let f = File::create(&p)?;
        f.set_len(4 << 20)?;
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 4096], 0)?;
        Ok(seek_hole(&f, 0)? < 4 << 20)
    })();
    let _ = fs::remove_file(&p);
    r.unwrap_or(false)
}

/// True if files in `dir` can be opened with O_DIRECT.
pub fn supports_o_direct(dir: &Path) -> bool {
    let p = dir.join(".odirect-probe");
    let _ = File::create(&p);
    let ok = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = fs::remove_file(&p);
    ok
}

/// A small deterministic PRNG (SplitMix64): reproducible data without a dependency.
#[derive(Clone, Debug)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Prng::new(seed).fill(&mut v);
    v
}

/// Creates `path` as a sparse raw image of `size` bytes (all holes).
pub fn sparse_image(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("set_len");
}

/// Creates `path` filled with pseudo-random data from `seed`; returns the content.
pub fn random_image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(seed, size);
    fs::write(path, &data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    data
}

/// The whole content of a file.
pub fn read_all(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `stat` size of `path`.
pub fn file_size(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

/// Permission bits (`st_mode & 0o7777`) of `path`.
pub fn file_mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// Bytes allocated to `path` (`st_blocks * 512`).
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE` (SIZE in bytes or with a suffix: `1M`).
pub fn create_qcow2(path: &Path, opts: &str, size: impl ToString) {
    run(tool("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", opts])
        .arg(path)
        .arg(size.to_string()))
    .ok();
}

/// `qemu-img check -f qcow2 PATH`: exit 0 clean, 2 corruption, 3 leaks only.
/// Waits (up to `timeout`) until nobody holds a QEMU-style lock byte of the image at `path`
/// (bytes 100 to 299: the permission and shared-permission locks); returns whether it is free.
///
/// After a SIGKILL, `waitpid` can return before the kernel has let go of the image: requests
/// that were in flight on the dead process's io_uring are cancelled and reaped by a kernel
/// worker afterwards (`io_ring_exit_work`), and the open file — with its OFD locks — is
/// released only when the last of them is done (an `fdatasync` to finish, for example). A
/// restart or a `qemu-img check` in that window finds the image locked.
pub fn wait_image_unlocked(path: &Path, timeout: Duration) -> bool {
    let Ok(f) = File::open(path) else {
        return true; // no image, no lock
    };
    wait_until(timeout, || {
        // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 100;
        fl.l_len = 200;
        // SAFETY: F_OFD_GETLK reads and writes the `flock` we pass, which lives for the call.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        r == 0 && fl.l_type == libc::F_UNLCK as libc::c_short
    })
}

pub fn qemu_img_check(path: &Path) -> Output {
    run(tool("qemu-img").args(["check", "-f", "qcow2"]).arg(path))
}

/// Opens `path` read-write with `O_DIRECT`.
pub fn open_direct(path: &Path) -> File {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()))
}

/// Opens `path` read-write.
pub fn open_rw(path: &Path) -> File {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", path.display()))
}

/// Asserts two byte strings are equal, reporting the first difference instead of dumping them.
#[track_caller]
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    match first {
        Some(i) => {
            let end = (i + 16).min(got.len()).min(want.len());
            let diff_count = got.iter().zip(want).filter(|(a, b)| a != b).count();
            panic!(
                "{what}: first difference at byte {i} (0x{i:x}); got {:02x?}, want {:02x?}; {diff_count} bytes differ (lengths {} vs {})",
                &got[i..end],
                &want[i..end],
                got.len(),
                want.len()
            );
        }
        None => panic!(
            "{what}: lengths differ: got {} bytes, want {}",
            got.len(),
            want.len()
        ),
    }
}

/// `lseek(fd, offset, whence)`.
pub fn lseek(f: &File, offset: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek on a valid fd has no memory-safety preconditions.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// The data extents of an image per `qemu-img map --output=json` (through its chain),
/// adjacent ones merged; with `skip_zero`, extents qemu-img marks `"zero": true` are holes.
pub fn qemu_img_data_extents(img: &Path, skip_zero: bool) -> Vec<(u64, u64)> {
    let out = sh!("qemu-img", "map", "--output=json", img).ok();
    let num = |obj: &str, key: &str| -> u64 {
        let at = obj.find(&format!("\"{key}\":")).expect("key") + key.len() + 3;
        let digits: String = obj[at..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().expect("a number")
    };
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for obj in out.stdout.split('{').skip(1) {
        if !obj.contains("\"data\": true") || (skip_zero && obj.contains("\"zero\": true")) {
            continue;
        }
        let (start, len) = (num(obj, "start"), num(obj, "length"));
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => extents.push((start, len)),
        }
    }
    extents
}

/// What SEEK_DATA / SEEK_HOLE from `off` must return for a file of `size` bytes with these
/// data extents (sorted, merged): `None` for ENXIO.
pub fn expected_seek(extents: &[(u64, u64)], size: u64, off: u64, data: bool) -> Option<u64> {
    // EOF is a hole: SEEK_HOLE at EOF returns EOF; everything past it is ENXIO.
    if off > size || (off == size && data) {
        return None;
    }
    if off == size {
        return Some(size);
    }
    let inside = extents.iter().find(|&&(s, l)| s <= off && off < s + l);
    if data {
        match inside {
            Some(_) => Some(off),
            None => extents.iter().map(|e| e.0).find(|&s| s > off),
        }
    } else {
        Some(inside.map_or(off, |&(s, l)| s + l))
    }
}

/// SEEK_DATA and SEEK_HOLE on `mounted` at the edges of every data extent agree with
/// [`expected_seek`]; `what` names the case in a failure.
pub fn assert_seek_matches(mounted: &Path, extents: &[(u64, u64)], size: u64, what: &str) {
    let f = File::open(mounted).unwrap();
    let mut offsets = vec![0, 1, size - 1, size, size + 1];
    for &(s, l) in extents {
        offsets.extend([s, s + 1, s + l - 1, s + l, s + l + 4096]);
        offsets.extend(s.checked_sub(1));
    }
    for off in offsets {
        for (whence, data) in [(libc::SEEK_DATA, true), (libc::SEEK_HOLE, false)] {
            let got = lseek(&f, off, whence).map_err(|e| e.raw_os_error());
            let want = expected_seek(extents, size, off, data).ok_or(Some(libc::ENXIO));
            let name = if data { "SEEK_DATA" } else { "SEEK_HOLE" };
            assert_eq!(
                got, want,
                "{what}: lseek({off}, {name}) with data at {extents:?}"
            );
        }
    }
}

/// `lseek(SEEK_DATA)`.
pub fn seek_data(f: &File, offset: u64) -> io::Result<u64> {
    lseek(f, offset, libc::SEEK_DATA)
}

/// `lseek(SEEK_HOLE)`.
pub fn seek_hole(f: &File, offset: u64) -> io::Result<u64> {
    lseek(f, offset, libc::SEEK_HOLE)
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(f: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid fd has no memory-safety preconditions.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Other guards
// ---------------------------------------------------------------------------------------------

/// A loop device attached with `losetup --find --show`, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    #[track_caller]
    pub fn attach(file: &Path) -> LoopDev {
        let out = run(tool("losetup").arg("--find").arg("--show").arg(file)).ok();
        LoopDev {
            dev: PathBuf::from(out.stdout.trim()),
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new(find_tool("losetup").unwrap_or_else(|| "losetup".into()))
                .arg("-d")
                .arg(&self.dev)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A filesystem mounted with `mount`, unmounted on drop (lazily if busy).
pub struct FsMount {
    pub dir: PathBuf,
    mounted: bool,
}

impl FsMount {
    #[track_caller]
    pub fn mount(dev: &Path, dir: &Path, opts: &[&str]) -> FsMount {
        let mut c = tool("mount");
        c.args(opts).arg(dev).arg(dir);
        run(&mut c).ok();
        FsMount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// A clean `umount`; panics if it fails.
    #[track_caller]
    pub fn umount(&mut self) {
        run(tool("umount").arg(&self.dir)).ok();
        self.mounted = false;
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = umount_lazy(&self.dir);
        }
    }
}

/// Converts a `&Path` into an `OsString` argument (for building argument lists).
pub fn arg(p: &Path) -> OsString {
    p.as_os_str().to_os_string()
}
