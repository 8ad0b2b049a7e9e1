//! The text descriptor of a VMDK disk: which extents make up the disk, in order.
//!
//! QEMU: `vmdk_open_desc_file()`, `vmdk_parse_extents()`, `vmdk_parse_description()` and
//! `vmdk_parent_open()` in `block/vmdk.c`; the format is the "Descriptor File" section of
//! VMware's "Virtual Disk Format 1.1".
//!
//! A descriptor is a small text file (or the text embedded in a monolithicSparse or
//! streamOptimized file, after its header):
//!
//! ```text
//! # Disk DescriptorFile
//! version=1
//! CID=31aa9e04
//! parentCID=ffffffff
//! createType="twoGbMaxExtentSparse"
//!
//! # Extent description
//! RW 4194304 SPARSE "disk-s001.vmdk"
//! RW 2097152 SPARSE "disk-s002.vmdk"
//! ```
//!
//! Each extent line is `ACCESS SECTORS TYPE "FILE" [OFFSET]`; the extents follow each other
//! in the virtual disk in the order listed. We read `FLAT` and `VMFS` (raw bytes of FILE from
//! OFFSET sectors on), `SPARSE` (a hosted sparse extent, see `sparse.rs`) and `ZERO` (no file,
//! reads as zeros). Where we differ from QEMU:
//!
//! - `RDONLY` extents are part of the disk (QEMU skips every line that is not `RW`, so the disk
//!   it shows is shorter than VMware's); `NOACCESS` extents are refused.
//! - `ZERO` extents are read (QEMU skips them).
//! - An unknown extent type is an error rather than a skipped line.
//! - Only lines are looked at: QEMU finds `createType` with `strstr()`, anywhere.
//!
//! A descriptor with `parentFileNameHint` is a delta ("child") disk whose unallocated grains
//! read from its parent; those are refused (see `mod.rs`).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use crate::{BlockError, Result};

/// At most this much of a descriptor file is read (QEMU: `vmdk_read_desc()`'s cap).
pub const MAX_DESCRIPTOR: u64 = (1 << 20) - 1;

/// The `createType` values of descriptor files we open (QEMU's list, without the types whose
/// extents we cannot read: `vmfsSparse`, `seSparse`).
const CREATE_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

/// What an extent line says the extent is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Raw bytes of `file`, starting `offset` bytes into it (`FLAT`, `VMFS`).
    Flat { file: OsString, offset: u64 },
    /// A hosted sparse extent file (`SPARSE`).
    Sparse { file: OsString },
    /// No file: zeros (`ZERO`).
    Zero,
}

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// Virtual size of the extent in bytes (the line's sectors × 512).
    pub len: u64,
    pub kind: ExtentKind,
}

/// A parsed descriptor file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub create_type: String,
    pub extents: Vec<ExtentLine>,
}

/// The text of a descriptor: up to the first NUL (an embedded descriptor is padded with them).
fn text(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// The lines of `bytes`, each without its `\n` or `\r\n` and surrounding blanks.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    text(bytes).split(|&b| b == b'\n').map(|l| l.trim_ascii())
}

/// The value of `key = value` or `key="value"` if `line` is that line.
fn value_of<'a>(line: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(key.as_bytes())?.trim_ascii_start();
    let value = rest.strip_prefix(b"=")?.trim_ascii();
    Some(
        value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value),
    )
}

/// The value of the first line `key = …` of the descriptor.
pub fn find_value<'a>(bytes: &'a [u8], key: &str) -> Option<&'a [u8]> {
    lines(bytes).find_map(|l| value_of(l, key))
}

/// The parent of a delta disk (`parentFileNameHint`), if the descriptor names one. QEMU:
/// `vmdk_parent_open()`.
pub fn parent_hint(bytes: &[u8]) -> Option<String> {
    find_value(bytes, "parentFileNameHint").map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Parses a descriptor file. Errors are [`BlockError::Invalid`] (unsupported) or
/// [`BlockError::Corrupt`] (malformed) and quote the offending line.
pub fn parse(bytes: &[u8]) -> Result<Descriptor> {
    let corrupt = |why: String| BlockError::Corrupt(format!("vmdk: descriptor: {why}"));
    let create_type =
        find_value(bytes, "createType").ok_or_else(|| corrupt("no createType".into()))?;
    let create_type = String::from_utf8_lossy(create_type).into_owned();
    if !CREATE_TYPES.contains(&create_type.as_str()) {
        return Err(BlockError::Invalid(format!(
            "vmdk: descriptor: createType \"{create_type}\" is not supported (these are: {})",
            CREATE_TYPES.join(", ")
        )));
    }
    let mut extents = Vec::new();
    for line in lines(bytes) {
        if let Some(extent) = parse_extent_line(line)? {
            extents.push(extent);
        }
    }
    if extents.is_empty() {
        return Err(corrupt("no extent lines".into()));
    }
    Ok(Descriptor {
        create_type,
        extents,
    })
}

/// Splits off the first blank-separated word of `s`.
fn word(s: &[u8]) -> (&[u8], &[u8]) {
    let s = s.trim_ascii_start();
    let end = s
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// A decimal number of sectors as bytes, if it is one and the bytes fit a disk.
fn sectors(w: &[u8]) -> Option<u64> {
    if w.is_empty() || !w.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(w)
        .ok()?
        .parse::<u64>()
        .ok()?
        .checked_mul(512)
        .filter(|&b| b <= i64::MAX as u64)
}

/// One line: `Ok(None)` if it is not an extent line (comments, `key=value`, blank) or an empty
/// extent (QEMU skips those too); an error if it starts like one but is malformed or
/// unsupported.
fn parse_extent_line(line: &[u8]) -> Result<Option<ExtentLine>> {
    let (access, rest) = word(line);
    if !matches!(access, b"RW" | b"RDONLY" | b"NOACCESS") {
        return Ok(None);
    }
    let shown = String::from_utf8_lossy(line);
    let invalid =
        |why: &str| BlockError::Corrupt(format!("vmdk: invalid extent line '{shown}': {why}"));
    if access == b"NOACCESS" {
        return Err(BlockError::Invalid(format!(
            "vmdk: extent line '{shown}': NOACCESS extents cannot be read"
        )));
    }
    let (count, rest) = word(rest);
    let len = sectors(count).ok_or_else(|| invalid("bad sector count"))?;
    let (kind, rest) = word(rest);
    if kind == b"ZERO" {
        if !rest.trim_ascii().is_empty() {
            return Err(invalid("a ZERO extent has no file"));
        }
        return Ok((len > 0).then_some(ExtentLine {
            len,
            kind: ExtentKind::Zero,
        }));
    }
    let rest = rest.trim_ascii_start();
    let name = rest
        .strip_prefix(b"\"")
        .ok_or_else(|| invalid("no quoted file name"))?;
    let close = name
        .iter()
        .position(|&b| b == b'"')
        .ok_or_else(|| invalid("the file name is not closed"))?;
    let (file, rest) = (&name[..close], name[close + 1..].trim_ascii());
    if file.is_empty() {
        return Err(invalid("an empty file name"));
    }
    let file = OsString::from_vec(file.to_vec());
    let kind = match kind {
        b"FLAT" => {
            let offset = sectors(rest).ok_or_else(|| invalid("a FLAT extent needs an offset"))?;
            ExtentKind::Flat { file, offset }
        }
        b"VMFS" | b"SPARSE" if !rest.is_empty() => {
            return Err(invalid("unexpected text after the file name"))
        }
        b"VMFS" => ExtentKind::Flat { file, offset: 0 },
        b"SPARSE" => ExtentKind::Sparse { file },
        other => {
            return Err(BlockError::Invalid(format!(
                "vmdk: extent line '{shown}': extent type {} is not supported (FLAT, VMFS, \
                 SPARSE and ZERO are)",
                String::from_utf8_lossy(other)
            )))
        }
    };
    Ok((len > 0).then_some(ExtentLine { len, kind }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_GB: &str = "# Disk DescriptorFile\nversion=1\nCID=31aa9e04\nparentCID=ffffffff\n\
        createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n\
        RW 4194304 SPARSE \"d-s001.vmdk\"\r\nRDONLY 8 SPARSE \"d s002.vmdk\"\n\
        RW 16 ZERO\nRW 0 FLAT \"empty\" 0\n\n#DDB\nddb.adapterType = \"ide\"\n";

    #[test]
    fn qemu_descriptor_parses() {
        let d = parse(TWO_GB.as_bytes()).expect("valid");
        assert_eq!(d.create_type, "twoGbMaxExtentSparse");
        let sparse = |f: &str, len| ExtentLine {
            len,
            kind: ExtentKind::Sparse { file: f.into() },
        };
        assert_eq!(
            d.extents,
            [
                sparse("d-s001.vmdk", 2 << 30),
                sparse("d s002.vmdk", 4096),
                ExtentLine {
                    len: 8192,
                    kind: ExtentKind::Zero
                },
            ]
        );
        assert_eq!(
            find_value(TWO_GB.as_bytes(), "ddb.adapterType"),
            Some(&b"ide"[..])
        );
        assert_eq!(parent_hint(TWO_GB.as_bytes()), None);
    }

    #[test]
    fn flat_lines() {
        let d =
            parse(b"createType=\"monolithicFlat\"\nRW 10 FLAT \"f.vmdk\" 3\nRW 2 VMFS \"v\"\0junk")
                .expect("valid");
        assert_eq!(
            d.extents[0].kind,
            ExtentKind::Flat {
                file: "f.vmdk".into(),
                offset: 1536
            }
        );
        assert_eq!(d.extents[1].len, 1024);
        assert_eq!(d.extents.len(), 2, "the text ends at the NUL");
    }

    #[test]
    fn bad_descriptors_are_refused() {
        let ct = "createType=\"monolithicFlat\"\n";
        for bad in [
            "RW 10 FLAT \"f\" 0\n".to_owned(), // no createType
            "createType=\"streamOptimized\"\nRW 10 FLAT \"f\" 0\n".into(),
            format!("{ct}# nothing\n"),
            format!("{ct}RW 10 FLAT \"f\"\n"),
            format!("{ct}RW 10 FLAT \"f\" -1\n"),
            format!("{ct}RW ten FLAT \"f\" 0\n"),
            format!("{ct}RW 99999999999999999999 FLAT \"f\" 0\n"),
            format!("{ct}RW 10 SPARSE f\n"),
            format!("{ct}RW 10 SPARSE \"f\n"),
            format!("{ct}RW 10 SPARSE \"\"\n"),
            format!("{ct}RW 10 SPARSE \"f\" 7\n"),
            format!("{ct}RW 10 VMFSSPARSE \"f\"\n"),
            format!("{ct}RW 10 ZERO \"f\"\n"),
            format!("{ct}NOACCESS 10 FLAT \"f\" 0\n"),
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "accepted: {bad:?}");
        }
    }

    #[test]
    fn parent_is_found() {
        let d = b"parentCID=1234\nparentFileNameHint=\"base.vmdk\"\n";
        assert_eq!(parent_hint(d).as_deref(), Some("base.vmdk"));
    }
}
