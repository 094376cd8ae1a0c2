//! The verbs themselves: a device context with one protection domain, memory registered once,
//! and RC connections whose completions wake tokio through the completion channel's file
//! descriptor (no busy polling). Every `unsafe` call of the crate is here.

use crate::address::{self, AddressVector, LocalPort};
use crate::error::RdmaError;
use crate::handshake::Endpoint;
use crate::select::Selection;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue, GenericCompletionQueue,
    WorkCompletionStatus,
};
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
    SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::unix::AsyncFd;

/// An open device with its protection domain.
pub struct RdmaContext {
    context: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    selection: Selection,
}

impl RdmaContext {
    pub fn open(selection: Selection) -> Result<Arc<RdmaContext>, RdmaError> {
        let list = DeviceList::new().map_err(|e| RdmaError::Unavailable(e.to_string()))?;
        let device = list
            .iter()
            .find(|d| d.name() == selection.device)
            .ok_or_else(|| {
                RdmaError::NoSuchDevice(
                    selection.device.clone(),
                    list.iter().map(|d| d.name()).collect::<Vec<_>>().join(", "),
                )
            })?;
        let context = device
            .open()
            .map_err(|e| RdmaError::verbs("ibv_open_device", e))?;
        let pd = context
            .alloc_pd()
            .map_err(|e| RdmaError::verbs("ibv_alloc_pd", e))?;
        Ok(Arc::new(RdmaContext {
            context,
            pd,
            selection,
        }))
    }

    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// The selected port's LID as the port reports it now (a subnet manager may have assigned
    /// or changed it since discovery), with the link layer it reports.
    pub fn query_lid(&self) -> Result<u16, RdmaError> {
        let port = self
            .context
            .query_port(self.selection.port)
            .map_err(|e| RdmaError::verbs("ibv_query_port", e))?;
        let link_layer = crate::device::link_layer(&port);
        if link_layer != self.selection.link_layer {
            return Err(RdmaError::verbs(
                "ibv_query_port",
                format!(
                    "port {} is now {link_layer}, was {} at discovery",
                    self.selection.port, self.selection.link_layer
                ),
            ));
        }
        Ok(port.lid())
    }

    /// Allocates a type-2 memory window: remote access to exactly one bound range, through one
    /// queue pair, until invalidated.
    pub fn alloc_window(self: &Arc<Self>) -> Result<MemoryWindow, RdmaError> {
        // SAFETY: the PD is alive; a null result is checked.
        let mw = unsafe {
            rdma_mummy_sys::ibv_alloc_mw(
                self.pd.pd().as_ptr(),
                rdma_mummy_sys::ibv_mw_type::IBV_MW_TYPE_2,
            )
        };
        let mw = NonNull::new(mw)
            .ok_or_else(|| RdmaError::verbs("ibv_alloc_mw", std::io::Error::last_os_error()))?;
        Ok(MemoryWindow {
            mw,
            _context: Arc::clone(self),
        })
    }

    /// Registers `len` bytes at `ptr` for local writes (the NIC writes incoming data there)
    /// and, when `remote_write`, for peers' RDMA WRITEs. Memory windows can always be bound
    /// to it: that is how a receiver exposes just the slots it granted. Logs how long it took
    /// per GiB.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped and not be freed while the returned region (or any work
    /// request using it) is alive.
    pub unsafe fn register(
        self: &Arc<Self>,
        ptr: *mut u8,
        len: usize,
        remote_write: bool,
    ) -> Result<RegisteredRegion, RdmaError> {
        let mut access = AccessFlags::LocalWrite | AccessFlags::MemoryWindowBind;
        if remote_write {
            access |= AccessFlags::RemoteWrite;
        }
        let started = Instant::now();
        // SAFETY: forwarded from the caller's contract.
        let mr = unsafe { self.pd.reg_mr(ptr as usize, len, access) }
            .map_err(|e| RdmaError::verbs("ibv_reg_mr", e))?;
        let elapsed = started.elapsed();
        let per_gib = elapsed.as_secs_f64() / (len as f64 / (1u64 << 30) as f64);
        tracing::info!(bytes = len, millis = elapsed.as_secs_f64() * 1e3, seconds_per_gib = per_gib, remote_write, device = %self.selection.device, "registered memory region");
        Ok(RegisteredRegion {
            mr,
            base: ptr as usize,
            len,
            context: Arc::clone(self),
            seconds_per_gib: per_gib,
        })
    }
}

/// A type-2 memory window (see [`RdmaContext::alloc_window`]).
pub struct MemoryWindow {
    mw: NonNull<rdma_mummy_sys::ibv_mw>,
    _context: Arc<RdmaContext>,
}

// SAFETY: an ibv_mw is a handle the provider lets any thread use.
unsafe impl Send for MemoryWindow {}
// SAFETY: as above; it is only read (its pointer) through `&self`.
unsafe impl Sync for MemoryWindow {}

impl Drop for MemoryWindow {
    fn drop(&mut self) {
        // SAFETY: allocated by ibv_alloc_mw and freed once, here.
        unsafe { rdma_mummy_sys::ibv_dealloc_mw(self.mw.as_ptr()) };
    }
}

/// Memory registered with the device.
pub struct RegisteredRegion {
    mr: Arc<MemoryRegion>,
    base: usize,
    len: usize,
    context: Arc<RdmaContext>,
    seconds_per_gib: f64,
}

impl RegisteredRegion {
    pub fn lkey(&self) -> u32 {
        self.mr.lkey()
    }

    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }

    pub fn base(&self) -> u64 {
        self.base as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn seconds_per_gib(&self) -> f64 {
        self.seconds_per_gib
    }

    /// Whether `addr..addr+len` lies inside the region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base as u64
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= (self.base + self.len) as u64)
    }

    pub fn context(&self) -> &Arc<RdmaContext> {
        &self.context
    }
}

/// Send queue entries of a queue pair ([`ConnectionConfig::default`]): on the source, one per
/// chunk write of a piece (so it refuses a piece of more writes); on the receiver, the window
/// binds and invalidations of the pieces in flight.
pub const SEND_QUEUE_DEPTH: u32 = 256;
/// Receive queue entries of a receiver's queue pair: one per chunk of every piece in flight.
pub const RECEIVER_RECEIVE_DEPTH: u32 = 1024;

/// Queue depths and retry behaviour of one RC connection.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub send_depth: u32,
    pub receive_depth: u32,
    /// Local ACK timeout exponent: 4.096 µs * 2^timeout (18: about 1.07 s, NCCL's choice).
    /// Short timeouts (14, 67 ms) retransmit whenever the peer is briefly starved of CPU,
    /// and soft-RoCE in Linux 6.1 then fails writes with RemoteInvalidRequest under load.
    pub ack_timeout: u8,
    pub retry_count: u8,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            send_depth: SEND_QUEUE_DEPTH,
            receive_depth: 256,
            ack_timeout: 18,
            retry_count: 7,
        }
    }
}

/// A work completion, copied out of the completion queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    /// `None` on success, else the status name (for example `RemoteAccessError`).
    pub error: Option<String>,
    pub byte_len: u32,
    /// The immediate value of a received RDMA WRITE with immediate (host order).
    pub immediate: Option<u32>,
}

impl Completion {
    pub fn ok(&self) -> Result<(), RdmaError> {
        match &self.error {
            None => Ok(()),
            Some(status) => Err(RdmaError::Completion {
                wr_id: self.wr_id,
                status: status.clone(),
            }),
        }
    }
}

struct ChannelFd(RawFd);

impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// One reliable-connected queue pair with its own completion queue and channel.
pub struct Connection {
    // Drop order matters: the AsyncFd before the channel whose fd it watches, the QP before
    // the CQ it reports to.
    wakeups: AsyncFd<ChannelFd>,
    qp: Mutex<BasicQueuePair>,
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    /// Regions this QP's requests have used: kept registered until the QP is gone, so a
    /// request still in flight when its caller gave up never touches unregistered memory.
    regions: Mutex<Vec<Arc<RegisteredRegion>>>,
    local: Endpoint,
    local_port: LocalPort,
    // Keeps the device context (and its protection domain) alive as long as the queue pair.
    _context: Arc<RdmaContext>,
    config: ConnectionConfig,
}

// Opcode of a received RDMA WRITE with immediate (IBV_WC_RECV_RDMA_WITH_IMM).
const WC_RECV_RDMA_WITH_IMM: u32 = 1 << 7 | 1;

impl Connection {
    /// Creates the queue pair (in INIT) and its completion machinery. Must be called inside a
    /// tokio runtime.
    pub fn new(
        context: &Arc<RdmaContext>,
        config: ConnectionConfig,
    ) -> Result<Connection, RdmaError> {
        let channel = context
            .context
            .create_comp_channel()
            .map_err(|e| RdmaError::verbs("ibv_create_comp_channel", e))?;
        channel.set_nonblocking(true)?;
        let cq = context
            .context
            .create_cq_builder()
            .setup_cqe(config.send_depth + config.receive_depth)
            .setup_comp_channel(&channel, 0)
            .build()
            .map_err(|e| RdmaError::verbs("ibv_create_cq", e))?;
        let generic = GenericCompletionQueue::from(Arc::clone(&cq));
        let mut qp = context
            .pd
            .create_qp_builder()
            .setup_send_cq(generic.clone())
            .setup_recv_cq(generic)
            .setup_max_send_wr(config.send_depth)
            .setup_max_recv_wr(config.receive_depth)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .build()
            .map_err(|e| RdmaError::verbs("ibv_create_qp", e))?;
        let selection = &context.selection;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(selection.port)
            // Peers may write only through memory windows or regions that allow it; the QP
            // itself must permit remote writes for those to work.
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite);
        qp.modify(&attr)
            .map_err(|e| RdmaError::verbs("modify QP to INIT", e))?;
        let local_port = selection.local_port(context.query_lid()?);
        let local = Endpoint {
            qp_number: qp.qp_number(),
            packet_sequence: random_psn()?,
            gid: selection.gid.gid,
            lid: local_port.lid,
            mtu: selection.active_mtu,
            link_layer: local_port.link_layer,
            subnet_prefix: local_port.subnet_prefix,
        };
        // SAFETY: the fd belongs to `channel`, which the connection owns and drops only after
        // `wakeups` (field order), so it stays open for the AsyncFd's whole life.
        let wakeups = unsafe { AsyncFd::register(ChannelFd(channel.as_raw_fd())) }
            .map_err(std::io::Error::from)?;
        Ok(Connection {
            wakeups,
            qp: Mutex::new(qp),
            cq,
            channel,
            regions: Mutex::new(Vec::new()),
            local,
            local_port,
            _context: Arc::clone(context),
            config,
        })
    }

    pub fn local_endpoint(&self) -> Endpoint {
        self.local
    }

    /// The address vector [`Connection::connect`] would use towards `remote` (see
    /// [`address::address_vector`]).
    pub fn address_vector(&self, remote: &Endpoint) -> Result<AddressVector, RdmaError> {
        Ok(address::address_vector(&self.local_port, remote)?)
    }

    /// Moves the queue pair to RTR then RTS towards `remote`: LID routed on one InfiniBand
    /// subnet, with a GRH across subnets and always on RoCE.
    pub fn connect(&self, remote: &Endpoint) -> Result<(), RdmaError> {
        let vector = self.address_vector(remote)?;
        let mtu = match remote.mtu.min(self.local.mtu) {
            256 => Mtu::Mtu256,
            512 => Mtu::Mtu512,
            1024 => Mtu::Mtu1024,
            2048 => Mtu::Mtu2048,
            _ => Mtu::Mtu4096,
        };
        let mut qp = self.qp.lock().expect("qp lock");
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu)
            .setup_dest_qp_num(remote.qp_number)
            .setup_rq_psn(remote.packet_sequence)
            .setup_max_dest_read_atomic(0)
            .setup_min_rnr_timer(12);
        let mut address = AddressHandleAttribute::new();
        address
            .setup_dest_lid(vector.dest_lid)
            .setup_port(vector.port)
            .setup_service_level(vector.service_level);
        if let Some(grh) = vector.grh {
            address.setup_grh(
                &Gid::from(grh.dest_gid),
                grh.flow_label,
                grh.src_gid_index,
                grh.hop_limit,
                grh.traffic_class,
            );
        }
        attr.setup_address_vector(&address);
        qp.modify(&attr)
            .map_err(|e| RdmaError::verbs("modify QP to RTR", e))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.local.packet_sequence)
            .setup_timeout(self.config.ack_timeout)
            .setup_retry_cnt(self.config.retry_count)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(0);
        qp.modify(&attr)
            .map_err(|e| RdmaError::verbs("modify QP to RTS", e))?;
        Ok(())
    }

    /// Moves the queue pair to the error state at once: from now on no remote write lands
    /// through it (used when a request is abandoned while its memory windows are bound).
    pub fn fail(&self) -> Result<(), RdmaError> {
        let mut qp = self.qp.lock().expect("qp lock");
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        qp.modify(&attr)
            .map_err(|e| RdmaError::verbs("modify QP to ERR", e))
    }

    /// Posts `count` receive requests with no buffer: an RDMA WRITE with immediate consumes
    /// one and reports its immediate value, while the data goes where the writer aimed it.
    pub fn post_receives(&self, first_wr_id: u64, count: u32) -> Result<(), RdmaError> {
        let mut qp = self.qp.lock().expect("qp lock");
        let mut guard = qp.start_post_recv();
        for i in 0..u64::from(count) {
            let _ = guard.construct_wr(first_wr_id + i);
        }
        guard
            .post()
            .map_err(|e| RdmaError::verbs("ibv_post_recv", e))
    }

    fn keep_region(&self, region: &Arc<RegisteredRegion>) {
        let mut regions = self.regions.lock().expect("regions lock");
        if !regions.iter().any(|r| Arc::ptr_eq(r, region)) {
            regions.push(Arc::clone(region));
        }
    }

    /// Posts an RDMA WRITE with immediate of `len` bytes at `local_addr` (inside `local`) to
    /// `remote_addr` under `rkey`; it completes as `wr_id`.
    ///
    /// Safe because the bytes are read by the NIC from memory that stays registered (and so
    /// mapped) for as long as this connection: a caller that reuses the buffer before the
    /// completion can only send wrong bytes, which the receiver's digest check rejects.
    #[allow(clippy::too_many_arguments)]
    pub fn post_write_with_immediate(
        &self,
        wr_id: u64,
        local: &Arc<RegisteredRegion>,
        local_addr: u64,
        len: u32,
        rkey: u32,
        remote_addr: u64,
        immediate: u32,
    ) -> Result<(), RdmaError> {
        if !local.contains(local_addr, u64::from(len)) {
            return Err(RdmaError::verbs(
                "post RDMA WRITE",
                "local buffer lies outside its registered region",
            ));
        }
        self.keep_region(local);
        let mut qp = self.qp.lock().expect("qp lock");
        let mut guard = qp.start_post_send();
        let wr = guard
            .construct_wr(wr_id, WorkRequestFlags::Signaled)
            .setup_write_imm(rkey, remote_addr, immediate.to_be());
        // SAFETY: the range lies inside `local`, which stays registered while this QP exists.
        unsafe { wr.setup_sge(local.lkey(), local_addr, len) };
        guard
            .post()
            .map_err(|e| RdmaError::verbs("ibv_post_send", e))
    }

    /// Binds `window` to `len` bytes at `addr` (inside `region`) for remote writes through
    /// this queue pair only, and returns the rkey to grant. The bind completes as `wr_id`.
    /// A peer writing outside the range, through another queue pair, or after
    /// [`Connection::post_invalidate`], gets a remote access error.
    pub fn post_bind(
        &self,
        wr_id: u64,
        window: &MemoryWindow,
        region: &RegisteredRegion,
        addr: u64,
        len: u64,
    ) -> Result<u32, RdmaError> {
        if !region.contains(addr, len) {
            return Err(RdmaError::verbs(
                "bind memory window",
                "range lies outside its registered region",
            ));
        }
        // A type-2 window gets a fresh key (its low byte) with every bind.
        // SAFETY: `window` is a live MW; ibv_inc_rkey only computes the next key.
        let rkey = unsafe { rdma_mummy_sys::ibv_inc_rkey(window.mw.as_ref().rkey) };
        // SAFETY: an all-zero ibv_send_wr is a valid empty request; every field used is set.
        let mut wr: rdma_mummy_sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = rdma_mummy_sys::ibv_wr_opcode::IBV_WR_BIND_MW;
        wr.send_flags = rdma_mummy_sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.bind_mw_tso_union.bind_mw = rdma_mummy_sys::bind_mw_t {
            mw: window.mw.as_ptr(),
            rkey,
            bind_info: rdma_mummy_sys::ibv_mw_bind_info {
                // SAFETY: the MR handle lives as long as `region`.
                mr: unsafe { region.mr.mr().as_ptr() },
                addr,
                length: len,
                mw_access_flags: rdma_mummy_sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0,
            },
        };
        self.post_raw(&mut wr, "post bind memory window")?;
        // The provider names the window by `ibv_mw.rkey` in the next bind request, and the
        // device now knows it by the new key: keep the two in step (libibverbs does this for
        // type-1 binds only).
        // SAFETY: the MW is ours and alive; the field is plain data read only when posting.
        unsafe { (*window.mw.as_ptr()).rkey = rkey };
        Ok(rkey)
    }

    /// Invalidates the window bound under `rkey`: from the time this completes (as `wr_id`),
    /// writes through it fail on the writer's side.
    pub fn post_invalidate(&self, wr_id: u64, rkey: u32) -> Result<(), RdmaError> {
        // SAFETY: as in `post_bind`.
        let mut wr: rdma_mummy_sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = rdma_mummy_sys::ibv_wr_opcode::IBV_WR_LOCAL_INV;
        wr.send_flags = rdma_mummy_sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
        self.post_raw(&mut wr, "post local invalidate")
    }

    fn post_raw(
        &self,
        wr: &mut rdma_mummy_sys::ibv_send_wr,
        step: &'static str,
    ) -> Result<(), RdmaError> {
        let qp = self.qp.lock().expect("qp lock");
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is alive and locked; `wr` is a complete single request whose memory
        // (window, MR) outlives its completion by the caller's contract.
        let rc = unsafe { rdma_mummy_sys::ibv_post_send(qp.qp().as_ptr(), wr, &mut bad) };
        if rc != 0 {
            return Err(RdmaError::verbs(
                step,
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    fn drain(&self) -> Vec<Completion> {
        let mut out = Vec::new();
        while let Ok(poller) = self.cq.start_poll() {
            let before = out.len();
            for wc in poller {
                let status = WorkCompletionStatus::from(wc.status());
                let immediate =
                    (wc.opcode() == WC_RECV_RDMA_WITH_IMM).then(|| u32::from_be(wc.imm_data()));
                out.push(Completion {
                    wr_id: wc.wr_id(),
                    error: (status != WorkCompletionStatus::Success).then(|| format!("{status:?}")),
                    byte_len: wc.byte_len(),
                    immediate,
                });
            }
            if out.len() == before {
                break;
            }
        }
        out
    }

    /// Waits for completions without spinning: arms the completion channel, then sleeps on its
    /// file descriptor until the device signals. Returns at least one completion.
    pub async fn completions(&self) -> Result<Vec<Completion>, RdmaError> {
        loop {
            let ready = self.drain();
            if !ready.is_empty() {
                return Ok(ready);
            }
            // SAFETY: the CQ is alive (owned by self).
            let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
            if rc != 0 {
                return Err(RdmaError::verbs(
                    "ibv_req_notify_cq",
                    std::io::Error::from_raw_os_error(rc),
                ));
            }
            // A completion may have landed between the drain and arming.
            let ready = self.drain();
            if !ready.is_empty() {
                return Ok(ready);
            }
            let mut guard = self.wakeups.readable().await?;
            let mut event_cq = std::ptr::null_mut();
            let mut event_context = std::ptr::null_mut();
            // SAFETY: the channel is alive and non-blocking; the out-pointers are valid locals.
            let rc = unsafe {
                rdma_mummy_sys::ibv_get_cq_event(
                    self.channel.comp_channel().as_ptr(),
                    &mut event_cq,
                    &mut event_context,
                )
            };
            if rc == 0 {
                // SAFETY: acknowledges the one event just taken from this channel for its CQ.
                unsafe { rdma_mummy_sys::ibv_ack_cq_events(event_cq, 1) };
            } else {
                guard.clear_ready();
            }
        }
    }
}

/// A queue pair's first packet sequence number (24 bits), from the OS's random source
/// (`getrandom(2)`): a peer or an off-path host cannot predict it.
pub fn random_psn() -> Result<u32, RdmaError> {
    let mut bytes = [0u8; 4];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the pointer and length name the unfilled tail of a live local array.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RdmaError::verbs("getrandom for the queue pair's PSN", err));
        }
        filled += n as usize;
    }
    Ok(u32::from_ne_bytes(bytes) & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    #[test]
    fn psns_are_24_bit_and_not_repeated() {
        let psns: Vec<u32> = (0..64).map(|_| super::random_psn().unwrap()).collect();
        assert!(psns.iter().all(|&p| p <= 0xff_ffff));
        let mut unique = psns.clone();
        unique.sort_unstable();
        unique.dedup();
        // 64 draws from 2^24 values: a repeat has probability about 1e-4.
        assert!(unique.len() >= 63, "{psns:?}");
    }
}
