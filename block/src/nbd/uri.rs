//! NBD URIs, QEMU's syntax: `nbd://HOST[:PORT]/EXPORT` (also `nbd+tcp://`) and
//! `nbd+unix:///EXPORT?socket=PATH` — and the socket they name ([`Stream`]).
//!
//! QEMU: `block/nbd.c` `nbd_parse_uri()`. The export name is the path without its first `/`,
//! percent-decoded; the default port is 10809. TLS (`nbds://`) is not supported.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    /// The export name ("" is the server's default export).
    pub export: String,
}

/// Whether `s` is meant as an NBD URI (it starts with an `nbd` scheme).
pub fn is_nbd_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+tcp://") || s.starts_with("nbd+unix://")
}

impl NbdUri {
    /// Parses `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://…`, `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(s: &str) -> Result<NbdUri, String> {
        let bad = |why: &str| format!("'{s}' is not an NBD URI: {why}");
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        let address = match scheme {
            "nbd" | "nbd+tcp" => {
                if query.is_some() {
                    return Err(bad("a TCP URI takes no query (?socket= is for nbd+unix)"));
                }
                let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad port"))?;
                if host.is_empty() {
                    return Err(bad("no host"));
                }
                Address::Tcp { host, port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)",
                    ));
                }
                let socket = query
                    .and_then(|q| q.strip_prefix("socket="))
                    .filter(|p| !p.is_empty() && !p.contains('&'))
                    .ok_or_else(|| bad("nbd+unix needs exactly ?socket=PATH"))?;
                let socket = percent_decode(socket).ok_or_else(|| bad("bad %-escape"))?;
                Address::Unix(PathBuf::from(socket))
            }
            "nbds" | "nbds+tcp" | "nbds+unix" => return Err(bad("TLS is not supported")),
            _ => return Err(bad("unknown scheme")),
        };
        Ok(NbdUri { address, export })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", self.export)
            }
            Address::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            Address::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(a: &str) -> Option<(String, u16)> {
    if let Some(rest) = a.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((a.to_owned(), DEFAULT_PORT)),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Turns on `SO_KEEPALIVE` (QEMU does so for NBD's TCP sockets): a peer host that vanished
/// without a reset then ends the connection in the kernel's keepalive time, even when no
/// request is in flight.
fn set_keepalive(s: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: `s` owns an open socket for the whole call; `&on` points to a live `c_int` and
    // the length passed is exactly its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A connected socket to the server, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects (blocking, at most `timeout` per address).
    pub fn connect(address: &Address, timeout: Duration) -> io::Result<Stream> {
        match address {
            Address::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            Address::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            set_keepalive(&s)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Read and write timeouts of the blocking handshake.
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        }
    }

    /// Ends the connection in both directions; every coroutine waiting on it wakes.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = NbdUri::parse("nbd://localhost/disk").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "localhost".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "disk");
        let u = NbdUri::parse("nbd://127.0.0.1:10900").unwrap();
        assert_eq!(u.export, "");
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        let u = NbdUri::parse("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        assert_eq!(u.export, "a b");
        let u = NbdUri::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "exp");
        assert_eq!(u.to_string(), "nbd+unix:///exp?socket=/tmp/s.sock");
        for bad in [
            "nbd+unix:///exp",
            "nbd+unix://host/exp?socket=/x",
            "nbd://:80/x",
            "nbd://h:port/x",
            "nbd://h/x?socket=/s",
            "nbds://h/x",
            "http://h/x",
            "nbd://h/%zz",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
        assert!(is_nbd_uri("nbd+unix:///x?socket=/s"));
        assert!(!is_nbd_uri("/tmp/nbd://x"));
    }
}
