//! The buffer pool: one page-aligned region, allocated and pinned once at start-up, cut into
//! equal slots. Every piece in flight borrows slots from here, so the same memory can be
//! registered once with io_uring (fixed buffers) and with an RDMA NIC (memory regions):
//! bytes land from the network and go to disk without a copy.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Alignment O_DIRECT needs for addresses, offsets and lengths.
pub const DIRECT_IO_ALIGN: usize = 4096;
const HUGE_PAGE: usize = 2 * 1024 * 1024;

/// What the pool was able to get from the kernel.
#[derive(Debug, Clone, Copy)]
pub struct PoolInfo {
    pub slot_size: usize,
    pub slot_count: usize,
    pub huge_pages: bool,
    pub locked: bool,
}

pub struct BufferPool {
    base: NonNull<u8>,
    len: usize,
    info: PoolInfo,
    free: Mutex<Vec<u32>>,
    permits: Semaphore,
    /// Longest [`BufferPool::acquire`] waits, in milliseconds (0: unbounded).
    acquire_timeout_ms: AtomicU64,
}

// SAFETY: the region is plain memory owned by the pool for its whole life; every byte of it is
// reached only through a `PieceBuffer`, which owns its slots exclusively.
unsafe impl Send for BufferPool {}
// SAFETY: as above; shared access only hands out slots under the mutex.
unsafe impl Sync for BufferPool {}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    #[error("slot size {0} must be a non-zero multiple of {DIRECT_IO_ALIGN}")]
    BadSlotSize(usize),
    #[error("a pool needs at least one slot")]
    NoSlots,
    #[error("mapping {bytes} bytes for the buffer pool failed: {source}")]
    Map { bytes: usize, source: io::Error },
    #[error("a {bytes}-byte piece needs {needed} slots but the pool has {total}")]
    PieceTooLarge {
        bytes: u64,
        needed: usize,
        total: usize,
    },
    #[error("no {needed} free slots for a {bytes}-byte piece within {}s: every buffer is held by work that is not finishing", after.as_secs_f64())]
    Timeout {
        bytes: u64,
        needed: usize,
        after: Duration,
    },
}

impl BufferPool {
    /// Maps `slot_size * slot_count` bytes, with 2 MiB huge pages when the kernel has them,
    /// faulted in and locked (pinned) where the memlock limit allows.
    pub fn new(slot_size: usize, slot_count: usize) -> Result<Arc<BufferPool>, PoolError> {
        if slot_size == 0 || !slot_size.is_multiple_of(DIRECT_IO_ALIGN) {
            return Err(PoolError::BadSlotSize(slot_size));
        }
        if slot_count == 0 {
            return Err(PoolError::NoSlots);
        }
        let len = slot_size * slot_count;
        let (base, huge_pages) = map_region(len)?;
        // SAFETY: `base..base+len` is the mapping made just above.
        let locked = unsafe { libc::mlock(base.as_ptr().cast(), len) } == 0;
        if !locked {
            tracing::warn!(
                bytes = len,
                error = %io::Error::last_os_error(),
                "buffer pool could not be locked in memory (raise LimitMEMLOCK); it stays usable but may be swapped"
            );
        }
        Ok(Arc::new(BufferPool {
            base,
            len,
            info: PoolInfo {
                slot_size,
                slot_count,
                huge_pages,
                locked,
            },
            free: Mutex::new((0..slot_count as u32).rev().collect()),
            permits: Semaphore::new(slot_count),
            acquire_timeout_ms: AtomicU64::new(0),
        }))
    }

    pub fn info(&self) -> PoolInfo {
        self.info
    }

    pub fn total_bytes(&self) -> usize {
        self.len
    }

    /// The whole region, for registering it with a device (io_uring, an RDMA NIC).
    pub fn region(&self) -> (*mut u8, usize) {
        (self.base.as_ptr(), self.len)
    }

    /// Registers the whole pool with an RDMA device, once, at start-up. `self` must outlive
    /// the region: the daemon keeps both for its whole life.
    pub fn register_rdma(
        self: &Arc<Self>,
        context: &Arc<ferry_rdma::RdmaContext>,
    ) -> Result<ferry_rdma::RegisteredRegion, ferry_rdma::RdmaError> {
        // SAFETY: the region is the pool's own mapping, which is unmapped only when the pool is
        // dropped; callers keep an `Arc` of the pool beside the returned region.
        unsafe { context.register(self.base.as_ptr(), self.len, false) }
    }

    /// One `iovec` per slot, for `io_uring_register_buffers` (buffer index = slot number).
    pub fn slot_iovecs(&self) -> Vec<libc::iovec> {
        (0..self.info.slot_count)
            .map(|slot| libc::iovec {
                iov_base: self.slot_ptr(slot as u32).cast(),
                iov_len: self.info.slot_size,
            })
            .collect()
    }

    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!((slot as usize) < self.info.slot_count);
        // SAFETY: slot < slot_count, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(slot as usize * self.info.slot_size) }
    }

    fn slots_for(&self, bytes: u64) -> Result<usize, PoolError> {
        let needed = (bytes.max(1)).div_ceil(self.info.slot_size as u64) as usize;
        if needed > self.info.slot_count {
            return Err(PoolError::PieceTooLarge {
                bytes,
                needed,
                total: self.info.slot_count,
            });
        }
        Ok(needed)
    }

    /// Bounds every later [`BufferPool::acquire`] (`None`: waits as long as it takes).
    pub fn set_acquire_timeout(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |t| (t.as_millis() as u64).max(1));
        self.acquire_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Borrows enough slots for `bytes`, waiting until they are free (at most the pool's
    /// acquire timeout, then [`PoolError::Timeout`]). Slots are taken all at once (never a few
    /// now and the rest later), so concurrent callers cannot deadlock.
    pub async fn acquire(self: &Arc<Self>, bytes: u64) -> Result<PieceBuffer, PoolError> {
        let needed = self.slots_for(bytes)?;
        let waiting = self.permits.acquire_many(needed as u32);
        let permit = match self.acquire_timeout_ms.load(Ordering::Relaxed) {
            0 => waiting.await,
            ms => {
                let after = Duration::from_millis(ms);
                tokio::time::timeout(after, waiting)
                    .await
                    .map_err(|_| PoolError::Timeout {
                        bytes,
                        needed,
                        after,
                    })?
            }
        }
        .expect("pool semaphore is never closed");
        permit.forget();
        Ok(self.take(needed, bytes as usize))
    }

    /// Like [`BufferPool::acquire`] but returns `None` instead of waiting.
    pub fn try_acquire(self: &Arc<Self>, bytes: u64) -> Result<Option<PieceBuffer>, PoolError> {
        let needed = self.slots_for(bytes)?;
        match self.permits.try_acquire_many(needed as u32) {
            Ok(permit) => {
                permit.forget();
                Ok(Some(self.take(needed, bytes as usize)))
            }
            Err(_) => Ok(None),
        }
    }

    fn take(self: &Arc<Self>, needed: usize, len: usize) -> PieceBuffer {
        let mut free = self.free.lock().expect("pool lock");
        let at = free.len() - needed;
        let slots = free.split_off(at);
        PieceBuffer {
            pool: Arc::clone(self),
            slots,
            len,
        }
    }

    pub fn free_slots(&self) -> usize {
        self.permits.available_permits()
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and no `PieceBuffer` is alive (each holds an Arc).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn map_region(len: usize) -> Result<(NonNull<u8>, bool), PoolError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
    if len.is_multiple_of(HUGE_PAGE) {
        // SAFETY: an anonymous mapping with no address hint touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                flags | libc::MAP_HUGETLB,
                -1,
                0,
            )
        };
        if ptr != libc::MAP_FAILED {
            return Ok((NonNull::new(ptr.cast()).expect("mmap returned null"), true));
        }
    }
    // SAFETY: as above.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(PoolError::Map {
            bytes: len,
            source: io::Error::last_os_error(),
        });
    }
    if len >= HUGE_PAGE {
        // Transparent huge pages where the kernel allows: fewer TLB misses and fewer NIC
        // translation entries. Advisory, so the result does not matter.
        // SAFETY: advice on our own fresh mapping.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
    }
    Ok((NonNull::new(ptr.cast()).expect("mmap returned null"), false))
}

/// Slots borrowed from the pool for one piece; given back when dropped.
pub struct PieceBuffer {
    pool: Arc<BufferPool>,
    slots: Vec<u32>,
    len: usize,
}

impl PieceBuffer {
    /// The piece's length in bytes (the slots may hold more).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the slots hold in all.
    pub fn capacity(&self) -> usize {
        self.slots.len() * self.pool.info.slot_size
    }

    pub fn slot_size(&self) -> usize {
        self.pool.info.slot_size
    }

    /// The slot numbers, in content order.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// Start address of the `index`-th slot of this buffer, for I/O submitted by this crate.
    pub(crate) fn chunk_ptr(&self, index: usize) -> *mut u8 {
        self.pool.slot_ptr(self.slots[index])
    }

    /// The address of byte `offset` of the piece, for a device to read or write (an integer:
    /// nothing is dereferenced here).
    pub fn address_of(&self, offset: usize) -> u64 {
        let slot_size = self.pool.info.slot_size;
        self.chunk_ptr(offset / slot_size) as u64 + (offset % slot_size) as u64
    }

    /// The first `upto` bytes (at most the capacity), as one slice per slot.
    pub fn chunks_upto_mut(&mut self, upto: usize) -> Vec<&mut [u8]> {
        assert!(upto <= self.capacity());
        let slot_size = self.pool.info.slot_size;
        let mut left = upto;
        let mut chunks = Vec::with_capacity(self.slots.len());
        for &slot in &self.slots {
            if left == 0 {
                break;
            }
            let take = left.min(slot_size);
            // SAFETY: each slot is owned by this buffer alone and `take <= slot_size`; the
            // slices live no longer than the `&mut self` borrow.
            chunks.push(unsafe { std::slice::from_raw_parts_mut(self.pool.slot_ptr(slot), take) });
            left -= take;
        }
        chunks
    }

    /// The piece's bytes, one slice per slot.
    pub fn chunks_mut(&mut self) -> Vec<&mut [u8]> {
        self.chunks_upto_mut(self.len)
    }

    /// The piece's bytes, one slice per slot, read-only.
    pub fn chunks(&self) -> Vec<&[u8]> {
        let slot_size = self.pool.info.slot_size;
        let mut left = self.len;
        let mut chunks = Vec::with_capacity(self.slots.len());
        for &slot in &self.slots {
            if left == 0 {
                break;
            }
            let take = left.min(slot_size);
            // SAFETY: as in `chunks_upto_mut`, shared for the `&self` borrow.
            chunks.push(unsafe { std::slice::from_raw_parts(self.pool.slot_ptr(slot), take) });
            left -= take;
        }
        chunks
    }

    /// Zeroes the bytes between the piece's end and `upto`, so an aligned direct write of a
    /// short last piece writes zeros, not stale bytes of an earlier piece.
    pub fn zero_tail(&mut self, upto: usize) {
        let len = self.len;
        let mut at = 0;
        for chunk in self.chunks_upto_mut(upto) {
            let end = at + chunk.len();
            if end > len {
                let from = len.saturating_sub(at);
                chunk[from..].fill(0);
            }
            at = end;
        }
    }

    pub fn crc32(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        for chunk in self.chunks() {
            hasher.update(chunk);
        }
        hasher.finalize()
    }
}

impl Drop for PieceBuffer {
    fn drop(&mut self) {
        let count = self.slots.len();
        self.pool
            .free
            .lock()
            .expect("pool lock")
            .append(&mut self.slots);
        self.pool.permits.add_permits(count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_exclusive_and_returned() {
        let pool = BufferPool::new(8192, 4).unwrap();
        let mut a = pool.acquire(10_000).await.unwrap();
        assert_eq!(a.slots().len(), 2);
        let mut b = pool.acquire(8192).await.unwrap();
        assert_eq!(pool.free_slots(), 1);
        a.chunks_mut().iter_mut().for_each(|c| c.fill(1));
        b.chunks_mut().iter_mut().for_each(|c| c.fill(2));
        assert!(a.chunks().iter().all(|c| c.iter().all(|&x| x == 1)));
        assert!(pool.try_acquire(16384).unwrap().is_none());
        drop(a);
        assert_eq!(pool.free_slots(), 3);
        assert!(matches!(
            pool.acquire(5 * 8192).await,
            Err(PoolError::PieceTooLarge { .. })
        ));
        let mut c = pool.acquire(100).await.unwrap();
        c.chunks_upto_mut(8192).iter_mut().for_each(|ch| ch.fill(7));
        c.zero_tail(8192);
        assert!(c.chunks_upto_mut(8192)[0][100..].iter().all(|&x| x == 0));
        assert_eq!(c.chunks()[0].len(), 100);
    }

    /// Was an unbounded wait: a pool drained by stuck work hung every acquirer forever.
    #[tokio::test]
    async fn acquire_gives_up_after_the_pool_timeout() {
        let pool = BufferPool::new(8192, 1).unwrap();
        let held = pool.acquire(8192).await.unwrap();
        pool.set_acquire_timeout(Some(Duration::from_millis(100)));
        let started = std::time::Instant::now();
        let err = pool.acquire(100).await.err().expect("times out");
        let waited = started.elapsed();
        assert!(matches!(err, PoolError::Timeout { needed: 1, .. }), "{err}");
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        drop(held);
        pool.acquire(100).await.expect("free again");
    }
}
