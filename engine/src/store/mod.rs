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

use crate::geometry::{Geometry, GeometryError, PieceRange};
use crate::io::{BufferPool, IoEngine, PieceBuffer, TaskFile, WriteRequest};
use crate::manifest::Manifest;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

mod create;
mod faults;
mod files;
#[cfg(test)]
mod io_tests;
mod read;
mod recovery;
#[cfg(test)]
mod tests;
mod write;

pub use faults::{Fault, Faults};
use files::{derived_open_tasks, Handles, OpenFiles, WriteHandles};
pub use write::Cloned;
use write::GroupSync;

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
    /// A piece read for serving ran out of time (the task is not failed: nothing was
    /// written); its buffer stays with the read still in flight.
    #[error("reading piece {piece} of task {task_id} took longer than {}s (store.io_timeout_secs)", after.as_secs_f64())]
    ReadTimeout {
        task_id: String,
        piece: u32,
        after: Duration,
    },
    /// The task's content file ends inside a piece it holds (truncated under the daemon).
    #[error("piece {piece} of task {task_id}: the content file has {got} of its {expected} bytes")]
    ShortRead {
        task_id: String,
        piece: u32,
        got: usize,
        expected: u64,
    },
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

impl StoreError {
    fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
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
    /// The task's manifest, read from `manifest.json` on first use (outer `None`: not read
    /// yet) and kept: stats, listings and transfers ask for it often, it changes rarely.
    manifest: Mutex<Option<Option<Manifest>>>,
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
        let first = handles.write.is_none() && handles.serve.is_none();
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
        let first = handles.read.is_none() && handles.serve.is_none();
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
                .serve
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
        if let Some(serve) = handles.serve.take() {
            io.release_file(&serve);
        }
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

    /// The task's manifest, if it has one (read once, then kept). A manifest that cannot be
    /// read is an error every time, never "none".
    pub fn manifest(&self) -> io::Result<Option<Manifest>> {
        let mut cached = self.manifest.lock().expect("manifest lock");
        if let Some(known) = *cached {
            return Ok(known);
        }
        let loaded = crate::manifest::load(&self.dir)?;
        *cached = Some(loaded);
        Ok(loaded)
    }

    /// Records a new manifest durably, then keeps it.
    pub fn set_manifest(&self, manifest: Manifest) -> io::Result<()> {
        let mut cached = self.manifest.lock().expect("manifest lock");
        crate::manifest::save(&self.dir, &manifest)?;
        *cached = Some(Some(manifest));
        Ok(())
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
        task.close_serve(&self.io);
        self.files.forget(&task.id);
        fs::remove_dir_all(&task.dir)
            .map_err(|e| StoreError::io(format!("removing {}", task.dir.display()), e))
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

/// Reads `range` of `file` into `buf` with `pread` (import reads its source file this way).
pub fn read_range_into(file: &File, offset: u64, buf: &mut PieceBuffer) -> io::Result<()> {
    let mut at = offset;
    for chunk in buf.chunks_mut() {
        file.read_exact_at(chunk, at)?;
        at += chunk.len() as u64;
    }
    Ok(())
}
