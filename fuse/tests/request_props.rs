//! Property tests (proptest) of the FUSE request parser, `fuse::protocol::request::parse`, against what
//! the kernel may send — and what a broken or hostile stream may:
//!
//! - `every_opcode_round_trips`: a request of any handled opcode with random argument values,
//!   laid out as the kernel does at a random protocol minor (0..=45 and beyond: the older,
//!   shorter argument structs below 7.9), parses to exactly those values (trailing fields the
//!   minor does not send read as zero);
//! - `truncated_arguments_are_errors`: the same request cut anywhere inside its arguments, with
//!   a `len` that matches the cut, is a `ParseError`;
//! - `lying_lengths_are_length_mismatches`: a `len` field that differs from the bytes read is
//!   `LengthMismatch`, whatever the opcode and the minor;
//! - `random_arguments_never_panic`: a valid header of any opcode (also unknown ones) followed
//!   by random bytes goes through the whole fuzz target body (`fuse::fuzzing::fuse_request`:
//!   every minor, whole and split reads, INIT negotiation).
//!
//! Case counts are small (the file runs in about a second); failures are not persisted.

use std::ffi::CString;
use std::mem::size_of;

use fuse::fuzzing::HANDLED_OPCODES as HANDLED;
use fuse::protocol::abi::*;
use fuse::protocol::request::{parse, Operation, ParseError};
use proptest::prelude::*;
use proptest::test_runner::Config;
use zerocopy::{FromBytes, IntoBytes};

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A `T` whose first `wire` bytes come from `bytes` and the rest are zero: what the parser
/// must return for a struct the kernel sent `wire` bytes of.
fn value<T: FromBytes + IntoBytes>(bytes: &[u8], wire: usize) -> T {
    let mut full = vec![0u8; size_of::<T>()];
    full[..wire].copy_from_slice(&bytes[..wire]);
    T::read_from_bytes(&full).expect("the size of T")
}

/// One request as the kernel would send it at protocol `minor`: its argument bytes (after the
/// header) and the operation they must parse to. `random` supplies the field values.
struct Case {
    args: Vec<u8>,
    expected: Operation<'static>,
    /// Whether a cut anywhere inside `args` must be an error (false for argument-less ones).
    cut_is_error: bool,
}

/// Leaks `v` for the lifetime of the process: the borrowed parts (names, data) of an expected
/// `Operation<'static>`. Tests only, a few KiB per case.
fn leak(v: Vec<u8>) -> &'static [u8] {
    Box::leak(v.into_boxed_slice())
}

fn case(opcode: u32, minor: u32, random: &[u8], name: &[u8], count: usize) -> Case {
    let fixed = |wire: usize| random[..wire].to_vec();
    let (args, expected) = match opcode {
        FUSE_INIT => {
            // The INIT size depends on the minor it announces itself.
            let mut b = random[..size_of::<fuse_init_in>()].to_vec();
            b[..8].copy_from_slice(&[7, 0, 0, 0, minor as u8, 0, 0, 0]);
            let wire = init_in_size(minor & 0xff);
            b.truncate(wire);
            let init: fuse_init_in = value(&b, wire);
            (b, Operation::Init(init))
        }
        FUSE_DESTROY => (vec![], Operation::Destroy),
        FUSE_STATFS => (vec![], Operation::Statfs),
        FUSE_OPEN | FUSE_OPENDIR => {
            let w = size_of::<fuse_open_in>();
            let v = value(random, w);
            let op = if opcode == FUSE_OPEN {
                Operation::Open(v)
            } else {
                Operation::Opendir(v)
            };
            (fixed(w), op)
        }
        FUSE_RELEASE | FUSE_RELEASEDIR => {
            let w = release_in_size(minor);
            let v = value(random, w);
            let op = if opcode == FUSE_RELEASE {
                Operation::Release(v)
            } else {
                Operation::Releasedir(v)
            };
            (fixed(w), op)
        }
        FUSE_LOOKUP => {
            let name = CString::new(name.to_vec()).expect("no NUL in the name");
            let b = name.as_bytes_with_nul().to_vec();
            let name: &'static std::ffi::CStr = Box::leak(name.into_boxed_c_str());
            (b, Operation::Lookup { name })
        }
        FUSE_FORGET => {
            let w = size_of::<fuse_forget_in>();
            (fixed(w), Operation::Forget(value(random, w)))
        }
        FUSE_BATCH_FORGET => {
            let mut b = (count as u32).to_ne_bytes().to_vec();
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&random[..count * size_of::<fuse_forget_one>()]);
            // The entries are compared through the fuzz body's checks; here: the count.
            let buf = request(FUSE_BATCH_FORGET, &b);
            let op = parse(&buf, &[], minor).expect("a valid batch forget").op;
            let Operation::BatchForget { forgets } = op else {
                panic!("not a batch forget");
            };
            assert_eq!(forgets.len(), count);
            let entries: Vec<fuse_forget_one> = forgets.iter().collect();
            for (k, e) in entries.iter().enumerate() {
                let want: fuse_forget_one = value(&random[k * 16..], 16);
                assert_eq!(*e, want);
            }
            return Case {
                cut_is_error: true,
                expected: Operation::Unknown(u32::MAX), // not compared
                args: b,
            };
        }
        FUSE_GETATTR => {
            let w = getattr_in_size(minor);
            (fixed(w), Operation::Getattr(value(random, w)))
        }
        FUSE_SETATTR => {
            let w = size_of::<fuse_setattr_in>();
            (fixed(w), Operation::Setattr(value(random, w)))
        }
        FUSE_READ | FUSE_READDIR => {
            let w = read_in_size(minor);
            let v = value(random, w);
            let op = if opcode == FUSE_READ {
                Operation::Read(v)
            } else {
                Operation::Readdir(v)
            };
            (fixed(w), op)
        }
        FUSE_WRITE => {
            let w = write_in_size(minor);
            let mut b = fixed(w);
            b[16..20].copy_from_slice(&(name.len() as u32).to_ne_bytes()); // size
            let arg: fuse_write_in = value(&b, w);
            b.extend_from_slice(name);
            let data = leak(name.to_vec());
            (b, Operation::Write { arg, data })
        }
        FUSE_FALLOCATE => {
            let w = size_of::<fuse_fallocate_in>();
            (fixed(w), Operation::Fallocate(value(random, w)))
        }
        FUSE_FSYNC => {
            let w = size_of::<fuse_fsync_in>();
            (fixed(w), Operation::Fsync(value(random, w)))
        }
        FUSE_FLUSH => {
            let w = size_of::<fuse_flush_in>();
            (fixed(w), Operation::Flush(value(random, w)))
        }
        FUSE_LSEEK => {
            let w = size_of::<fuse_lseek_in>();
            (fixed(w), Operation::Lseek(value(random, w)))
        }
        FUSE_INTERRUPT => {
            let w = size_of::<fuse_interrupt_in>();
            (fixed(w), Operation::Interrupt(value(random, w)))
        }
        other => panic!("opcode {other} is not handled"),
    };
    let cut_is_error = !args.is_empty();
    Case {
        args,
        expected,
        cut_is_error,
    }
}

/// Header (with a `len` that matches) and `args`.
fn request(opcode: u32, args: &[u8]) -> Vec<u8> {
    let header = fuse_in_header {
        len: (size_of::<fuse_in_header>() + args.len()) as u32,
        opcode,
        unique: 77,
        nodeid: 1,
        ..Default::default()
    };
    let mut b = header.as_bytes().to_vec();
    b.extend_from_slice(args);
    b
}

fn set_len(b: &mut [u8], len: u32) {
    b[..4].copy_from_slice(&len.to_ne_bytes());
}

/// Random argument material: enough bytes for the largest struct and 8 forget entries.
fn material() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, usize)> {
    (
        prop::collection::vec(any::<u8>(), 128..=128),
        prop::collection::vec(1u8..=255, 1..64),
        0usize..=4,
    )
}

fn minor() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..=FUSE_KERNEL_MINOR_VERSION,
        Just(9),
        Just(45),
        46u32..200
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn every_opcode_round_trips(
        opcode in prop::sample::select(&HANDLED[..]),
        minor in minor(),
        (random, name, count) in material(),
    ) {
        let c = case(opcode, minor, &random, &name, count);
        let buf = request(opcode, &c.args);
        let req = parse(&buf, &[], minor).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(req.header.opcode, opcode);
        prop_assert_eq!(req.header.len as usize, buf.len());
        if opcode != FUSE_BATCH_FORGET {
            prop_assert_eq!(req.op, c.expected);
        }
    }

    #[test]
    fn truncated_arguments_are_errors(
        opcode in prop::sample::select(&HANDLED[..]),
        minor in minor(),
        (random, name, count) in material(),
        cut in any::<prop::sample::Index>(),
    ) {
        let c = case(opcode, minor, &random, &name, count);
        prop_assume!(c.cut_is_error);
        let keep = cut.index(c.args.len());
        let buf = request(opcode, &c.args[..keep]);
        let r = parse(&buf, &[], minor);
        prop_assert!(r.is_err(), "{} cut to {keep} of {} argument bytes parsed: {r:?}",
            opcode_name(opcode).unwrap_or("?"), c.args.len());
        // And the header alone, cut inside: always ShortHeader.
        let short = cut.index(size_of::<fuse_in_header>());
        prop_assert_eq!(parse(&buf[..short], &[], minor).unwrap_err(),
            ParseError::ShortHeader { len: short });
    }

    #[test]
    fn lying_lengths_are_length_mismatches(
        opcode in prop::sample::select(&HANDLED[..]),
        minor in minor(),
        (random, name, count) in material(),
        len in any::<u32>(),
    ) {
        let c = case(opcode, minor, &random, &name, count);
        let mut buf = request(opcode, &c.args);
        prop_assume!(len as usize != buf.len());
        set_len(&mut buf, len);
        prop_assert_eq!(parse(&buf, &[], minor).unwrap_err(),
            ParseError::LengthMismatch { header_len: len, read: buf.len() });
        // Split reads check the total of both buffers.
        let at = buf.len().min(size_of::<fuse_in_header>() + 40);
        let (head, payload) = buf.split_at(at);
        prop_assert_eq!(parse(head, payload, minor).unwrap_err(),
            ParseError::LengthMismatch { header_len: len, read: buf.len() });
    }

    #[test]
    fn random_arguments_never_panic(
        opcode in prop_oneof![prop::sample::select(&HANDLED[..]), any::<u32>()],
        args in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        fuse::fuzzing::fuse_request(&request(opcode, &args));
    }
}
