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
use std::sync::{Arc, Mutex, RwLock};

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

#[derive(Debug, Serialize, Deserialize)]
struct TaskMeta {
    task_id: String,
    content_length: u64,
    piece_length: u64,
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
    write_file: Arc<TaskFile>,
    read_file: Arc<File>,
    pieces: Mutex<PieceState>,
    /// The piece journal, appended under the lock; `journal_file` is the same file, for
    /// syncing without holding it.
    journal: Mutex<File>,
    journal_file: File,
    journal_sync: GroupSync,
    /// Pieces written to the content file share its fdatasyncs the same way.
    content_sync: GroupSync,
    served: AtomicU64,
    deleted: AtomicBool,
    /// Set while a transfer writes into this task (one at a time).
    pub transferring: AtomicBool,
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

    /// The content file opened for reading (page cache), shared with the servers.
    pub fn read_file(&self) -> &Arc<File> {
        &self.read_file
    }

    pub fn content_path(&self) -> PathBuf {
        self.dir.join("content")
    }

    /// The task's directory (its manifest lives there).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The store: every task under the data dir.
pub struct Store {
    tasks_dir: PathBuf,
    data_dir: PathBuf,
    io: IoEngine,
    pool: Arc<BufferPool>,
    direct_io: bool,
    tasks: RwLock<HashMap<String, Arc<StoredTask>>>,
}

impl Store {
    /// Opens the store and recovers every task's held pieces from its journal.
    pub fn open(
        data_dir: &Path,
        pool: Arc<BufferPool>,
        io: IoEngine,
        direct_io: bool,
    ) -> Result<Store, StoreError> {
        let tasks_dir = data_dir.join("tasks");
        fs::create_dir_all(&tasks_dir)
            .map_err(|e| StoreError::io(format!("creating {}", tasks_dir.display()), e))?;
        let store = Store {
            tasks_dir: tasks_dir.clone(),
            data_dir: data_dir.to_owned(),
            io,
            pool,
            direct_io,
            tasks: RwLock::new(HashMap::new()),
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
                Err(err) => {
                    // A task dir without its metadata was never finished being created.
                    tracing::warn!(dir = %dir.display(), error = %err, "removing unusable task dir");
                    let _ = fs::remove_dir_all(&dir);
                }
            }
        }
        Ok(store)
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
        let geometry = Geometry::new(meta.content_length, meta.piece_length)?;
        let journal_path = dir.join("pieces.log");
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
        let task = self.task_handle(
            dir,
            meta.task_id,
            geometry,
            journal,
            PieceState { digests, held },
        )?;
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
        journal: File,
        pieces: PieceState,
    ) -> Result<Arc<StoredTask>, StoreError> {
        let content = dir.join("content");
        let write_file = TaskFile::open(&content, self.direct_io)
            .map_err(|e| StoreError::io(format!("opening {}", content.display()), e))?;
        let read_file = File::open(&content)
            .map_err(|e| StoreError::io(format!("opening {}", content.display()), e))?;
        Ok(Arc::new(StoredTask {
            id,
            geometry,
            dir: dir.to_owned(),
            write_file: Arc::new(write_file),
            read_file: Arc::new(read_file),
            pieces: Mutex::new(pieces),
            journal_file: journal
                .try_clone()
                .map_err(|e| StoreError::io("opening the journal", e))?,
            journal: Mutex::new(journal),
            journal_sync: GroupSync::default(),
            content_sync: GroupSync::default(),
            served: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            transferring: AtomicBool::new(false),
        }))
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
    pub fn create_or_get(
        &self,
        task_id: &str,
        geometry: Geometry,
    ) -> Result<Arc<StoredTask>, StoreError> {
        let mut tasks = self.tasks.write().expect("tasks lock");
        if let Some(task) = tasks.get(task_id) {
            if task.geometry != geometry {
                return Err(StoreError::GeometryConflict {
                    task_id: task_id.into(),
                    stored_length: task.geometry.content_length(),
                    stored_piece: task.geometry.piece_length(),
                    length: geometry.content_length(),
                    piece: geometry.piece_length(),
                });
            }
            return Ok(Arc::clone(task));
        }
        let dir = self.tasks_dir.join(task_id);
        let result = self.create_task_dir(&dir, task_id, geometry);
        if result.is_err() {
            let _ = fs::remove_dir_all(&dir);
        }
        let task = result?;
        tasks.insert(task_id.to_owned(), Arc::clone(&task));
        Ok(task)
    }

    fn create_task_dir(
        &self,
        dir: &Path,
        task_id: &str,
        geometry: Geometry,
    ) -> Result<Arc<StoredTask>, StoreError> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)
            .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
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
        drop(file);
        let journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(dir.join("pieces.log"))
            .map_err(|e| StoreError::io("creating journal", e))?;
        let meta = TaskMeta {
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
        self.task_handle(dir, task_id.into(), geometry, journal, pieces)
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
    /// for reuse whatever happened.
    pub async fn write_piece(
        &self,
        task: &Arc<StoredTask>,
        piece: PieceRange,
        mut buf: PieceBuffer,
        crc: u32,
    ) -> (PieceBuffer, Result<(), StoreError>) {
        if buf.len() as u64 != piece.length {
            let err = StoreError::WrongLength {
                number: piece.number,
                got: buf.len(),
                expected: piece.length,
            };
            return (buf, Err(err));
        }
        if task.deleted.load(Ordering::Acquire) {
            return (buf, Err(StoreError::Deleted(task.id.clone())));
        }
        if task.held(piece.number).is_some() {
            return (buf, Ok(()));
        }
        let len = task.write_file.write_len(buf.len());
        buf.zero_tail(len);
        let request = WriteRequest {
            file: Arc::clone(&task.write_file),
            offset: piece.offset,
            buf,
            len,
        };
        let (buf, written) = self.io.write(request).await;
        let number = piece.number;
        let durable = match written {
            Err(err) => Err(Unsaved::Data(err)),
            // One trip to a blocking thread: the data made durable (an fdatasync shared with
            // the pieces finishing beside it), then its journal record (the same, for records).
            Ok(()) => {
                let task = Arc::clone(task);
                tokio::task::spawn_blocking(move || {
                    task.content_sync
                        .sync(task.write_file.file())
                        .map_err(Unsaved::Data)?;
                    task.append_record(number, crc).map_err(Unsaved::Record)
                })
                .await
                .expect("durability task panicked")
            }
        };
        match durable {
            Ok(()) => {}
            Err(Unsaved::Data(err)) => {
                let doing = format!("writing piece {number} of {}", task.id);
                return (
                    buf,
                    Err(self.map_write_error(&task.id, piece.length, &doing, err)),
                );
            }
            Err(Unsaved::Record(err)) => {
                let doing = "appending to the piece journal";
                return (buf, Err(self.map_write_error(&task.id, 0, doing, err)));
            }
        }
        let complete = {
            let mut state = task.pieces.lock().expect("pieces lock");
            if state.digests[number as usize].replace(crc).is_none() {
                state.held += 1;
            }
            state.held == task.geometry.piece_count()
        };
        if complete {
            if let Err(err) = self.finish(task) {
                return (buf, Err(err));
            }
        }
        (buf, Ok(()))
    }

    /// A complete task: cut direct-I/O padding off the end and stop registering its file.
    fn finish(&self, task: &StoredTask) -> Result<(), StoreError> {
        let file = task.write_file.file();
        let length = task.geometry.content_length();
        let actual = file
            .metadata()
            .map_err(|e| StoreError::io("stat content", e))?
            .len();
        if actual != length {
            file.set_len(length)
                .map_err(|e| StoreError::io("truncating content", e))?;
            file.sync_all()
                .map_err(|e| StoreError::io("syncing content", e))?;
        }
        self.io.release_file(&task.write_file);
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
        self.io.release_file(&task.write_file);
        fs::remove_dir_all(&task.dir)
            .map_err(|e| StoreError::io(format!("removing {}", task.dir.display()), e))
    }
}

impl StoredTask {
    fn append_record(&self, number: u32, crc: u32) -> io::Result<()> {
        let mut record = [0u8; RECORD_LEN];
        record[0..4].copy_from_slice(&number.to_le_bytes());
        record[4..8].copy_from_slice(&crc.to_le_bytes());
        let check = crc32fast::hash(&record[..8]) ^ RECORD_MAGIC;
        record[8..12].copy_from_slice(&check.to_le_bytes());
        self.journal
            .lock()
            .expect("journal lock")
            .write_all(&record)?;
        self.journal_sync.sync(&self.journal_file)
    }
}

/// Which step of making a piece durable failed.
enum Unsaved {
    Data(io::Error),
    Record(io::Error),
}

/// Group commit on one file: a caller whose write has completed waits for an fdatasync that
/// started after that; whoever syncs covers every caller that came before it, so writes
/// finishing together share one device flush instead of queueing one each.
#[derive(Default)]
struct GroupSync {
    /// (writes completed so far, writes known durable)
    counts: Mutex<(u64, u64)>,
    /// Held by the one caller syncing for everyone.
    leader: Mutex<()>,
}

impl GroupSync {
    fn sync(&self, file: &File) -> io::Result<()> {
        let mine = {
            let mut counts = self.counts.lock().expect("sync counts lock");
            counts.0 += 1;
            counts.0
        };
        let _leader = self.leader.lock().expect("sync leader lock");
        let covered = {
            let counts = self.counts.lock().expect("sync counts lock");
            if counts.1 >= mine {
                return Ok(());
            }
            counts.0
        };
        file.sync_data()?;
        let mut counts = self.counts.lock().expect("sync counts lock");
        counts.1 = counts.1.max(covered);
        Ok(())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = path.with_extension("tmp");
    let mut file = File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temp, path)?;
    File::open(path.parent().expect("has parent"))?.sync_all()
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
        // Peers fetch a task's pieces roughly in order: start reading the next pieces from
        // disk now, so a cold seed's disk works ahead of its network instead of each piece's
        // read starting only when that piece is asked for.
        let ahead = range.offset + range.length;
        if ahead < task.geometry.content_length() {
            let _ = nix::fcntl::posix_fadvise(
                task.read_file.as_ref(),
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
            file: Arc::clone(&task.read_file),
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

    fn open(dir: &Path) -> Store {
        let pool = BufferPool::new(4 << 20, 16).unwrap();
        let io = IoEngine::start(&pool, IoChoice::Auto, 1).unwrap();
        Store::open(dir, pool, io, true).unwrap()
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
}
