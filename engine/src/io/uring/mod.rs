//! The io_uring backend: each I/O thread owns a ring with the pool's slots registered as fixed
//! buffers and a sparse table of fixed files. A piece is written as one linked chain of
//! `WriteFixed`, one per slot, and read as one `ReadFixed` per slot. Making it durable is the
//! store's job (one fdatasync shared by the pieces that finish together).
//!
//! Ownership: a buffer goes back to its caller only once the completion of every SQE that
//! uses it has been reaped, and a fixed-file slot is repointed only when no SQE using it is
//! still outstanding. A ring whose submit fails takes no more work: the SQEs the kernel never
//! consumed are failed at once (they never will be: a failed ring is only ever entered to
//! wait), the others are drained by reaping their completions, and a new ring takes over. An
//! operation whose completion does not come within [`DRAIN_DEADLINE`] is quarantined: its
//! buffer stays with the failed ring (out of the pool) until it does, and its caller's own
//! timeout (the store's) gives up on it.

mod ring;

use super::{BufferPool, IoCounters, IoFaults, PieceBuffer, ReadRequest, WriteRequest};
use ring::{Op, Ring};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const RING_ENTRIES: u32 = 256;
const FIXED_FILES: u32 = 64;
/// How long the operations of a failed ring may take to complete before they count as
/// quarantined (the kernel still owns their buffers; they are reaped whenever they do finish).
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// How often a failed ring is looked at while it drains, and after the deadline.
const DRAIN_POLL: Duration = Duration::from_millis(5);
const QUARANTINE_POLL: Duration = Duration::from_secs(1);
/// How soon a ring that could not be built is tried again.
const REBUILD_RETRY: Duration = Duration::from_secs(1);

pub(super) type WriteReply = oneshot::Sender<(PieceBuffer, io::Result<()>)>;
pub(super) type ReadReply = oneshot::Sender<(PieceBuffer, io::Result<usize>)>;

enum Command {
    Start(Op),
    Release(u64),
}

pub struct UringIo {
    senders: Vec<mpsc::Sender<Command>>,
    next: AtomicUsize,
}

/// What every I/O thread shares with the engine.
#[derive(Clone)]
struct Shared {
    pool: Arc<BufferPool>,
    faults: Arc<IoFaults>,
    counters: Arc<IoCounters>,
}

impl UringIo {
    /// Builds every ring on the calling thread, so any refusal (seccomp, an old kernel, the
    /// memlock limit on registered buffers) is reported here and the caller can fall back.
    pub fn start(
        pool: &Arc<BufferPool>,
        threads: usize,
        faults: &Arc<IoFaults>,
        counters: &Arc<IoCounters>,
    ) -> io::Result<UringIo> {
        let shared = Shared {
            pool: Arc::clone(pool),
            faults: Arc::clone(faults),
            counters: Arc::clone(counters),
        };
        let mut senders = Vec::new();
        for index in 0..threads.max(1) {
            let ring = Ring::build(&shared.pool, RING_ENTRIES, FIXED_FILES, true)?;
            let (sender, receiver) = mpsc::channel();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("ferry-uring-{index}"))
                .spawn(move || Worker::new(ring, shared).run(receiver))?;
            senders.push(sender);
        }
        Ok(UringIo {
            senders,
            next: AtomicUsize::new(0),
        })
    }

    fn send(&self, op: Op) -> Result<(), Op> {
        let thread = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        match self.senders[thread].send(Command::Start(op)) {
            Ok(()) => Ok(()),
            Err(mpsc::SendError(Command::Start(op))) => Err(op),
            Err(mpsc::SendError(Command::Release(_))) => unreachable!("sent a Start"),
        }
    }

    pub async fn write(&self, request: WriteRequest) -> (PieceBuffer, io::Result<()>) {
        let (reply, answer) = oneshot::channel();
        if let Err(op) = self.send(Op::write(request, reply)) {
            return (op.into_buf(), Err(stopped()));
        }
        answer
            .await
            .expect("io_uring thread dropped a write without answering")
    }

    pub async fn read(&self, request: ReadRequest) -> (PieceBuffer, io::Result<usize>) {
        let (reply, answer) = oneshot::channel();
        if let Err(op) = self.send(Op::read(request, reply)) {
            return (op.into_buf(), Err(stopped()));
        }
        answer
            .await
            .expect("io_uring thread dropped a read without answering")
    }

    pub fn release_file(&self, file_id: u64) {
        for sender in &self.senders {
            let _ = sender.send(Command::Release(file_id));
        }
    }
}

fn stopped() -> io::Error {
    io::Error::other("io_uring thread has stopped")
}

/// One I/O thread: the ring taking work now, and failed rings still draining.
struct Worker {
    current: Option<Ring>,
    retired: Vec<Ring>,
    backlog: VecDeque<Op>,
    shared: Shared,
    /// When to try building a ring again after a failed attempt.
    rebuild_at: Option<Instant>,
}

impl Worker {
    fn new(ring: Ring, shared: Shared) -> Worker {
        Worker {
            current: Some(ring),
            retired: Vec::new(),
            backlog: VecDeque::new(),
            shared,
            rebuild_at: None,
        }
    }

    fn busy(&self) -> bool {
        !self.backlog.is_empty() || self.current.as_ref().is_some_and(Ring::has_pending)
    }

    fn run(mut self, commands: mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            if !self.busy() {
                if !open && self.retired.is_empty() {
                    return;
                }
                let command = match (open, self.retired_poll_interval()) {
                    (true, None) => commands.recv().map_err(|_| true),
                    (true, Some(interval)) => commands
                        .recv_timeout(interval)
                        .map_err(|err| matches!(err, mpsc::RecvTimeoutError::Disconnected)),
                    // Closed: only failed rings are left to drain.
                    (false, interval) => {
                        std::thread::sleep(interval.unwrap_or(DRAIN_POLL));
                        Err(false)
                    }
                };
                match command {
                    Ok(command) => self.accept(command),
                    Err(closed) => open &= !closed,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(command) => self.accept(command),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.ensure_ring();
            self.start_backlog();
            let wait = self.retired_poll_interval();
            if let Some(ring) = self.current.as_mut().filter(|r| r.has_pending()) {
                if let Err(err) = ring.wait(&self.shared.faults, wait) {
                    self.retire(err);
                }
            }
            if let Some(ring) = &mut self.current {
                ring.reap(&self.shared);
            }
            self.poll_retired();
        }
    }

    /// How long a wait may last while failed rings drain (`None`: none are).
    fn retired_poll_interval(&self) -> Option<Duration> {
        if self.retired.is_empty() {
            return None;
        }
        Some(if self.retired.iter().all(Ring::quarantined) {
            QUARANTINE_POLL
        } else {
            DRAIN_POLL
        })
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Start(op) => self.backlog.push_back(op),
            Command::Release(file_id) => {
                if let Some(ring) = &mut self.current {
                    ring.release_file(file_id);
                }
            }
        }
    }

    /// A ring to take work, after a failed one: built again (at most every
    /// [`REBUILD_RETRY`]); while there is none, work is refused (its buffers were never
    /// seen by a kernel, so they go straight back).
    fn ensure_ring(&mut self) {
        if self.current.is_some() {
            return;
        }
        if self.rebuild_at.is_none_or(|at| Instant::now() >= at) {
            match Ring::build(&self.shared.pool, RING_ENTRIES, FIXED_FILES, false) {
                Ok(ring) => {
                    tracing::info!("io_uring ring rebuilt");
                    self.current = Some(ring);
                    self.rebuild_at = None;
                    return;
                }
                Err(err) => {
                    tracing::error!(error = %err, "io_uring ring could not be rebuilt; piece I/O fails until it can");
                    self.rebuild_at = Some(Instant::now() + REBUILD_RETRY);
                }
            }
        }
        for op in self.backlog.drain(..) {
            op.fail_unsubmitted(io::Error::other(
                "no io_uring ring: the last one failed and a new one could not be built",
            ));
        }
    }

    fn start_backlog(&mut self) {
        let Some(ring) = &mut self.current else {
            return;
        };
        while let Some(op) = self.backlog.pop_front() {
            match ring.try_push(op, &self.shared) {
                Ok(()) => {}
                Err(op) => {
                    self.backlog.push_front(op);
                    return;
                }
            }
        }
    }

    /// The current ring failed: it takes no more work and drains beside the new one.
    fn retire(&mut self, err: io::Error) {
        let Some(mut ring) = self.current.take() else {
            return;
        };
        // Counted before any answer goes out.
        self.shared
            .counters
            .ring_rebuilds
            .fetch_add(1, Ordering::Relaxed);
        let left = ring.fail(&err, &self.shared);
        tracing::error!(error = %err, in_flight = left, "io_uring submit failed: the ring takes no more work, drains what the kernel holds and is replaced");
        if left > 0 {
            self.retired.push(ring);
        }
        self.ensure_ring();
    }

    fn poll_retired(&mut self) {
        let shared = &self.shared;
        self.retired.retain_mut(|ring| {
            ring.poll_failed(shared);
            if !ring.has_pending() {
                return false;
            }
            let deadline = shared.faults.drain_deadline().unwrap_or(DRAIN_DEADLINE);
            if !ring.quarantined() && ring.failed_for() >= deadline {
                let ops = ring.quarantine(shared);
                tracing::error!(
                    ops,
                    "a failed io_uring ring has not completed these operations within {}s: their buffers stay out of the pool until it does",
                    deadline.as_secs_f64()
                );
            }
            true
        });
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Rings whose operations never completed (the process is exiting): their buffers
        // must not be handed out again, nor the pool unmapped under the kernel, so they are
        // leaked rather than dropped.
        for ring in self.retired.drain(..) {
            if ring.has_pending() {
                std::mem::forget(ring);
            }
        }
        if let Some(ring) = self.current.take() {
            if ring.has_pending() {
                std::mem::forget(ring);
            }
        }
    }
}

#[cfg(test)]
mod tests;
