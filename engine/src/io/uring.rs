//! The io_uring backend: each I/O thread owns a ring with the pool's slots registered as fixed
//! buffers and a sparse table of fixed files. A piece is written as one linked chain of
//! `WriteFixed`, one per slot. Making it durable is the store's job (one fdatasync shared by
//! the pieces that finish together).

use super::{BufferPool, PieceBuffer, WriteRequest};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

const RING_ENTRIES: u32 = 256;
const FIXED_FILES: u32 = 64;

type Reply = oneshot::Sender<(PieceBuffer, io::Result<()>)>;

enum Command {
    Write(WriteRequest, Reply),
    Release(u64),
}

pub struct UringIo {
    senders: Vec<mpsc::Sender<Command>>,
    next: AtomicUsize,
}

impl UringIo {
    /// Builds every ring on the calling thread, so any refusal (seccomp, an old kernel, the
    /// memlock limit on registered buffers) is reported here and the caller can fall back.
    pub fn start(pool: &Arc<BufferPool>, threads: usize) -> io::Result<UringIo> {
        let iovecs = pool.slot_iovecs();
        let mut senders = Vec::new();
        for index in 0..threads.max(1) {
            let ring = IoUring::builder().build(RING_ENTRIES)?;
            // SAFETY: the iovecs describe the pool's slots, which stay mapped for as long as the
            // ring exists: the thread below holds an `Arc` of the pool until the ring is dropped.
            unsafe { ring.submitter().register_buffers(&iovecs)? };
            ring.submitter().register_files_sparse(FIXED_FILES)?;
            let (sender, receiver) = mpsc::channel();
            let pool = Arc::clone(pool);
            std::thread::Builder::new()
                .name(format!("ferry-uring-{index}"))
                .spawn(move || {
                    Worker::new(ring).run(receiver);
                    drop(pool);
                })?;
            senders.push(sender);
        }
        Ok(UringIo {
            senders,
            next: AtomicUsize::new(0),
        })
    }

    pub async fn write(&self, request: WriteRequest) -> (PieceBuffer, io::Result<()>) {
        let (reply, answer) = oneshot::channel();
        let thread = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        if let Err(mpsc::SendError(Command::Write(request, _))) =
            self.senders[thread].send(Command::Write(request, reply))
        {
            return (
                request.buf,
                Err(io::Error::other("io_uring thread has stopped")),
            );
        }
        answer
            .await
            .expect("io_uring thread dropped a write without answering")
    }

    pub fn release_file(&self, file_id: u64) {
        for sender in &self.senders {
            let _ = sender.send(Command::Release(file_id));
        }
    }
}

struct Pending {
    buf: PieceBuffer,
    reply: Reply,
    outstanding: usize,
    error: Option<io::Error>,
    /// Bytes each write SQE must complete, by chunk index.
    chunk_lens: Vec<u32>,
    /// Keeps the fd open until every SQE using it has completed.
    _file: Arc<super::TaskFile>,
}

struct Worker {
    ring: IoUring,
    pending: HashMap<u64, Pending>,
    backlog: VecDeque<(WriteRequest, Reply)>,
    in_flight_sqes: usize,
    next_key: u64,
    fixed: HashMap<u64, u32>,
    free_fixed: Vec<u32>,
}

impl Worker {
    fn new(ring: IoUring) -> Worker {
        Worker {
            ring,
            pending: HashMap::new(),
            backlog: VecDeque::new(),
            in_flight_sqes: 0,
            next_key: 0,
            fixed: HashMap::new(),
            free_fixed: (0..FIXED_FILES).rev().collect(),
        }
    }

    fn run(mut self, commands: mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            if self.pending.is_empty() && self.backlog.is_empty() {
                if !open {
                    return;
                }
                match commands.recv() {
                    Ok(command) => self.accept(command),
                    Err(_) => return,
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
            self.start_backlog();
            if !self.pending.is_empty() {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(err)
                        if matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                    Err(err) => {
                        tracing::error!(error = %err, "io_uring submit failed");
                        self.fail_all(&err);
                        continue;
                    }
                }
            }
            self.reap();
        }
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Write(request, reply) => self.backlog.push_back((request, reply)),
            Command::Release(file_id) => {
                if let Some(slot) = self.fixed.remove(&file_id) {
                    let _ = self.ring.submitter().register_files_update(slot, &[-1]);
                    self.free_fixed.push(slot);
                }
            }
        }
    }

    fn fixed_slot(&mut self, file: &super::TaskFile) -> Option<u32> {
        if let Some(&slot) = self.fixed.get(&file.id()) {
            return Some(slot);
        }
        if self.free_fixed.is_empty() {
            // Flush what is queued first: a queued SQE resolves its fixed file at submission.
            let _ = self.ring.submit();
            for (_, slot) in self.fixed.drain() {
                let _ = self.ring.submitter().register_files_update(slot, &[-1]);
                self.free_fixed.push(slot);
            }
        }
        let slot = self.free_fixed.pop()?;
        match self
            .ring
            .submitter()
            .register_files_update(slot, &[file.file().as_raw_fd()])
        {
            Ok(_) => {
                self.fixed.insert(file.id(), slot);
                Some(slot)
            }
            Err(_) => {
                self.free_fixed.push(slot);
                None
            }
        }
    }

    fn start_backlog(&mut self) {
        let capacity = RING_ENTRIES as usize;
        while let Some((request, _)) = self.backlog.front() {
            let chunks = request.len.div_ceil(request.buf.slot_size());
            if chunks > capacity {
                let (request, reply) = self.backlog.pop_front().expect("front exists");
                let _ = reply.send((
                    request.buf,
                    Err(io::Error::other(
                        "piece needs more SQEs than the ring holds",
                    )),
                ));
                continue;
            }
            if self.in_flight_sqes + chunks > capacity {
                return;
            }
            let (request, reply) = self.backlog.pop_front().expect("front exists");
            request.file.take_write_stall();
            self.push(request, reply, chunks);
        }
    }

    fn push(&mut self, request: WriteRequest, reply: Reply, chunks: usize) {
        let key = self.next_key;
        self.next_key += 1;
        let fixed = self.fixed_slot(&request.file);
        let raw_fd = request.file.file().as_raw_fd();
        let slot_size = request.buf.slot_size();
        let mut chunk_lens = Vec::with_capacity(chunks);
        let mut sqes = Vec::with_capacity(chunks);
        for index in 0..chunks {
            let len = (request.len - index * slot_size).min(slot_size) as u32;
            chunk_lens.push(len);
            let ptr = request.buf.chunk_ptr(index);
            let buf_index = request.buf.slots()[index] as u16;
            let offset = request.offset + (index * slot_size) as u64;
            let entry = match fixed {
                Some(slot) => opcode::WriteFixed::new(types::Fixed(slot), ptr, len, buf_index)
                    .offset(offset)
                    .build(),
                None => opcode::WriteFixed::new(types::Fd(raw_fd), ptr, len, buf_index)
                    .offset(offset)
                    .build(),
            };
            sqes.push(entry.user_data((key << 16) | index as u64));
        }
        // Link the chain: after a failed write the rest of the piece is not attempted.
        let last = sqes.len() - 1;
        for sqe in &mut sqes[..last] {
            *sqe = sqe.clone().flags(squeue::Flags::IO_LINK);
        }
        for sqe in &sqes {
            loop {
                // SAFETY: every pointer in the SQE refers to memory owned by `request.buf` (pool
                // slots registered with this ring) and every fd to `request.file`; both are kept
                // in `self.pending` until the SQE's completion has been reaped.
                if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                    break;
                }
                let _ = self.ring.submit();
            }
        }
        self.in_flight_sqes += chunks;
        self.pending.insert(
            key,
            Pending {
                buf: request.buf,
                reply,
                outstanding: chunks,
                error: None,
                chunk_lens,
                _file: request.file,
            },
        );
    }

    fn reap(&mut self) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in completions {
            let key = user_data >> 16;
            let index = user_data & 0xffff;
            self.in_flight_sqes -= 1;
            let Some(pending) = self.pending.get_mut(&key) else {
                continue;
            };
            pending.outstanding -= 1;
            let error = if result < 0 {
                Some(io::Error::from_raw_os_error(-result))
            } else if (result as u32) < pending.chunk_lens[index as usize] {
                Some(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!(
                        "short write: {result} of {} bytes",
                        pending.chunk_lens[index as usize]
                    ),
                ))
            } else {
                None
            };
            if let Some(error) = error {
                // Keep the first real error, not the cancellations it caused down the chain.
                let cancelled = error.raw_os_error() == Some(libc::ECANCELED);
                if pending.error.is_none()
                    || (!cancelled
                        && pending.error.as_ref().and_then(|e| e.raw_os_error())
                            == Some(libc::ECANCELED))
                {
                    pending.error = Some(error);
                }
            }
            if pending.outstanding == 0 {
                let done = self.pending.remove(&key).expect("present");
                let result = match done.error {
                    Some(err) => Err(err),
                    None => Ok(()),
                };
                let _ = done.reply.send((done.buf, result));
            }
        }
    }

    fn fail_all(&mut self, err: &io::Error) {
        // Only reached when the ring itself is broken: wait for nothing further from it.
        for (_, pending) in self.pending.drain() {
            let _ = pending.reply.send((
                pending.buf,
                Err(io::Error::new(err.kind(), err.to_string())),
            ));
        }
        self.in_flight_sqes = 0;
    }
}
