//! Block status through a backing chain: what a range of the *whole* image holds, looking
//! below every layer that does not allocate it.
//!
//! QEMU: `block/io.c` `bdrv_co_common_block_status_above()` (with `base = NULL`), which is what
//! the FUSE export's `SEEK_DATA`/`SEEK_HOLE` and `qemu-img map` use.
//!
//! A node's own [`BlockDriver::co_block_status`] answers for that node only: a qcow2 image with
//! a backing file says [`BlockStatus::Unallocated`] for a cluster it does not hold, meaning "ask
//! below". [`co_block_status_above`] does the asking: it walks down through
//! [`BlockDriver::backing_node`] until a layer allocates the range (data or zeros), the chain
//! ends (zeros), or the range lies past a shorter backing file's end (zeros). The extent it
//! returns is the shortest of the layers' extents on the way down, so one answer is true for
//! every byte it covers. The result is never `Unallocated`.

use crate::{BlockDriver, BlockStatus, Result};

/// The status of `[offset, offset+len)` of `node` including its backing chain, and how many
/// bytes (1 ..= `len`) share it. `offset + len` must be inside `node`.
pub fn co_block_status_above(
    node: &dyn BlockDriver,
    offset: u64,
    len: u64,
) -> Result<(BlockStatus, u64)> {
    let mut node = node;
    let mut len = len.max(1);
    loop {
        let (status, n) = node.co_block_status(offset, len)?;
        let n = n.clamp(1, len);
        if status != BlockStatus::Unallocated {
            return Ok((status, n));
        }
        let Some(below) = node.backing_node() else {
            return Ok((BlockStatus::Zero, n));
        };
        let below_len = below.getlength();
        if offset >= below_len {
            return Ok((BlockStatus::Zero, n));
        }
        // Ask the layer below about the unallocated run only, clipped at its end.
        len = n.min(below_len - offset);
        node = below;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockError, NullDriver};

    /// A node with a fixed layout of (status, length) extents and an optional backing node.
    struct Layers {
        extents: Vec<(BlockStatus, u64)>,
        backing: Option<Box<dyn BlockDriver>>,
    }

    impl BlockDriver for Layers {
        fn format_name(&self) -> &'static str {
            "test"
        }
        fn getlength(&self) -> u64 {
            self.extents.iter().map(|e| e.1).sum()
        }
        fn is_read_only(&self) -> bool {
            true
        }
        fn co_preadv(&self, _: u64, _: &mut [u8]) -> Result<()> {
            Err(BlockError::NotSupported("read"))
        }
        fn co_pwritev(&self, _: u64, _: &[u8]) -> Result<()> {
            Err(BlockError::ReadOnly)
        }
        fn co_flush(&self) -> Result<()> {
            Ok(())
        }
        fn co_pwrite_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
            Err(BlockError::ReadOnly)
        }
        fn co_pdiscard(&self, _: u64, _: u64) -> Result<()> {
            Err(BlockError::ReadOnly)
        }
        fn co_block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
            let mut start = 0;
            for &(status, n) in &self.extents {
                if offset < start + n {
                    return Ok((status, (start + n - offset).min(len)));
                }
                start += n;
            }
            Err(BlockError::Invalid("past the end".into()))
        }
        fn co_truncate(&self, _: u64) -> Result<()> {
            Err(BlockError::ReadOnly)
        }
        fn backing_node(&self) -> Option<&dyn BlockDriver> {
            self.backing.as_deref()
        }
    }

    #[test]
    fn walks_down_and_clips_extents() {
        use BlockStatus::{Data, Unallocated as U, Zero};
        // base: 100 data, 100 zero (shorter than the top)
        let base = Layers {
            extents: vec![(Data, 100), (Zero, 100)],
            backing: None,
        };
        let mid = Layers {
            extents: vec![(U, 50), (Data, 50), (U, 200)],
            backing: Some(Box::new(base)),
        };
        let top = Layers {
            extents: vec![(U, 150), (Zero, 50), (U, 100)],
            backing: Some(Box::new(mid)),
        };
        let at = |o| co_block_status_above(&top, o, 300 - o).expect("status");
        assert_eq!(
            at(0),
            (Data, 50),
            "top and mid unallocated: base data, clipped"
        );
        assert_eq!(at(50), (Data, 50), "mid data");
        assert_eq!(
            at(100),
            (Zero, 50),
            "base zero below two unallocated layers"
        );
        assert_eq!(at(150), (Zero, 50), "top zero");
        assert_eq!(at(200), (Zero, 100), "past the base's end");
        // Without a backing node, unallocated reads as zeros.
        let alone = Layers {
            extents: vec![(U, 10)],
            backing: None,
        };
        assert_eq!(co_block_status_above(&alone, 0, 10).ok(), Some((Zero, 10)));
        let null = NullDriver::new(10, true);
        assert!(co_block_status_above(&null, 0, 10).is_ok());
    }
}
