//! Ending a run on SIGINT, SIGTERM or SIGHUP.
//!
//! The signals are blocked in every thread and taken by one waiting thread, so they are
//! seen at any point of the run, also while the main thread is busy or blocked. The first
//! signal during start-up ends the process at once (nothing is attached that the kernel
//! would not detach when its file descriptors close); once tracing, the first signal asks
//! the main loop for its last report, and a second one ends the process at once, even if
//! the main thread is stuck writing to a stdout nobody reads.

use std::{
    mem::MaybeUninit,
    sync::atomic::{AtomicBool, Ordering},
    thread,
};

use anyhow::{Result, bail};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

const ENDING: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Set once the main loop can take a signal and print the last report.
static TRACING: AtomicBool = AtomicBool::new(false);

fn ending_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset only writes into it.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for sig in ENDING {
            libc::sigaddset(set.as_mut_ptr(), sig);
        }
        set.assume_init()
    }
}

/// The signals the main loop has to act on.
pub struct Signals {
    rx: UnboundedReceiver<i32>,
}

impl Signals {
    /// Must run before any other thread starts, so every thread inherits the mask.
    pub fn install() -> Result<Self> {
        let set = ending_set();
        // SAFETY: `set` is initialised; the old mask is not asked for.
        let err = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if err != 0 {
            bail!(
                "blocking SIGINT, SIGTERM and SIGHUP: {}",
                std::io::Error::from_raw_os_error(err)
            );
        }
        let (tx, rx) = unbounded_channel();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || wait_for_signals(set, tx))
            .map_err(|e| anyhow::anyhow!("starting the signal thread: {e}"))?;
        Ok(Self { rx })
    }

    /// From now on the first signal ends the run with its report.
    pub fn tracing(&self) {
        TRACING.store(true, Ordering::SeqCst);
    }

    /// The next signal.
    pub async fn recv(&mut self) -> i32 {
        self.rx.recv().await.unwrap_or(libc::SIGTERM)
    }
}

fn wait_for_signals(set: libc::sigset_t, tx: UnboundedSender<i32>) {
    let mut seen = 0;
    loop {
        let mut sig = 0;
        // SAFETY: both pointers are to live locals.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        seen += 1;
        if !TRACING.load(Ordering::SeqCst) {
            // SAFETY: _exit ends the process without running anything that could block.
            unsafe { libc::_exit(0) };
        }
        if seen > 1 || tx.send(sig).is_err() {
            // SAFETY: as above; 128 + signal number is how shells report such an end.
            unsafe { libc::_exit(128 + sig) };
        }
    }
}
