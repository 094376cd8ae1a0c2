//! The completion thread of a device: one OS thread per open device reaps the completion
//! queues of all its connections and hands each connection its completions (a mailbox and a
//! wake-up), so no tokio worker, which also runs digests, `sendfile` and the rest, polls a CQ
//! or sleeps on a completion channel, and completions are reaped while those workers are busy.
//!
//! - [`PollMode::Event`] (the default) sleeps in `epoll` on the connections' completion
//!   channels: no CPU while idle, one wake-up per armed event (counted as `wakeups`).
//! - [`PollMode::Busy`] polls every CQ in a loop without arming: no interrupt or wake-up
//!   latency, at the cost of one core per device while connections exist (it parks when
//!   there are none).
//!
//! The thread holds connections only weakly: a dropped connection leaves it at once (its
//! channel's fd leaves the epoll set when closed), and the last reference may be dropped on
//! this thread, which is fine: nothing here is touched after.

use crate::error::RdmaError;
use crate::verbs::ConnectionCore;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How a device's completion thread waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PollMode {
    /// Sleep on the completion channels (epoll) between completions.
    #[default]
    Event,
    /// Poll the completion queues in a loop (a core per device while connections exist).
    Busy,
}

impl std::fmt::Display for PollMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PollMode::Event => "event",
            PollMode::Busy => "busy",
        })
    }
}

impl std::str::FromStr for PollMode {
    type Err = String;
    fn from_str(s: &str) -> Result<PollMode, String> {
        match s {
            "event" => Ok(PollMode::Event),
            "busy" => Ok(PollMode::Busy),
            other => Err(format!(
                "{other:?} is not a poll mode: \"event\" or \"busy\""
            )),
        }
    }
}

/// What the connections and the thread share.
struct Shared {
    mode: PollMode,
    /// Connections registered since the thread last looked.
    joining: Mutex<Vec<Weak<ConnectionCore>>>,
    any_joining: AtomicBool,
    stop: AtomicBool,
    /// An eventfd that wakes the thread out of `epoll_wait` (event mode).
    wake: OwnedFd,
}

impl Shared {
    fn nudge(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd this struct owns.
        let _ = unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// A device's completion thread. Dropping it stops the thread (without waiting for it: the
/// last connection, and so this, may be dropped on that very thread).
pub(crate) struct Poller {
    shared: Arc<Shared>,
    thread: std::thread::Thread,
}

impl Poller {
    pub(crate) fn start(device: &str, mode: PollMode) -> Result<Poller, RdmaError> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(RdmaError::verbs(
                "eventfd for the completion thread",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            mode,
            joining: Mutex::new(Vec::new()),
            any_joining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake,
        });
        let for_thread = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("ferry-cq-{device}"))
            .spawn(move || match for_thread.mode {
                PollMode::Event => run_events(&for_thread),
                PollMode::Busy => run_busy(&for_thread),
            })
            .map_err(|e| RdmaError::verbs("starting the completion thread", e))?;
        Ok(Poller {
            shared,
            thread: handle.thread().clone(),
        })
    }

    pub(crate) fn mode(&self) -> PollMode {
        self.shared.mode
    }

    /// Hands `core`'s completion queue to the thread.
    pub(crate) fn register(&self, core: &Arc<ConnectionCore>) {
        self.shared
            .joining
            .lock()
            .expect("poller lock")
            .push(Arc::downgrade(core));
        self.shared.any_joining.store(true, Ordering::Release);
        self.shared.nudge();
        self.thread.unpark();
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.nudge();
        self.thread.unpark();
    }
}

fn take_joining(shared: &Shared) -> Vec<Weak<ConnectionCore>> {
    if !shared.any_joining.swap(false, Ordering::AcqRel) {
        return Vec::new();
    }
    std::mem::take(&mut *shared.joining.lock().expect("poller lock"))
}

/// Reaps what is on `core`'s CQ, arms it, and reaps again: a completion that landed between
/// the first poll and the arming raises no event, so the second poll finds it.
fn reap_and_arm(core: &ConnectionCore) {
    core.deliver(core.drain());
    if let Err(err) = core.arm() {
        return core.deliver_error(err);
    }
    core.deliver(core.drain());
}

const WAKE_TOKEN: u64 = u64::MAX;

fn run_events(shared: &Shared) {
    // SAFETY: plain syscall; the result is checked.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        let err = std::io::Error::last_os_error();
        tracing::error!(error = %err, "epoll_create1 for the completion thread failed; RDMA completions will not be reaped");
        return;
    }
    // SAFETY: `epoll` was just created and is owned by nothing else.
    let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
    let add = |fd: i32, token: u64| -> std::io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both fds are open; `event` is a live local the kernel copies.
        let rc = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    if let Err(err) = add(shared.wake.as_raw_fd(), WAKE_TOKEN) {
        tracing::error!(error = %err, "the completion thread cannot watch its wake-up fd");
        return;
    }
    let mut members: HashMap<u64, Weak<ConnectionCore>> = HashMap::new();
    let mut next_token = 0u64;
    // SAFETY: an all-zero epoll_event is plain data the kernel overwrites.
    let mut events: [libc::epoll_event; 64] = unsafe { std::mem::zeroed() };
    while !shared.stop.load(Ordering::Acquire) {
        for weak in take_joining(shared) {
            let Some(core) = weak.upgrade() else { continue };
            next_token += 1;
            if let Err(err) = add(core.channel_fd(), next_token) {
                core.deliver_error(RdmaError::verbs("epoll_ctl for a completion channel", err));
                continue;
            }
            members.insert(next_token, weak);
            reap_and_arm(&core);
        }
        // SAFETY: `events` has room for 64 entries; the epoll fd is open.
        let n = unsafe {
            libc::epoll_wait(
                epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                1000,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!(error = %err, "epoll_wait in the completion thread failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if n == 0 {
            // A quiet second: forget connections that are gone.
            members.retain(|_, weak| weak.strong_count() > 0);
            continue;
        }
        for event in &events[..n as usize] {
            let token = event.u64;
            if token == WAKE_TOKEN {
                let mut count = 0u64;
                // SAFETY: reads 8 bytes into a live u64 from the eventfd `shared` owns.
                let _ = unsafe {
                    libc::read(
                        shared.wake.as_raw_fd(),
                        (&mut count as *mut u64).cast(),
                        std::mem::size_of::<u64>(),
                    )
                };
                continue;
            }
            match members.get(&token).and_then(Weak::upgrade) {
                Some(core) => {
                    core.take_channel_events();
                    reap_and_arm(&core);
                }
                None => {
                    // Its channel is closed, which took it out of the epoll set.
                    members.remove(&token);
                }
            }
        }
    }
}

fn run_busy(shared: &Shared) {
    let mut members: Vec<Weak<ConnectionCore>> = Vec::new();
    let mut idle_rounds = 0u32;
    while !shared.stop.load(Ordering::Acquire) {
        members.extend(take_joining(shared));
        let mut reaped = false;
        members.retain(|weak| match weak.upgrade() {
            Some(core) => {
                let batch = core.drain();
                if !batch.is_empty() {
                    reaped = true;
                    core.deliver(batch);
                }
                true
            }
            None => false,
        });
        if reaped {
            idle_rounds = 0;
        } else if members.is_empty() {
            // Nothing to poll: sleep until a connection registers (or the poller stops).
            std::thread::park_timeout(Duration::from_millis(100));
        } else {
            idle_rounds = idle_rounds.saturating_add(1);
            if idle_rounds < 1024 {
                std::hint::spin_loop();
            } else {
                // Still polling, but let other threads of this core run between rounds.
                std::thread::yield_now();
            }
        }
    }
}
