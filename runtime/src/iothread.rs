//! `IoThread`: a thread that owns one `AioContext` and polls it until stopped.
//!
//! QEMU: `iothread.c` (`iothread_run`, `iothread_stop`, `iothread_get_aio_context`).
//!
//! Other threads reach the iothread through its [`RemoteContext`]: [`IoThread::run`] schedules a
//! closure there, [`IoThread::spawn_co`] starts a coroutine there (which then lives on that thread
//! for good), [`IoThread::run_sync`] waits for a closure's result. Stopping is itself a bottom half
//! on the thread, so the loop sees it after everything scheduled before it; `stop()` then joins
//! the thread. Dropping an `IoThread` stops it.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};

use crate::aio::{AioContext, RemoteContext};
use crate::coroutine::Coroutine;

/// A thread running an event loop. QEMU: `IOThread`.
pub struct IoThread {
    remote: RemoteContext,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts a thread named `name` with its own context, and waits until it polls.
    pub fn spawn(name: &str) -> io::Result<IoThread> {
        let (tx, rx) = mpsc::channel();
        // Cleared by a bottom half on the thread itself, so the loop sees it right after that
        // poll (and Relaxed suffices: the flag is written and read by the same thread).
        let running = Arc::new(AtomicBool::new(true));
        let stop = running.clone();
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let ctx = AioContext::current();
                if tx.send(ctx.remote()).is_err() {
                    return;
                }
                while running.load(Ordering::Relaxed) {
                    ctx.poll(true);
                }
                // Finish what was queued before the stop (completions, wake-ups).
                while ctx.poll(false) {}
            })?;
        match rx.recv() {
            Ok(remote) => Ok(IoThread {
                remote,
                stop,
                thread: Some(thread),
            }),
            Err(_) => Err(io::Error::other(format!(
                "iothread '{name}' died while starting"
            ))),
        }
    }

    /// The iothread's context, to schedule work or wake coroutines there.
    pub fn context(&self) -> &RemoteContext {
        &self.remote
    }

    /// Runs `f` on the iothread, in its next `poll()`.
    pub fn run(&self, f: impl FnOnce() + Send + 'static) {
        self.remote.schedule_oneshot(f);
    }

    /// Runs `f` on the iothread and waits for its result. Must not be called from the iothread
    /// itself (it would wait for its own loop).
    pub fn run_sync<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        assert!(
            !self.remote.is_current(),
            "IoThread::run_sync() called on the iothread itself"
        );
        let (tx, rx) = mpsc::sync_channel(1);
        self.run(move || {
            let _ = tx.send(f());
        });
        match rx.recv() {
            Ok(r) => r,
            Err(_) => panic!(
                "iothread '{}' dropped a run_sync() closure",
                self.remote.name()
            ),
        }
    }

    /// Creates a coroutine on the iothread and enters it there.
    pub fn spawn_co(&self, f: impl FnOnce() + Send + 'static) {
        self.run(move || Coroutine::new(f).enter());
    }

    /// Stops the loop after the work already scheduled, and joins the thread.
    ///
    /// QEMU: `iothread_stop()`.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let stop = self.stop.clone();
        self.remote
            .schedule_oneshot(move || stop.store(false, Ordering::Relaxed));
        if thread.join().is_err() {
            log::error!("iothread '{}' panicked", self.remote.name());
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
