//! The buffer pool: one page-aligned region, allocated and pinned once at start-up, cut into
//! equal slots. Every piece in flight borrows slots from here, so the same memory can be
//! registered once with io_uring (fixed buffers) and with an RDMA NIC (memory regions):
//! bytes land from the network and go to disk without a copy.

use super::free_slots::FreeSlots;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Alignment O_DIRECT needs for addresses, offsets and lengths.
pub const DIRECT_IO_ALIGN: usize = 4096;
const HUGE_PAGE: usize = 2 * 1024 * 1024;
/// The byte a returned slot is filled with when poisoning is on (tests): a late device
/// write from a slot given back too early then writes this, which a test sees on disk.
pub const POISON: u8 = 0xA5;

/// What the pool was able to get from the kernel.
#[derive(Debug, Clone, Copy)]
pub struct PoolInfo {
    pub slot_size: usize,
    pub slot_count: usize,
    pub huge_pages: bool,
    pub locked: bool,
}

/// Who a buffer is for. Each has a reserved minimum of the pool and borrows from a common
/// part beyond it, so no one of them can take every slot: a host saturated by receiving still
/// serves (its peers' receives, which its own may be waiting for, keep moving) and imports
/// still progress, and the other way round. That is what keeps a P2P mesh, where every host
/// receives and serves at once, free of pool deadlocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    /// Pieces being fetched (and kept for the in-order hash).
    Receive,
    /// Pieces being read from the store for a peer.
    Serve,
    /// Pieces being copied in by an import.
    Import,
}

impl Budget {
    pub const ALL: [Budget; 3] = [Budget::Receive, Budget::Serve, Budget::Import];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Budget::Receive => "receive",
            Budget::Serve => "serve",
            Budget::Import => "import",
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Slots reserved for each budget; the rest of the pool is the common part all borrow from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shares {
    pub receive: usize,
    pub serve: usize,
    pub import: usize,
}

impl Shares {
    /// Nothing reserved: the whole pool is common, for a tool with one user of it (a
    /// benchmark of the disk path alone).
    pub const NONE: Shares = Shares {
        receive: 0,
        serve: 0,
        import: 0,
    };

    /// The rule the daemon uses: a quarter of the slots reserved for receiving, a quarter for
    /// serving, an eighth for imports, the remaining three eighths common.
    pub fn default_for(slot_count: usize) -> Shares {
        Shares {
            receive: slot_count / 4,
            serve: slot_count / 4,
            import: slot_count / 8,
        }
    }

    fn get(&self, budget: Budget) -> usize {
        match budget {
            Budget::Receive => self.receive,
            Budget::Serve => self.serve,
            Budget::Import => self.import,
        }
    }

    fn total(&self) -> usize {
        self.receive + self.serve + self.import
    }
}

/// One part of a pool split by NUMA node, as asked for: `slots` slots allocated on
/// `numa_node` (None: wherever the kernel likes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLayout {
    pub numa_node: Option<u32>,
    pub slots: usize,
}

/// One part of the pool as made: its slots `first_slot..first_slot + slots` and where their
/// pages landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolPart {
    pub numa_node: Option<u32>,
    pub first_slot: usize,
    pub slots: usize,
    /// Of the pages sampled after faulting in, how many are on `numa_node` (None: no node
    /// asked for, or the kernel could not say).
    pub pages_on_node: Option<(usize, usize)>,
}

impl PoolPart {
    fn range(&self) -> std::ops::Range<usize> {
        self.first_slot..self.first_slot + self.slots
    }
}

/// The slots not lent out, and how many of each budget's reserve and of the common part are.
struct Accounts {
    free: FreeSlots,
    reserve_used: [usize; 3],
    common_used: usize,
}

pub struct BufferPool {
    base: NonNull<u8>,
    len: usize,
    info: PoolInfo,
    /// One part per NUMA node with rails (one part without NUMA placement); a buffer's slots
    /// always lie in one part.
    parts: Box<[PoolPart]>,
    shares: Shares,
    common: usize,
    accounts: Mutex<Accounts>,
    /// Woken whenever slots come back.
    returned: Notify,
    /// Longest [`BufferPool::acquire`] waits, in milliseconds (0: unbounded).
    acquire_timeout_ms: AtomicU64,
    /// Per slot: device operations (an io_uring SQE, later an RDMA work request) that may
    /// still touch it. A buffer dropped while any is set is never given back (see `Drop`).
    device_holds: Box<[AtomicU32]>,
    /// Buffers dropped while a device could still touch them, and so kept out of the pool.
    returned_while_device_owned: AtomicU64,
    /// Buffers dropped while a device lease held them: their slots (still counted as used)
    /// wait here until every lease on them is released, then go back.
    quarantined: Mutex<Vec<Quarantined>>,
    /// Fill returned slots with [`POISON`] (tests).
    poison_on_release: AtomicBool,
    /// Receive slots kept after their piece was written (see [`PieceBuffer::linger`]), by
    /// every transfer together.
    lingering_slots: AtomicUsize,
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
    #[error("reserving {reserved} slots for the budgets leaves none common in a pool of {total}")]
    BadShares { reserved: usize, total: usize },
    #[error("a pool part needs at least one slot")]
    EmptyPart,
    #[error("mapping {bytes} bytes for the buffer pool failed: {source}")]
    Map { bytes: usize, source: io::Error },
    #[error("a {bytes}-byte piece needs {needed} slots but the {budget} budget of the pool can hold at most {total}")]
    PieceTooLarge {
        bytes: u64,
        needed: usize,
        total: usize,
        budget: Budget,
    },
    #[error("no {needed} free slots in the {budget} budget for a {bytes}-byte piece within {}s: every buffer it may use is held by work that is not finishing", after.as_secs_f64())]
    Timeout {
        bytes: u64,
        needed: usize,
        budget: Budget,
        after: Duration,
    },
}

impl BufferPool {
    /// Maps `slot_size * slot_count` bytes, with 2 MiB huge pages when the kernel has them,
    /// faulted in and locked (pinned) where the memlock limit allows; the budgets get
    /// [`Shares::default_for`].
    pub fn new(slot_size: usize, slot_count: usize) -> Result<Arc<BufferPool>, PoolError> {
        BufferPool::with_shares(slot_size, slot_count, Shares::default_for(slot_count))
    }

    /// [`BufferPool::new`] with the budgets' reserves given.
    pub fn with_shares(
        slot_size: usize,
        slot_count: usize,
        shares: Shares,
    ) -> Result<Arc<BufferPool>, PoolError> {
        let whole = PartLayout {
            numa_node: None,
            slots: slot_count,
        };
        BufferPool::with_layout(slot_size, &[whole], shares)
    }

    /// A pool of one part per entry of `layout`, in that order, each part's pages allocated on
    /// its NUMA node (preferred: a node short of memory gives pages from another rather than
    /// failing; where they landed is sampled and logged).
    pub fn with_layout(
        slot_size: usize,
        layout: &[PartLayout],
        shares: Shares,
    ) -> Result<Arc<BufferPool>, PoolError> {
        if slot_size == 0 || !slot_size.is_multiple_of(DIRECT_IO_ALIGN) {
            return Err(PoolError::BadSlotSize(slot_size));
        }
        let slot_count: usize = layout.iter().map(|p| p.slots).sum();
        if slot_count == 0 {
            return Err(PoolError::NoSlots);
        }
        if layout.iter().any(|p| p.slots == 0) {
            return Err(PoolError::EmptyPart);
        }
        if shares.total() >= slot_count {
            return Err(PoolError::BadShares {
                reserved: shares.total(),
                total: slot_count,
            });
        }
        let len = slot_size * slot_count;
        let placed = layout.iter().any(|p| p.numa_node.is_some());
        // With a memory policy to set, the pages are faulted in only after it is set.
        let (base, huge_pages) = map_region(len, !placed)?;
        let page = if huge_pages { HUGE_PAGE } else { 4096 };
        let mut parts = Vec::with_capacity(layout.len());
        let mut first_slot = 0;
        for part in layout {
            let at = first_slot * slot_size;
            let bytes = part.slots * slot_size;
            // SAFETY: `at..at+bytes` lies inside the fresh mapping.
            let ptr = unsafe { base.as_ptr().add(at) };
            if let Some(node) = part.numa_node {
                // SAFETY: a page-aligned range (slots are multiples of the page when huge
                // pages are in use, else of 4 KiB) of our own fresh mapping, not faulted in.
                if let Err(error) = unsafe { super::numa::prefer_node(ptr, bytes, node) } {
                    tracing::warn!(node, bytes, %error, "could not place a buffer pool part on its NUMA node; its pages come from anywhere");
                }
            }
            if placed {
                // SAFETY: as above; nothing has been handed out yet.
                unsafe { super::numa::fault_in(ptr, bytes, page) };
            }
            let pages_on_node = part.numa_node.and_then(|node| {
                // SAFETY: the range is ours and faulted in.
                let nodes = unsafe { super::numa::nodes_of_pages(ptr, bytes, page) }.ok()?;
                let on = nodes.iter().filter(|&&n| n == node as i32).count();
                Some((on, nodes.len()))
            });
            parts.push(PoolPart {
                numa_node: part.numa_node,
                first_slot,
                slots: part.slots,
                pages_on_node,
            });
            first_slot += part.slots;
        }
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
            parts: parts.into(),
            shares,
            common: slot_count - shares.total(),
            accounts: Mutex::new(Accounts {
                free: FreeSlots::all(slot_count),
                reserve_used: [0; 3],
                common_used: 0,
            }),
            returned: Notify::new(),
            acquire_timeout_ms: AtomicU64::new(0),
            device_holds: (0..slot_count).map(|_| AtomicU32::new(0)).collect(),
            returned_while_device_owned: AtomicU64::new(0),
            quarantined: Mutex::new(Vec::new()),
            poison_on_release: AtomicBool::new(false),
            lingering_slots: AtomicUsize::new(0),
        }))
    }

    /// The pool's parts, in slot order (one when the pool is not split by NUMA node).
    pub fn parts(&self) -> &[PoolPart] {
        &self.parts
    }

    /// The part holding `slot`.
    fn part_of_slot(&self, slot: u32) -> usize {
        (self.parts.iter())
            .position(|p| p.range().contains(&(slot as usize)))
            .expect("every slot lies in a part")
    }

    pub fn info(&self) -> PoolInfo {
        self.info
    }

    pub fn total_bytes(&self) -> usize {
        self.len
    }

    /// The slots reserved for each budget.
    pub fn shares(&self) -> Shares {
        self.shares
    }

    /// The slots `budget` may hold at most: its reserve and all of the common part.
    pub fn budget_limit(&self, budget: Budget) -> usize {
        self.shares.get(budget) + self.common
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

    /// Registers one part of the pool (a rail on that part's NUMA node), as
    /// [`BufferPool::register_rdma`] does the whole.
    pub fn register_rdma_part(
        self: &Arc<Self>,
        context: &Arc<ferry_rdma::RdmaContext>,
        part: usize,
    ) -> Result<ferry_rdma::RegisteredRegion, ferry_rdma::RdmaError> {
        let part = self.parts[part];
        let ptr = self.slot_ptr(part.first_slot as u32);
        // SAFETY: as in `register_rdma`, for a range inside the mapping.
        unsafe { context.register(ptr, part.slots * self.info.slot_size, false) }
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

    fn slots_for(&self, budget: Budget, bytes: u64) -> Result<usize, PoolError> {
        let needed = (bytes.max(1)).div_ceil(self.info.slot_size as u64) as usize;
        // A buffer lies in one part.
        let largest_part = self.parts.iter().map(|p| p.slots).max().unwrap_or(0);
        let total = self.budget_limit(budget).min(largest_part);
        if needed > total {
            return Err(PoolError::PieceTooLarge {
                bytes,
                needed,
                total,
                budget,
            });
        }
        Ok(needed)
    }

    /// Bounds every later [`BufferPool::acquire`] (`None`: waits as long as it takes).
    pub fn set_acquire_timeout(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |t| (t.as_millis() as u64).max(1));
        self.acquire_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// [`BufferPool::acquire_for`] the receiving side.
    pub async fn acquire(self: &Arc<Self>, bytes: u64) -> Result<PieceBuffer, PoolError> {
        self.acquire_for(Budget::Receive, bytes).await
    }

    /// Borrows enough slots of `budget` for `bytes`, waiting until they are free (at most
    /// the pool's acquire timeout, then [`PoolError::Timeout`]). Slots are taken all at once
    /// (never a few now and the rest later), so concurrent callers cannot deadlock, and a
    /// budget waits only while its own reserve and the common part are both spent.
    pub async fn acquire_for(
        self: &Arc<Self>,
        budget: Budget,
        bytes: u64,
    ) -> Result<PieceBuffer, PoolError> {
        self.acquire_near(budget, bytes, PartChoice::Any).await
    }

    /// [`BufferPool::acquire_for`], from the parts `from` allows (the part local to the rail
    /// that will carry the piece).
    pub async fn acquire_near(
        self: &Arc<Self>,
        budget: Budget,
        bytes: u64,
        from: PartChoice,
    ) -> Result<PieceBuffer, PoolError> {
        let needed = self.slots_for(budget, bytes)?;
        let waiting = async {
            loop {
                let returned = self.returned.notified();
                tokio::pin!(returned);
                // Registered before looking, so a return in between is not missed.
                returned.as_mut().enable();
                if let Some(buf) = self.take(budget, needed, bytes as usize, from) {
                    return buf;
                }
                returned.await;
            }
        };
        match self.acquire_timeout_ms.load(Ordering::Relaxed) {
            0 => Ok(waiting.await),
            ms => {
                let after = Duration::from_millis(ms);
                tokio::time::timeout(after, waiting)
                    .await
                    .map_err(|_| PoolError::Timeout {
                        bytes,
                        needed,
                        budget,
                        after,
                    })
            }
        }
    }

    /// Like [`BufferPool::acquire`] but returns `None` instead of waiting.
    pub fn try_acquire(self: &Arc<Self>, bytes: u64) -> Result<Option<PieceBuffer>, PoolError> {
        self.try_acquire_for(Budget::Receive, bytes)
    }

    /// Like [`BufferPool::acquire_for`] but returns `None` instead of waiting.
    pub fn try_acquire_for(
        self: &Arc<Self>,
        budget: Budget,
        bytes: u64,
    ) -> Result<Option<PieceBuffer>, PoolError> {
        let needed = self.slots_for(budget, bytes)?;
        Ok(self.take(budget, needed, bytes as usize, PartChoice::Any))
    }

    /// Like [`BufferPool::try_acquire_for`], from part `part` only.
    pub fn try_acquire_in(
        self: &Arc<Self>,
        budget: Budget,
        bytes: u64,
        part: usize,
    ) -> Result<Option<PieceBuffer>, PoolError> {
        let needed = self.slots_for(budget, bytes)?;
        Ok(self.take(budget, needed, bytes as usize, PartChoice::Only(part)))
    }

    /// Takes `needed` slots of one part for `budget` if its reserve and the common part have
    /// them, its own reserve first (leaving the common part to the others).
    fn take(
        self: &Arc<Self>,
        budget: Budget,
        needed: usize,
        len: usize,
        from: PartChoice,
    ) -> Option<PieceBuffer> {
        let mut accounts = self.accounts.lock().expect("pool lock");
        let at = budget.index();
        let reserve_free = self.shares.get(budget) - accounts.reserve_used[at];
        let from_reserve = needed.min(reserve_free);
        let from_common = needed - from_reserve;
        if self.common - accounts.common_used < from_common {
            return None;
        }
        // The parts to try, in order: the one asked for, then those with most free slots.
        let mut order: Vec<usize> = (0..self.parts.len()).collect();
        if self.parts.len() > 1 {
            order
                .sort_by_key(|&p| std::cmp::Reverse(accounts.free.count_in(self.parts[p].range())));
        }
        match from {
            PartChoice::Any => {}
            PartChoice::Prefer(first) => {
                order.retain(|&p| p != first);
                order.insert(0, first);
            }
            PartChoice::Only(only) => order = vec![only],
        }
        // Contiguous when a run is free: one memory window grants the whole piece.
        let slots = (order.into_iter())
            .find_map(|p| accounts.free.take_in(self.parts[p].range(), needed))?;
        accounts.reserve_used[at] += from_reserve;
        accounts.common_used += from_common;
        Some(PieceBuffer {
            pool: Arc::clone(self),
            slots,
            len,
            budget,
            from_reserve,
        })
    }

    pub fn free_slots(&self) -> usize {
        self.accounts.lock().expect("pool lock").free.len()
    }

    /// Slots `budget` could take now without waiting.
    pub fn available(&self, budget: Budget) -> usize {
        let accounts = self.accounts.lock().expect("pool lock");
        self.shares.get(budget) - accounts.reserve_used[budget.index()] + self.common
            - accounts.common_used
    }

    /// Buffers dropped while a device could still touch them, kept out of the pool until
    /// every lease on them is released (for good if held by a raw `lend_to_device`): a
    /// fetch cancelled with its windows granted, or a bug in an I/O path.
    pub fn returned_while_device_owned(&self) -> u64 {
        self.returned_while_device_owned.load(Ordering::Relaxed)
    }

    /// Receive slots that may linger at once: a quarter of what the receive budget may hold.
    /// Pieces waiting for a buffer then always find the other three quarters cycling, however
    /// many transfers keep buffers for their hashers.
    pub fn linger_limit(&self) -> usize {
        self.budget_limit(Budget::Receive) / 4
    }

    /// Receive slots lingering now, all transfers together.
    pub fn lingering_slots(&self) -> usize {
        self.lingering_slots.load(Ordering::Acquire)
    }

    /// Fills every slot given back with [`POISON`], so bytes read from a slot after it was
    /// returned are recognisable (tests).
    pub fn set_poison_on_release(&self, on: bool) {
        self.poison_on_release.store(on, Ordering::Relaxed);
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and no `PieceBuffer` is alive (each holds an Arc).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Maps `len` bytes, faulted in at once if `populate` (else the caller faults them in).
fn map_region(len: usize, populate: bool) -> Result<(NonNull<u8>, bool), PoolError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    if populate {
        flags |= libc::MAP_POPULATE;
    }
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

/// Which parts of the pool a buffer may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartChoice {
    /// Any part, the one with most free slots first.
    Any,
    /// This part if it has the slots, else another.
    Prefer(usize),
    /// This part only (a rail registered on it alone will carry the buffer).
    Only(usize),
}

/// Slots borrowed from the pool for one piece; given back when dropped.
pub struct PieceBuffer {
    pool: Arc<BufferPool>,
    slots: Vec<u32>,
    len: usize,
    budget: Budget,
    /// How many of the slots count against the budget's reserve (the rest: the common part).
    from_reserve: usize,
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

    /// The budget the slots were taken from.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// The pool part (NUMA node) the slots lie in.
    pub fn part(&self) -> usize {
        self.pool.part_of_slot(self.slots[0])
    }

    /// A buffer like this one (same length and budget) from pool part `part`, if it has the
    /// slots free now: for a piece whose rail is registered on another part than this buffer.
    pub fn sibling_in(&self, part: usize) -> Result<Option<PieceBuffer>, PoolError> {
        (self.pool).try_acquire_in(self.budget, self.len as u64, part)
    }

    /// Marks every slot as reachable by a device operation about to be started (an SQE, a
    /// work request): until [`PieceBuffer::device_done`], dropping the buffer keeps its slots
    /// out of the pool instead of handing them to the next piece.
    pub(crate) fn lend_to_device(&self) {
        for &slot in &self.slots {
            self.pool.device_holds[slot as usize].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Lends every slot to a device through a lease that outlives the buffer (see
    /// [`DeviceLease`]).
    pub fn lease_to_device(&self) -> DeviceLease {
        self.lend_to_device();
        DeviceLease {
            pool: Arc::clone(&self.pool),
            slots: self.slots.clone(),
        }
    }

    /// The completion of an operation marked with [`PieceBuffer::lend_to_device`] was seen.
    pub(crate) fn device_done(&self) {
        for &slot in &self.slots {
            let before = self.pool.device_holds[slot as usize].fetch_sub(1, Ordering::AcqRel);
            assert!(before > 0, "device_done without lend_to_device");
        }
    }

    /// Whether a device operation may still touch one of the slots.
    pub fn device_owned(&self) -> bool {
        self.slots
            .iter()
            .any(|&slot| self.pool.device_holds[slot as usize].load(Ordering::Acquire) > 0)
    }

    /// Keeps this buffer past the work it was taken for (a written piece kept for the
    /// transfer's hasher), if the pool-wide linger limit allows; else gives it back unchanged.
    /// Without one cap for all transfers, many transfers each keeping a few pieces ahead of
    /// their hash frontier could hold every receive slot while their frontier pieces wait for
    /// one: a deadlock that only the acquire timeout would end.
    pub fn linger(self) -> Result<LingeringBuffer, PieceBuffer> {
        let slots = self.slots.len();
        let limit = self.pool.linger_limit();
        let taken =
            self.pool
                .lingering_slots
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                    (now + slots <= limit).then_some(now + slots)
                });
        match taken {
            Ok(_) => Ok(LingeringBuffer { buf: Some(self) }),
            Err(_) => Err(self),
        }
    }

    /// Splits the buffer at byte `at` of the piece, a multiple of the slot size strictly
    /// inside it: this buffer keeps the slots before `at`, the one returned owns the rest.
    /// Each half is a buffer of its own (leased, quarantined and given back alone), so each
    /// stripe of a piece fetched over several rails is owned by its own fetch; [`join`]
    /// puts them back together.
    ///
    /// [`join`]: PieceBuffer::join
    ///
    /// # Panics
    /// When `at` is not a slot boundary inside the piece: a caller bug.
    pub fn split_off(&mut self, at: usize) -> PieceBuffer {
        let slot_size = self.pool.info.slot_size;
        assert!(
            at > 0 && at < self.len && at.is_multiple_of(slot_size),
            "split at {at} of a {}-byte piece in {slot_size}-byte slots",
            self.len
        );
        let kept = at / slot_size;
        let tail_slots = self.slots.split_off(kept);
        // The reserve's share is kept first, so both halves give back what they took.
        let kept_from_reserve = self.from_reserve.min(kept);
        let tail = PieceBuffer {
            pool: Arc::clone(&self.pool),
            slots: tail_slots,
            len: self.len - at,
            budget: self.budget,
            from_reserve: self.from_reserve - kept_from_reserve,
        };
        self.len = at;
        self.from_reserve = kept_from_reserve;
        tail
    }

    /// Appends `tail` (the inverse of [`PieceBuffer::split_off`]): this buffer's slots must
    /// be full, and both from one pool and budget.
    ///
    /// # Panics
    /// When they are not: a caller bug.
    pub fn join(&mut self, mut tail: PieceBuffer) {
        assert!(
            Arc::ptr_eq(&self.pool, &tail.pool) && self.budget == tail.budget,
            "joining buffers of different pools or budgets"
        );
        assert_eq!(
            self.len,
            self.capacity(),
            "joining onto a partly filled slot"
        );
        self.slots.append(&mut tail.slots);
        self.len += std::mem::take(&mut tail.len);
        self.from_reserve += std::mem::take(&mut tail.from_reserve);
        // `tail` holds no slot now: its drop gives nothing back.
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

impl std::fmt::Debug for PieceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceBuffer")
            .field("len", &self.len)
            .field("slots", &self.slots)
            .field("budget", &self.budget)
            .finish()
    }
}

impl Drop for PieceBuffer {
    fn drop(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        if slots
            .iter()
            .any(|&slot| self.pool.device_holds[slot as usize].load(Ordering::Acquire) > 0)
        {
            // A device may still read or write these slots. Handing them to the next piece
            // could send its bytes to the wrong place or let late bytes land in it, so they
            // wait until every lease on them is released (a flush completion proved the
            // device done); held by a raw `lend_to_device`, that is never.
            self.pool
                .returned_while_device_owned
                .fetch_add(1, Ordering::Relaxed);
            // Expected when a transfer is cancelled mid-piece; counted in the metrics.
            tracing::debug!(
                ?slots,
                "a buffer was dropped while a device may still use it; its slots stay out of the pool until the device is done"
            );
            self.pool
                .quarantined
                .lock()
                .expect("quarantine lock")
                .push(Quarantined {
                    slots,
                    budget: self.budget,
                    from_reserve: self.from_reserve,
                });
            self.pool.reclaim_quarantined();
            return;
        }
        self.pool.give_back(slots, self.budget, self.from_reserve);
    }
}

/// Slots of a buffer dropped while a device held them.
struct Quarantined {
    slots: Vec<u32>,
    budget: Budget,
    from_reserve: usize,
}

impl BufferPool {
    /// Returns `slots` (taken for `budget`, `from_reserve` of them from its reserve) to the
    /// free list.
    fn give_back(&self, slots: Vec<u32>, budget: Budget, from_reserve: usize) {
        if self.poison_on_release.load(Ordering::Relaxed) {
            for &slot in &slots {
                // SAFETY: the slot is ours (no buffer owns it any more, no device holds it)
                // and lies inside the mapping.
                unsafe { std::ptr::write_bytes(self.slot_ptr(slot), POISON, self.info.slot_size) };
            }
        }
        let count = slots.len();
        {
            let mut accounts = self.accounts.lock().expect("pool lock");
            accounts.reserve_used[budget.index()] -= from_reserve;
            accounts.common_used -= count - from_reserve;
            accounts.free.give_back(&slots);
        }
        self.returned.notify_waiters();
    }

    /// Gives back every quarantined buffer no device holds any more.
    fn reclaim_quarantined(&self) {
        let free: Vec<Quarantined> = {
            let mut quarantined = self.quarantined.lock().expect("quarantine lock");
            let (free, held): (Vec<_>, Vec<_>) = quarantined.drain(..).partition(|q| {
                q.slots
                    .iter()
                    .all(|&slot| self.device_holds[slot as usize].load(Ordering::Acquire) == 0)
            });
            *quarantined = held;
            free
        };
        for q in free {
            self.give_back(q.slots, q.budget, q.from_reserve);
        }
    }

    /// Slots waiting for a device to be done before they go back.
    pub fn quarantined_slots(&self) -> usize {
        self.quarantined
            .lock()
            .expect("quarantine lock")
            .iter()
            .map(|q| q.slots.len())
            .sum()
    }
}

/// A device's claim on a buffer's slots, apart from the buffer: while it lives, the slots
/// never go back to the pool, even if the buffer is dropped (they wait in quarantine). Drop it
/// only once a completion proves the device is done with them (an invalidation, a flush);
/// [`DeviceLease::keep_forever`] when that proof never came.
pub struct DeviceLease {
    pool: Arc<BufferPool>,
    slots: Vec<u32>,
}

impl DeviceLease {
    /// No proof the device is done will come: the slots stay out of the pool for good.
    pub fn keep_forever(self) {
        tracing::error!(slots = ?self.slots, "device never confirmed it was done with these slots; they stay out of the pool");
        std::mem::forget(self);
    }
}

impl Drop for DeviceLease {
    fn drop(&mut self) {
        for &slot in &self.slots {
            let before = self.pool.device_holds[slot as usize].fetch_sub(1, Ordering::AcqRel);
            debug_assert!(before > 0, "a device lease released twice");
        }
        self.pool.reclaim_quarantined();
    }
}

/// A buffer kept under the pool's linger limit ([`PieceBuffer::linger`]); the limit's share
/// is given back with the slots when it drops.
pub struct LingeringBuffer {
    buf: Option<PieceBuffer>,
}

impl std::ops::Deref for LingeringBuffer {
    type Target = PieceBuffer;

    fn deref(&self) -> &PieceBuffer {
        self.buf.as_ref().expect("present until dropped")
    }
}

impl Drop for LingeringBuffer {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            // Only `linger` reads the count and it never waits, so which goes back first
            // (the share here, the slots as `buf` drops) does not matter.
            buf.pool
                .lingering_slots
                .fetch_sub(buf.slots.len(), Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool split in two parts, both placed on node 0 (the one node every Linux host has):
    /// the pages land there, a buffer never spans the parts, a preferred part is used first and
    /// the other when it is full, and a strict take stays in its part.
    #[tokio::test]
    async fn a_pool_split_by_node_places_its_parts_and_keeps_each_buffer_in_one() {
        let layout = [
            PartLayout {
                numa_node: Some(0),
                slots: 4,
            },
            PartLayout {
                numa_node: Some(0),
                slots: 2,
            },
        ];
        let pool = BufferPool::with_layout(8192, &layout, Shares::NONE).unwrap();
        let parts = pool.parts();
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[1].first_slot, parts[1].slots), (4, 2));
        for part in parts {
            let (on, sampled) = part.pages_on_node.expect("the kernel says where pages are");
            assert!(sampled > 0);
            assert_eq!(
                on, sampled,
                "every sampled page on the node asked for: {part:?}"
            );
        }
        // Larger than the largest part: refused, though the pool has six slots.
        assert!(matches!(
            pool.acquire(5 * 8192).await,
            Err(PoolError::PieceTooLarge { total: 4, .. })
        ));
        let near = pool
            .acquire_near(Budget::Receive, 8192, PartChoice::Prefer(1))
            .await
            .unwrap();
        assert_eq!((near.part(), near.slots()), (1, &[4][..]));
        let strict = pool
            .try_acquire_in(Budget::Receive, 8192, 1)
            .unwrap()
            .unwrap();
        assert_eq!(strict.slots(), [5]);
        assert!(pool
            .try_acquire_in(Budget::Receive, 8192, 1)
            .unwrap()
            .is_none());
        // Part 1 is full: a preference for it falls back to part 0.
        let spill = pool
            .acquire_near(Budget::Receive, 2 * 8192, PartChoice::Prefer(1))
            .await
            .unwrap();
        assert_eq!((spill.part(), spill.slots()), (0, &[0, 1][..]));
        drop(near);
        // Free: 2, 3 in part 0 and 4 in part 1. Three slots are free but no part has three.
        assert_eq!(pool.free_slots(), 3);
        assert!(pool
            .try_acquire_for(Budget::Receive, 3 * 8192)
            .unwrap()
            .is_none());
        // Any part: the one with most free slots first.
        let any = pool.try_acquire(8192).unwrap().unwrap();
        assert_eq!(any.part(), 0);
    }

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

    /// A piece split into stripes: each half is a buffer of its own (a device lease on one
    /// keeps only its slots out of the pool), the budget's accounts balance whichever half
    /// goes back first, and joined again the bytes read as one piece.
    #[tokio::test]
    async fn a_buffer_splits_into_stripes_that_are_owned_alone_and_join_back() {
        let pool = BufferPool::with_shares(
            8192,
            6,
            Shares {
                receive: 2,
                serve: 1,
                import: 1,
            },
        )
        .unwrap();
        let mut whole = pool.acquire(3 * 8192 - 100).await.unwrap();
        let slots = whole.slots().to_vec();
        let mut tail = whole.split_off(8192);
        let last = tail.split_off(8192);
        assert_eq!(
            (whole.len(), tail.len(), last.len()),
            (8192, 8192, 8192 - 100)
        );
        assert_eq!([whole.slots(), tail.slots(), last.slots()].concat(), slots);
        for (n, part) in [&mut whole, &mut tail].into_iter().enumerate() {
            part.chunks_mut()[0].fill(n as u8 + 1);
        }
        // The middle stripe's device never confirmed: only its slot stays out.
        let lease = tail.lease_to_device();
        drop(tail);
        drop(last);
        assert_eq!((pool.free_slots(), pool.quarantined_slots()), (4, 1));
        drop(lease);
        assert_eq!((pool.free_slots(), pool.quarantined_slots()), (5, 0));
        drop(whole);
        assert_eq!(pool.free_slots(), 6);
        assert_eq!(
            pool.available(Budget::Receive),
            pool.budget_limit(Budget::Receive)
        );

        let mut a = pool.acquire(2 * 8192 + 1).await.unwrap();
        let mut b = a.split_off(8192);
        let c = b.split_off(8192);
        a.chunks_mut()[0].fill(1);
        b.chunks_mut()[0].fill(2);
        let crc_parts = {
            let mut h = crc32fast::Hasher::new();
            h.update(&[1; 8192]);
            h.update(&[2; 8192]);
            h.update(&c.chunks()[0][..1]);
            h.finalize()
        };
        b.join(c);
        a.join(b);
        assert_eq!((a.len(), a.slots().len()), (2 * 8192 + 1, 3));
        assert_eq!(a.crc32(), crc_parts);
        drop(a);
        assert_eq!(pool.free_slots(), 6);
        assert_eq!(
            pool.available(Budget::Receive),
            pool.budget_limit(Budget::Receive)
        );
    }

    /// Was an unbounded wait: a pool drained by stuck work hung every acquirer forever.
    #[tokio::test]
    async fn acquire_gives_up_after_the_pool_timeout() {
        let pool = BufferPool::new(8192, 1).unwrap();
        let held = pool.acquire(8192).await.unwrap();
        pool.set_acquire_timeout(Some(Duration::from_millis(100)));
        let started = std::time::Instant::now();
        let err = pool.acquire(100).await.expect_err("times out");
        let waited = started.elapsed();
        assert!(
            matches!(
                err,
                PoolError::Timeout {
                    needed: 1,
                    budget: Budget::Receive,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        drop(held);
        pool.acquire(100).await.expect("free again");
    }

    #[tokio::test]
    async fn budgets_take_their_reserve_first_and_borrow_the_common_part() {
        let shares = Shares {
            receive: 2,
            serve: 2,
            import: 1,
        };
        let pool = BufferPool::with_shares(8192, 8, shares).unwrap();
        assert_eq!(pool.budget_limit(Budget::Receive), 5);
        assert_eq!(pool.budget_limit(Budget::Import), 4);
        // Receive: its 2 reserved, then the 3 common ones.
        let a = pool.try_acquire(3 * 8192).unwrap().unwrap();
        let b = pool.try_acquire(2 * 8192).unwrap().unwrap();
        assert!(pool.try_acquire(8192).unwrap().is_none());
        assert_eq!(pool.available(Budget::Receive), 0);
        // The others still have their reserves, and nothing more.
        assert_eq!(pool.available(Budget::Serve), 2);
        assert!(pool
            .try_acquire_for(Budget::Serve, 3 * 8192)
            .unwrap()
            .is_none());
        let s = pool
            .try_acquire_for(Budget::Serve, 2 * 8192)
            .unwrap()
            .unwrap();
        let i = pool.try_acquire_for(Budget::Import, 8192).unwrap().unwrap();
        assert_eq!(pool.free_slots(), 0);
        // `a` took receive's reserve and one common slot: that one is anyone's again.
        drop(a);
        assert_eq!(pool.available(Budget::Serve), 1);
        assert_eq!(pool.available(Budget::Import), 1);
        assert_eq!(pool.available(Budget::Receive), 3);
        drop((b, s, i));
        assert_eq!(pool.free_slots(), 8);
        assert!(matches!(
            pool.try_acquire_for(Budget::Import, 5 * 8192),
            Err(PoolError::PieceTooLarge {
                budget: Budget::Import,
                total: 4,
                ..
            })
        ));
        assert!(matches!(
            BufferPool::with_shares(8192, 5, shares),
            Err(PoolError::BadShares { .. })
        ));
    }

    /// A waiter is woken by a return from another budget when that frees what it needs.
    #[tokio::test]
    async fn a_waiting_budget_is_woken_when_the_common_part_frees() {
        let pool = BufferPool::with_shares(
            8192,
            3,
            Shares {
                receive: 1,
                serve: 1,
                import: 0,
            },
        )
        .unwrap();
        pool.set_acquire_timeout(Some(Duration::from_secs(5)));
        let serve = pool.acquire_for(Budget::Serve, 2 * 8192).await.unwrap();
        let own = pool.acquire(8192).await.unwrap();
        let waiting = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { pool.acquire(8192).await.map(|b| b.slots().len()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "the common slot is the serve side's"
        );
        drop(serve);
        assert_eq!(waiting.await.unwrap().unwrap(), 1);
        drop(own);
        assert_eq!(pool.free_slots(), 3);
    }

    /// The safety net: a buffer dropped while a device may still use it never goes back.
    #[tokio::test]
    async fn a_buffer_dropped_while_device_owned_stays_out_of_the_pool() {
        let pool = BufferPool::new(8192, 2).unwrap();
        let buf = pool.acquire(8192).await.unwrap();
        buf.lend_to_device();
        drop(buf);
        assert_eq!(pool.returned_while_device_owned(), 1);
        assert_eq!(pool.free_slots(), 1);
        let buf = pool.acquire(8192).await.unwrap();
        buf.lend_to_device();
        buf.device_done();
        drop(buf);
        assert_eq!(pool.free_slots(), 1);
        assert_eq!(pool.returned_while_device_owned(), 1);
    }

    /// A lease outlives its buffer: the slots come back once the lease is released, not when
    /// the buffer is dropped, and never while a lease remains.
    #[tokio::test]
    async fn leased_slots_come_back_only_when_the_lease_is_released() {
        let pool = BufferPool::new(8192, 2).unwrap();
        pool.set_poison_on_release(true);
        let buf = pool.acquire(8192).await.unwrap();
        let lease = buf.lease_to_device();
        drop(buf);
        assert_eq!(pool.free_slots(), 1, "quarantined, not free");
        assert_eq!(pool.quarantined_slots(), 1);
        drop(lease);
        assert_eq!(pool.free_slots(), 2);
        assert_eq!(pool.quarantined_slots(), 0);
        // Released before the buffer drops: the buffer goes back at once.
        let buf = pool.acquire(16384).await.unwrap();
        drop(buf.lease_to_device());
        assert!(!buf.device_owned());
        drop(buf);
        assert_eq!(pool.free_slots(), 2);
        // Kept forever: never back.
        let buf = pool.acquire(8192).await.unwrap();
        buf.lease_to_device().keep_forever();
        drop(buf);
        assert_eq!(pool.free_slots(), 1);
        assert_eq!(pool.quarantined_slots(), 1);
    }
}
