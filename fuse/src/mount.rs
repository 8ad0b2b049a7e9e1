//! Mounting the export's FUSE file system, and unmounting it again.
//!
//! This module owns what happens between "we have a mountpoint path" and "we hold a
//! `/dev/fuse` fd of a live mount", and the way back: the mountpoint checks, the mount
//! options, `mount(2)` when we are privileged or `fusermount3` when we are not, the
//! `allow_other=auto` rule, and the lazy unmount at the end. It mirrors libfuse's
//! `lib/mount.c` (`fuse_kern_mount()`, `fuse_mount_sys()`, `fuse_mount_fusermount()`,
//! `fuse_kern_unmount()`), the mount half of `util/fusermount.c`, and the mount-related parts
//! of QEMU's `block/export/fuse.c` (`mount_fuse_export()`, `is_regular_file()`, the
//! `allow-other=auto` retry). The syscalls themselves are in [`crate::sys`].
//!
//! # How a mount is made
//!
//! 1. Check the mountpoint ([`MountError`] names the path and the cause): it must exist, be
//!    a regular file (QEMU style, also the image itself) or a directory (nbdfuse style), and
//!    not already be a FUSE mount. The check uses `statx(AT_STATX_DONT_SYNC)` so that it
//!    does not talk to the server of a FUSE mount already there, and `statfs` only when the
//!    path is a mount root (so an image that merely lives on sshfs is fine).
//! 2. Privileged: open `/dev/fuse` and `mount("fsname", path, "fuse.coro-fuse",
//!    MS_NOSUID|MS_NODEV[|MS_RDONLY], "fd=N,rootmode=100000,user_id=U,group_id=G,…")`;
//!    `rootmode` is the mountpoint's file type in octal (`40000` for a directory), because
//!    the kernel only mounts a root of the same type over a path.
//! 3. Otherwise (`mount(2)` says `EPERM` and we are not root), like libfuse: run
//!    `fusermount3 -o OPTS -- PATH` with `_FUSE_COMMFD=<fd>` naming our end of a
//!    `socketpair(AF_UNIX, SOCK_STREAM)`; the setuid helper mounts and sends the `/dev/fuse`
//!    fd back with `SCM_RIGHTS`, or exits and says why on stderr.
//!
//! The [`Mount`] keeps the session fd (queue 0 reads from it; other queues clone it with
//! [`sys::clone_dev_fuse`]) and remembers how to unmount: `umount2(MNT_DETACH)` after a
//! `mount(2)`, `fusermount3 -u -z` after a `fusermount3` mount. Before unmounting it polls
//! the fd: `POLLERR` means the file system is gone already (unmounted from outside, or
//! aborted), and then it does nothing, so that it never unmounts a newer mount on the same
//! path (libfuse's `fuse_kern_unmount()` does the same).
//!
//! # Differences from QEMU
//!
//! QEMU mounts through libfuse and only over regular files. Its `allow-other=auto` tries to
//! mount with `allow_other`, and on any failure mounts again without. We predict the
//! outcome instead ([`allow_other_auto`]): root may always use `allow_other`, anybody else
//! only if `/etc/fuse.conf` has `user_allow_other` (the only reason `fusermount3` refuses
//! it). The end state is the same, without a failed mount and its error message on stderr.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::protocol::reply::DEFAULT_MAX_WRITE;
use crate::sys::{self, MsFlags};

/// The unprivileged mount helper of libfuse 3.
const FUSERMOUNT: &str = "fusermount3";
/// Environment variable that tells `fusermount3` which fd to send the session fd over.
const FUSE_COMMFD_ENV: &str = "_FUSE_COMMFD";
/// Where `fusermount3` reads `user_allow_other`.
const FUSE_CONF: &str = "/etc/fuse.conf";

/// `rootmode` for a mount over a regular file (`S_IFREG`).
const ROOTMODE_FILE: u32 = libc::S_IFREG;
/// `rootmode` for a mount over a directory (`S_IFDIR`).
const ROOTMODE_DIR: u32 = libc::S_IFDIR;

/// How to mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// Let users other than the mounting one access the file (`allow_other`). Without it the
    /// kernel refuses everybody else, root included. See [`allow_other_auto`].
    pub allow_other: bool,
    /// Mount read-only (`MS_RDONLY` / `ro`).
    pub read_only: bool,
    /// Largest READ the kernel sends (`max_read=`); default 1 MiB, matching
    /// `reply::DEFAULT_MAX_WRITE`.
    pub max_read: u32,
    /// The "device" column of `/proc/mounts`, e.g. the image path. Default `coro-fuse`.
    pub fsname: String,
    /// The file system type becomes `fuse.<subtype>`; default `coro-fuse`. Empty: `fuse`.
    pub subtype: String,
    /// Let the kernel check permissions against the mode and owner we report
    /// (`default_permissions`), as QEMU always does. Default on.
    pub default_permissions: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: false,
            read_only: false,
            max_read: DEFAULT_MAX_WRITE,
            fsname: "coro-fuse".to_owned(),
            subtype: "coro-fuse".to_owned(),
            default_permissions: true,
        }
    }
}

/// Whether `allow_other` will work for us: as root always, otherwise only if
/// `/etc/fuse.conf` has a `user_allow_other` line. This is the outcome QEMU's
/// `allow-other=auto` reaches by trial and error (see the module doc).
///
/// QEMU: block/export/fuse.c, fuse_export_create() (FUSE_EXPORT_ALLOW_OTHER_AUTO)
pub fn allow_other_auto() -> bool {
    sys::geteuid() == 0
        || std::fs::read_to_string(FUSE_CONF).is_ok_and(|conf| conf_allows_other(&conf))
}

/// Whether a `fuse.conf` text enables `user_allow_other` (a line of its own; `#` starts a
/// comment), as `fusermount3`'s read_conf() reads it.
fn conf_allows_other(conf: &str) -> bool {
    conf.lines().any(|line| {
        let line = line.split('#').next().unwrap_or_default();
        line.trim() == "user_allow_other"
    })
}

/// How a [`Mount`] was made, and so how it is unmounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountMethod {
    /// `mount(2)` ourselves; unmount with `umount2(MNT_DETACH)`.
    Syscall,
    /// Through `fusermount3`; unmount with `fusermount3 -u -z`.
    Fusermount,
}

/// Everything that can go wrong mounting or unmounting; `Display` is lower-case and names
/// the path and the cause.
#[derive(Debug)]
pub enum MountError {
    /// The mountpoint does not exist.
    Missing {
        /// The mountpoint.
        path: PathBuf,
    },
    /// The mountpoint is neither a regular file nor a directory.
    NotFileOrDirectory {
        /// The mountpoint.
        path: PathBuf,
    },
    /// A FUSE file system is already mounted there.
    AlreadyFuse {
        /// The mountpoint.
        path: PathBuf,
    },
    /// A FUSE file system is mounted there whose server is gone (`ENOTCONN`).
    StaleFuse {
        /// The mountpoint.
        path: PathBuf,
    },
    /// The kernel said `EACCES`/`EPERM`.
    PermissionDenied {
        /// The mountpoint.
        path: PathBuf,
        /// What we tried, as in "permission denied to {action} {path}".
        action: &'static str,
    },
    /// A path or option contains a NUL byte.
    InvalidOption {
        /// Which option.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// `/dev/fuse` could not be opened (the message says why and what to do).
    DevFuse(io::Error),
    /// `mount(2)` failed.
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// We are not privileged and `fusermount3` is not installed.
    FusermountMissing {
        /// The mountpoint.
        path: PathBuf,
    },
    /// `fusermount3` failed.
    Fusermount {
        /// The mountpoint.
        path: PathBuf,
        /// "mount" or "unmount".
        action: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// What it said on stderr, trimmed.
        stderr: String,
    },
    /// `umount2(2)` failed.
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Another I/O error.
    Io {
        /// The mountpoint.
        path: PathBuf,
        /// What we tried, as in "cannot {action} {path}".
        action: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountError::Missing { path } => {
                write!(f, "mountpoint {} does not exist", path.display())
            }
            MountError::NotFileOrDirectory { path } => write!(
                f,
                "mountpoint {} is not a regular file or a directory",
                path.display()
            ),
            MountError::AlreadyFuse { path } => write!(
                f,
                "{} is already a FUSE mount (another coro-fuse or qemu export?)",
                path.display()
            ),
            MountError::StaleFuse { path } => write!(
                f,
                "{0} is a FUSE mount whose server is gone (transport endpoint is not \
                 connected); unmount it first (`fusermount3 -u {0}` or `umount {0}`)",
                path.display()
            ),
            MountError::PermissionDenied { path, action } => {
                write!(f, "permission denied to {action} {}", path.display())
            }
            MountError::InvalidOption { what, value } => {
                write!(f, "{what} {value:?} contains a NUL byte")
            }
            MountError::DevFuse(err) => write!(f, "{err}"),
            MountError::Mount { path, source } => write!(
                f,
                "cannot mount a FUSE file system on {}: {source}",
                path.display()
            ),
            MountError::FusermountMissing { path } => write!(
                f,
                "cannot mount on {} without root privileges: install fuse3 (fusermount3) \
                 or run as root",
                path.display()
            ),
            MountError::Fusermount {
                path,
                action,
                status,
                stderr,
            } => {
                write!(
                    f,
                    "fusermount3 could not {action} {} ({status})",
                    path.display()
                )?;
                if !stderr.is_empty() {
                    write!(f, ": {stderr}")?;
                }
                Ok(())
            }
            MountError::Unmount { path, source } => {
                write!(f, "cannot unmount {}: {source}", path.display())
            }
            MountError::Io {
                path,
                action,
                source,
            } => write!(f, "cannot {action} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for MountError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MountError::DevFuse(source)
            | MountError::Mount { source, .. }
            | MountError::Unmount { source, .. }
            | MountError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A mounted FUSE file system: the session fd and how to unmount. Dropping it unmounts
/// (lazily); so does [`unmount`](Mount::unmount), which reports errors.
#[derive(Debug)]
pub struct Mount {
    fd: OwnedFd,
    mountpoint: PathBuf,
    method: MountMethod,
    /// Cleared once unmounted, so that `Drop` does nothing more.
    mounted: bool,
}

impl Mount {
    /// Checks `mountpoint` and mounts over it, with `mount(2)` if we may, else with
    /// `fusermount3`. The kernel then queues INIT on [`fd`](Mount::fd); nothing on the
    /// mountpoint answers until somebody serves it.
    ///
    /// libfuse: lib/mount.c, fuse_kern_mount(); QEMU: block/export/fuse.c, mount_fuse_export()
    pub fn new(mountpoint: &Path, opts: &MountOptions) -> Result<Mount, MountError> {
        Self::new_with(mountpoint, opts, None)
    }

    /// [`new`](Mount::new), optionally forcing a method (tests use `Fusermount` as root).
    pub fn new_with(
        mountpoint: &Path,
        opts: &MountOptions,
        force: Option<MountMethod>,
    ) -> Result<Mount, MountError> {
        let c_path = c_string("mountpoint", mountpoint.as_os_str())?;
        validate(opts)?;
        let root_mode = check_mountpoint(mountpoint, &c_path)?;
        let privileged = sys::geteuid() == 0;

        if force != Some(MountMethod::Fusermount) {
            match sys::open_dev_fuse() {
                Ok(fd) => match mount_syscall(&c_path, fd.as_raw_fd(), root_mode, opts) {
                    Ok(()) => return Ok(Mount::mounted(fd, mountpoint, MountMethod::Syscall)),
                    // Unprivileged: fusermount3 can do it (libfuse falls back the same way).
                    Err(err) if err.raw_os_error() == Some(libc::EPERM) && !privileged => {}
                    Err(err) => return Err(mount_error(mountpoint, err)),
                },
                // Not even fusermount3 helps when we may not open /dev/fuse: it opens the
                // device with our privileges, not its setuid ones.
                Err(err) => return Err(MountError::DevFuse(err)),
            }
        }
        let fd = mount_fusermount(mountpoint, opts)?;
        Ok(Mount::mounted(fd, mountpoint, MountMethod::Fusermount))
    }

    fn mounted(fd: OwnedFd, mountpoint: &Path, method: MountMethod) -> Mount {
        Mount {
            fd,
            mountpoint: mountpoint.to_path_buf(),
            method,
            mounted: true,
        }
    }

    /// The session fd (non-blocking). Read requests from it, or attach more queues with
    /// [`sys::clone_dev_fuse`]; `try_clone_to_owned()` gives an owned duplicate of the same
    /// open file (same queue).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Where it is mounted (as given to [`new`](Mount::new)).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// How it was mounted.
    pub fn method(&self) -> MountMethod {
        self.method
    }

    /// Unmounts lazily (detached now, torn down when no longer in use; servers then read
    /// `ENODEV`) and closes the session fd. Unmounting what is already gone (unmounted from
    /// outside) is not an error.
    ///
    /// libfuse: lib/mount.c, fuse_kern_unmount()
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.unmount_once()
    }

    fn unmount_once(&mut self) -> Result<(), MountError> {
        if !std::mem::replace(&mut self.mounted, false) {
            return Ok(());
        }
        if self.is_gone() {
            return Ok(());
        }
        match self.method {
            MountMethod::Syscall => {
                let c_path = c_string("mountpoint", self.mountpoint.as_os_str())?;
                match sys::umount_detach(&c_path) {
                    Ok(()) => Ok(()),
                    // EINVAL: not a mount point (any more); ENOENT: the path is gone.
                    Err(err) if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
                        Ok(())
                    }
                    Err(source) => Err(MountError::Unmount {
                        path: self.mountpoint.clone(),
                        source,
                    }),
                }
            }
            MountMethod::Fusermount => {
                let result = unmount_fusermount(&self.mountpoint);
                if result.is_err() && self.is_gone() {
                    return Ok(());
                }
                result
            }
        }
    }

    /// Whether the session is over already (`POLLERR` on the fd).
    fn is_gone(&self) -> bool {
        sys::is_disconnected(self.fd.as_fd()).unwrap_or(false)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(err) = self.unmount_once() {
            log::warn!("{err}");
        }
    }
}

/// `value` as a C string, or `InvalidOption`.
fn c_string(what: &'static str, value: &OsStr) -> Result<CString, MountError> {
    CString::new(value.as_bytes()).map_err(|_| MountError::InvalidOption {
        what,
        value: value.to_string_lossy().into_owned(),
    })
}

fn validate(opts: &MountOptions) -> Result<(), MountError> {
    c_string("fsname", OsStr::new(&opts.fsname))?;
    c_string("subtype", OsStr::new(&opts.subtype))?;
    Ok(())
}

/// Checks the mountpoint and returns the `rootmode` for it (module doc, step 1).
///
/// QEMU: block/export/fuse.c, is_regular_file()
fn check_mountpoint(path: &Path, c_path: &CString) -> Result<u32, MountError> {
    let st = sys::stat_nosync(c_path).map_err(|err| match err.raw_os_error() {
        Some(libc::ENOENT) => MountError::Missing {
            path: path.to_path_buf(),
        },
        Some(libc::ENOTCONN) => MountError::StaleFuse {
            path: path.to_path_buf(),
        },
        Some(libc::EACCES | libc::EPERM) => MountError::PermissionDenied {
            path: path.to_path_buf(),
            action: "access",
        },
        _ => MountError::Io {
            path: path.to_path_buf(),
            action: "access",
            source: err,
        },
    })?;
    // Only a mount root can be "already a FUSE mount"; a file inside a FUSE file system
    // (an image on sshfs) is fine. Without the statx bit (Linux < 5.8) we cannot tell.
    if st.mount_root != Some(false) {
        match sys::statfs_type(c_path) {
            Ok(sys::FUSE_SUPER_MAGIC) => {
                return Err(MountError::AlreadyFuse {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => {
                return Err(MountError::StaleFuse {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(MountError::Io {
                    path: path.to_path_buf(),
                    action: "statfs",
                    source,
                })
            }
        }
    }
    match st.mode & libc::S_IFMT {
        ROOTMODE_FILE => Ok(ROOTMODE_FILE),
        ROOTMODE_DIR => Ok(ROOTMODE_DIR),
        _ => Err(MountError::NotFileOrDirectory {
            path: path.to_path_buf(),
        }),
    }
}

/// The `data` argument of `mount(2)`: what the kernel's FUSE driver parses.
fn kernel_options(opts: &MountOptions, fd: RawFd, root_mode: u32, uid: u32, gid: u32) -> String {
    let mut data = format!("fd={fd},rootmode={root_mode:o},user_id={uid},group_id={gid}");
    if opts.default_permissions {
        data.push_str(",default_permissions");
    }
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    data.push_str(&format!(",max_read={}", opts.max_read));
    data
}

/// The `-o` argument of `fusermount3`: flags as words, no `fd`/`rootmode`/`user_id`/
/// `group_id` (it sets those itself), `fsname`/`subtype` with `,` and `\` escaped.
///
/// libfuse: lib/mount.c, fuse_mount_opt_proc() and get_mnt_flag_opts()
fn fusermount_options(opts: &MountOptions) -> String {
    let mut words = vec![
        if opts.read_only { "ro" } else { "rw" }.to_owned(),
        "nosuid".to_owned(),
        "nodev".to_owned(),
    ];
    if opts.default_permissions {
        words.push("default_permissions".to_owned());
    }
    if opts.allow_other {
        words.push("allow_other".to_owned());
    }
    words.push(format!("max_read={}", opts.max_read));
    if !opts.fsname.is_empty() {
        words.push(format!("fsname={}", escape_option(&opts.fsname)));
    }
    if !opts.subtype.is_empty() {
        words.push(format!("subtype={}", escape_option(&opts.subtype)));
    }
    words.join(",")
}

/// Escapes `,` and `\` for `fusermount3`'s option parser (libfuse's fuse_opt_add_opt_escaped()).
fn escape_option(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == ',' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Mounts with `mount(2)` (module doc, step 2).
///
/// libfuse: lib/mount.c, fuse_mount_sys()
fn mount_syscall(
    c_path: &CString,
    fd: RawFd,
    root_mode: u32,
    opts: &MountOptions,
) -> io::Result<()> {
    let data = kernel_options(opts, fd, root_mode, sys::getuid(), sys::getgid());
    let source = match (opts.fsname.as_str(), opts.subtype.as_str()) {
        ("", "") => sys::DEV_FUSE,
        ("", subtype) => subtype,
        (fsname, _) => fsname,
    };
    let fstype = if opts.subtype.is_empty() {
        "fuse".to_owned()
    } else {
        format!("fuse.{}", opts.subtype)
    };
    let mut flags = MsFlags::NOSUID | MsFlags::NODEV;
    if opts.read_only {
        flags = flags | MsFlags::RDONLY;
    }
    // `validate` ruled out NUL bytes in fsname and subtype; the rest is our own text.
    let c = |s: &str| CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    sys::mount(&c(source)?, c_path, &c(&fstype)?, flags, &c(&data)?)
}

#[cold]
fn mount_error(path: &Path, err: io::Error) -> MountError {
    match err.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => MountError::PermissionDenied {
            path: path.to_path_buf(),
            action: "mount on",
        },
        _ => MountError::Mount {
            path: path.to_path_buf(),
            source: err,
        },
    }
}

/// Mounts with `fusermount3` and receives the session fd (module doc, step 3).
///
/// libfuse: lib/mount.c, fuse_mount_fusermount() and receive_fd()
fn mount_fusermount(path: &Path, opts: &MountOptions) -> Result<OwnedFd, MountError> {
    let io_error = |action, source| MountError::Io {
        path: path.to_path_buf(),
        action,
        source,
    };
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| io_error("create a socketpair to mount", e))?;
    let mut cmd = Command::new(FUSERMOUNT);
    cmd.arg("-o")
        .arg(fusermount_options(opts))
        .arg("--")
        .arg(path)
        .env(FUSE_COMMFD_ENV, theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    sys::inherit_fd(&mut cmd, theirs.as_fd());
    let child = cmd.spawn().map_err(|err| {
        if err.kind() == io::ErrorKind::NotFound {
            MountError::FusermountMissing {
                path: path.to_path_buf(),
            }
        } else {
            io_error("run fusermount3 to mount", err)
        }
    })?;
    // Close our copy of the child's end: when fusermount3 exits, we must see EOF.
    drop(theirs);
    let received = sys::recv_fd(ours.as_fd());
    let output = child
        .wait_with_output()
        .map_err(|e| io_error("wait for fusermount3 mounting", e))?;
    match received {
        Ok(Some(fd)) => {
            sys::set_nonblocking(fd.as_fd())
                .map_err(|e| io_error("make the FUSE fd non-blocking for", e))?;
            Ok(fd)
        }
        Ok(None) => Err(MountError::Fusermount {
            path: path.to_path_buf(),
            action: "mount",
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }),
        Err(err) => Err(io_error("receive the FUSE fd from fusermount3 for", err)),
    }
}

/// `fusermount3 -u -z -- PATH`.
fn unmount_fusermount(path: &Path) -> Result<(), MountError> {
    let output = Command::new(FUSERMOUNT)
        .args(["-u", "-z", "--"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| MountError::Io {
            path: path.to_path_buf(),
            action: "run fusermount3 to unmount",
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(MountError::Fusermount {
        path: path.to_path_buf(),
        action: "unmount",
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    //! The pure parts and the refusals before any mount; real mounts are in
    //! `fuse/tests/mount.rs`.

    use super::*;

    // -----------------------------------------------------------------------------------
    // Pure helpers
    // -----------------------------------------------------------------------------------

    #[test]
    fn kernel_options_for_a_file_and_a_directory() {
        let opts = MountOptions::default();
        assert_eq!(
            kernel_options(&opts, 7, ROOTMODE_FILE, 1000, 100),
            "fd=7,rootmode=100000,user_id=1000,group_id=100,default_permissions,\
             max_read=1048576"
        );
        let opts = MountOptions {
            allow_other: true,
            default_permissions: false,
            max_read: 65536,
            ..Default::default()
        };
        assert_eq!(
            kernel_options(&opts, 3, ROOTMODE_DIR, 0, 0),
            "fd=3,rootmode=40000,user_id=0,group_id=0,allow_other,max_read=65536"
        );
    }

    #[test]
    fn fusermount_options_escape_fsname() {
        let opts = MountOptions {
            read_only: true,
            allow_other: true,
            fsname: r"/img/a,b\c.qcow2".to_owned(),
            ..Default::default()
        };
        assert_eq!(
            fusermount_options(&opts),
            r"ro,nosuid,nodev,default_permissions,allow_other,max_read=1048576,fsname=/img/a\,b\\c.qcow2,subtype=coro-fuse"
        );
        let opts = MountOptions {
            fsname: String::new(),
            subtype: String::new(),
            default_permissions: false,
            ..Default::default()
        };
        assert_eq!(
            fusermount_options(&opts),
            "rw,nosuid,nodev,max_read=1048576"
        );
    }

    #[test]
    fn fuse_conf_user_allow_other() {
        assert!(conf_allows_other("user_allow_other\n"));
        assert!(conf_allows_other(
            "# comment\n  user_allow_other  # yes\nmount_max = 10\n"
        ));
        assert!(!conf_allows_other("#user_allow_other\n"));
        assert!(!conf_allows_other("user_allow_other_not\n"));
        assert!(!conf_allows_other(""));
        if sys::geteuid() == 0 {
            assert!(allow_other_auto(), "root may always use allow_other");
        }
    }

    #[test]
    fn errors_name_the_path_in_lower_case() {
        let path = PathBuf::from("/mnt/x");
        let errors = [
            MountError::Missing { path: path.clone() },
            MountError::NotFileOrDirectory { path: path.clone() },
            MountError::AlreadyFuse { path: path.clone() },
            MountError::StaleFuse { path: path.clone() },
            MountError::PermissionDenied {
                path: path.clone(),
                action: "mount on",
            },
            MountError::Mount {
                path: path.clone(),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            },
            MountError::FusermountMissing { path: path.clone() },
            MountError::Unmount {
                path: path.clone(),
                source: io::Error::from_raw_os_error(libc::EBUSY),
            },
            MountError::Io {
                path: path.clone(),
                action: "statfs",
                source: io::Error::from_raw_os_error(libc::EIO),
            },
        ];
        for err in errors {
            let text = err.to_string();
            assert!(
                text.starts_with(|c: char| c.is_ascii_lowercase() || c == '/'),
                "{text}"
            );
            assert!(text.contains("/mnt/x"), "{text}");
        }
        assert_eq!(
            MountError::AlreadyFuse { path: path.clone() }.to_string(),
            "/mnt/x is already a FUSE mount (another coro-fuse or qemu export?)"
        );
        assert!(MountError::FusermountMissing { path }
            .to_string()
            .contains("install fuse3 (fusermount3) or run as root"));
    }

    // -----------------------------------------------------------------------------------
    // Mountpoint checks that need no /dev/fuse
    // -----------------------------------------------------------------------------------

    #[test]
    fn missing_mountpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope");
        let err = Mount::new(&path, &MountOptions::default()).unwrap_err();
        assert!(matches!(err, MountError::Missing { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("mountpoint {} does not exist", path.display())
        );
    }

    #[test]
    fn mountpoint_must_be_a_file_or_directory() {
        let err = Mount::new(Path::new("/dev/null"), &MountOptions::default()).unwrap_err();
        assert!(
            matches!(err, MountError::NotFileOrDirectory { .. }),
            "{err}"
        );
    }

    #[test]
    fn nul_bytes_are_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let opts = MountOptions {
            fsname: "a\0b".to_owned(),
            ..Default::default()
        };
        let err = Mount::new(file.path(), &opts).unwrap_err();
        assert!(
            matches!(err, MountError::InvalidOption { what: "fsname", .. }),
            "{err}"
        );
    }
}
