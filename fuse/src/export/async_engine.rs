//! The I/O half of the export's handlers for `--engine async`: the request is a future polled
//! by `runtime::executor`, and every block-layer call here (`pread_async`, …) is an `.await`.
//! Line for line the same as `coroutine.rs` (`docs/comparison.md` compares them); only the way
//! of waiting differs.

use super::*;

impl Export {
    /// Handles one request as a future (`--engine async`). Same semantics as
    /// [`Export::co_handle`]: only `io_async` differs from `co_io`.
    pub async fn handle_async(&self, req: &Request<'_>) -> Response {
        self.handle_async_into(req, None).await
    }

    /// [`Export::handle_async`] with a buffer the transport lends for READ data, as
    /// [`Export::co_handle_into`].
    pub async fn handle_async_into(&self, req: &Request<'_>, out: Option<&mut [u8]>) -> Response {
        match self.plan(req) {
            Step::Done(r) => r,
            Step::Io(io) => self.io_async(io, out).await,
        }
    }

    /// The I/O of a request, async engine: [`Export::co_io`] with `.await`s.
    async fn io_async(&self, io: Io<'_>, out: Option<&mut [u8]>) -> Response {
        let blk = &self.blk;
        match io {
            Io::Read { offset, len } if out.as_ref().is_some_and(|o| o.len() >= len) => {
                let out = out.unwrap_or_default();
                let r = blk.pread_async(offset, &mut out[..len]).await;
                read_in_place_finish(len, offset, r)
            }
            Io::Read { offset, len } => match read_buffer(len) {
                Then::Go(mut buf) => {
                    let r = blk.pread_async(offset, &mut buf[..len]).await;
                    read_finish(buf, len, offset, r)
                }
                Then::Reply(resp) => resp,
            },
            Io::Write {
                offset,
                data,
                grow_to,
            } => {
                let r = match grow_to {
                    Some(end) => self.grow_to_async(end).await,
                    None => Ok(()),
                };
                let r = match r {
                    Ok(()) => blk.pwrite_async(offset, data).await,
                    Err(e) => Err(e),
                };
                self.write_finish(offset, data.len(), r)
            }
            Io::Fallocate { grow_to, zero } => {
                let mut r = match grow_to {
                    Some(end) => self.grow_to_async(end).await,
                    None => Ok(()),
                };
                if let (Ok(()), Some((offset, len, unmap))) = (&r, zero) {
                    r = blk.pwrite_zeroes_async(offset, len, unmap).await;
                }
                self.fallocate_finish(r)
            }
            Io::Truncate {
                nodeid,
                arg,
                to_set,
            } => {
                let r = {
                    let _g = self.resize_lock.lock_async().await;
                    blk.truncate_async(arg.size).await
                };
                self.setattr_finish(nodeid, arg, to_set, r)
            }
            Io::Flush => flush_finish(blk.flush_async().await),
            Io::Lseek {
                whence,
                mut offset,
                extent,
            } => loop {
                let size = self.size_of(extent);
                let len = match seek_check(whence, offset, size) {
                    Then::Go(len) => len,
                    Then::Reply(resp) => return resp,
                };
                let status = blk.block_status_async(extent.base + offset, len).await;
                match seek_next(whence, offset, status) {
                    Then::Go(next) => offset = next,
                    Then::Reply(resp) => return resp,
                }
            },
        }
    }

    /// [`Export::co_grow_to`] for the async engine (the same lock, the same queue).
    async fn grow_to_async(&self, end: u64) -> block::Result<()> {
        let _g = self.resize_lock.lock_async().await;
        let new = self.grown_size(end)?;
        if new > self.blk.size() {
            self.blk.truncate_async(new).await?;
        }
        Ok(())
    }
}
