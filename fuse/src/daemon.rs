//! `--daemonize`, `--pidfile` and systemd's `NOTIFY_SOCKET` (`Type=notify`).
//!
//! `--daemonize` forks at the very start of `main`, after the arguments are parsed and before
//! any thread or event loop exists, so the child is a whole copy of a single-threaded process.
//! The parent keeps the read end of a pipe: the child writes one byte to it once the mount is
//! live, and the parent exits 0. If the pipe closes without that byte, the child has exited
//! (having printed its error on the stderr both share): the parent reaps it and exits with
//! its status, so `coro-fuse --daemonize` fails as the foreground command would.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::ExitCode;

/// The byte the daemon writes when the export is ready.
const READY: u8 = b'R';

/// The child's side of `--daemonize`.
pub struct Daemon {
    /// The pipe's write end; dropped (closed) once ready is reported.
    ready: Option<OwnedFd>,
    /// /dev/null, for stdout and stderr once ready.
    devnull: File,
}

/// What [`fork`] leaves in this process.
pub enum Forked {
    /// The parent: the daemon reported ready or exited; exit with this.
    Parent(ExitCode),
    /// The daemon.
    Child(Daemon),
}

/// Forks the daemon. Call only while the process has a single thread.
pub fn fork() -> io::Result<Forked> {
    let devnull = File::options().read(true).write(true).open("/dev/null")?;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two c_ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are new open fds that nothing else owns.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller guarantees that this process has one thread (main forks before it
    // starts any thread or event loop), so the child is a complete copy of it: no lock is held
    // by a thread that does not exist in the child.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid > 0 {
        drop(wr);
        return Ok(Forked::Parent(wait_ready(rd, pid)));
    }
    drop(rd);
    // SAFETY: setsid has no memory-safety preconditions; the child of fork is never a process
    // group leader, so it succeeds.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are open; dup2 atomically replaces fd 0 (stdin), which std does not
    // own as an object, so no Rust value is left with a stale fd.
    if unsafe { libc::dup2(devnull.as_raw_fd(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Forked::Child(Daemon {
        ready: Some(wr),
        devnull,
    }))
}

/// The parent: waits for the ready byte, or for the daemon to exit.
fn wait_ready(rd: OwnedFd, pid: libc::pid_t) -> ExitCode {
    let mut byte = [0u8; 1];
    let mut pipe = File::from(rd);
    loop {
        match pipe.read(&mut byte) {
            Ok(1) if byte[0] == READY => return ExitCode::SUCCESS,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => break,
        }
    }
    // The write end closed without the byte: the daemon has exited (or is exiting).
    let mut status = 0;
    let r = loop {
        // SAFETY: `status` is a valid out-pointer; `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    if r < 0 {
        eprintln!(
            "coro-fuse: the daemon (pid {pid}) stopped before the export was ready: {}",
            io::Error::last_os_error()
        );
        return ExitCode::from(1);
    }
    if libc::WIFEXITED(status) {
        return match libc::WEXITSTATUS(status) {
            0 => {
                eprintln!("coro-fuse: the daemon exited before the export was ready");
                ExitCode::from(1)
            }
            code => ExitCode::from(code as u8),
        };
    }
    eprintln!(
        "coro-fuse: the daemon (pid {pid}) was killed by signal {} before the export was ready",
        libc::WTERMSIG(status)
    );
    ExitCode::from(1)
}

impl Daemon {
    /// Tells the parent the export is ready, then detaches stdout and stderr (the parent's
    /// caller may be waiting for them to close) by pointing them at /dev/null.
    pub fn ready(&mut self) -> io::Result<()> {
        let _ = io::stdout().flush();
        let _ = io::stderr().flush();
        let Some(wr) = self.ready.take() else {
            return Ok(());
        };
        let sent = File::from(wr).write_all(&[READY]);
        for fd in [1, 2] {
            // SAFETY: both fds are open; dup2 atomically replaces fd 1 or 2, which std's
            // stdout/stderr use by number only, so no Rust value is left with a stale fd.
            if unsafe { libc::dup2(self.devnull.as_raw_fd(), fd) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        sent
    }
}

/// Sends `msg` to systemd's `NOTIFY_SOCKET`, if set (`sd_notify`). Never fails the export: a
/// failure is logged.
pub fn notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(&path, msg) {
        log::warn!(
            "cannot notify NOTIFY_SOCKET={} ({}): {e}",
            path.to_string_lossy(),
            msg.replace('\n', " ")
        );
    }
}

fn send_notify(path: &OsStr, msg: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL.
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    sock.send_to_addr(msg.as_bytes(), &addr)?;
    Ok(())
}
