//! Reading held pieces for serving: straight from the content file into a pool buffer
//! through the I/O engine (O_DIRECT where the filesystem and the piece's alignment allow:
//! no CPU copies the payload), bounded by the store's I/O timeout.

use super::*;
use crate::io::{Budget, PartChoice, ReadRequest, DIRECT_IO_ALIGN};

impl StoredTask {
    /// The content file for the I/O engine's piece reads; opened now if it was closed.
    /// O_DIRECT when the store asks for direct I/O and every piece starts on a block
    /// boundary (the piece length is a multiple of the block).
    fn serve_file(self: &Arc<Self>) -> io::Result<Arc<TaskFile>> {
        self.last_used.store(self.files.tick(), Ordering::Relaxed);
        let mut handles = self.handles.lock().expect("handles lock");
        if let Some(serve) = &handles.serve {
            return Ok(Arc::clone(serve));
        }
        let aligned = self
            .geometry
            .piece_length()
            .is_multiple_of(DIRECT_IO_ALIGN as u64);
        let serve = Arc::new(TaskFile::open_read(
            &self.content_path(),
            self.files.direct_io && aligned,
        )?);
        let first = handles.read.is_none() && handles.write.is_none();
        handles.serve = Some(Arc::clone(&serve));
        drop(handles);
        if first {
            self.files.opened(self);
        }
        Ok(serve)
    }

    /// Drops the serving descriptor (the task is deleted).
    pub(super) fn close_serve(&self, io: &IoEngine) {
        let serve = self.handles.lock().expect("handles lock").serve.take();
        if let Some(serve) = serve {
            io.release_file(&serve);
        }
    }
}

impl Store {
    /// Reads held piece `piece` of `task` into `buf` (a buffer of the piece's length).
    /// The buffer comes back, unless the read timed out: then it stays with the read still
    /// in flight (returning to the pool when that completes) and `None` comes back.
    pub async fn read_piece_into(
        &self,
        task: &Arc<StoredTask>,
        piece: PieceRange,
        buf: PieceBuffer,
    ) -> (Option<PieceBuffer>, Result<(), StoreError>) {
        if buf.len() as u64 != piece.length {
            let err = StoreError::WrongLength {
                number: piece.number,
                got: buf.len(),
                expected: piece.length,
            };
            return (Some(buf), Err(err));
        }
        let file = match task.serve_file() {
            Ok(file) => file,
            Err(err) => {
                let doing = format!("opening the content of task {} for reading", task.id);
                return (Some(buf), Err(StoreError::io(doing, err)));
            }
        };
        let len = file.io_len(buf.len());
        let request = ReadRequest {
            file,
            offset: piece.offset,
            buf,
            len,
        };
        // On timeout the dropped future leaves the buffer with the read in flight.
        let Ok((buf, read)) = tokio::time::timeout(self.io_timeout, self.io.read(request)).await
        else {
            let err = StoreError::ReadTimeout {
                task_id: task.id.clone(),
                piece: piece.number,
                after: self.io_timeout,
            };
            return (None, Err(err));
        };
        let result = match read {
            Ok(got) if got as u64 == piece.length => Ok(()),
            Ok(got) => Err(StoreError::ShortRead {
                task_id: task.id.clone(),
                piece: piece.number,
                got,
                expected: piece.length,
            }),
            Err(err) => Err(StoreError::io(
                format!("reading piece {} of {}", piece.number, task.id),
                err,
            )),
        };
        (Some(buf), result)
    }

    /// A buffer of the serving budget (which receiving and imports cannot exhaust) holding
    /// piece `piece` of `task`, read by [`Store::read_piece_into`].
    pub async fn read_piece(
        &self,
        task: &Arc<StoredTask>,
        piece: PieceRange,
    ) -> Result<PieceBuffer, StoreError> {
        self.read_piece_near(task, piece, PartChoice::Any).await
    }

    /// [`Store::read_piece`] into a buffer from the pool parts `from` allows (those the rail
    /// that sends it is registered on).
    pub async fn read_piece_near(
        &self,
        task: &Arc<StoredTask>,
        piece: PieceRange,
        from: PartChoice,
    ) -> Result<PieceBuffer, StoreError> {
        let buf = (self.pool)
            .acquire_near(Budget::Serve, piece.length, from)
            .await?;
        match self.read_piece_into(task, piece, buf).await {
            (Some(buf), Ok(())) => Ok(buf),
            (_, Err(err)) => Err(err),
            (None, Ok(())) => unreachable!("a read that completed gives its buffer back"),
        }
    }

    /// The I/O engine's counters (reads and their payload copies, ring rebuilds).
    pub fn io_counters(&self) -> &Arc<crate::io::IoCounters> {
        self.io.counters()
    }

    /// The test-only fault switches of the I/O engine.
    pub fn io_faults(&self) -> &Arc<crate::io::IoFaults> {
        self.io.faults()
    }
}
