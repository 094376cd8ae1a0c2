//! Test-only fault switches of the store's disk operations, armed in-process.

use super::*;

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
    pub(super) armed: Mutex<Vec<(String, Fault)>>,
    /// Skips the lock on the hot path when nothing is armed.
    pub(super) any: AtomicBool,
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
    pub(super) fn take(&self, task_id: &str, wanted: impl Fn(&Fault) -> bool) -> Option<Fault> {
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
    pub(super) fn sync(&self, task_id: &str, target: SyncTarget, file: &File) -> io::Result<()> {
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
