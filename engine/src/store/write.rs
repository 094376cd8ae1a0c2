//! Writing pieces durably (or recording cloned ones): the device write, the group
//! fdatasyncs of content and journal, and the rules when either fails or hangs.

use super::*;

/// What [`Store::clone_content`] did.
#[derive(Debug)]
pub enum Cloned {
    /// The content is a durable reflink of the source.
    Yes,
    /// Reflinks are not possible here (the error the kernel gave); nothing was changed.
    Unsupported(io::Error),
}

impl Store {
    pub(super) fn map_write_error(
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
    pub(super) fn timed_out(&self, task: &StoredTask, number: u32, step: IoStep) -> StoreError {
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
    pub(super) async fn hold_when_durable(
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
                    Err(err) if crate::io::reflink_unsupported(&err) => {
                        return Ok(Cloned::Unsupported(err))
                    }
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
    pub(super) fn finish(&self, task: &StoredTask) -> Result<(), StoreError> {
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
}

impl StoredTask {
    /// Appends a held piece's record and makes it durable. Any failure fails the task and cuts
    /// the journal back to what an fdatasync is known to have covered: a record left in the
    /// page cache must not come back as held after a restart.
    pub(super) fn append_record(self: &Arc<Self>, number: u32, crc: u32) -> io::Result<()> {
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

    pub(super) fn cut_journal_to_durable(&self, journal: &File) {
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
pub(super) struct GroupSync {
    /// (writes completed so far, writes known durable)
    pub(super) counts: Mutex<(u64, u64)>,
    /// Held by the one caller syncing for everyone; holds the failure once there is one.
    pub(super) leader: Mutex<Option<SyncFailure>>,
}

/// A failed flush, kept to report to every caller after it.
#[derive(Debug, Clone)]
pub(super) struct SyncFailure {
    pub(super) raw: Option<i32>,
    pub(super) kind: io::ErrorKind,
    pub(super) text: String,
}

impl SyncFailure {
    pub(super) fn of(err: &io::Error) -> SyncFailure {
        SyncFailure {
            raw: err.raw_os_error(),
            kind: err.kind(),
            text: err.to_string(),
        }
    }

    pub(super) fn error(&self) -> io::Error {
        match self.raw {
            Some(raw) => io::Error::from_raw_os_error(raw),
            None => io::Error::new(self.kind, self.text.clone()),
        }
    }
}

impl GroupSync {
    pub(super) fn sync(&self, flush: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
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
