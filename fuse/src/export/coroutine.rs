//! The I/O half of the export's handlers for `--engine coroutine`: the request runs in its own
//! coroutine, and every block-layer call here (`co_pread`, `co_pwrite`, …) may yield it until the
//! disk answers. Read it beside `async_engine.rs`: the two files are the only code that exists
//! once per engine; dispatch (`Export::plan`) and the replies (`*_finish`) are shared, in
//! `mod.rs`.
//!
//! QEMU: the `fuse_co_*` functions of `block/export/fuse.c`, which are coroutines too.

use super::*;

impl Export {
    /// Handles one request; runs in the request's coroutine (`--engine coroutine`).
    pub fn co_handle(&self, req: &Request<'_>) -> Response {
        self.co_handle_into(req, None)
    }

    /// [`Export::co_handle`] with a buffer the transport lends for READ data (a ring entry's
    /// payload buffer): a READ that fits is read straight into it ([`Response::InPlace`]).
    pub fn co_handle_into(&self, req: &Request<'_>, out: Option<&mut [u8]>) -> Response {
        match self.plan(req) {
            Step::Done(r) => r,
            Step::Io(io) => self.co_io(io, out),
        }
    }

    /// The I/O of a request, coroutine engine: `co_` calls that yield inside the block layer.
    fn co_io(&self, io: Io<'_>, out: Option<&mut [u8]>) -> Response {
        let blk = &self.blk;
        match io {
            Io::Read { offset, len } if out.as_ref().is_some_and(|o| o.len() >= len) => {
                let out = out.unwrap_or_default();
                let r = blk.co_pread(offset, &mut out[..len]);
                read_in_place_finish(len, offset, r)
            }
            Io::Read { offset, len } => match read_buffer(len) {
                Then::Go(mut buf) => {
                    let r = blk.co_pread(offset, &mut buf[..len]);
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
                    Some(end) => self.co_grow_to(end),
                    None => Ok(()),
                };
                let r = r.and_then(|()| blk.co_pwrite(offset, data));
                self.write_finish(offset, data.len(), r)
            }
            Io::Fallocate { grow_to, zero } => {
                let mut r = match grow_to {
                    Some(end) => self.co_grow_to(end),
                    None => Ok(()),
                };
                if let (Ok(()), Some((offset, len, unmap))) = (&r, zero) {
                    r = blk.co_pwrite_zeroes(offset, len, unmap);
                }
                self.fallocate_finish(r)
            }
            Io::Truncate {
                nodeid,
                arg,
                to_set,
            } => {
                let r = {
                    let _g = self.resize_lock.co_lock();
                    blk.co_truncate(arg.size)
                };
                self.setattr_finish(nodeid, arg, to_set, r)
            }
            Io::Flush => flush_finish(blk.co_flush()),
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
                match seek_next(
                    whence,
                    offset,
                    blk.co_block_status(extent.base + offset, len),
                ) {
                    Then::Go(next) => offset = next,
                    Then::Reply(resp) => return resp,
                }
            },
        }
    }

    /// Grows the image so that `[0, end)` is inside it: to `end` rounded up to the image's
    /// size granularity (see [`Export::grown_size`]), and never shrinks (another queue may
    /// have grown it further meanwhile). The only place the export grows the image: growable
    /// writes, fallocate and ZERO_RANGE past EOF all come here; SETATTR's truncate takes the
    /// same lock.
    fn co_grow_to(&self, end: u64) -> block::Result<()> {
        let _g = self.resize_lock.co_lock();
        let new = self.grown_size(end)?;
        if new > self.blk.size() {
            self.blk.co_truncate(new)?;
        }
        Ok(())
    }
}
