//! Creating a task: its directory, preallocated content, metadata and journal, behind a gate
//! for that task id only.

use super::*;

impl Store {
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

    pub(super) fn create_task_dir(
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

    pub(super) fn fill_task_dir(
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
}
