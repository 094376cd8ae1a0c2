//! Test-only fault switches of the io_uring backend, and the engine's counters.
//!
//! The faults act on the real ring (nothing is mocked): a submit reported failed, a write
//! really submitted short, a completion's result replaced by EIO, so the ownership rules are
//! tested against what the kernel really does with the SQEs already handed to it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// A fault to inject once into the io_uring backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFault {
    /// The next submit of a ring reports EIO without entering the kernel: the SQEs queued
    /// are never seen by it.
    SubmitError,
    /// The next submit of a ring hands its SQEs to the kernel, then reports EIO as if it had
    /// failed: the SQEs run on, and their buffers with them.
    SubmitErrorAfterSubmit,
    /// The first SQE of the next piece write asks the kernel for half its bytes: a real
    /// short write.
    ShortWrite,
    /// The next successful completion is reported as EIO (a device error after the fact).
    EioCompletion,
}

/// Armed in-process through [`super::IoEngine::faults`]; each armed fault fires once.
#[derive(Debug, Default)]
pub struct IoFaults {
    armed: Mutex<Vec<IoFault>>,
    /// Skips the lock on the hot path when nothing is armed.
    any: AtomicBool,
    /// Replaces the drain deadline of failed rings, in milliseconds (0: the default).
    drain_deadline_ms: AtomicU64,
}

impl IoFaults {
    pub fn arm(&self, fault: IoFault) {
        self.armed.lock().expect("io faults lock").push(fault);
        self.any.store(true, Ordering::Release);
    }

    /// Shortens how long a failed ring's operations may take before they are quarantined.
    pub fn set_drain_deadline(&self, deadline: std::time::Duration) {
        self.drain_deadline_ms
            .store((deadline.as_millis() as u64).max(1), Ordering::Relaxed);
    }

    pub(super) fn drain_deadline(&self) -> Option<std::time::Duration> {
        match self.drain_deadline_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// The first armed fault that `wanted` accepts, disarmed.
    pub(super) fn take(&self, wanted: impl Fn(IoFault) -> bool) -> Option<IoFault> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut armed = self.armed.lock().expect("io faults lock");
        let at = armed.iter().position(|&fault| wanted(fault))?;
        let fault = armed.remove(at);
        self.any.store(!armed.is_empty(), Ordering::Release);
        Some(fault)
    }
}

/// What the engine has done, read by the metrics at scrape time and asserted by tests.
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Piece reads completed (for serving).
    pub reads: AtomicU64,
    /// Of those, reads through O_DIRECT: the device wrote the pool slots itself.
    pub direct_reads: AtomicU64,
    /// Payload copies by a CPU those reads cost (one per buffered read: the kernel's copy
    /// out of the page cache; none for a direct read).
    pub read_payload_copies: AtomicU64,
    pub read_bytes: AtomicU64,
    /// Rings that failed and were replaced.
    pub ring_rebuilds: AtomicU64,
    /// Operations of failed rings whose completion has not come within the drain deadline:
    /// their buffers stay out of the pool until it does.
    pub quarantined_ops: AtomicU64,
}

impl IoCounters {
    pub(super) fn count_read(&self, bytes: u64, direct: bool) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
        if direct {
            self.direct_reads.fetch_add(1, Ordering::Relaxed);
        } else {
            self.read_payload_copies.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
