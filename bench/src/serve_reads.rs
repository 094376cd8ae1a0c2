//! The serving side's disk reads: pieces of a stored task read cold into pool buffers, the way
//! the RDMA source does it (`Store::read_piece`: io_uring `ReadFixed`, O_DIRECT where the
//! filesystem allows), and the way it did before (`pread` through the page cache, one CPU
//! copy), beside `fio --rw=read --direct=1` in `disk_rows`.

use crate::report::{Measured, Stopwatch};
use crate::rig::fill;
use ferry_engine::geometry::Geometry;
use ferry_engine::io::{Budget, BufferPool, IoChoice, IoCounters, IoEngine};
use ferry_engine::store::{self, Store, StoredTask};
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use std::path::Path;
use std::sync::Arc;

/// A stored task of `size` bytes in `block` pieces, to be read back.
pub struct Seeded {
    store: Arc<Store>,
    task: Arc<StoredTask>,
    depth: usize,
}

/// What one pass of reads cost.
pub struct Pass {
    pub measured: Measured,
    /// CPU copies of payload per piece (the I/O engine's count; the `pread` path is 1).
    pub copies_per_piece: f64,
    pub direct: bool,
}

impl Seeded {
    pub async fn new(dir: &Path, size: u64, block: u64, depth: usize) -> anyhow::Result<Seeded> {
        // Twice the depth: the serving budget (its reserve and the common part) holds `depth`.
        let pool = BufferPool::new(block as usize, (2 * depth).max(2))?;
        let io = IoEngine::start(&pool, IoChoice::Auto, 1)?;
        let store = Arc::new(Store::open(&dir.join("serve-store"), pool, io, true)?);
        let task = store.create_or_get(&"e".repeat(64), Geometry::new(size, block)?)?;
        for piece in task.geometry().pieces() {
            let mut buf = store.pool().acquire(piece.length).await?;
            fill(&mut buf, piece.number);
            let crc = buf.crc32();
            store.write_piece(&task, piece, buf, crc).await.1?;
        }
        Ok(Seeded { store, task, depth })
    }

    /// Drops the content's pages from the page cache: every read goes to the device.
    fn make_cold(&self) -> anyhow::Result<()> {
        let file = std::fs::File::open(self.task.content_path())?;
        file.sync_all()?;
        posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)?;
        Ok(())
    }

    /// Every piece through `Store::read_piece`, `depth` at a time, cold.
    pub async fn engine_reads(&self) -> anyhow::Result<Pass> {
        self.make_cold()?;
        let counters = Arc::clone(self.store.io_counters());
        let (reads, copies) = (
            IoCounters::get(&counters.reads),
            IoCounters::get(&counters.read_payload_copies),
        );
        let watch = Stopwatch::start();
        let mut running = tokio::task::JoinSet::new();
        for piece in self.task.geometry().pieces() {
            if running.len() >= self.depth {
                running.join_next().await.expect("non-empty")??;
            }
            let (store, task) = (Arc::clone(&self.store), Arc::clone(&self.task));
            running.spawn(async move {
                store.read_piece(&task, piece).await?;
                anyhow::Ok(())
            });
        }
        while let Some(done) = running.join_next().await {
            done??;
        }
        let measured = watch.stop(self.task.geometry().content_length());
        let pieces = IoCounters::get(&counters.reads) - reads;
        let copied = IoCounters::get(&counters.read_payload_copies) - copies;
        Ok(Pass {
            measured,
            copies_per_piece: copied as f64 / pieces.max(1) as f64,
            direct: copied == 0,
        })
    }

    /// The path the RDMA source had before: `pread` through the page cache into a pool
    /// buffer on a blocking thread, `depth` at a time, cold.
    pub async fn pread_reads(&self) -> anyhow::Result<Pass> {
        self.make_cold()?;
        let file = self.task.read_file()?;
        let watch = Stopwatch::start();
        let mut running = tokio::task::JoinSet::new();
        for piece in self.task.geometry().pieces() {
            if running.len() >= self.depth {
                running.join_next().await.expect("non-empty")??;
            }
            let mut buf = self
                .store
                .pool()
                .acquire_for(Budget::Serve, piece.length)
                .await?;
            let file = Arc::clone(&file);
            running.spawn_blocking(move || {
                anyhow::Ok(store::read_range_into(&file, piece.offset, &mut buf)?)
            });
        }
        while let Some(done) = running.join_next().await {
            done??;
        }
        Ok(Pass {
            measured: watch.stop(self.task.geometry().content_length()),
            copies_per_piece: 1.0,
            direct: false,
        })
    }

    pub fn remove(self) -> anyhow::Result<()> {
        self.store.delete(self.task.id())?;
        Ok(())
    }
}
