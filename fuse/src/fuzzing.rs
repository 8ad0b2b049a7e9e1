//! The body of the `fuse_request` fuzz target, shared by cargo-fuzz (`fuzz/fuzz_targets/`) and
//! the corpus replay test (`fuse/tests/fuzz_corpus.rs`), so that `cargo test` runs every
//! committed corpus file through exactly the code libFuzzer runs.
//!
//! Not a public API (`#[doc(hidden)]`): [`fuse_request`] panics when an invariant of
//! [`request::parse`] breaks, which is how a fuzzer learns of a bug. The input is the bytes of
//! one request as read from `/dev/fuse` (the corpus holds real requests of every opcode); they
//! are parsed under every protocol minor from 0 to 45 and beyond, as one buffer and split in
//! two the way the split read does, and an INIT that parses is negotiated.

use core::mem::size_of;

use crate::protocol::abi::*;
use crate::protocol::reply::{negotiate_init, InitConfig};
use crate::protocol::request::{self, Operation, ParseError, Request, WRITE_HEADER_SIZE};

/// Minors beyond every table entry: the negotiated one is at most 45, but the parser must not
/// care.
const EXTRA_MINORS: [u32; 3] = [46, 1000, u32::MAX];

/// Opcodes whose arguments have the same size in every minor: their parse must not depend on
/// it.
fn size_depends_on_minor(opcode: u32) -> bool {
    matches!(
        opcode,
        FUSE_READ | FUSE_WRITE | FUSE_GETATTR | FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_READDIR
    )
}

/// The opcodes the parser decodes (the others are `Operation::Unknown`): every one has a corpus
/// file (`fuse/tests/fuzz_corpus.rs` checks) and a round-trip property
/// (`fuse/tests/request_props.rs`).
pub const HANDLED_OPCODES: [u32; 20] = [
    FUSE_INIT,
    FUSE_DESTROY,
    FUSE_STATFS,
    FUSE_OPEN,
    FUSE_RELEASE,
    FUSE_LOOKUP,
    FUSE_FORGET,
    FUSE_BATCH_FORGET,
    FUSE_GETATTR,
    FUSE_SETATTR,
    FUSE_READ,
    FUSE_WRITE,
    FUSE_FALLOCATE,
    FUSE_FSYNC,
    FUSE_FLUSH,
    FUSE_LSEEK,
    FUSE_INTERRUPT,
    FUSE_OPENDIR,
    FUSE_READDIR,
    FUSE_RELEASEDIR,
];

/// Fuzz target `fuse_request`: [`request::parse`] of `data` under every minor, whole and split.
pub fn fuse_request(data: &[u8]) {
    let mut first: Option<Result<Request<'_>, ParseError>> = None;
    for minor in (0..=FUSE_KERNEL_MINOR_VERSION).chain(EXTRA_MINORS) {
        let whole = request::parse(data, &[], minor);
        check(&whole, data, &[], minor);
        match (&first, &whole) {
            (None, _) => first = Some(whole),
            (Some(Ok(a)), Ok(b)) if !size_depends_on_minor(a.header.opcode) => {
                assert_eq!(a, b, "the parse depends on the minor")
            }
            _ => {}
        }
        // The split read: header and fixed arguments in one buffer, the rest in another; and
        // a split at an arbitrary point (an error unless it is a WRITE cut after its data).
        for at in [
            WRITE_HEADER_SIZE,
            data.len() / 2,
            data.len().saturating_sub(1),
        ] {
            if at <= data.len() {
                let (head, payload) = data.split_at(at);
                let split = request::parse(head, payload, minor);
                check(&split, head, payload, minor);
                if let (Ok(a), Ok(b)) = (&whole, &split) {
                    assert_eq!(a.header, b.header);
                }
            }
        }
    }
}

/// What a parse result promises about the buffers it came from.
fn check(r: &Result<Request<'_>, ParseError>, head: &[u8], payload: &[u8], minor: u32) {
    let total = head.len() + payload.len();
    let req = match r {
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with(|c: char| c.is_ascii_lowercase()), "{text}");
            if head.len() < size_of::<fuse_in_header>() {
                assert_eq!(*e, ParseError::ShortHeader { len: head.len() });
            }
            return;
        }
        Ok(req) => req,
    };
    assert_eq!(
        req.header.len as usize, total,
        "header len equals bytes read"
    );
    assert!(head.len() >= size_of::<fuse_in_header>());
    let args = &head[size_of::<fuse_in_header>()..];
    let inside = |s: &[u8], buf: &[u8]| {
        let (p, b) = (s.as_ptr() as usize, buf.as_ptr() as usize);
        s.is_empty() || (p >= b && p + s.len() <= b + buf.len())
    };
    let opcode = req.header.opcode;
    if opcode != FUSE_WRITE {
        assert!(
            payload.is_empty(),
            "only WRITE data may use the payload buffer"
        );
    }
    match req.op {
        Operation::Write { arg, data } => {
            assert_eq!(opcode, FUSE_WRITE);
            assert_eq!(data.len(), arg.size as usize);
            assert!(
                inside(data, args) || inside(data, payload),
                "WRITE data inside the buffers"
            );
            assert!(write_in_size(minor) <= args.len());
        }
        Operation::Lookup { name } => {
            assert_eq!(opcode, FUSE_LOOKUP);
            assert!(inside(name.to_bytes_with_nul(), args));
        }
        Operation::BatchForget { forgets } => {
            assert_eq!(opcode, FUSE_BATCH_FORGET);
            let room = args.len() - size_of::<fuse_batch_forget_in>();
            assert!(forgets.len() * size_of::<fuse_forget_one>() <= room);
            assert_eq!(forgets.iter().count(), forgets.len());
        }
        Operation::Init(init) => {
            assert_eq!(opcode, FUSE_INIT);
            negotiate(&init);
        }
        Operation::Read(_) | Operation::Readdir(_) => assert!(read_in_size(minor) <= args.len()),
        Operation::Getattr(_) => assert!(getattr_in_size(minor) <= args.len()),
        Operation::Release(_) | Operation::Releasedir(_) => {
            assert!(release_in_size(minor) <= args.len())
        }
        Operation::Unknown(op) => assert_eq!(op, opcode),
        _ => {}
    }
    let _ = req.op.needs_reply();
}

/// The INIT negotiation on what the kernel sent: a reply or EINVAL, never a panic; a reply
/// is never longer than `fuse_init_out` and the session never gets a newer minor than ours.
fn negotiate(init: &fuse_init_in) {
    for max_write in [0, 4096, 1 << 20, u32::MAX] {
        let ours = InitConfig {
            max_write,
            ..InitConfig::default()
        };
        match negotiate_init(init, &ours) {
            Ok(reply) => {
                assert!(reply.as_bytes().len() <= size_of::<fuse_init_out>());
                if let Some(n) = reply.negotiated() {
                    assert!(
                        n.minor <= FUSE_KERNEL_MINOR_VERSION
                            && n.minor == init.minor.min(FUSE_KERNEL_MINOR_VERSION)
                    );
                    assert!(n.max_write >= 4096);
                }
            }
            Err(errno) => assert_eq!(errno, libc::EINVAL),
        }
    }
}
