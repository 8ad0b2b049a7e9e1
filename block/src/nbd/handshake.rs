//! The client side of the fixed newstyle handshake, over a blocking socket: structured
//! replies, the `base:allocation` meta context, then `NBD_OPT_GO` with the export's size,
//! flags and block sizes (falling back to `NBD_OPT_EXPORT_NAME` for a server without GO).
//!
//! QEMU: `nbd/client.c` (`nbd_receive_negotiate()`, `nbd_opt_info_or_go()`,
//! `nbd_negotiate_simple_meta_context()`). QEMU runs it in a coroutine on a non-blocking
//! channel, or in its connection thread (`nbd/client-connection.c`); here it always runs on a
//! plain thread with a blocking socket and timeouts — at open on the opener's thread, at a
//! reconnect on the thread pool — which is QEMU's connection-thread shape and keeps this
//! file free of yields.
//!
//! Every length the server sends is checked before anything is read into a buffer of that
//! size; a server that breaks the protocol gets a [`HandshakeError`] naming what it did.

use std::io::{self, Read, Write};

use super::proto::*;

/// What the handshake agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Smallest request granularity (1 unless the server says otherwise).
    pub min_block: u32,
    /// The server's preferred request size (for information).
    pub pref_block: u32,
    /// Largest payload the server accepts in one request.
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The id of `base:allocation`, if the server has it.
    pub meta_context: Option<u32>,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    Io(io::Error),
    /// The server broke the protocol.
    Protocol(ProtocolError),
    /// The server refused what we need (unknown export, TLS required …).
    Refused(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "{e}"),
            HandshakeError::Protocol(p) => write!(f, "protocol error in the handshake: {p}"),
            HandshakeError::Refused(why) => f.write_str(why),
        }
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl From<ProtocolError> for HandshakeError {
    fn from(e: ProtocolError) -> Self {
        HandshakeError::Protocol(e)
    }
}

type Result<T> = std::result::Result<T, HandshakeError>;

/// The default and largest payload we send or accept in one request (QEMU:
/// `NBD_MAX_BUFFER_SIZE`).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Longest option reply accepted (an `NBD_REP_INFO` is a few bytes; names are at most 4096).
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// Negotiates `export` on `s` (a fresh connection) and returns what the server offers.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo> {
    let magic = read_u64(s)?;
    if magic != INIT_MAGIC {
        return Err(violation(format!(
            "bad initial magic {magic:#018x} (not an NBD server?)"
        ))
        .into());
    }
    match read_u64(s)? {
        OPTS_MAGIC => {}
        OLDSTYLE_MAGIC => {
            return Err(HandshakeError::Refused(
                "the server speaks the oldstyle handshake, which is not supported".into(),
            ))
        }
        m => return Err(violation(format!("bad handshake magic {m:#018x}")).into()),
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::Refused(
            "the server does not support the fixed newstyle handshake".into(),
        ));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
    s.write_all(&client_flags.to_be_bytes())?;

    let structured = simple_option(s, OPT_STRUCTURED_REPLY)?;
    let meta_context = if structured {
        set_meta_context(s, export)?
    } else {
        None
    };
    let info = match go(s, export)? {
        Some(info) => info,
        None => export_name(s, export, no_zeroes)?,
    };
    Ok(ExportInfo {
        structured,
        meta_context,
        ..info
    })
}

/// One option reply's header: `(type, length)`, after checking magic and option.
fn read_reply_header<S: Read>(s: &mut S, opt: u32) -> Result<(u32, u32)> {
    let magic = read_u64(s)?;
    if magic != REP_MAGIC {
        return Err(violation(format!("bad option reply magic {magic:#018x}")).into());
    }
    let got = read_u32(s)?;
    if got != opt {
        return Err(violation(format!("reply to option {got}, expected {opt}")).into());
    }
    let ty = read_u32(s)?;
    let len = read_u32(s)?;
    if len > MAX_OPTION_REPLY {
        return Err(violation(format!("option reply of {len} bytes")).into());
    }
    Ok((ty, len))
}

fn send_option<S: Write>(s: &mut S, opt: u32, data: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)?;
    Ok(())
}

/// An option without data whose answer is ACK or an error: true if acknowledged.
fn simple_option<S: Read + Write>(s: &mut S, opt: u32) -> Result<bool> {
    send_option(s, opt, &[])?;
    let (ty, len) = read_reply_header(s, opt)?;
    let _ = read_vec(s, len)?;
    match ty {
        REP_ACK => Ok(true),
        t if t & REP_FLAG_ERROR != 0 => {
            log::debug!("nbd: the server refused option {opt} (reply {t:#x})");
            Ok(false)
        }
        t => Err(violation(format!("reply type {t} to option {opt}")).into()),
    }
}

/// `NBD_OPT_SET_META_CONTEXT` for `base:allocation`: its id, or `None` if the server lacks it.
fn set_meta_context<S: Read + Write>(s: &mut S, export: &str) -> Result<Option<u32>> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
    data.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
    send_option(s, OPT_SET_META_CONTEXT, &data)?;
    let mut id = None;
    loop {
        let (ty, len) = read_reply_header(s, OPT_SET_META_CONTEXT)?;
        let payload = read_vec(s, len)?;
        match ty {
            REP_ACK => return Ok(id),
            REP_META_CONTEXT => {
                if payload.len() < 4 {
                    return Err(violation("meta context reply shorter than its id").into());
                }
                if &payload[4..] != META_BASE_ALLOCATION.as_bytes() || id.is_some() {
                    return Err(violation(format!(
                        "meta context '{}' that was not asked for",
                        String::from_utf8_lossy(&payload[4..])
                    ))
                    .into());
                }
                id = Some(be32(&payload));
            }
            t if t & REP_FLAG_ERROR != 0 => {
                log::debug!("nbd: no meta contexts (reply {t:#x}); SEEK_HOLE sees data only");
                return Ok(None);
            }
            t => return Err(violation(format!("reply type {t} to SET_META_CONTEXT")).into()),
        }
    }
}

/// `NBD_OPT_GO` asking for block sizes. `None` if the server does not know GO.
fn go<S: Read + Write>(s: &mut S, export: &str) -> Result<Option<ExportInfo>> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut export_info: Option<(u64, u16)> = None;
    let mut sizes = (1, 4096, MAX_PAYLOAD);
    loop {
        let (ty, len) = read_reply_header(s, OPT_GO)?;
        let payload = read_vec(s, len)?;
        match ty {
            REP_ACK => break,
            REP_INFO => {
                if payload.len() < 2 {
                    return Err(violation("info reply without a type").into());
                }
                match be16(&payload) {
                    INFO_EXPORT if payload.len() == 12 => {
                        export_info = Some((be64(&payload[2..]), be16(&payload[10..])));
                    }
                    INFO_BLOCK_SIZE if payload.len() == 14 => {
                        sizes = check_block_sizes(
                            be32(&payload[2..]),
                            be32(&payload[6..]),
                            be32(&payload[10..]),
                        )?;
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(
                            violation(format!("info reply of {} bytes", payload.len())).into()
                        )
                    }
                    _ => {} // name, description: not needed
                }
            }
            REP_ERR_UNSUP => return Ok(None),
            t if t & REP_FLAG_ERROR != 0 => return Err(refusal(t, export, &payload)),
            t => return Err(violation(format!("reply type {t} to GO")).into()),
        }
    }
    let Some((size, flags)) = export_info else {
        return Err(violation("GO acknowledged without the export's size").into());
    };
    check_size(size)?;
    Ok(Some(ExportInfo {
        size,
        flags,
        min_block: sizes.0,
        pref_block: sizes.1,
        max_block: sizes.2,
        structured: false,
        meta_context: None,
    }))
}

/// The pre-GO way in: no reply header, just size and flags (and 124 zero bytes unless
/// `NO_ZEROES` was agreed). A server that does not know the export closes the connection.
fn export_name<S: Read + Write>(s: &mut S, export: &str, no_zeroes: bool) -> Result<ExportInfo> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let size = read_u64(s).map_err(|e| match e {
        HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            HandshakeError::Refused(format!("the server has no export '{export}'"))
        }
        e => e,
    })?;
    let flags = read_u16(s)?;
    if !no_zeroes {
        let _ = read_vec(s, 124)?;
    }
    check_size(size)?;
    Ok(ExportInfo {
        size,
        flags,
        min_block: 1,
        pref_block: 4096,
        max_block: MAX_PAYLOAD,
        structured: false,
        meta_context: None,
    })
}

fn check_size(size: u64) -> Result<()> {
    if size > i64::MAX as u64 {
        return Err(violation(format!("export size {size}")).into());
    }
    Ok(())
}

/// The protocol's rules for `NBD_INFO_BLOCK_SIZE`: a power-of-two minimum up to 64 KiB, a
/// power-of-two preferred size at least the minimum, a maximum that is a multiple of the
/// minimum. The maximum is capped at [`MAX_PAYLOAD`].
fn check_block_sizes(min: u32, pref: u32, max: u32) -> Result<(u32, u32, u32)> {
    let ok = min.is_power_of_two()
        && min <= 64 * 1024
        && pref.is_power_of_two()
        && pref >= min
        && max >= min
        && max.is_multiple_of(min);
    if !ok {
        return Err(violation(format!("block sizes min {min} pref {pref} max {max}")).into());
    }
    Ok((min, pref, max.min(MAX_PAYLOAD)))
}

fn refusal(ty: u32, export: &str, payload: &[u8]) -> HandshakeError {
    let msg = String::from_utf8_lossy(payload);
    let why = match ty {
        REP_ERR_UNKNOWN => format!("the server has no export '{export}'"),
        REP_ERR_TLS_REQD => "the server requires TLS, which is not supported".into(),
        REP_ERR_POLICY => format!("the server refuses export '{export}' (policy)"),
        REP_ERR_INVALID => format!("the server calls the request for '{export}' invalid"),
        REP_ERR_SHUTDOWN => "the server is shutting down".into(),
        t => format!("the server refused export '{export}' (error {:#x})", t),
    };
    if msg.is_empty() {
        HandshakeError::Refused(why)
    } else {
        HandshakeError::Refused(format!("{why}: {msg}"))
    }
}

fn read_vec<S: Read>(s: &mut S, len: u32) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn read_u16<S: Read>(s: &mut S) -> Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32<S: Read>(s: &mut S) -> Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64<S: Read>(s: &mut S) -> Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_rules() {
        assert_eq!(
            check_block_sizes(1, 4096, 1 << 25).unwrap(),
            (1, 4096, 1 << 25)
        );
        assert_eq!(
            check_block_sizes(512, 4096, 1 << 30).unwrap().2,
            MAX_PAYLOAD
        );
        assert!(check_block_sizes(3, 4096, 4096).is_err());
        assert!(check_block_sizes(4096, 512, 4096).is_err());
        assert!(check_block_sizes(512, 4096, 1000).is_err());
        assert!(check_block_sizes(1 << 17, 1 << 17, 1 << 17).is_err());
    }
}
