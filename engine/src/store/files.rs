//! Task files opened on demand, a bounded number at a time (least recently used closed first).

use super::*;

/// Descriptors each task may hold: the content for writes, for reads through the page
/// cache and for serving reads (O_DIRECT where it can), the journal.
pub(super) const FDS_PER_TASK: u64 = 4;
/// Descriptors left for everything else (sockets, the pool, rings, logs).
pub(super) const FDS_RESERVED: u64 = 256;

/// `max_open_tasks` when the options leave it to the descriptor limit.
pub(super) fn derived_open_tasks() -> usize {
    let limit = crate::io::open_file_limit().unwrap_or(1024);
    (limit.saturating_sub(FDS_RESERVED) / FDS_PER_TASK).clamp(8, 1 << 20) as usize
}

/// A task's descriptors, opened on first use and closed again by [`OpenFiles`]. Users take
/// an `Arc` clone for as long as they use one, so closing never pulls a descriptor from
/// under a write or a piece being served: it closes when the last clone goes.
#[derive(Default)]
pub(super) struct Handles {
    /// The content through the page cache, for serving.
    pub(super) read: Option<Arc<File>>,
    /// The content for piece reads by the I/O engine (serving), O_DIRECT where possible.
    pub(super) serve: Option<Arc<TaskFile>>,
    pub(super) write: Option<Arc<WriteHandles>>,
}

pub(super) struct WriteHandles {
    pub(super) content: Arc<TaskFile>,
    /// Appended under the task's journal lock, synced without it.
    pub(super) journal: File,
}

/// Keeps at most `limit` tasks' descriptors open: opening one more closes those of the least
/// recently used task not in use (none in use: the limit is passed for a while).
pub(super) struct OpenFiles {
    pub(super) limit: usize,
    pub(super) direct_io: bool,
    pub(super) io: Arc<IoEngine>,
    pub(super) clock: AtomicU64,
    pub(super) open: Mutex<HashMap<String, Weak<StoredTask>>>,
}

impl OpenFiles {
    pub(super) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// `task` has just opened descriptors: count it, and close others past the limit.
    pub(super) fn opened(&self, task: &Arc<StoredTask>) {
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

    pub(super) fn forget(&self, task_id: &str) {
        self.open.lock().expect("open files lock").remove(task_id);
    }

    pub(super) fn count(&self) -> usize {
        self.open.lock().expect("open files lock").len()
    }
}
