//! Opening the store: loading every task from its metadata and journal, and setting aside
//! (never deleting) what cannot be loaded.

use super::*;

impl Store {
    /// A task dir that cannot be used: removed only if it provably holds nothing (creation
    /// never got to task.json, so no piece was ever journaled); anything else is moved under
    /// quarantine/ with its bytes, whatever the reason (EMFILE, EACCES, a newer format).
    pub(super) fn set_aside(&self, dir: &Path, reason: &str) {
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

    pub(super) fn move_to_quarantine(&self, dir: &Path, name: &str) -> io::Result<PathBuf> {
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

    pub(super) fn load_task(&self, dir: &Path) -> Result<Arc<StoredTask>, StoreError> {
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

    pub(super) fn task_handle(
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
            manifest: Mutex::new(None),
        })
    }
}
