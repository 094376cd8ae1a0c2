//! The piece store: one preallocated content file per task, written at piece offsets through
//! the I/O engine, and a journal of held pieces.
//!
//! Durability rule: a piece is recorded in the journal only after its bytes are on disk (the
//! write and an fdatasync completed), and it counts as held only once that record is synced.
//! A daemon killed at any moment therefore restarts knowing exactly what it holds; a torn
//! journal tail is cut off at the last whole record.
//!
//! Layout under the data directory:
//! ```text
//! tasks/<task id>/task.json     geometry, written once (temp file + rename)
//! tasks/<task id>/content       the content, preallocated
//! tasks/<task id>/pieces.log    12-byte records: number, crc32, check
//! ```

use crate::geometry::{format_digest, Geometry, GeometryError, PieceRange};
use crate::io::{BufferPool, IoEngine, PieceBuffer, TaskFile, WriteRequest};
use ferry_fallback_tcp::{PieceMetadata, PieceProvider, ProviderError, ServedPiece, TaskInfo};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

const RECORD_LEN: usize = 12;
const RECORD_MAGIC: u32 = 0x4645_5259; // "FERY"

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(
        "no space left in the data dir for task {task_id} ({needed} bytes needed under {path})"
    )]
    NoSpace {
        task_id: String,
        needed: u64,
        path: PathBuf,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("task {0} is not in the store")]
    NotFound(String),
    #[error("task {task_id} is stored with content length {stored_length} and piece length {stored_piece}, not {length} and {piece}")]
    GeometryConflict {
        task_id: String,
        stored_length: u64,
        stored_piece: u64,
        length: u64,
        piece: u64,
    },
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error("piece {number} has {got} bytes, expected {expected}")]
    WrongLength {
        number: u32,
        got: usize,
        expected: u64,
    },
    #[error("task {0} was deleted")]
    Deleted(String),
    #[error(transparent)]
    Pool(#[from] crate::io::PoolError),
    #[error("task {task_id} is being written by {writer}; one writer at a time")]
    Busy { task_id: String, writer: WriterKind },
    #[error("{path} has task format {found}; this daemon reads format {TASK_FORMAT} or older")]
    UnsupportedFormat { path: PathBuf, found: u32 },
    /// The first failed fdatasync of a task's file: what it covered is lost, and the task is
    /// failed (see [`StoreError::TaskFailed`]).
    #[error("fdatasync of the {file} file of task {task_id} failed (piece {piece} not held; the task takes no more writes): {source}")]
    SyncFailed {
        task_id: String,
        piece: u32,
        file: SyncTarget,
        #[source]
        source: io::Error,
    },
    /// A task whose disk state became unknown (a failed fdatasync, a timed-out write): it takes
    /// no more writes until the daemon restarts and recovers it from its durable journal.
    #[error("task {task_id} has failed and takes no more writes: {reason}")]
    TaskFailed { task_id: String, reason: String },
    /// [`Store::clone_content`] into a task that holds pieces, a clone whose result is not the
    /// task's length, or [`Store::record_cloned_piece`] on a task not cloned into.
    #[error("task {task_id}: {reason}")]
    NotClonable { task_id: String, reason: String },
    #[error("{step} of piece {piece} of task {task_id} took longer than {}s (store.io_timeout_secs); the task is failed, its state on disk unknown", after.as_secs_f64())]
    Timeout {
        task_id: String,
        piece: u32,
        step: IoStep,
        after: Duration,
    },
}

/// Which step of a piece write ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStep {
    /// The write of the bytes to the content file.
    Write,
    /// The fdatasync of the content and the journal record after it.
    Durability,
}

impl std::fmt::Display for IoStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoStep::Write => "the disk write",
            IoStep::Durability => "the fdatasync and journal record",
        })
    }
}

/// A task's file that is fdatasynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncTarget {
    Content,
    Journal,
}

impl std::fmt::Display for SyncTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncTarget::Content => "content",
            SyncTarget::Journal => "journal",
        })
    }
}

/// A fault to inject once into one task's disk operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next fdatasync of that file fails with EIO (without syncing).
    FailSync(SyncTarget),
    /// The next fdatasync of that file blocks this long first.
    StallSync(SyncTarget, Duration),
    /// The next device write of a piece blocks this long first, holding its buffer.
    StallWrite(Duration),
    /// The next `write_piece` panics (for tests of panic handling above the store).
    PanicWrite,
    /// Creating the task's directory blocks this long first.
    StallCreate(Duration),
}

/// Test-only fault switches: armed in-process through [`Store::faults`] (nothing on the
/// network reaches them); each armed fault fires once.
#[derive(Debug, Default)]
pub struct Faults {
    armed: Mutex<Vec<(String, Fault)>>,
    /// Skips the lock on the hot path when nothing is armed.
    any: AtomicBool,
}

impl Faults {
    pub fn arm(&self, task_id: &str, fault: Fault) {
        self.armed
            .lock()
            .expect("faults lock")
            .push((task_id.to_owned(), fault));
        self.any.store(true, Ordering::Release);
    }

    /// The first armed fault for the task that `wanted` accepts, disarmed.
    fn take(&self, task_id: &str, wanted: impl Fn(&Fault) -> bool) -> Option<Fault> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut armed = self.armed.lock().expect("faults lock");
        let at = armed
            .iter()
            .position(|(id, fault)| id == task_id && wanted(fault))?;
        let (_, fault) = armed.remove(at);
        self.any.store(!armed.is_empty(), Ordering::Release);
        Some(fault)
    }

    /// An fdatasync of `file` of the task, with any fault armed for it.
    fn sync(&self, task_id: &str, target: SyncTarget, file: &File) -> io::Result<()> {
        match self.take(
            task_id,
            |f| matches!(f, Fault::FailSync(t) | Fault::StallSync(t, _) if *t == target),
        ) {
            Some(Fault::FailSync(_)) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Some(Fault::StallSync(_, stall)) => std::thread::sleep(stall),
            _ => {}
        }
        file.sync_data()
    }
}

/// How the store runs; [`Store::open`] takes the defaults but for `direct_io`.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// O_DIRECT writes where the filesystem supports them.
    pub direct_io: bool,
    /// Longest a piece's disk write, or its fdatasync and journal record, may take.
    pub io_timeout: Duration,
    /// Tasks whose descriptors may stay open at once (0: derived from RLIMIT_NOFILE).
    pub max_open_tasks: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            direct_io: true,
            io_timeout: Duration::from_secs(60),
            max_open_tasks: 0,
        }
    }
}

/// Descriptors each task may hold: the content for writes and for reads, the journal.
const FDS_PER_TASK: u64 = 3;
/// Descriptors left for everything else (sockets, the pool, rings, logs).
const FDS_RESERVED: u64 = 256;

/// `max_open_tasks` when the options leave it to the descriptor limit.
fn derived_open_tasks() -> usize {
    let limit = crate::io::open_file_limit().unwrap_or(1024);
    (limit.saturating_sub(FDS_RESERVED) / FDS_PER_TASK).clamp(8, 1 << 20) as usize
}

/// A task's descriptors, opened on first use and closed again by [`OpenFiles`]. Users take
/// an `Arc` clone for as long as they use one, so closing never pulls a descriptor from
/// under a write or a piece being served: it closes when the last clone goes.
#[derive(Default)]
struct Handles {
    /// The content through the page cache, for serving.
    read: Option<Arc<File>>,
    write: Option<Arc<WriteHandles>>,
}

struct WriteHandles {
    content: Arc<TaskFile>,
    /// Appended under the task's journal lock, synced without it.
    journal: File,
}

/// Keeps at most `limit` tasks' descriptors open: opening one more closes those of the least
/// recently used task not in use (none in use: the limit is passed for a while).
struct OpenFiles {
    limit: usize,
    direct_io: bool,
    io: Arc<IoEngine>,
    clock: AtomicU64,
    open: Mutex<HashMap<String, Weak<StoredTask>>>,
}

impl OpenFiles {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// `task` has just opened descriptors: count it, and close others past the limit.
    fn opened(&self, task: &Arc<StoredTask>) {
        let mut open = self.open.lock().expect("open files lock");
        open.insert(task.id.clone(), Arc::downgrade(task));
        if open.len() <= self.limit {
            return;
        }
        let mut candidates: Vec<(u64, Arc<StoredTask>)> = Vec::new();
        open.retain(|id, weak| match weak.upgrade() {
            Some(other) => {
                if *id != task.id {
                    candidates.push((other.last_used.load(Ordering::Relaxed), other));
                }
                true
            }
            None => false,
        });
        candidates.sort_unstable_by_key(|(used, _)| *used);
        for (_, victim) in candidates {
            if open.len() <= self.limit {
                break;
            }
            if victim.close_idle(&self.io) {
                open.remove(&victim.id);
            }
        }
    }

    fn forget(&self, task_id: &str) {
        self.open.lock().expect("open files lock").remove(task_id);
    }

    fn count(&self) -> usize {
        self.open.lock().expect("open files lock").len()
    }
}

impl StoreError {
    fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// What [`Store::clone_content`] did.
#[derive(Debug)]
pub enum Cloned {
    /// The content is a durable reflink of the source.
    Yes,
    /// Reflinks are not possible here (the error the kernel gave); nothing was changed.
    Unsupported(io::Error),
}

/// A failed FICLONE that means "not possible here": a filesystem without reflinks
/// (EOPNOTSUPP, or EINVAL from some), two filesystems (EXDEV), no FICLONE at all (ENOTTY,
/// ENOSYS). The kernel refuses these before it changes the target.
fn reflink_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

fn is_no_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// The task.json format this daemon writes; a newer one is refused (and quarantined), never
/// guessed at.
const TASK_FORMAT: u32 = 1;

fn first_format() -> u32 {
    1
}

#[derive(Debug, Serialize, Deserialize)]
struct TaskMeta {
    #[serde(default = "first_format")]
    format: u32,
    task_id: String,
    content_length: u64,
    piece_length: u64,
}

/// Who is writing into a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterKind {
    Transfer,
    Import,
}

impl std::fmt::Display for WriterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriterKind::Transfer => "a transfer",
            WriterKind::Import => "an import",
        })
    }
}

/// The one writer of a task, for as long as it is held; dropping it (also on unwind) lets the
/// next one in.
#[must_use = "the task is free for other writers once the guard is dropped"]
pub struct WriteGuard {
    task: Arc<StoredTask>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        *self.task.writer.lock().expect("writer lock") = None;
    }
}

/// A task dir that could not be loaded, moved aside with its bytes intact.
#[derive(Debug, Clone)]
pub struct QuarantinedTask {
    /// Where it was, under tasks/.
    pub name: String,
    /// Where it is now (under quarantine/), or still under tasks/ if moving it failed.
    pub path: PathBuf,
    pub reason: String,
}

struct PieceState {
    digests: Vec<Option<u32>>,
    held: u32,
}

/// One task in the store.
pub struct StoredTask {
    id: String,
    geometry: Geometry,
    dir: PathBuf,
    handles: Mutex<Handles>,
    /// When the handles were last taken, on the [`OpenFiles`] clock.
    last_used: AtomicU64,
    files: Arc<OpenFiles>,
    pieces: Mutex<PieceState>,
    /// Held while appending to (or cutting) the piece journal.
    journal_lock: Mutex<()>,
    journal_sync: GroupSync,
    /// Pieces written to the content file share its fdatasyncs the same way.
    content_sync: GroupSync,
    served: AtomicU64,
    deleted: AtomicBool,
    /// Set at the first failed fdatasync or timed-out write: why the task takes no more writes.
    failure: OnceLock<String>,
    /// Journal bytes appended, and how many of them an fdatasync is known to have covered.
    journal_appended: AtomicU64,
    journal_durable: AtomicU64,
    faults: Arc<Faults>,
    /// Who writes into this task now (one writer at a time; see [`WriteGuard`]).
    writer: Mutex<Option<WriterKind>>,
    /// Set once [`Store::clone_content`] made the content a durable reflink of a file: its
    /// pieces may then be recorded with [`Store::record_cloned_piece`].
    cloned: AtomicBool,
}

impl StoredTask {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn held(&self, number: u32) -> Option<u32> {
        self.pieces
            .lock()
            .expect("pieces lock")
            .digests
            .get(number as usize)
            .copied()
            .flatten()
    }

    pub fn held_count(&self) -> u32 {
        self.pieces.lock().expect("pieces lock").held
    }

    pub fn held_digests(&self) -> Vec<Option<u32>> {
        self.pieces.lock().expect("pieces lock").digests.clone()
    }

    pub fn is_complete(&self) -> bool {
        self.held_count() == self.geometry.piece_count()
    }

    pub fn pieces_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    pub fn count_served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// The content file opened for reading (page cache), shared with the servers; opened
    /// now if the task's descriptors were closed.
    pub fn read_file(self: &Arc<Self>) -> io::Result<Arc<File>> {
        self.last_used.store(self.files.tick(), Ordering::Relaxed);
        let mut handles = self.handles.lock().expect("handles lock");
        if let Some(read) = &handles.read {
            return Ok(Arc::clone(read));
        }
        let read = Arc::new(File::open(self.content_path())?);
        let first = handles.write.is_none();
        handles.read = Some(Arc::clone(&read));
        drop(handles);
        if first {
            self.files.opened(self);
        }
        Ok(read)
    }

    /// The content file for piece writes and the journal; opened now if they were closed.
    fn write_handles(self: &Arc<Self>) -> io::Result<Arc<WriteHandles>> {
        self.last_used.store(self.files.tick(), Ordering::Relaxed);
        let mut handles = self.handles.lock().expect("handles lock");
        if let Some(write) = &handles.write {
            return Ok(Arc::clone(write));
        }
        let content = TaskFile::open(&self.content_path(), self.files.direct_io)?;
        let journal = OpenOptions::new()
            .append(true)
            .open(self.dir.join("pieces.log"))?;
        let write = Arc::new(WriteHandles {
            content: Arc::new(content),
            journal,
        });
        let first = handles.read.is_none();
        handles.write = Some(Arc::clone(&write));
        drop(handles);
        if first {
            self.files.opened(self);
        }
        Ok(write)
    }

    /// Closes the task's descriptors unless someone uses them now; whether it did.
    fn close_idle(&self, io: &IoEngine) -> bool {
        let Ok(mut handles) = self.handles.try_lock() else {
            return false;
        };
        let busy = handles
            .read
            .as_ref()
            .is_some_and(|r| Arc::strong_count(r) > 1)
            || handles
                .write
                .as_ref()
                .is_some_and(|w| Arc::strong_count(w) > 1);
        if busy {
            return false;
        }
        handles.read = None;
        if let Some(write) = handles.write.take() {
            io.release_file(&write.content);
        }
        true
    }

    /// Drops the write descriptors (a complete or deleted task is not written again).
    fn close_write(&self, io: &IoEngine) {
        let write = self.handles.lock().expect("handles lock").write.take();
        if let Some(write) = write {
            io.release_file(&write.content);
        }
    }

    pub fn content_path(&self) -> PathBuf {
        self.dir.join("content")
    }

    /// The task's directory (its manifest lives there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Becomes the task's one writer, or says who already is.
    pub fn try_begin_writing(self: &Arc<Self>, who: WriterKind) -> Result<WriteGuard, StoreError> {
        let mut writer = self.writer.lock().expect("writer lock");
        if let Some(writer) = *writer {
            return Err(StoreError::Busy {
                task_id: self.id.clone(),
                writer,
            });
        }
        *writer = Some(who);
        Ok(WriteGuard {
            task: Arc::clone(self),
        })
    }

    /// Who writes into the task now, if anyone.
    pub fn writer(&self) -> Option<WriterKind> {
        *self.writer.lock().expect("writer lock")
    }

    /// Why the task failed (it then takes no writes), if it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    fn fail(&self, reason: String) {
        if self.failure.set(reason).is_ok() {
            tracing::error!(task_id = %self.id, reason = self.failure().unwrap_or_default(), "task failed: it takes no more writes until the daemon restarts");
        }
    }

    fn failed_error(&self) -> Option<StoreError> {
        self.failure().map(|reason| StoreError::TaskFailed {
            task_id: self.id.clone(),
            reason: reason.to_owned(),
        })
    }
}

/// The store: every task under the data dir.
pub struct Store {
    tasks_dir: PathBuf,
    data_dir: PathBuf,
    io: Arc<IoEngine>,
    pool: Arc<BufferPool>,
    direct_io: bool,
    io_timeout: Duration,
    faults: Arc<Faults>,
    tasks: RwLock<HashMap<String, Arc<StoredTask>>>,
    /// One gate per task being created, so creating it holds no store-wide lock.
    creating: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    files: Arc<OpenFiles>,
    quarantined: Mutex<Vec<QuarantinedTask>>,
}

impl Store {
    /// Opens the store with the default options (but `direct_io`); see [`Store::open_with`].
    pub fn open(
        data_dir: &Path,
        pool: Arc<BufferPool>,
        io: IoEngine,
        direct_io: bool,
    ) -> Result<Store, StoreError> {
        let options = StoreOptions {
            direct_io,
            ..StoreOptions::default()
        };
        Store::open_with(data_dir, pool, io, options)
    }

    /// Opens the store and recovers every task's held pieces from its journal.
    pub fn open_with(
        data_dir: &Path,
        pool: Arc<BufferPool>,
        io: IoEngine,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let tasks_dir = data_dir.join("tasks");
        fs::create_dir_all(&tasks_dir)
            .map_err(|e| StoreError::io(format!("creating {}", tasks_dir.display()), e))?;
        let io = Arc::new(io);
        let limit = match options.max_open_tasks {
            0 => derived_open_tasks(),
            set => set,
        };
        let files = Arc::new(OpenFiles {
            limit,
            direct_io: options.direct_io,
            io: Arc::clone(&io),
            clock: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        });
        let store = Store {
            tasks_dir: tasks_dir.clone(),
            data_dir: data_dir.to_owned(),
            io,
            files,
            creating: Mutex::new(HashMap::new()),
            pool,
            direct_io: options.direct_io,
            io_timeout: options.io_timeout,
            faults: Arc::default(),
            tasks: RwLock::new(HashMap::new()),
            quarantined: Mutex::new(Vec::new()),
        };
        let entries = fs::read_dir(&tasks_dir)
            .map_err(|e| StoreError::io(format!("reading {}", tasks_dir.display()), e))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            match store.load_task(&dir) {
                Ok(task) => {
                    tracing::info!(task_id = %task.id, held = task.held_count(), pieces = task.geometry.piece_count(), "recovered task");
                    store
                        .tasks
                        .write()
                        .expect("tasks lock")
                        .insert(task.id.clone(), task);
                }
                Err(err) => store.set_aside(&dir, &err.to_string()),
            }
        }
        Ok(store)
    }

    /// Task dirs found unusable at start-up, moved to `<data_dir>/quarantine/`.
    pub fn quarantined(&self) -> Vec<QuarantinedTask> {
        self.quarantined.lock().expect("quarantine lock").clone()
    }

    /// A task dir that cannot be used: removed only if it provably holds nothing (creation
    /// never got to task.json, so no piece was ever journaled); anything else is moved under
    /// quarantine/ with its bytes, whatever the reason (EMFILE, EACCES, a newer format).
    fn set_aside(&self, dir: &Path, reason: &str) {
        let journal_empty = fs::metadata(dir.join("pieces.log")).map_or(true, |m| m.len() == 0);
        if !dir.join("task.json").exists() && !dir.join("task.tmp").exists() && journal_empty {
            tracing::warn!(dir = %dir.display(), error = reason, "removing a task dir whose creation never finished (no task.json, no journaled piece)");
            let _ = fs::remove_dir_all(dir);
            return;
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let moved = self.move_to_quarantine(dir, &name);
        let path = match &moved {
            Ok(path) => {
                tracing::warn!(dir = %dir.display(), quarantined = %path.display(), error = reason, "task dir unusable: moved to quarantine with its bytes");
                path.clone()
            }
            Err(err) => {
                tracing::error!(dir = %dir.display(), error = reason, move_error = %err, "task dir unusable and could not be moved to quarantine: left in place, not loaded");
                dir.to_owned()
            }
        };
        self.quarantined
            .lock()
            .expect("quarantine lock")
            .push(QuarantinedTask {
                name,
                path,
                reason: reason.to_owned(),
            });
    }

    fn move_to_quarantine(&self, dir: &Path, name: &str) -> io::Result<PathBuf> {
        let quarantine = self.data_dir.join("quarantine");
        fs::create_dir_all(&quarantine)?;
        let mut target = quarantine.join(name);
        let mut n = 1;
        while target.symlink_metadata().is_ok() {
            target = quarantine.join(format!("{name}.{n}"));
            n += 1;
        }
        fs::rename(dir, &target)?;
        sync_dir(&quarantine)?;
        sync_dir(&self.tasks_dir)?;
        Ok(target)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn io_backend(&self) -> &'static str {
        self.io.name()
    }

    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// The test-only fault switches of this store's disk operations.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    /// How many tasks' descriptors may be open at once.
    pub fn max_open_tasks(&self) -> usize {
        self.files.limit
    }

    /// How many tasks have descriptors open now.
    pub fn open_tasks(&self) -> usize {
        self.files.count()
    }

    fn load_task(&self, dir: &Path) -> Result<Arc<StoredTask>, StoreError> {
        let meta_path = dir.join("task.json");
        let meta: TaskMeta = serde_json::from_slice(
            &fs::read(&meta_path)
                .map_err(|e| StoreError::io(format!("reading {}", meta_path.display()), e))?,
        )
        .map_err(|e| {
            StoreError::io(
                format!("parsing {}", meta_path.display()),
                io::Error::other(e),
            )
        })?;
        if meta.format > TASK_FORMAT {
            return Err(StoreError::UnsupportedFormat {
                path: meta_path,
                found: meta.format,
            });
        }
        let geometry = Geometry::new(meta.content_length, meta.piece_length)?;
        let journal_path = dir.join("pieces.log");
        // Read and closed again: descriptors are opened when the task is used.
        let mut journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&journal_path)
            .map_err(|e| StoreError::io(format!("opening {}", journal_path.display()), e))?;
        let mut bytes = Vec::new();
        journal
            .read_to_end(&mut bytes)
            .map_err(|e| StoreError::io("reading journal", e))?;
        let mut digests = vec![None; geometry.piece_count() as usize];
        let mut valid = 0;
        for record in bytes.chunks_exact(RECORD_LEN) {
            let number = u32::from_le_bytes(record[0..4].try_into().expect("4"));
            let crc = u32::from_le_bytes(record[4..8].try_into().expect("4"));
            let check = u32::from_le_bytes(record[8..12].try_into().expect("4"));
            if check != crc32fast::hash(&record[..8]) ^ RECORD_MAGIC
                || number >= geometry.piece_count()
            {
                break;
            }
            digests[number as usize] = Some(crc);
            valid += RECORD_LEN;
        }
        if valid < bytes.len() {
            tracing::warn!(journal = %journal_path.display(), kept = valid, dropped = bytes.len() - valid, "cutting torn journal tail");
            journal
                .set_len(valid as u64)
                .map_err(|e| StoreError::io("truncating journal", e))?;
            journal
                .sync_all()
                .map_err(|e| StoreError::io("syncing journal", e))?;
        }
        let held = digests.iter().filter(|d| d.is_some()).count() as u32;
        drop(journal);
        let task = self.task_handle(
            dir,
            meta.task_id,
            geometry,
            valid as u64,
            PieceState { digests, held },
        );
        if task.is_complete() {
            self.finish(&task)?;
        }
        Ok(task)
    }

    fn task_handle(
        &self,
        dir: &Path,
        id: String,
        geometry: Geometry,
        journal_len: u64,
        pieces: PieceState,
    ) -> Arc<StoredTask> {
        Arc::new(StoredTask {
            id,
            geometry,
            dir: dir.to_owned(),
            handles: Mutex::new(Handles::default()),
            last_used: AtomicU64::new(0),
            files: Arc::clone(&self.files),
            pieces: Mutex::new(pieces),
            journal_lock: Mutex::new(()),
            journal_sync: GroupSync::default(),
            content_sync: GroupSync::default(),
            served: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            failure: OnceLock::new(),
            journal_appended: AtomicU64::new(journal_len),
            journal_durable: AtomicU64::new(journal_len),
            faults: Arc::clone(&self.faults),
            writer: Mutex::new(None),
            cloned: AtomicBool::new(false),
        })
    }

    pub fn get(&self, task_id: &str) -> Option<Arc<StoredTask>> {
        self.tasks.read().expect("tasks lock").get(task_id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<StoredTask>> {
        let mut tasks: Vec<_> = self
            .tasks
            .read()
            .expect("tasks lock")
            .values()
            .cloned()
            .collect();
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        tasks
    }

    /// The task, created (content file preallocated) if the store does not have it yet.
    /// Creating it (fallocate, fsyncs) holds only that task id's gate, never the map lock
    /// that every other task's lookups take.
    pub fn create_or_get(
        &self,
        task_id: &str,
        geometry: Geometry,
    ) -> Result<Arc<StoredTask>, StoreError> {
        if let Some(task) = self.get(task_id) {
            return same_geometry(task, geometry);
        }
        let gate = Arc::clone(
            self.creating
                .lock()
                .expect("creating lock")
                .entry(task_id.to_owned())
                .or_default(),
        );
        let created = {
            let _creating = gate.lock().expect("creation gate");
            match self.get(task_id) {
                // Created by whoever held the gate before.
                Some(task) => Ok(task),
                None => {
                    let dir = self.tasks_dir.join(task_id);
                    self.create_task_dir(&dir, task_id, geometry)
                        .inspect(|task| {
                            self.tasks
                                .write()
                                .expect("tasks lock")
                                .insert(task_id.to_owned(), Arc::clone(task));
                        })
                }
            }
        };
        {
            let mut creating = self.creating.lock().expect("creating lock");
            if creating
                .get(task_id)
                .is_some_and(|entry| Arc::ptr_eq(entry, &gate))
            {
                creating.remove(task_id);
            }
        }
        same_geometry(created?, geometry)
    }

    fn create_task_dir(
        &self,
        dir: &Path,
        task_id: &str,
        geometry: Geometry,
    ) -> Result<Arc<StoredTask>, StoreError> {
        if dir.symlink_metadata().is_ok() {
            // Not in the map but on disk: set aside like at start-up, never deleted blindly.
            self.set_aside(dir, "found on disk when creating the task");
            if dir.symlink_metadata().is_ok() {
                return Err(StoreError::io(
                    format!("creating {}", dir.display()),
                    io::Error::from(io::ErrorKind::AlreadyExists),
                ));
            }
        }
        if let Some(Fault::StallCreate(stall)) = self
            .faults
            .take(task_id, |f| matches!(f, Fault::StallCreate(_)))
        {
            std::thread::sleep(stall);
        }
        fs::create_dir(dir)
            .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        let filled = self.fill_task_dir(dir, task_id, geometry);
        if filled.is_err() {
            // Only what this call created just now.
            let _ = fs::remove_dir_all(dir);
        }
        filled
    }

    fn fill_task_dir(
        &self,
        dir: &Path,
        task_id: &str,
        geometry: Geometry,
    ) -> Result<Arc<StoredTask>, StoreError> {
        // The new entry in tasks/ must survive a crash as surely as the files in it.
        sync_dir(&self.tasks_dir).map_err(|e| StoreError::io("syncing the tasks dir", e))?;
        let content = dir.join("content");
        let file = File::create(&content)
            .map_err(|e| StoreError::io(format!("creating {}", content.display()), e))?;
        if geometry.content_length() > 0 {
            // Reserve every block now: a full disk fails here, before any byte is fetched.
            nix::fcntl::fallocate(
                &file,
                nix::fcntl::FallocateFlags::empty(),
                0,
                geometry.content_length() as i64,
            )
            .map_err(|errno| {
                let err = io::Error::from(errno);
                if is_no_space(&err) {
                    StoreError::NoSpace {
                        task_id: task_id.into(),
                        needed: geometry.content_length(),
                        path: self.data_dir.clone(),
                    }
                } else {
                    StoreError::io(format!("preallocating {}", content.display()), err)
                }
            })?;
        }
        file.sync_all()
            .map_err(|e| StoreError::io(format!("syncing {}", content.display()), e))?;
        drop(file);
        File::create(dir.join("pieces.log")).map_err(|e| StoreError::io("creating journal", e))?;
        let meta = TaskMeta {
            format: TASK_FORMAT,
            task_id: task_id.into(),
            content_length: geometry.content_length(),
            piece_length: geometry.piece_length(),
        };
        write_atomically(
            &dir.join("task.json"),
            &serde_json::to_vec_pretty(&meta).expect("serializable"),
        )
        .map_err(|e| {
            self.map_write_error(task_id, geometry.content_length(), "writing task.json", e)
        })?;
        let pieces = PieceState {
            digests: vec![None; geometry.piece_count() as usize],
            held: 0,
        };
        Ok(self.task_handle(dir, task_id.into(), geometry, 0, pieces))
    }

    fn map_write_error(
        &self,
        task_id: &str,
        needed: u64,
        context: &str,
        err: io::Error,
    ) -> StoreError {
        if is_no_space(&err) {
            StoreError::NoSpace {
                task_id: task_id.into(),
                needed,
                path: self.data_dir.clone(),
            }
        } else {
            StoreError::io(context, err)
        }
    }

    /// Writes a verified piece and records it as held once durable. The buffer comes back
    /// for reuse, unless the write timed out: then it stays with the device operation still in
    /// flight (returning to the pool when that completes) and `None` comes back.
    ///
    /// A failed fdatasync or a timeout fails the task (PostgreSQL's rule: a retried fsync may
    /// report success for data the kernel already dropped): no piece it covered is held, and
    /// every later write returns [`StoreError::TaskFailed`].
    pub async fn write_piece(
        &self,
        task: &Arc<StoredTask>,
        piece: PieceRange,
        mut buf: PieceBuffer,
        crc: u32,
    ) -> (Option<PieceBuffer>, Result<(), StoreError>) {
        let number = piece.number;
        if buf.len() as u64 != piece.length {
            let err = StoreError::WrongLength {
                number,
                got: buf.len(),
                expected: piece.length,
            };
            return (Some(buf), Err(err));
        }
        if task.deleted.load(Ordering::Acquire) {
            return (Some(buf), Err(StoreError::Deleted(task.id.clone())));
        }
        if let Some(err) = task.failed_error() {
            return (Some(buf), Err(err));
        }
        if task.held(number).is_some() {
            return (Some(buf), Ok(()));
        }
        let handles = match task.write_handles() {
            Ok(handles) => handles,
            Err(err) => {
                let doing = format!("opening the files of task {}", task.id);
                return (Some(buf), Err(StoreError::io(doing, err)));
            }
        };
        match self.faults.take(&task.id, |f| {
            matches!(f, Fault::PanicWrite | Fault::StallWrite(_))
        }) {
            Some(Fault::PanicWrite) => panic!(
                "injected fault: writing piece {number} of task {} panics",
                task.id
            ),
            Some(Fault::StallWrite(stall)) => handles.content.stall_next_write(stall),
            _ => {}
        }
        let len = handles.content.write_len(buf.len());
        buf.zero_tail(len);
        let request = WriteRequest {
            file: Arc::clone(&handles.content),
            offset: piece.offset,
            buf,
            len,
        };
        // On timeout the dropped future leaves the buffer with the operation in flight.
        let Ok((buf, written)) =
            tokio::time::timeout(self.io_timeout, self.io.write(request)).await
        else {
            return (None, Err(self.timed_out(task, number, IoStep::Write)));
        };
        if let Err(err) = written {
            let doing = format!("writing piece {number} of {}", task.id);
            let err = self.map_write_error(&task.id, piece.length, &doing, err);
            return (Some(buf), Err(err));
        }
        // One trip to a blocking thread: the data made durable (an fdatasync shared with the
        // pieces finishing beside it), then its journal record (the same, for records).
        let durable = {
            let task = Arc::clone(task);
            move || {
                task.content_sync
                    .sync(|| {
                        task.faults
                            .sync(&task.id, SyncTarget::Content, handles.content.file())
                    })
                    .map_err(|e| (SyncTarget::Content, e))?;
                task.append_record(number, crc)
                    .map_err(|e| (SyncTarget::Journal, e))
            }
        };
        (
            Some(buf),
            self.hold_when_durable(task, piece, crc, durable).await,
        )
    }

    /// The timeout of `step` of piece `number`, which fails the task.
    fn timed_out(&self, task: &StoredTask, number: u32, step: IoStep) -> StoreError {
        let err = StoreError::Timeout {
            task_id: task.id.clone(),
            piece: number,
            step,
            after: self.io_timeout,
        };
        task.fail(err.to_string());
        err
    }

    /// The last step of every piece the store takes, written or cloned: `durable` makes the
    /// piece's bytes and then its journal record durable (on a blocking thread, within the
    /// I/O timeout), and only then is the piece held. A failure, a timeout or a panic of it
    /// fails the task.
    async fn hold_when_durable(
        &self,
        task: &Arc<StoredTask>,
        piece: PieceRange,
        crc: u32,
        durable: impl FnOnce() -> Result<(), (SyncTarget, io::Error)> + Send + 'static,
    ) -> Result<(), StoreError> {
        let number = piece.number;
        let durable = tokio::task::spawn_blocking(durable);
        let durable = match tokio::time::timeout(self.io_timeout, durable).await {
            Err(_) => return Err(self.timed_out(task, number, IoStep::Durability)),
            Ok(Err(join)) => {
                task.fail(format!("making piece {number} durable panicked: {join}"));
                return Err(task.failed_error().expect("just failed"));
            }
            Ok(Ok(durable)) => durable,
        };
        if let Err((file, source)) = durable {
            task.fail(format!("fdatasync of its {file} file failed: {source}"));
            return Err(if is_no_space(&source) {
                StoreError::NoSpace {
                    task_id: task.id.clone(),
                    needed: piece.length,
                    path: self.data_dir.clone(),
                }
            } else {
                StoreError::SyncFailed {
                    task_id: task.id.clone(),
                    piece: number,
                    file,
                    source,
                }
            });
        }
        let complete = {
            let mut state = task.pieces.lock().expect("pieces lock");
            if state.digests[number as usize].replace(crc).is_none() {
                state.held += 1;
            }
            state.held == task.geometry.piece_count()
        };
        if complete {
            self.finish(task)?;
        }
        Ok(())
    }

    /// Makes the content file of `task`, which holds no piece yet, a copy-on-write clone
    /// (FICLONE) of all of `source`, which has the task's length, and makes that durable:
    /// an fdatasync through the same group sync and fault switches as written pieces, whose
    /// failure fails the task the same way. The preallocated blocks are given back for the
    /// shared ones. Nothing is held yet: [`Store::record_cloned_piece`] then records each
    /// piece, once its digest is known. The caller is the task's writer
    /// ([`StoredTask::try_begin_writing`]).
    ///
    /// [`Cloned::Unsupported`] when this filesystem (or this pair of filesystems) cannot
    /// reflink: the kernel refused before touching the content, and the pieces are to be
    /// written instead. A crash at any point leaves no piece held, so the content's bytes
    /// in between do not matter.
    pub async fn clone_content(
        &self,
        task: &Arc<StoredTask>,
        source: Arc<File>,
    ) -> Result<Cloned, StoreError> {
        if task.deleted.load(Ordering::Acquire) {
            return Err(StoreError::Deleted(task.id.clone()));
        }
        if let Some(err) = task.failed_error() {
            return Err(err);
        }
        let refuse = |reason: String| StoreError::NotClonable {
            task_id: task.id.clone(),
            reason,
        };
        if task.held_count() > 0 {
            return Err(refuse(format!(
                "it holds {} pieces: only a task holding none is cloned into",
                task.held_count()
            )));
        }
        let length = task.geometry.content_length();
        let path = task.content_path();
        let cloned = {
            let task = Arc::clone(task);
            // The error says whether it was the fdatasync (which fails the task) and what.
            tokio::task::spawn_blocking(move || -> Result<Cloned, (bool, &str, io::Error)> {
                let target = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| (false, "opening the content", e))?;
                match crate::io::reflink(&source, &target) {
                    Ok(()) => {}
                    Err(err) if reflink_unsupported(&err) => return Ok(Cloned::Unsupported(err)),
                    Err(err) => return Err((false, "reflinking the content", err)),
                }
                let now = target
                    .metadata()
                    .map_err(|e| (false, "stat content", e))?
                    .len();
                if now != length {
                    let err = io::Error::other(format!("{now} bytes, not {length}"));
                    return Err((false, "the reflinked content (the source changed)", err));
                }
                task.content_sync
                    .sync(|| task.faults.sync(&task.id, SyncTarget::Content, &target))
                    .map_err(|e| (true, "fdatasync of the reflinked content", e))?;
                Ok(Cloned::Yes)
            })
        };
        let cloned = match tokio::time::timeout(self.io_timeout, cloned).await {
            Err(_) => {
                task.fail(format!(
                    "reflinking its content took longer than {}s (store.io_timeout_secs); its state on disk is unknown",
                    self.io_timeout.as_secs_f64()
                ));
                return Err(task.failed_error().expect("just failed"));
            }
            Ok(Err(join)) => {
                task.fail(format!("reflinking its content panicked: {join}"));
                return Err(task.failed_error().expect("just failed"));
            }
            Ok(Ok(cloned)) => cloned,
        };
        match cloned {
            Ok(Cloned::Yes) => {
                task.cloned.store(true, Ordering::Release);
                Ok(Cloned::Yes)
            }
            Ok(unsupported) => Ok(unsupported),
            // A failed fdatasync is final (see `write_piece`): the task takes no more writes.
            Err((true, step, err)) => {
                task.fail(format!("{step} failed: {err}"));
                Err(task.failed_error().expect("just failed"))
            }
            // Nothing is held, so nothing is lost: a later import may clone or copy again.
            Err((false, step, err)) => Err(self.map_write_error(&task.id, length, step, err)),
        }
    }

    /// Records piece `number` of a task cloned into by [`Store::clone_content`] as held with
    /// digest `crc` (read back from the task's content): the journal step of `write_piece`
    /// (record appended, group-synced, held only once synced; a failure fails the task), its
    /// bytes already durable.
    pub async fn record_cloned_piece(
        &self,
        task: &Arc<StoredTask>,
        number: u32,
        crc: u32,
    ) -> Result<(), StoreError> {
        let piece = task.geometry.piece(number)?;
        if task.deleted.load(Ordering::Acquire) {
            return Err(StoreError::Deleted(task.id.clone()));
        }
        if let Some(err) = task.failed_error() {
            return Err(err);
        }
        if !task.cloned.load(Ordering::Acquire) {
            return Err(StoreError::NotClonable {
                task_id: task.id.clone(),
                reason: format!(
                    "piece {number} recorded as cloned, but the content was not cloned into"
                ),
            });
        }
        if task.held(number).is_some() {
            return Ok(());
        }
        let durable = {
            let task = Arc::clone(task);
            move || {
                task.append_record(number, crc)
                    .map_err(|e| (SyncTarget::Journal, e))
            }
        };
        self.hold_when_durable(task, piece, crc, durable).await
    }

    /// A complete task: cut direct-I/O padding off the end and close its write descriptors.
    fn finish(&self, task: &StoredTask) -> Result<(), StoreError> {
        let path = task.content_path();
        let length = task.geometry.content_length();
        let actual = fs::metadata(&path)
            .map_err(|e| StoreError::io("stat content", e))?
            .len();
        if actual != length {
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| StoreError::io("opening content", e))?;
            file.set_len(length)
                .map_err(|e| StoreError::io("truncating content", e))?;
            file.sync_all()
                .map_err(|e| StoreError::io("syncing content", e))?;
        }
        task.close_write(&self.io);
        Ok(())
    }

    /// Removes the task and its bytes.
    pub fn delete(&self, task_id: &str) -> Result<(), StoreError> {
        let task = self
            .tasks
            .write()
            .expect("tasks lock")
            .remove(task_id)
            .ok_or_else(|| StoreError::NotFound(task_id.into()))?;
        task.deleted.store(true, Ordering::Release);
        task.close_write(&self.io);
        self.files.forget(&task.id);
        fs::remove_dir_all(&task.dir)
            .map_err(|e| StoreError::io(format!("removing {}", task.dir.display()), e))
    }
}

impl StoredTask {
    /// Appends a held piece's record and makes it durable. Any failure fails the task and cuts
    /// the journal back to what an fdatasync is known to have covered: a record left in the
    /// page cache must not come back as held after a restart.
    fn append_record(self: &Arc<Self>, number: u32, crc: u32) -> io::Result<()> {
        let mut record = [0u8; RECORD_LEN];
        record[0..4].copy_from_slice(&number.to_le_bytes());
        record[4..8].copy_from_slice(&crc.to_le_bytes());
        let check = crc32fast::hash(&record[..8]) ^ RECORD_MAGIC;
        record[8..12].copy_from_slice(&check.to_le_bytes());
        let handles = self.write_handles()?;
        let appended = {
            let _journal = self.journal_lock.lock().expect("journal lock");
            if let Some(reason) = self.failure() {
                return Err(io::Error::other(format!("task failed: {reason}")));
            }
            (&handles.journal).write_all(&record).map(|()| {
                self.journal_appended
                    .fetch_add(RECORD_LEN as u64, Ordering::AcqRel);
            })
        };
        let result = appended.and_then(|()| {
            self.journal_sync.sync(|| {
                let upto = self.journal_appended.load(Ordering::Acquire);
                self.faults
                    .sync(&self.id, SyncTarget::Journal, &handles.journal)?;
                self.journal_durable.fetch_max(upto, Ordering::AcqRel);
                Ok(())
            })
        });
        if let Err(err) = &result {
            self.fail(format!("the piece journal failed: {err}"));
            self.cut_journal_to_durable(&handles.journal);
        }
        result
    }

    fn cut_journal_to_durable(&self, journal: &File) {
        let _journal = self.journal_lock.lock().expect("journal lock");
        let durable = self.journal_durable.load(Ordering::Acquire);
        if let Err(err) = journal.set_len(durable).and_then(|()| journal.sync_all()) {
            tracing::error!(task_id = %self.id, error = %err, durable, "could not cut the journal back to its durable length; a restart may recover records whose sync failed");
        }
    }
}

/// Group commit on one file: a caller whose write has completed waits for an fdatasync that
/// started after that; whoever syncs covers every caller that came before it, so writes
/// finishing together share one device flush instead of queueing one each.
///
/// The first failed flush is final: that caller, every caller waiting on it and every later
/// one get the error. A flush retried after a failure may succeed without the lost writes
/// (the kernel drops dirty pages on a writeback error), so nothing is ever retried.
#[derive(Default)]
struct GroupSync {
    /// (writes completed so far, writes known durable)
    counts: Mutex<(u64, u64)>,
    /// Held by the one caller syncing for everyone; holds the failure once there is one.
    leader: Mutex<Option<SyncFailure>>,
}

/// A failed flush, kept to report to every caller after it.
#[derive(Debug, Clone)]
struct SyncFailure {
    raw: Option<i32>,
    kind: io::ErrorKind,
    text: String,
}

impl SyncFailure {
    fn of(err: &io::Error) -> SyncFailure {
        SyncFailure {
            raw: err.raw_os_error(),
            kind: err.kind(),
            text: err.to_string(),
        }
    }

    fn error(&self) -> io::Error {
        match self.raw {
            Some(raw) => io::Error::from_raw_os_error(raw),
            None => io::Error::new(self.kind, self.text.clone()),
        }
    }
}

impl GroupSync {
    fn sync(&self, flush: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mine = {
            let mut counts = self.counts.lock().expect("sync counts lock");
            counts.0 += 1;
            counts.0
        };
        let mut leader = self.leader.lock().expect("sync leader lock");
        if let Some(failure) = &*leader {
            return Err(failure.error());
        }
        let covered = {
            let counts = self.counts.lock().expect("sync counts lock");
            if counts.1 >= mine {
                return Ok(());
            }
            counts.0
        };
        if let Err(err) = flush() {
            *leader = Some(SyncFailure::of(&err));
            return Err(err);
        }
        let mut counts = self.counts.lock().expect("sync counts lock");
        counts.1 = counts.1.max(covered);
        Ok(())
    }
}

fn same_geometry(task: Arc<StoredTask>, geometry: Geometry) -> Result<Arc<StoredTask>, StoreError> {
    if task.geometry != geometry {
        return Err(StoreError::GeometryConflict {
            task_id: task.id.clone(),
            stored_length: task.geometry.content_length(),
            stored_piece: task.geometry.piece_length(),
            length: geometry.content_length(),
            piece: geometry.piece_length(),
        });
    }
    Ok(task)
}

/// Writes `bytes` to `path` through a temp file and a rename, then syncs the directory: that
/// covers the rename and every other entry made in it before (the content file, the journal).
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = path.with_extension("tmp");
    let mut file = File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temp, path)?;
    sync_dir(path.parent().expect("has parent"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    #[cfg(test)]
    tests::SYNCED_DIRS
        .lock()
        .expect("synced dirs")
        .push(dir.to_owned());
    Ok(())
}

/// Pieces read ahead of the one a peer asks for.
const READ_AHEAD_PIECES: u64 = 2;

/// Serves the store's held pieces to peers over the TCP data port.
pub struct StoreProvider {
    pub store: Arc<Store>,
    /// Sent as the Vortex parent id, so a Dragonfly peer knows where the piece came from.
    pub host_id: String,
    /// Serves pieces over RDMA to peers that upgrade their connection, when this host can.
    pub rdma: Option<Arc<crate::rdma::RdmaService>>,
}

/// Dragonfly's traffic type for pieces sent to a remote peer.
const TRAFFIC_REMOTE_PEER: u8 = 1;

impl PieceProvider for StoreProvider {
    fn piece(&self, task_id: &str, number: u32) -> Result<ServedPiece, ProviderError> {
        let task = self
            .store
            .get(task_id)
            .ok_or_else(|| ProviderError::NotFound(format!("task {task_id} is not held here")))?;
        let range = task
            .geometry
            .piece(number)
            .map_err(|e| ProviderError::NotFound(e.to_string()))?;
        let crc = task.held(number).ok_or_else(|| {
            ProviderError::NotFound(format!("piece {number} of task {task_id} is not held here"))
        })?;
        let file = task.read_file().map_err(|e| {
            ProviderError::Internal(format!("opening the content of task {task_id}: {e}"))
        })?;
        // Peers fetch a task's pieces roughly in order: start reading the next pieces from
        // disk now, so a cold seed's disk works ahead of its network instead of each piece's
        // read starting only when that piece is asked for.
        let ahead = range.offset + range.length;
        if ahead < task.geometry.content_length() {
            let _ = nix::fcntl::posix_fadvise(
                file.as_ref(),
                ahead as i64,
                (READ_AHEAD_PIECES * range.length) as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
        Ok(ServedPiece {
            metadata: PieceMetadata {
                number,
                offset: range.offset,
                length: range.length,
                digest: format_digest(crc),
                parent_id: self.host_id.clone(),
                traffic_type: TRAFFIC_REMOTE_PEER,
                cost: std::time::Duration::ZERO,
                created_at: chrono::Utc::now().naive_utc(),
            },
            file,
            file_offset: range.offset,
        })
    }

    fn task_info(&self, task_id: &str) -> Option<TaskInfo> {
        let task = self.store.get(task_id)?;
        Some(TaskInfo {
            content_length: task.geometry.content_length(),
            piece_length: task.geometry.piece_length(),
            pieces_held: task.held_count(),
            complete: task.is_complete(),
            // A manifest that cannot be read is stated as none: the receiver then verifies
            // the content it gets against its own pin.
            content_sha256: crate::manifest::load(task.dir())
                .unwrap_or_else(|err| {
                    tracing::warn!(task_id, error = %err, "unreadable manifest");
                    None
                })
                .map(|m| m.content_sha256.0),
        })
    }

    fn served(&self, task_id: &str, _number: u32, _bytes: u64) {
        if let Some(task) = self.store.get(task_id) {
            task.count_served();
        }
    }

    fn upgrade(
        &self,
        tag: u8,
        value: Vec<u8>,
        stream: tokio::net::TcpStream,
    ) -> Result<ferry_fallback_tcp::UpgradeFuture, (tokio::net::TcpStream, String)> {
        match (&self.rdma, tag) {
            (Some(service), ferry_rdma::wire::TAG_CONNECT) => {
                Ok(Box::pin(Arc::clone(service).serve(stream, value)))
            }
            (None, ferry_rdma::wire::TAG_CONNECT) => {
                Err((stream, "RDMA is not available on this peer".into()))
            }
            _ => Err((
                stream,
                format!("extension {tag:#04x} is not supported by this peer"),
            )),
        }
    }
}

/// Reads `range` of `file` into `buf` (used by import).
pub fn read_range_into(file: &File, offset: u64, buf: &mut PieceBuffer) -> io::Result<()> {
    let mut at = offset;
    for chunk in buf.chunks_mut() {
        file.read_exact_at(chunk, at)?;
        at += chunk.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoChoice;

    /// Every directory `sync_dir` synced, by any test.
    pub(super) static SYNCED_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    fn open(dir: &Path) -> Store {
        let pool = BufferPool::new(4 << 20, 16).unwrap();
        let io = IoEngine::start(&pool, IoChoice::Auto, 1).unwrap();
        Store::open(dir, pool, io, true).unwrap()
    }

    fn open_timed(dir: &Path, io_timeout: Duration) -> Store {
        open_with(
            dir,
            StoreOptions {
                io_timeout,
                ..StoreOptions::default()
            },
        )
    }

    fn open_with(dir: &Path, options: StoreOptions) -> Store {
        let pool = BufferPool::new(4 << 20, 16).unwrap();
        let io = IoEngine::start(&pool, IoChoice::Auto, 1).unwrap();
        Store::open_with(dir, pool, io, options).unwrap()
    }

    async fn try_write(
        store: &Store,
        task: &Arc<StoredTask>,
        number: u32,
        fill: u8,
    ) -> (Option<PieceBuffer>, Result<(), StoreError>) {
        let piece = task.geometry().piece(number).unwrap();
        let mut buf = store.pool().acquire(piece.length).await.unwrap();
        buf.chunks_mut().iter_mut().for_each(|c| c.fill(fill));
        let crc = buf.crc32();
        store.write_piece(task, piece, buf, crc).await
    }

    async fn write(store: &Store, task: &Arc<StoredTask>, number: u32, fill: u8) -> u32 {
        let piece = task.geometry().piece(number).unwrap();
        let mut buf = store.pool().acquire(piece.length).await.unwrap();
        buf.chunks_mut().iter_mut().for_each(|c| c.fill(fill));
        let crc = buf.crc32();
        let (_, written) = store.write_piece(task, piece, buf, crc).await;
        written.unwrap();
        crc
    }

    #[tokio::test]
    async fn held_pieces_survive_a_restart_and_a_torn_journal_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let id = "a".repeat(64);
        let geometry = Geometry::new(10 << 20, 4 << 20).unwrap();
        let (crc0, crc2) = {
            let store = open(dir.path());
            let task = store.create_or_get(&id, geometry).unwrap();
            let crc0 = write(&store, &task, 0, 1).await;
            let crc2 = write(&store, &task, 2, 3).await;
            assert_eq!(task.held_count(), 2);
            (crc0, crc2)
        };
        // A crash mid-append leaves part of a record behind.
        let journal = dir.path().join("tasks").join(&id).join("pieces.log");
        let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
        file.write_all(&[1, 0, 0, 0, 9]).unwrap();
        drop(file);

        let store = open(dir.path());
        let task = store.get(&id).expect("recovered");
        assert_eq!(task.held(0), Some(crc0));
        assert_eq!(task.held(1), None);
        assert_eq!(task.held(2), Some(crc2));
        assert_eq!(
            fs::metadata(&journal).unwrap().len(),
            2 * RECORD_LEN as u64,
            "torn tail cut"
        );
        // Completing the task trims the direct-I/O padding of the short last piece.
        write(&store, &task, 1, 2).await;
        assert!(task.is_complete());
        assert_eq!(fs::metadata(task.content_path()).unwrap().len(), 10 << 20);
        let bytes = fs::read(task.content_path()).unwrap();
        assert!(bytes[..4 << 20].iter().all(|&b| b == 1));
        assert!(bytes[8 << 20..].iter().all(|&b| b == 3));
    }

    #[tokio::test]
    async fn a_different_geometry_for_a_known_task_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let id = "b".repeat(64);
        store
            .create_or_get(&id, Geometry::new(8 << 20, 4 << 20).unwrap())
            .unwrap();
        let err = store
            .create_or_get(&id, Geometry::new(9 << 20, 4 << 20).unwrap())
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::GeometryConflict { .. }), "{err}");
        store.delete(&id).unwrap();
        assert!(store.get(&id).is_none());
        assert!(!dir.path().join("tasks").join(&id).exists());
    }

    #[test]
    fn journal_records_appended_together_are_all_durable_and_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let id = "c".repeat(64);
        let pieces = 64u32;
        {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let store = runtime.block_on(async { open(dir.path()) });
            let task = store
                .create_or_get(
                    &id,
                    Geometry::new(u64::from(pieces) << 22, 4 << 20).unwrap(),
                )
                .unwrap();
            // Many appenders at once: group commit must leave no record unsynced or lost.
            std::thread::scope(|scope| {
                for worker in 0..8u32 {
                    let task = &task;
                    scope.spawn(move || {
                        for number in (worker..pieces).step_by(8) {
                            task.append_record(number, number * 7 + 1).unwrap();
                        }
                    });
                }
            });
            let (appended, synced) = *task.journal_sync.counts.lock().unwrap();
            assert_eq!(appended, u64::from(pieces));
            assert_eq!(synced, u64::from(pieces), "every record covered by a sync");
        }
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = runtime.block_on(async { open(dir.path()) });
        let task = store.get(&id).expect("recovered");
        for number in 0..pieces {
            assert_eq!(task.held(number), Some(number * 7 + 1), "piece {number}");
        }
    }

    /// Was: any task dir that failed to load (a garbage or newer task.json, but also EMFILE
    /// or EACCES) was `remove_dir_all`ed at start-up, held bytes and all.
    #[tokio::test]
    async fn an_unloadable_task_dir_is_quarantined_with_its_bytes_and_the_others_load() {
        let dir = tempfile::tempdir().unwrap();
        let geometry = Geometry::new(8 << 20, 4 << 20).unwrap();
        let (good, garbage, newer) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        {
            let store = open(dir.path());
            for id in [&good, &garbage, &newer] {
                let task = store.create_or_get(id, geometry).unwrap();
                write(&store, &task, 0, 7).await;
            }
        }
        let tasks = dir.path().join("tasks");
        fs::write(tasks.join(&garbage).join("task.json"), b"{ not json").unwrap();
        let meta = fs::read_to_string(tasks.join(&newer).join("task.json")).unwrap();
        fs::write(
            tasks.join(&newer).join("task.json"),
            meta.replace("\"format\": 1", "\"format\": 99"),
        )
        .unwrap();
        // A creation that never reached task.json holds nothing and may go.
        let unfinished = tasks.join("d".repeat(64));
        fs::create_dir(&unfinished).unwrap();
        fs::write(unfinished.join("content"), b"").unwrap();
        // The quarantine already holds a dir of that name: the new one gets another.
        fs::create_dir_all(dir.path().join("quarantine").join(&garbage)).unwrap();
        let before: Vec<Vec<u8>> = [&garbage, &newer]
            .iter()
            .flat_map(|id| {
                ["content", "pieces.log"].map(|f| fs::read(tasks.join(id).join(f)).unwrap())
            })
            .collect();

        let store = open(dir.path());
        assert!(store.get(&good).unwrap().held(0).is_some());
        assert!(store.get(&garbage).is_none() && store.get(&newer).is_none());
        assert!(!unfinished.exists());
        let quarantined = store.quarantined();
        assert_eq!(quarantined.len(), 2, "{quarantined:?}");
        let moved = |id: &str| {
            quarantined
                .iter()
                .find(|q| q.name == id)
                .unwrap_or_else(|| panic!("{id} not quarantined: {quarantined:?}"))
                .clone()
        };
        let (g, n) = (moved(&garbage), moved(&newer));
        assert_eq!(
            g.path,
            dir.path().join("quarantine").join(format!("{garbage}.1"))
        );
        assert!(g.reason.contains("parsing"), "{}", g.reason);
        assert!(n.reason.contains("format 99"), "{}", n.reason);
        let after: Vec<Vec<u8>> = [&g.path, &n.path]
            .iter()
            .flat_map(|p| ["content", "pieces.log"].map(|f| fs::read(p.join(f)).unwrap()))
            .collect();
        assert!(before == after, "quarantined bytes changed");
        assert!(!tasks.join(&garbage).exists() && !tasks.join(&newer).exists());
        // The task can be fetched again; its quarantined copy stays.
        store.create_or_get(&garbage, geometry).unwrap();
        assert!(g.path.join("content").exists());
    }

    /// Was a bare `AtomicBool` that transfers set and cleared by hand (and imports ignored).
    #[test]
    fn one_writer_at_a_time_and_the_guard_clears_even_on_unwind() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = runtime.block_on(async { open(dir.path()) });
        let task = store
            .create_or_get(&"e".repeat(64), Geometry::new(4 << 20, 4 << 20).unwrap())
            .unwrap();
        let guard = task.try_begin_writing(WriterKind::Import).unwrap();
        assert_eq!(task.writer(), Some(WriterKind::Import));
        let err = task.try_begin_writing(WriterKind::Transfer).err().unwrap();
        assert!(
            matches!(
                err,
                StoreError::Busy {
                    writer: WriterKind::Import,
                    ..
                }
            ),
            "{err}"
        );
        drop(guard);
        assert_eq!(task.writer(), None);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = task.try_begin_writing(WriterKind::Transfer).unwrap();
            panic!("writer panics");
        }));
        assert!(unwound.is_err());
        assert_eq!(task.writer(), None, "cleared on unwind");
        let _again = task.try_begin_writing(WriterKind::Transfer).unwrap();
    }

    /// Was: a failed fdatasync was retried by the next group-commit leader (which Linux may
    /// answer with success for the dropped pages), and a journal record whose sync failed
    /// was read back as held after a restart.
    #[tokio::test]
    async fn a_failed_fdatasync_fails_the_task_and_its_piece_is_not_held_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let geometry = Geometry::new(12 << 20, 4 << 20).unwrap();
        let (content, journal, other) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        {
            let store = open(dir.path());
            let other_task = store.create_or_get(&other, geometry).unwrap();
            for (n, id, target) in [
                (0, &content, SyncTarget::Content),
                (1, &journal, SyncTarget::Journal),
            ] {
                let task = store.create_or_get(id, geometry).unwrap();
                write(&store, &task, 0, 1).await;
                store.faults().arm(id, Fault::FailSync(target));
                let (buf, err) = try_write(&store, &task, 1, 2).await;
                assert!(buf.is_some(), "the device write itself completed");
                let err = err.expect_err("the sync failed");
                assert!(
                    matches!(&err, StoreError::SyncFailed { piece: 1, file, source, .. }
                        if *file == target && source.raw_os_error() == Some(libc::EIO)),
                    "{err}"
                );
                assert_eq!(task.held(1), None, "{target}: not held");
                assert!(task.failure().is_some());
                // No later write is taken, even though the next fdatasync would succeed.
                let (_, err) = try_write(&store, &task, 2, 3).await;
                let err = err.expect_err("the task has failed");
                assert!(
                    matches!(&err, StoreError::TaskFailed { task_id, .. } if task_id == id),
                    "{err}"
                );
                assert_eq!(task.held(2), None);
                // Other tasks are not affected.
                write(&store, &other_task, n, 4).await;
            }
            assert_eq!(other_task.held_count(), 2);
        }
        let store = open(dir.path());
        for id in [&content, &journal] {
            let task = store.get(id).expect("recovered");
            assert!(task.held(0).is_some(), "synced before the failure: held");
            assert_eq!(
                task.held(1),
                None,
                "its sync failed: not held after a restart"
            );
            assert_eq!(task.held(2), None);
            assert!(
                task.failure().is_none(),
                "recovered from its durable journal"
            );
        }
        let journal_len = fs::metadata(dir.path().join("tasks").join(&journal).join("pieces.log"))
            .unwrap()
            .len();
        assert_eq!(
            journal_len, RECORD_LEN as u64,
            "cut back to the synced record"
        );
        assert_eq!(store.get(&other).unwrap().held_count(), 2);
        // A recovered task takes writes again.
        let task = store.get(&content).unwrap();
        write(&store, &task, 1, 2).await;
    }

    /// Was: a follower queued behind a failed leader became leader, synced again, and could
    /// be told its write was durable.
    #[test]
    fn followers_of_a_failed_group_sync_fail_too_and_no_flush_is_retried() {
        let sync = &GroupSync::default();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let flushes = AtomicU64::new(0);
        std::thread::scope(|scope| {
            let leader = scope.spawn(move || {
                sync.sync(|| {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Err(io::Error::from_raw_os_error(libc::EIO))
                })
            });
            started_rx.recv().unwrap();
            let flushes = &flushes;
            let follower = scope.spawn(move || {
                sync.sync(|| {
                    flushes.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                })
            });
            // Let the follower queue up behind the leader.
            std::thread::sleep(Duration::from_millis(100));
            release_tx.send(()).unwrap();
            let led = leader.join().unwrap();
            assert_eq!(led.unwrap_err().raw_os_error(), Some(libc::EIO));
            let followed = follower.join().unwrap();
            assert_eq!(followed.unwrap_err().raw_os_error(), Some(libc::EIO));
        });
        let later = sync.sync(|| {
            flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        assert_eq!(later.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(
            flushes.load(Ordering::Relaxed),
            0,
            "nothing flushed after the failure"
        );
    }

    /// Was: an fdatasync that never returned hung the piece (and its transfer) for good.
    #[tokio::test]
    async fn a_stalled_fdatasync_fails_the_piece_with_a_timeout_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let bound = Duration::from_millis(300);
        let store = open_timed(dir.path(), bound);
        let geometry = Geometry::new(8 << 20, 4 << 20).unwrap();
        let (stalled, other) = ("a".repeat(64), "b".repeat(64));
        let task = store.create_or_get(&stalled, geometry).unwrap();
        let other_task = store.create_or_get(&other, geometry).unwrap();
        store.faults().arm(
            &stalled,
            Fault::StallSync(SyncTarget::Content, Duration::from_secs(2)),
        );
        let started = std::time::Instant::now();
        let (buf, err) = try_write(&store, &task, 0, 1).await;
        let took = started.elapsed();
        let err = err.expect_err("timed out");
        assert!(
            matches!(&err, StoreError::Timeout { piece: 0, step: IoStep::Durability, after, .. } if *after == bound),
            "{err}"
        );
        assert!(err.to_string().contains(&stalled), "{err}");
        assert!(
            took >= bound && took < Duration::from_millis(1500),
            "{took:?}"
        );
        assert!(
            buf.is_some(),
            "the device write had completed: its buffer comes back"
        );
        assert_eq!(task.held(0), None);
        let (_, err) = try_write(&store, &task, 1, 2).await;
        assert!(matches!(err, Err(StoreError::TaskFailed { .. })), "{err:?}");
        write(&store, &other_task, 0, 3).await;
        // The stalled sync finishing later does not make the piece held.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        assert_eq!(task.held(0), None);
        assert_eq!(
            fs::metadata(dir.path().join("tasks").join(&stalled).join("pieces.log"))
                .unwrap()
                .len(),
            0
        );
    }

    /// Was: the reply of a hung device write was awaited forever. A timed-out write must not
    /// hand its buffer back early either: the device may still read it.
    #[tokio::test]
    async fn a_stalled_device_write_times_out_and_its_buffer_returns_only_when_the_write_ends() {
        let dir = tempfile::tempdir().unwrap();
        let bound = Duration::from_millis(300);
        let store = open_timed(dir.path(), bound);
        let id = "a".repeat(64);
        let task = store
            .create_or_get(&id, Geometry::new(8 << 20, 4 << 20).unwrap())
            .unwrap();
        let free = store.pool().free_slots();
        store
            .faults()
            .arm(&id, Fault::StallWrite(Duration::from_millis(1500)));
        let started = std::time::Instant::now();
        let (buf, err) = try_write(&store, &task, 0, 1).await;
        let took = started.elapsed();
        assert!(
            matches!(
                &err,
                Err(StoreError::Timeout {
                    piece: 0,
                    step: IoStep::Write,
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(
            took >= bound && took < Duration::from_millis(1200),
            "{took:?}"
        );
        assert!(buf.is_none(), "the buffer stays with the write in flight");
        assert_eq!(
            store.pool().free_slots(),
            free - 1,
            "not back in the pool yet"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.pool().free_slots() != free {
            assert!(
                std::time::Instant::now() < deadline,
                "the buffer never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "back only after the write"
        );
        assert!(matches!(
            try_write(&store, &task, 1, 2).await.1,
            Err(StoreError::TaskFailed { .. })
        ));
    }

    /// Was: create_or_get held the store-wide write lock across mkdir, fallocate and the
    /// fsyncs, so every lookup of every other task (the serve path) waited for a new task.
    #[test]
    fn creating_a_task_does_not_stall_lookups_of_other_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = runtime.block_on(async { open(dir.path()) });
        let geometry = Geometry::new(4 << 20, 4 << 20).unwrap();
        let (served, created) = ("a".repeat(64), "b".repeat(64));
        store.create_or_get(&served, geometry).unwrap();
        store
            .faults()
            .arm(&created, Fault::StallCreate(Duration::from_millis(1500)));
        std::thread::scope(|scope| {
            let first = scope.spawn(|| store.create_or_get(&created, geometry).unwrap());
            std::thread::sleep(Duration::from_millis(200));
            let second = scope.spawn(|| store.create_or_get(&created, geometry).unwrap());
            let started = std::time::Instant::now();
            assert!(store.get(&served).is_some());
            assert_eq!(
                store.list().len(),
                1,
                "the task being created is not listed yet"
            );
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "lookups waited {:?} for another task's creation",
                started.elapsed()
            );
            let (first, second) = (first.join().unwrap(), second.join().unwrap());
            assert!(Arc::ptr_eq(&first, &second), "created once");
        });
        assert_eq!(store.list().len(), 2);
        assert!(store.creating.lock().unwrap().is_empty());
    }

    /// Was: every task kept four descriptors open from start-up on, so a store of many tasks
    /// ran out of them (EMFILE) before it served anything.
    #[tokio::test]
    async fn descriptors_are_opened_on_use_and_bounded_by_max_open_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let options = || StoreOptions {
            max_open_tasks: 4,
            ..StoreOptions::default()
        };
        let geometry = Geometry::new(4 << 20, 4 << 20).unwrap();
        let ids: Vec<String> = (0..12u8).map(|i| format!("{:064x}", i + 1)).collect();
        {
            let store = open_with(dir.path(), options());
            for (i, id) in ids.iter().enumerate() {
                let task = store.create_or_get(id, geometry).unwrap();
                write(&store, &task, 0, i as u8 + 1).await;
                assert!(store.open_tasks() <= 4, "{} open", store.open_tasks());
            }
        }
        let store = open_with(dir.path(), options());
        assert_eq!(store.list().len(), 12);
        assert_eq!(store.open_tasks(), 0, "nothing opened at start-up");
        // A file handed out stays usable after its task's descriptors are closed by the LRU.
        let first = store.get(&ids[0]).unwrap().read_file().unwrap();
        for (i, id) in ids.iter().enumerate() {
            let file = store.get(id).unwrap().read_file().unwrap();
            let mut byte = [0u8; 1];
            file.read_exact_at(&mut byte, 4095).unwrap();
            assert_eq!(byte[0], i as u8 + 1);
            assert!(store.open_tasks() <= 5, "{} open", store.open_tasks());
        }
        let mut byte = [0u8; 1];
        first.read_exact_at(&mut byte, 0).unwrap();
        assert_eq!(byte[0], 1);
        drop(first);
        // Reading the next one closes idle ones until the limit holds again.
        let _ = store.get(&ids[1]).unwrap().read_file().unwrap();
        assert!(store.open_tasks() <= 4, "{} open", store.open_tasks());
    }

    /// The panic fault (for tests of panic handling above the store) fires once.
    #[tokio::test]
    async fn an_armed_panic_fires_once_and_the_task_is_written_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()));
        let id = "a".repeat(64);
        let task = store
            .create_or_get(&id, Geometry::new(4 << 20, 4 << 20).unwrap())
            .unwrap();
        store.faults().arm(&id, Fault::PanicWrite);
        let panicked = tokio::spawn({
            let (store, task) = (Arc::clone(&store), Arc::clone(&task));
            async move { try_write(&store, &task, 0, 1).await.1 }
        })
        .await
        .expect_err("the write panicked");
        assert!(panicked.is_panic());
        assert_eq!(task.held(0), None);
        write(&store, &task, 0, 1).await;
        assert!(task.is_complete());
    }

    /// What a reflink leaves behind, made by hand where the test's filesystem has none (the
    /// real FICLONE is tested on XFS in tests/tests/reflink.rs): the content holds the bytes,
    /// synced, and the task is marked cloned.
    fn pretend_cloned(task: &Arc<StoredTask>, fill: impl Fn(u32) -> u8) -> Vec<u32> {
        let file = OpenOptions::new()
            .write(true)
            .open(task.content_path())
            .unwrap();
        let crcs = task
            .geometry()
            .pieces()
            .map(|p| {
                let bytes = vec![fill(p.number); p.length as usize];
                file.write_all_at(&bytes, p.offset).unwrap();
                crc32fast::hash(&bytes)
            })
            .collect();
        file.sync_all().unwrap();
        task.cloned.store(true, Ordering::Release);
        crcs
    }

    #[tokio::test]
    async fn cloned_pieces_are_held_once_journaled_and_recovered_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let id = "a".repeat(64);
        let geometry = Geometry::new(10 << 20, 4 << 20).unwrap();
        let crcs = {
            let store = open(dir.path());
            let task = store.create_or_get(&id, geometry).unwrap();
            let crcs = pretend_cloned(&task, |n| n as u8 + 1);
            store.record_cloned_piece(&task, 0, crcs[0]).await.unwrap();
            store.record_cloned_piece(&task, 2, crcs[2]).await.unwrap();
            // Recording a held piece again appends nothing.
            store.record_cloned_piece(&task, 2, crcs[2]).await.unwrap();
            assert_eq!(task.held(0), Some(crcs[0]));
            assert_eq!(task.held(1), None);
            assert_eq!(task.held_count(), 2);
            let (appended, synced) = *task.journal_sync.counts.lock().unwrap();
            assert_eq!((appended, synced), (2, 2), "each record covered by a sync");
            let err = store.record_cloned_piece(&task, 3, 0).await.unwrap_err();
            assert!(matches!(err, StoreError::Geometry(_)), "{err}");
            crcs
        };
        let journal = dir.path().join("tasks").join(&id).join("pieces.log");
        assert_eq!(fs::metadata(&journal).unwrap().len(), 2 * RECORD_LEN as u64);

        let store = open(dir.path());
        let task = store.get(&id).expect("recovered");
        assert_eq!(task.held(0), Some(crcs[0]));
        assert_eq!(task.held(1), None);
        assert_eq!(task.held(2), Some(crcs[2]));
        // The restarted daemon did not clone this task: the missing piece is not taken as
        // cloned, it is written.
        let err = store
            .record_cloned_piece(&task, 1, crcs[1])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotClonable { .. }), "{err}");
        assert_eq!(task.held(1), None);
        assert_eq!(write(&store, &task, 1, 2).await, crcs[1]);
        assert!(task.is_complete());
        let bytes = fs::read(task.content_path()).unwrap();
        assert_eq!(bytes.len(), 10 << 20);
        assert!(bytes[8 << 20..].iter().all(|&b| b == 3));
    }

    #[tokio::test]
    async fn cloning_the_last_piece_completes_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let task = store
            .create_or_get(&"a".repeat(64), Geometry::new(8 << 20, 4 << 20).unwrap())
            .unwrap();
        let crcs = pretend_cloned(&task, |n| n as u8 + 5);
        for (number, crc) in crcs.iter().enumerate() {
            store
                .record_cloned_piece(&task, number as u32, *crc)
                .await
                .unwrap();
        }
        assert!(task.is_complete());
        assert!(
            task.handles.lock().unwrap().write.is_none(),
            "write descriptors closed"
        );
    }

    /// The journal step of a cloned piece follows write_piece's rules: a failed fdatasync
    /// fails the task, the record is cut back, and nothing it covered is held after a restart.
    #[tokio::test]
    async fn a_failed_journal_sync_of_a_cloned_piece_fails_the_task_and_it_is_not_held_after_a_restart(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let id = "a".repeat(64);
        let geometry = Geometry::new(12 << 20, 4 << 20).unwrap();
        {
            let store = open(dir.path());
            let task = store.create_or_get(&id, geometry).unwrap();
            let crcs = pretend_cloned(&task, |n| n as u8 + 1);
            store.record_cloned_piece(&task, 0, crcs[0]).await.unwrap();
            store
                .faults()
                .arm(&id, Fault::FailSync(SyncTarget::Journal));
            let err = store
                .record_cloned_piece(&task, 1, crcs[1])
                .await
                .unwrap_err();
            assert!(
                matches!(&err, StoreError::SyncFailed { piece: 1, file: SyncTarget::Journal, source, .. }
                    if source.raw_os_error() == Some(libc::EIO)),
                "{err}"
            );
            assert_eq!(task.held(1), None);
            assert!(task.failure().is_some());
            // No later record is taken, though the next fdatasync would succeed; no write
            // either.
            let err = store
                .record_cloned_piece(&task, 2, crcs[2])
                .await
                .unwrap_err();
            assert!(matches!(err, StoreError::TaskFailed { .. }), "{err}");
            assert!(matches!(
                try_write(&store, &task, 2, 3).await.1,
                Err(StoreError::TaskFailed { .. })
            ));
            assert_eq!(task.held_count(), 1);
        }
        let journal = dir.path().join("tasks").join(&id).join("pieces.log");
        assert_eq!(
            fs::metadata(&journal).unwrap().len(),
            RECORD_LEN as u64,
            "cut back to the synced record"
        );
        let store = open(dir.path());
        let task = store.get(&id).expect("recovered");
        assert!(task.held(0).is_some());
        assert_eq!(
            task.held(1),
            None,
            "its sync failed: not held after a restart"
        );
        assert!(task.failure().is_none());
    }

    /// A stalled journal fdatasync fails the cloned piece within the I/O bound, as for a
    /// written piece.
    #[tokio::test]
    async fn a_stalled_journal_sync_of_a_cloned_piece_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let bound = Duration::from_millis(300);
        let store = open_timed(dir.path(), bound);
        let id = "a".repeat(64);
        let task = store
            .create_or_get(&id, Geometry::new(8 << 20, 4 << 20).unwrap())
            .unwrap();
        let crcs = pretend_cloned(&task, |n| n as u8 + 1);
        store.faults().arm(
            &id,
            Fault::StallSync(SyncTarget::Journal, Duration::from_secs(2)),
        );
        let started = std::time::Instant::now();
        let err = store
            .record_cloned_piece(&task, 0, crcs[0])
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                StoreError::Timeout {
                    piece: 0,
                    step: IoStep::Durability,
                    ..
                }
            ),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_millis(1500));
        assert_eq!(task.held(0), None);
        assert!(matches!(
            store.record_cloned_piece(&task, 1, crcs[1]).await,
            Err(StoreError::TaskFailed { .. })
        ));
        tokio::time::sleep(Duration::from_millis(2200)).await;
        assert_eq!(task.held(0), None, "the late sync does not make it held");
    }

    /// Where no reflink is possible (a source on another filesystem: EXDEV; on tmpfs:
    /// EOPNOTSUPP) nothing changes: the content stays preallocated, no piece may be recorded
    /// as cloned, and pieces are written as before. A task holding pieces is never cloned.
    #[tokio::test]
    async fn clone_content_where_reflinks_are_unsupported_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let geometry = Geometry::new(8 << 20, 4 << 20).unwrap();
        let task = store.create_or_get(&"a".repeat(64), geometry).unwrap();
        let source = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        source.as_file().set_len(8 << 20).unwrap();
        let source = Arc::new(source.reopen().unwrap());
        let cloned = store
            .clone_content(&task, Arc::clone(&source))
            .await
            .unwrap();
        let Cloned::Unsupported(err) = cloned else {
            panic!("a reflink across filesystems succeeded")
        };
        assert!(reflink_unsupported(&err), "{err}");
        assert!(!task.cloned.load(Ordering::Acquire));
        assert!(task.failure().is_none());
        let content = fs::metadata(task.content_path()).unwrap();
        assert_eq!(content.len(), 8 << 20);
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&content) * 512 >= 8 << 20,
            "still preallocated"
        );
        let err = store.record_cloned_piece(&task, 0, 1).await.unwrap_err();
        assert!(matches!(err, StoreError::NotClonable { .. }), "{err}");
        write(&store, &task, 0, 1).await;
        let err = store.clone_content(&task, source).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::NotClonable { reason, .. } if reason.contains("holds 1 pieces")),
            "{err}"
        );
        assert_eq!(task.held_count(), 1);
    }

    /// Was: only the task dir was synced (by task.json's rename), so a crash could lose the
    /// new dir's entry in tasks/ and with it every piece written into it.
    #[test]
    fn a_new_task_dir_is_synced_into_tasks_and_its_files_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = runtime.block_on(async { open(dir.path()) });
        let id = "f".repeat(64);
        store
            .create_or_get(&id, Geometry::new(4 << 20, 4 << 20).unwrap())
            .unwrap();
        let synced = SYNCED_DIRS.lock().unwrap().clone();
        let tasks = dir.path().join("tasks");
        assert!(synced.contains(&tasks), "tasks/ not synced: {synced:?}");
        assert!(synced.contains(&tasks.join(&id)), "task dir not synced");
    }
}
