//! One ring and the operations it holds: SQEs built from pool slots, their completions
//! reaped, the fixed-file table kept so that no slot is repointed under an SQE using it, and
//! the failure path (never consumed: failed now; consumed: drained).

use super::{ReadReply, Shared, WriteReply};
use crate::io::{BufferPool, IoFault, IoFaults, PieceBuffer, ReadRequest, TaskFile, WriteRequest};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `IORING_ENTER_GETEVENTS`: run pending completion work and post its CQEs.
const ENTER_GETEVENTS: u32 = 1;

enum Reply {
    Write(WriteReply),
    Read(ReadReply),
}

/// A piece read or write, with the buffer it moves and whom to answer.
pub(super) struct Op {
    file: Arc<TaskFile>,
    offset: u64,
    buf: PieceBuffer,
    /// Bytes asked of the kernel (whole blocks for direct I/O).
    len: usize,
    /// Bytes of the piece (a read needs these; a write writes `len`).
    want: usize,
    reply: Reply,
}

impl Op {
    pub(super) fn write(request: WriteRequest, reply: WriteReply) -> Op {
        Op {
            want: request.len,
            file: request.file,
            offset: request.offset,
            buf: request.buf,
            len: request.len,
            reply: Reply::Write(reply),
        }
    }

    pub(super) fn read(request: ReadRequest, reply: ReadReply) -> Op {
        Op {
            want: request.buf.len(),
            file: request.file,
            offset: request.offset,
            buf: request.buf,
            len: request.len,
            reply: Reply::Read(reply),
        }
    }

    fn is_write(&self) -> bool {
        matches!(self.reply, Reply::Write(_))
    }

    pub(super) fn into_buf(self) -> PieceBuffer {
        self.buf
    }

    /// Answers an operation no kernel has seen (its buffer is free to go back).
    pub(super) fn fail_unsubmitted(self, err: io::Error) {
        answer(self.reply, self.buf, Err(err));
    }
}

fn answer(reply: Reply, buf: PieceBuffer, result: io::Result<usize>) {
    match reply {
        Reply::Write(reply) => {
            let _ = reply.send((buf, result.map(|_| ())));
        }
        Reply::Read(reply) => {
            let _ = reply.send((buf, result));
        }
    }
}

/// An operation whose SQEs are in the ring or the kernel.
struct Pending {
    op: Op,
    outstanding: usize,
    error: Option<io::Error>,
    /// Bytes each SQE must complete, by chunk index.
    need: Vec<u32>,
    /// Bytes each SQE did complete.
    got: Vec<u32>,
    fixed: Option<u32>,
    quarantined: bool,
}

impl Pending {
    fn note_error(&mut self, error: io::Error) {
        // Keep the first real error, not the cancellations it caused down the chain.
        let cancelled = error.raw_os_error() == Some(libc::ECANCELED);
        let had_cancel = self
            .error
            .as_ref()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ECANCELED));
        if self.error.is_none() || (!cancelled && had_cancel) {
            self.error = Some(error);
        }
    }

    /// Bytes of the piece read: the chunks in order, up to the first that came up short
    /// (the end of the file).
    fn read_total(&self) -> usize {
        let mut total = 0usize;
        for (&need, &got) in self.need.iter().zip(&self.got) {
            total += need.min(got) as usize;
            if got < need {
                break;
            }
        }
        total.min(self.op.want)
    }
}

/// Where an SQE's file is: a fixed-file slot or a plain descriptor.
#[derive(Clone, Copy)]
enum Target {
    Fixed(u32),
    Fd(RawFd),
}

/// The ring's sparse fixed-file table. A slot is repointed (to another file, or emptied)
/// only while no SQE that names it is outstanding: an SQE resolves its fixed file when the
/// kernel consumes it, which may be after the `register_files_update` of a repoint if a
/// submit failed, and the write would then land in another task's file.
struct FixedFiles {
    by_file: HashMap<u64, u32>,
    users: Vec<u32>,
    /// Released while in use: emptied once its last user completes.
    releasing: Vec<bool>,
    free: Vec<u32>,
}

impl FixedFiles {
    fn new(slots: u32) -> FixedFiles {
        FixedFiles {
            by_file: HashMap::new(),
            users: vec![0; slots as usize],
            releasing: vec![false; slots as usize],
            free: (0..slots).rev().collect(),
        }
    }

    fn slot_for(&mut self, ring: &IoUring, file: &TaskFile) -> Option<u32> {
        if let Some(&slot) = self.by_file.get(&file.id()) {
            return Some(slot);
        }
        if self.free.is_empty() {
            let idle = self
                .by_file
                .iter()
                .find(|(_, &slot)| self.users[slot as usize] == 0)
                .map(|(&id, &slot)| (id, slot));
            // Every slot in use: the plain descriptor does as well, just slower.
            let (id, slot) = idle?;
            self.by_file.remove(&id);
            self.free.push(slot);
        }
        let slot = self.free.pop()?;
        match ring
            .submitter()
            .register_files_update(slot, &[file.file().as_raw_fd()])
        {
            Ok(_) => {
                self.by_file.insert(file.id(), slot);
                Some(slot)
            }
            Err(_) => {
                self.free.push(slot);
                None
            }
        }
    }

    fn release(&mut self, ring: &IoUring, file_id: u64) {
        if let Some(slot) = self.by_file.remove(&file_id) {
            if self.users[slot as usize] == 0 {
                self.empty(ring, slot);
            } else {
                self.releasing[slot as usize] = true;
            }
        }
    }

    fn done(&mut self, ring: &IoUring, slot: u32) {
        let users = &mut self.users[slot as usize];
        *users -= 1;
        if *users == 0 && std::mem::take(&mut self.releasing[slot as usize]) {
            self.empty(ring, slot);
        }
    }

    fn empty(&mut self, ring: &IoUring, slot: u32) {
        // A failure leaves the slot holding the old file open until it is next pointed
        // elsewhere: harmless, as nothing names the slot meanwhile.
        let _ = ring.submitter().register_files_update(slot, &[-1]);
        self.free.push(slot);
    }
}

pub(super) struct Ring {
    ring: IoUring,
    entries: usize,
    /// Whether the pool's slots are registered with this ring (`*Fixed` opcodes).
    fixed_buffers: bool,
    pending: HashMap<u64, Pending>,
    in_flight_sqes: usize,
    /// SQEs pushed that the kernel may not have consumed yet, in push order (the kernel
    /// consumes from the head).
    unconsumed: VecDeque<u64>,
    next_key: u64,
    files: FixedFiles,
    failed_at: Option<Instant>,
    quarantined: bool,
}

impl Ring {
    /// A ring with the pool registered. `first`: a refusal to register is an error (the
    /// engine then falls back to synchronous I/O); on a rebuild the ring works without
    /// (plain `Read`/`Write` of the same slots).
    pub(super) fn build(
        pool: &Arc<BufferPool>,
        entries: u32,
        fixed_files: u32,
        first: bool,
    ) -> io::Result<Ring> {
        let ring = IoUring::builder().build(entries)?;
        let iovecs = pool.slot_iovecs();
        // SAFETY: the iovecs describe the pool's slots, which stay mapped for as long as the
        // ring exists: every ring is owned by a worker holding an `Arc` of the pool, and a
        // ring with operations outstanding is leaked (never unmapped) rather than dropped.
        let fixed_buffers = match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => true,
            Err(err) if first => return Err(err),
            Err(err) => {
                tracing::warn!(error = %err, "the rebuilt io_uring ring works without registered buffers");
                false
            }
        };
        let fixed_files = match ring.submitter().register_files_sparse(fixed_files) {
            Ok(()) => fixed_files,
            Err(err) if first => return Err(err),
            Err(_) => 0,
        };
        Ok(Ring {
            ring,
            entries: entries as usize,
            fixed_buffers,
            pending: HashMap::new(),
            in_flight_sqes: 0,
            unconsumed: VecDeque::new(),
            next_key: 0,
            files: FixedFiles::new(fixed_files),
            failed_at: None,
            quarantined: false,
        })
    }

    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub(super) fn quarantined(&self) -> bool {
        self.quarantined
    }

    pub(super) fn failed_for(&self) -> Duration {
        self.failed_at.map_or(Duration::ZERO, |at| at.elapsed())
    }

    pub(super) fn release_file(&mut self, file_id: u64) {
        self.files.release(&self.ring, file_id);
    }

    /// Queues the operation's SQEs, or gives it back when the ring has no room for them now.
    pub(super) fn try_push(&mut self, op: Op, shared: &Shared) -> Result<(), Op> {
        let slot_size = op.buf.slot_size();
        let chunks = op.len.div_ceil(slot_size).max(1);
        if chunks > self.entries {
            op.fail_unsubmitted(io::Error::other(
                "piece needs more SQEs than the ring holds",
            ));
            return Ok(());
        }
        // SQEs not yet consumed are counted in `in_flight_sqes`, so this also leaves the
        // submission queue room for every SQE of the piece: none is pushed half-way.
        if self.in_flight_sqes + chunks > self.entries {
            return Err(op);
        }
        let write = op.is_write();
        if write {
            op.file.take_write_stall();
        }
        let short = write && shared.faults.take(|f| f == IoFault::ShortWrite).is_some();
        let key = self.next_key;
        self.next_key += 1;
        let fixed = self.files.slot_for(&self.ring, &op.file);
        let target = match fixed {
            Some(slot) => Target::Fixed(slot),
            None => Target::Fd(op.file.file().as_raw_fd()),
        };
        let mut need = Vec::with_capacity(chunks);
        let mut sqes = Vec::with_capacity(chunks);
        for index in 0..chunks {
            let start = index * slot_size;
            let mut len = (op.len - start).min(slot_size) as u32;
            if short && index == 0 {
                // The kernel is really asked for less: it writes half and says so.
                len = (len / 2) & !(crate::io::DIRECT_IO_ALIGN as u32 - 1);
            }
            need.push(if write {
                (op.len - start).min(slot_size) as u32
            } else {
                op.want.saturating_sub(start).min(slot_size) as u32
            });
            let sqe = self.sqe(
                write,
                target,
                op.buf.chunk_ptr(index),
                len,
                op.buf.slots()[index],
                op.offset + start as u64,
            );
            sqes.push(sqe.user_data((key << 16) | index as u64));
        }
        if write {
            // Link the chain: after a failed write the rest of the piece is not attempted.
            let last = sqes.len() - 1;
            for sqe in &mut sqes[..last] {
                *sqe = sqe.clone().flags(squeue::Flags::IO_LINK);
            }
        }
        op.buf.lend_to_device();
        {
            let mut queue = self.ring.submission();
            for sqe in &sqes {
                // SAFETY: every pointer in the SQE refers to memory owned by `op.buf` (pool
                // slots, registered with this ring when `fixed_buffers`) and every fd to
                // `op.file`; both are kept in `self.pending` until the SQE's completion has
                // been reaped, and a fixed-file slot it names is not repointed until then.
                unsafe { queue.push(sqe) }.expect("room was checked above");
                self.unconsumed.push_back(sqe.get_user_data());
            }
        }
        self.in_flight_sqes += chunks;
        if let Some(slot) = fixed {
            self.files.users[slot as usize] += chunks as u32;
        }
        self.pending.insert(
            key,
            Pending {
                op,
                outstanding: chunks,
                error: None,
                got: vec![0; need.len()],
                need,
                fixed,
                quarantined: false,
            },
        );
        Ok(())
    }

    fn sqe(
        &self,
        write: bool,
        target: Target,
        ptr: *mut u8,
        len: u32,
        slot: u32,
        offset: u64,
    ) -> squeue::Entry {
        let buf_index = slot as u16;
        macro_rules! build {
            ($fd:expr) => {
                match (write, self.fixed_buffers) {
                    (true, true) => opcode::WriteFixed::new($fd, ptr, len, buf_index)
                        .offset(offset)
                        .build(),
                    (true, false) => opcode::Write::new($fd, ptr, len).offset(offset).build(),
                    (false, true) => opcode::ReadFixed::new($fd, ptr, len, buf_index)
                        .offset(offset)
                        .build(),
                    (false, false) => opcode::Read::new($fd, ptr, len).offset(offset).build(),
                }
            };
        }
        match target {
            Target::Fixed(slot) => build!(types::Fixed(slot)),
            Target::Fd(fd) => build!(types::Fd(fd)),
        }
    }

    /// Submits what is queued and waits for a completion (at most `timeout`). An error is
    /// one the ring cannot go on after.
    pub(super) fn wait(&mut self, faults: &IoFaults, timeout: Option<Duration>) -> io::Result<()> {
        let fault =
            faults.take(|f| matches!(f, IoFault::SubmitError | IoFault::SubmitErrorAfterSubmit));
        if let Some(fault) = fault {
            if fault == IoFault::SubmitErrorAfterSubmit {
                let _ = self.ring.submit();
            }
            self.note_consumed();
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let result = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(timeout) => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                match self.ring.submitter().submit_with_args(1, &args) {
                    // A kernel before 5.11 has no timed wait: submit, then poll.
                    Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                        let submitted = self.ring.submit();
                        std::thread::sleep(timeout);
                        submitted
                    }
                    other => other,
                }
            }
        };
        self.note_consumed();
        match result {
            Ok(_) => Ok(()),
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN | libc::ETIME)
                ) =>
            {
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Forgets the SQEs the kernel has consumed (it advanced the queue's head past them).
    fn note_consumed(&mut self) {
        let left = self.ring.submission().len();
        while self.unconsumed.len() > left {
            self.unconsumed.pop_front();
        }
    }

    pub(super) fn reap(&mut self, shared: &Shared) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, mut result) in completions {
            let key = user_data >> 16;
            let index = (user_data & 0xffff) as usize;
            self.in_flight_sqes -= 1;
            let Some(pending) = self.pending.get_mut(&key) else {
                continue;
            };
            if result >= 0
                && shared
                    .faults
                    .take(|f| f == IoFault::EioCompletion)
                    .is_some()
            {
                result = -libc::EIO;
            }
            pending.outstanding -= 1;
            if let Some(slot) = pending.fixed {
                self.files.done(&self.ring, slot);
            }
            if result < 0 {
                pending.note_error(io::Error::from_raw_os_error(-result));
            } else {
                pending.got[index] = result as u32;
                let need = pending.need[index];
                if pending.op.is_write() && (result as u32) < need {
                    pending.note_error(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short write: {result} of {need} bytes"),
                    ));
                }
            }
            if pending.outstanding == 0 {
                let done = self.pending.remove(&key).expect("present");
                finish(done, shared);
            }
        }
    }

    /// The ring failed: the SQEs it never handed to the kernel never will be (a failed ring
    /// is only entered to wait, never to submit), so they are done now; the rest drain.
    /// Returns how many operations are still in the kernel.
    pub(super) fn fail(&mut self, err: &io::Error, shared: &Shared) -> usize {
        self.failed_at = Some(Instant::now());
        self.note_consumed();
        let never: Vec<u64> = self.unconsumed.drain(..).collect();
        for user_data in never {
            let key = user_data >> 16;
            self.in_flight_sqes -= 1;
            let Some(pending) = self.pending.get_mut(&key) else {
                continue;
            };
            pending.outstanding -= 1;
            if let Some(slot) = pending.fixed {
                self.files.done(&self.ring, slot);
            }
            pending.note_error(io::Error::new(
                err.kind(),
                format!("the io_uring submit failed before the kernel took this request: {err}"),
            ));
            if pending.outstanding == 0 {
                let done = self.pending.remove(&key).expect("present");
                finish(done, shared);
            }
        }
        self.pending.len()
    }

    /// Reaps what a failed ring has completed since.
    pub(super) fn poll_failed(&mut self, shared: &Shared) {
        // SAFETY: to_submit is 0, so the kernel consumes no SQE (those left were failed and
        // answered in `fail`); no argument pointer is passed.
        let _ = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(0, 0, ENTER_GETEVENTS, None)
        };
        self.reap(shared);
    }

    /// Marks every operation left as quarantined; returns how many.
    pub(super) fn quarantine(&mut self, shared: &Shared) -> usize {
        self.quarantined = true;
        for pending in self.pending.values_mut() {
            pending.quarantined = true;
        }
        shared
            .counters
            .quarantined_ops
            .fetch_add(self.pending.len() as u64, Ordering::Relaxed);
        self.pending.len()
    }
}

/// Every SQE of the operation has completed: the kernel is done with its buffer.
fn finish(done: Pending, shared: &Shared) {
    done.op.buf.device_done();
    if done.quarantined {
        shared
            .counters
            .quarantined_ops
            .fetch_sub(1, Ordering::Relaxed);
    }
    let moved = if done.op.is_write() {
        done.op.len
    } else {
        done.read_total()
    };
    let result = match done.error {
        Some(err) => Err(err),
        None => Ok(moved),
    };
    answer(done.op.reply, done.op.buf, result);
}
