//! The parent of a vhdx differencing image: which file it is, opening it, and checking that it
//! is the image the child was made against.
//!
//! QEMU has no counterpart (it refuses differencing vhdx images); the rules are the spec's
//! "Parent Locator" section, and the opening is [`crate::qcow2`]'s backing-file machinery
//! (`open_backing`: read-only, the cache mode and locking of the top image, loops and depth
//! refused).
//!
//! The locator is a list of UTF-16 key/value pairs written by Windows:
//!
//! - `relative_path`, e.g. `.\base.vhdx` or `..\dir\base.vhdx`: relative to the child's
//!   directory, with `\` separators — the one that works on Linux, tried first;
//! - `absolute_win32_path` (`C:\vms\base.vhdx`) and `volume_path` (`\\?\Volume{…}\…`):
//!   Windows locations; an absolute path is tried only if it is already a POSIX one (a tool
//!   on Linux may write `/images/base.vhdx`);
//! - `parent_linkage` (and `parent_linkage2`): the parent's data write GUID when the child
//!   was made. A parent whose current GUID differs was written since, so the child's sectors
//!   no longer fit on it: refused, as Hyper-V refuses it.
//!
//! **Trust:** the locator chooses which host file is read as the parent (`..` and absolute
//! POSIX paths included), as a qcow2 backing name or a vmdk extent does; see
//! [`crate::vmdk`]'s note.

use std::path::{Path, PathBuf};

use super::header::parse_parent_locator;
use super::VhdxDriver;
use crate::qcow2::{open_backing, resolve_backing_path, Backing, ChainOptions};
use crate::readonly::FileId;
use crate::{BlockError, Result};

/// A locator path with Windows separators as a relative POSIX path (`.\a\b` → `a/b`), or an
/// absolute POSIX path as it is; `None` for a Windows absolute path (`C:\…`, `\\?\…`).
fn posix_path(value: &str) -> Option<PathBuf> {
    if value.starts_with('/') {
        return Some(PathBuf::from(value));
    }
    if value.contains(':') || value.starts_with('\\') || value.is_empty() {
        return None;
    }
    let p = value.replace('\\', "/");
    Some(PathBuf::from(p.strip_prefix("./").unwrap_or(&p)))
}

/// Opens the parent named by `locator` (a parent locator item) of the differencing image at
/// `image`, and checks its linkage.
pub(super) fn open(
    image: &Path,
    locator: &[u8],
    opts: &ChainOptions,
    seen: &mut Vec<FileId>,
) -> Result<Backing> {
    let pairs = parse_parent_locator(locator)?;
    let get = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let Some(linkage) = get("parent_linkage") else {
        return Err(BlockError::Corrupt(
            "vhdx: the parent locator has no parent_linkage".into(),
        ));
    };
    let candidates: Vec<PathBuf> = ["relative_path", "absolute_win32_path"]
        .iter()
        .filter_map(|k| get(k).and_then(posix_path))
        .collect();
    let Some(name) = candidates
        .iter()
        .find(|c| resolve_backing_path(image, c).exists())
    else {
        let tried: Vec<String> = pairs
            .iter()
            .filter(|(k, _)| k.ends_with("path"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return Err(BlockError::Invalid(format!(
            "vhdx: the parent of the differencing image cannot be found (locator: {})",
            if tried.is_empty() {
                "no paths".to_owned()
            } else {
                tried.join(", ")
            }
        )));
    };
    let parent = open_backing(image, name, Some("vhdx"), opts, seen)?;
    let node: &dyn std::any::Any = parent.node();
    let Some(vhdx) = node.downcast_ref::<VhdxDriver>() else {
        return Err(BlockError::Invalid(
            "vhdx: the parent is not a vhdx image".into(),
        ));
    };
    let guid = vhdx.data_write_guid().to_braced();
    let matches = |key: &str| get(key).is_some_and(|v| v.eq_ignore_ascii_case(&guid));
    if !matches("parent_linkage") && !matches("parent_linkage2") {
        return Err(BlockError::Invalid(format!(
            "vhdx: parent '{}' has data write GUID {guid}, but the differencing image was made \
             against {linkage}: the parent was modified since, or is another image",
            parent.path().display()
        )));
    }
    Ok(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_paths() {
        assert_eq!(posix_path(".\\base.vhdx"), Some(PathBuf::from("base.vhdx")));
        assert_eq!(
            posix_path("..\\d\\b.vhdx"),
            Some(PathBuf::from("../d/b.vhdx"))
        );
        assert_eq!(
            posix_path("/img/b.vhdx"),
            Some(PathBuf::from("/img/b.vhdx"))
        );
        assert_eq!(posix_path("C:\\vms\\b.vhdx"), None);
        assert_eq!(posix_path("\\\\?\\Volume{x}\\b.vhdx"), None);
    }
}
