//! Moving pieces between the pool and disk: io_uring (O_DIRECT, the pool's slots registered
//! as fixed buffers, store files registered as fixed files) on dedicated threads, with a
//! synchronous fallback chosen at run time when io_uring is unavailable. Pieces are written
//! by the store and read by the serving side, straight into or out of pool slots. This
//! module and `rdma/` are the only places with `unsafe`; everything they expose is safe.
//!
//! Ownership rule: a buffer handed to the kernel comes back only after the completion that
//! proves the kernel is done with it (see `uring` for what happens when a ring fails).

mod faults;
mod free_slots;
mod numa;
pub mod pool;
mod reflink;
mod sync;
mod uring;

pub use faults::{IoCounters, IoFault, IoFaults};
pub use pool::{
    Budget, BufferPool, DeviceLease, LingeringBuffer, PartChoice, PartLayout, PieceBuffer,
    PoolError, PoolInfo, PoolPart, Shares, DIRECT_IO_ALIGN, POISON,
};
pub use reflink::{reflink, unsupported as reflink_unsupported};

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A store file open for piece writes, O_DIRECT where the filesystem allows.
pub struct TaskFile {
    id: u64,
    file: File,
    direct: bool,
    /// Test fault: the next write on this file stalls this many microseconds on the I/O thread
    /// first, holding its buffer, like a hung device (0: none).
    stall_next_write_us: AtomicU64,
}

static NEXT_FILE_ID: AtomicU64 = AtomicU64::new(1);

impl TaskFile {
    /// Opens (creating if needed) `path` for writes, trying O_DIRECT first; filesystems
    /// without it (tmpfs) get buffered writes, made durable by the same fdatasync (the store's).
    pub fn open(path: &Path, want_direct: bool) -> io::Result<TaskFile> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        if want_direct {
            match options.clone().custom_flags(libc::O_DIRECT).open(path) {
                Ok(file) => return Ok(TaskFile::wrap(file, true)),
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(path = %path.display(), "O_DIRECT not supported here; buffered writes");
                }
                Err(err) => return Err(err),
            }
        }
        Ok(TaskFile::wrap(options.open(path)?, false))
    }

    /// Opens `path` read-only for serving pieces, O_DIRECT where the filesystem allows and
    /// `want_direct` asks (reads then go from the device straight into pool slots).
    pub fn open_read(path: &Path, want_direct: bool) -> io::Result<TaskFile> {
        let mut options = OpenOptions::new();
        options.read(true);
        if want_direct {
            match options.clone().custom_flags(libc::O_DIRECT).open(path) {
                Ok(file) => return Ok(TaskFile::wrap(file, true)),
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(path = %path.display(), "O_DIRECT not supported here; buffered reads");
                }
                Err(err) => return Err(err),
            }
        }
        Ok(TaskFile::wrap(options.open(path)?, false))
    }

    fn wrap(file: File, direct: bool) -> TaskFile {
        TaskFile {
            id: NEXT_FILE_ID.fetch_add(1, Ordering::Relaxed),
            file,
            direct,
            stall_next_write_us: AtomicU64::new(0),
        }
    }

    /// Test fault: the next write of this file blocks for `stall` on the thread doing it
    /// (an io_uring thread stalls its whole ring, as a hung disk would).
    pub fn stall_next_write(&self, stall: Duration) {
        self.stall_next_write_us
            .store(stall.as_micros().max(1) as u64, Ordering::Release);
    }

    /// Sleeps out a stall armed by [`TaskFile::stall_next_write`], once.
    fn take_write_stall(&self) {
        let us = self.stall_next_write_us.swap(0, Ordering::AcqRel);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// How many bytes a write of `len` must cover: direct I/O writes whole aligned blocks.
    pub fn write_len(&self, len: usize) -> usize {
        self.io_len(len)
    }

    /// How many bytes a read or write of `len` must ask for: direct I/O moves whole aligned
    /// blocks (a read past the end of the file returns what there is).
    pub fn io_len(&self, len: usize) -> usize {
        if self.direct {
            len.next_multiple_of(DIRECT_IO_ALIGN)
        } else {
            len
        }
    }
}

/// The soft limit on open descriptors (RLIMIT_NOFILE) of this process.
pub fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives on this stack frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    Some(limit.rlim_cur)
}

/// Which backend to use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum IoChoice {
    /// io_uring when the kernel allows it, else synchronous writes.
    Auto,
    /// io_uring or fail.
    Uring,
    /// Synchronous pwrite + fdatasync on blocking threads.
    Sync,
}

/// A write of one piece: `len` bytes of `buf` (already padded for direct I/O) at `offset`.
pub struct WriteRequest {
    pub file: Arc<TaskFile>,
    pub offset: u64,
    pub buf: PieceBuffer,
    pub len: usize,
}

/// A read of one piece into `buf`: its `buf.len()` bytes start at `offset`; `len` bytes are
/// asked for (at least `buf.len()`, rounded up to whole blocks for direct I/O, at most the
/// buffer's capacity).
pub struct ReadRequest {
    pub file: Arc<TaskFile>,
    pub offset: u64,
    pub buf: PieceBuffer,
    pub len: usize,
}

/// The store's disk backend, chosen once at start-up.
pub struct IoEngine {
    backend: Backend,
    faults: Arc<IoFaults>,
    counters: Arc<IoCounters>,
}

enum Backend {
    Uring(uring::UringIo),
    Sync(sync::SyncIo),
}

impl IoEngine {
    pub fn start(pool: &Arc<BufferPool>, choice: IoChoice, threads: usize) -> io::Result<IoEngine> {
        let faults = Arc::new(IoFaults::default());
        let counters = Arc::new(IoCounters::default());
        let uring = || uring::UringIo::start(pool, threads, &faults, &counters);
        let backend = match choice {
            IoChoice::Sync => Backend::Sync(sync::SyncIo),
            IoChoice::Uring => Backend::Uring(uring()?),
            IoChoice::Auto => match uring() {
                Ok(io) => Backend::Uring(io),
                Err(err) => {
                    tracing::warn!(error = %err, "io_uring unavailable; using synchronous reads and writes");
                    Backend::Sync(sync::SyncIo)
                }
            },
        };
        Ok(IoEngine {
            backend,
            faults,
            counters,
        })
    }

    pub fn name(&self) -> &'static str {
        match self.backend {
            Backend::Uring(_) => "io_uring",
            Backend::Sync(_) => "sync",
        }
    }

    /// The test-only fault switches of the io_uring backend (armed in-process).
    pub fn faults(&self) -> &Arc<IoFaults> {
        &self.faults
    }

    /// What this engine has done: reads and their payload copies, ring rebuilds.
    pub fn counters(&self) -> &Arc<IoCounters> {
        &self.counters
    }

    /// Reads a piece straight into `buf` (a pool buffer, registered with io_uring): with a
    /// direct-I/O file the device writes the slots and the CPU copies nothing; a buffered one
    /// costs the kernel's copy out of the page cache. Gives the buffer back with how many of
    /// the piece's `buf.len()` bytes were read (fewer: the file ends early). As with
    /// [`IoEngine::write`], the buffer stays with the operation until it has completed, and
    /// the caller bounds the wait (dropping the future is safe).
    pub async fn read(&self, request: ReadRequest) -> (PieceBuffer, io::Result<usize>) {
        assert!(request.len >= request.buf.len() && request.len <= request.buf.capacity());
        let direct = request.file.is_direct();
        let (buf, result) = match &self.backend {
            Backend::Uring(io) => io.read(request).await,
            Backend::Sync(io) => io.read(request).await,
        };
        if let Ok(read) = &result {
            self.counters.count_read(*read as u64, direct);
        }
        (buf, result)
    }

    /// Writes the piece; the buffer comes back whatever happened, so it is never freed while
    /// the kernel may still read it. Dropping this future before it resolves (a timeout) is
    /// safe: the buffer stays with the operation in flight (the I/O thread, or the blocking
    /// task) and returns to the pool only once the device is done with it.
    pub async fn write(&self, request: WriteRequest) -> (PieceBuffer, io::Result<()>) {
        assert!(request.len <= request.buf.capacity());
        match &self.backend {
            Backend::Uring(io) => io.write(request).await,
            Backend::Sync(io) => io.write(request).await,
        }
    }

    /// Drops any registration of the file (call when it will not be used again). A slot a
    /// queued operation still uses is repointed only after that operation's completion.
    pub fn release_file(&self, file: &TaskFile) {
        if let Backend::Uring(io) = &self.backend {
            io.release_file(file.id());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    async fn write_and_read_back(choice: IoChoice) {
        let dir = tempfile::tempdir().unwrap();
        let pool = BufferPool::new(1 << 20, 8).unwrap();
        let io = IoEngine::start(&pool, choice, 1).unwrap();
        if choice == IoChoice::Auto {
            assert_eq!(
                io.name(),
                "io_uring",
                "io_uring is expected to work on this kernel"
            );
        }
        let file = Arc::new(TaskFile::open(&dir.path().join("content"), true).unwrap());
        for (number, len) in [(0u64, 3 << 20), (1, 100_000)] {
            let mut buf = pool.acquire(len as u64).await.unwrap();
            for (i, chunk) in buf.chunks_mut().into_iter().enumerate() {
                chunk.fill(number as u8 * 16 + i as u8 + 1);
            }
            let write_len = file.write_len(len);
            buf.zero_tail(write_len);
            let (buf, result) = io
                .write(WriteRequest {
                    file: Arc::clone(&file),
                    offset: number * (4 << 20),
                    buf,
                    len: write_len,
                })
                .await;
            result.unwrap();
            let mut back = vec![0u8; len];
            // Read back through the page cache: the direct-I/O handle needs aligned buffers.
            std::fs::File::open(dir.path().join("content"))
                .unwrap()
                .read_exact_at(&mut back, number * (4 << 20))
                .unwrap();
            let expected: Vec<u8> = buf.chunks().concat();
            assert!(back == expected, "{choice:?} piece {number} differs");
        }
        io.release_file(&file);
    }

    #[tokio::test]
    async fn sync_backend_writes() {
        write_and_read_back(IoChoice::Sync).await;
    }

    #[tokio::test]
    async fn auto_backend_writes() {
        write_and_read_back(IoChoice::Auto).await;
    }
}
