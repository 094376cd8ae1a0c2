//! The verbs themselves: a device context with one protection domain and one completion
//! thread ([`crate::poller`]), memory registered once, and RC connections whose completions
//! that thread reaps and hands over. The crate's `unsafe` calls are here and in the poller.

use crate::address::{self, AddressVector, LocalPort};
use crate::error::RdmaError;
use crate::handshake::Endpoint;
use crate::poller::{PollMode, Poller};
use crate::select::Selection;
use crate::sendq::SendQueue;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue, GenericCompletionQueue,
};
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairAttribute, QueuePairState};
use sideway::ibverbs::AccessFlags;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// An open device with its protection domain.
pub struct RdmaContext {
    context: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    selection: Selection,
    /// The device is soft-RoCE, whose kernel driver hands user space its completions with the
    /// kernel's flag values: "invalidated" arrives as bit 2 (the kernel's
    /// IB_WC_WITH_INVALIDATE), not bit 3 (IBV_WC_WITH_INV).
    kernel_wc_flags: bool,
    /// Reaps the completion queues of every connection on this device.
    poller: Poller,
}

/// The vendor id soft-RoCE (rdma_rxe) reports.
const RXE_VENDOR_ID: u32 = 0xff_ffff;

impl RdmaContext {
    /// Opens the device with a completion thread that sleeps on events ([`PollMode::Event`]).
    pub fn open(selection: Selection) -> Result<Arc<RdmaContext>, RdmaError> {
        RdmaContext::open_with(selection, PollMode::Event)
    }

    /// Opens the device; its completion thread polls as `poll` says.
    pub fn open_with(selection: Selection, poll: PollMode) -> Result<Arc<RdmaContext>, RdmaError> {
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
        let vendor = context
            .query_device()
            .map_err(|e| RdmaError::verbs("ibv_query_device", e))?
            .vendor_id();
        let poller = Poller::start(&selection.device, poll)?;
        Ok(Arc::new(RdmaContext {
            context,
            pd,
            selection,
            kernel_wc_flags: vendor == RXE_VENDOR_ID,
            poller,
        }))
    }

    /// How this device's completion thread polls.
    pub fn poll_mode(&self) -> PollMode {
        self.poller.mode()
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
// SAFETY: as above; `&self` gives no access to the window at all (binding it, which updates
// its rkey field, takes `&mut`).
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

/// Send queue entries of a queue pair ([`ConnectionConfig::default`]): on the source, the
/// chunk writes and the completing message of every piece it has on the wire; on the
/// receiver, the window binds, requests and invalidations of the pieces in flight.
pub const SEND_QUEUE_DEPTH: u32 = 512;
/// Bytes of one control message slot (a request or an answer carried by SEND): the largest
/// message Ferry sends, a request granting 64 slots, takes about 1.1 KiB.
pub const CONTROL_MESSAGE_BYTES: usize = 2048;
/// Control messages a queue pair can receive without the peer waiting (receives posted, each
/// re-posted once its message is copied out): bounds the pieces in flight per queue pair.
pub const CONTROL_RECEIVES: u32 = 128;
/// Work request ids with this top byte belong to the connection's own control receives.
const CONTROL_RECEIVE_TAG: u64 = 0xfe << 56;

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
    /// Control-message receives the connection posts and re-posts itself (at most
    /// `receive_depth`); 0 for none.
    pub control_receives: u32,
    /// Control messages that may be in flight outward at once (each holds a slot of
    /// registered memory until its completion).
    pub control_sends: u32,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            send_depth: SEND_QUEUE_DEPTH,
            receive_depth: CONTROL_RECEIVES,
            ack_timeout: 18,
            retry_count: 7,
            control_receives: CONTROL_RECEIVES,
            control_sends: CONTROL_RECEIVES,
        }
    }
}

/// A work completion's status (`ibv_wc_status`), typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WcStatus {
    Success,
    LocalLength,
    LocalQueuePairOperation,
    LocalProtection,
    /// The queue pair is in the error state: the request was never carried out.
    Flushed,
    MemoryWindowBind,
    BadResponse,
    LocalAccess,
    RemoteInvalidRequest,
    /// The peer refused the access: a write outside, or after, what it granted.
    RemoteAccess,
    RemoteOperation,
    RetryExceeded,
    ReceiverNotReadyRetryExceeded,
    Fatal,
    ResponseTimeout,
    General,
    Other(u32),
}

impl WcStatus {
    pub fn from_raw(status: u32) -> WcStatus {
        use rdma_mummy_sys::ibv_wc_status as s;
        match status {
            s::IBV_WC_SUCCESS => WcStatus::Success,
            s::IBV_WC_LOC_LEN_ERR => WcStatus::LocalLength,
            s::IBV_WC_LOC_QP_OP_ERR => WcStatus::LocalQueuePairOperation,
            s::IBV_WC_LOC_PROT_ERR => WcStatus::LocalProtection,
            s::IBV_WC_WR_FLUSH_ERR => WcStatus::Flushed,
            s::IBV_WC_MW_BIND_ERR => WcStatus::MemoryWindowBind,
            s::IBV_WC_BAD_RESP_ERR => WcStatus::BadResponse,
            s::IBV_WC_LOC_ACCESS_ERR => WcStatus::LocalAccess,
            s::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemoteInvalidRequest,
            s::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccess,
            s::IBV_WC_REM_OP_ERR => WcStatus::RemoteOperation,
            s::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceeded,
            s::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::ReceiverNotReadyRetryExceeded,
            s::IBV_WC_FATAL_ERR => WcStatus::Fatal,
            s::IBV_WC_RESP_TIMEOUT_ERR => WcStatus::ResponseTimeout,
            s::IBV_WC_GENERAL_ERR => WcStatus::General,
            other => WcStatus::Other(other),
        }
    }

    pub fn is_success(self) -> bool {
        self == WcStatus::Success
    }
}

impl std::fmt::Display for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WcStatus::Other(code) => write!(f, "work completion status {code}"),
            // The variant names are the statuses' names (RemoteAccess, RetryExceeded, ...).
            named => write!(f, "{named:?}"),
        }
    }
}

/// What kind of work a successful completion reports (`ibv_wc_opcode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WcOpcode {
    Send,
    RdmaWrite,
    BindWindow,
    LocalInvalidate,
    /// A control message (or another SEND) arrived.
    Receive,
    /// An RDMA WRITE with immediate arrived.
    ReceiveWithImmediate,
    /// Undefined on error completions.
    Other(u32),
}

impl WcOpcode {
    fn from_raw(opcode: u32) -> WcOpcode {
        use rdma_mummy_sys::ibv_wc_opcode as o;
        match opcode {
            o::IBV_WC_SEND => WcOpcode::Send,
            o::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            o::IBV_WC_BIND_MW => WcOpcode::BindWindow,
            o::IBV_WC_LOCAL_INV => WcOpcode::LocalInvalidate,
            o::IBV_WC_RECV => WcOpcode::Receive,
            WC_RECV_RDMA_WITH_IMM => WcOpcode::ReceiveWithImmediate,
            other => WcOpcode::Other(other),
        }
    }
}

/// A work completion, copied out of the completion queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub status: WcStatus,
    pub opcode: WcOpcode,
    pub byte_len: u32,
    /// The immediate value of a received RDMA WRITE with immediate (host order).
    pub immediate: Option<u32>,
    /// The rkey a received SEND_WITH_INVALIDATE invalidated here (the device did it before
    /// this completion was reported).
    pub invalidated_rkey: Option<u32>,
    /// A control message received into one of the connection's own slots (copied out; the
    /// slot is posted again).
    pub message: Option<Vec<u8>>,
}

impl Completion {
    pub fn ok(&self) -> Result<(), RdmaError> {
        if self.status.is_success() {
            Ok(())
        } else {
            Err(RdmaError::Completion {
                wr_id: self.wr_id,
                status: self.status,
            })
        }
    }

    pub fn is_error(&self) -> bool {
        !self.status.is_success()
    }
}

/// Work counted on one connection since it was made: what the design figures per piece are
/// computed from (they do not depend on speed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkCounts {
    /// Send-queue work requests posted (writes, sends, binds, invalidations).
    pub send_requests: u64,
    /// Of those, the signalled ones (each costs a completion to reap).
    pub signalled: u64,
    /// Completions reaped (send and receive side).
    pub completions: u64,
    /// Times a waiter slept on the completion channel and was woken by the device.
    pub wakeups: u64,
    /// Control messages sent and received over the queue pair.
    pub messages_sent: u64,
    pub messages_received: u64,
}

/// Registered memory for control messages: `receives` slots the NIC writes into, then `sends`
/// slots it reads from. Touched only through raw pointers: the NIC writes receive slots while
/// Rust code runs, so no reference to the buffer as a whole ever exists.
struct ControlRing {
    // The registration goes before the memory it covers.
    mr: Option<Arc<MemoryRegion>>,
    base: NonNull<u8>,
    len: usize,
    receives: u32,
    free_sends: Vec<u32>,
    sends_in_flight: std::collections::HashMap<u64, u32>,
}

// SAFETY: the ring's memory is reached only through its raw pointer, under the connection's
// mutex, at slots whose ownership (NIC or CPU) the completions settle.
unsafe impl Send for ControlRing {}

impl ControlRing {
    fn new(
        pd: &Arc<ProtectionDomain>,
        receives: u32,
        sends: u32,
    ) -> Result<ControlRing, RdmaError> {
        let len = (receives + sends) as usize * CONTROL_MESSAGE_BYTES;
        let base = if len == 0 {
            NonNull::dangling()
        } else {
            let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
            // SAFETY: the layout has a non-zero size; a null result is checked.
            NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
                .ok_or_else(|| RdmaError::verbs("allocating control slots", "out of memory"))?
        };
        let mut ring = ControlRing {
            mr: None,
            base,
            len,
            receives,
            free_sends: (receives..receives + sends).rev().collect(),
            sends_in_flight: std::collections::HashMap::new(),
        };
        if len > 0 {
            // SAFETY: the allocation stays alive until `Drop`, which drops the registration
            // first.
            let mr = unsafe { pd.reg_mr(base.as_ptr() as usize, len, AccessFlags::LocalWrite) }
                .map_err(|e| RdmaError::verbs("ibv_reg_mr for control slots", e))?;
            ring.mr = Some(mr);
        }
        Ok(ring)
    }

    fn slot_addr(&self, slot: u32) -> u64 {
        self.base.as_ptr() as u64 + u64::from(slot) * CONTROL_MESSAGE_BYTES as u64
    }

    fn lkey(&self) -> u32 {
        self.mr.as_ref().map_or(0, |mr| mr.lkey())
    }

    /// Copies a received message out of `slot`, whose receive completed (`len` bytes).
    fn take(&self, slot: u32, len: u32) -> Vec<u8> {
        let len = (len as usize).min(CONTROL_MESSAGE_BYTES);
        let mut out = vec![0u8; len];
        // SAFETY: `slot` is a receive slot inside the allocation; its completion proves the
        // NIC is done writing it, and it is not posted again before this copy returns.
        unsafe {
            std::ptr::copy_nonoverlapping(self.slot_addr(slot) as *const u8, out.as_mut_ptr(), len)
        };
        out
    }
}

impl Drop for ControlRing {
    fn drop(&mut self) {
        drop(self.mr.take());
        if self.len > 0 {
            let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("layout");
            // SAFETY: allocated in `new` with this layout and freed once, after the
            // registration (and, by the connection's field order, the queue pair) is gone.
            unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) };
        }
    }
}

/// What the completion thread handed a connection and its owner has not taken yet.
#[derive(Default)]
struct Mailbox {
    completions: Vec<Completion>,
    /// The thread could not arm the CQ: nothing more will come.
    error: Option<String>,
}

/// One reliable-connected queue pair with its own completion queue and channel, whose
/// completions the device's completion thread reaps. Dereferences to [`ConnectionCore`],
/// which the thread shares.
pub struct Connection {
    core: Arc<ConnectionCore>,
}

impl std::ops::Deref for Connection {
    type Target = ConnectionCore;
    fn deref(&self) -> &ConnectionCore {
        &self.core
    }
}

/// A connection's queue pair and completion machinery (see [`Connection`]).
pub struct ConnectionCore {
    // Drop order matters: the QP before the CQ it reports to, the CQ before its channel.
    qp: Mutex<BasicQueuePair>,
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    /// The send queue's entries in use; locked after `qp` when both are.
    send_queue: Mutex<SendQueue>,
    /// After `qp`: the NIC may write receive slots until the queue pair is destroyed.
    control: Mutex<ControlRing>,
    counts: Mutex<WorkCounts>,
    /// Regions this QP's requests have used: kept registered until the QP is gone, so a
    /// request still in flight when its caller gave up never touches unregistered memory.
    regions: Mutex<Vec<Arc<RegisteredRegion>>>,
    local: Endpoint,
    local_port: LocalPort,
    // Keeps the device context (and its protection domain) alive as long as the queue pair.
    _context: Arc<RdmaContext>,
    config: ConnectionConfig,
    mailbox: Mutex<Mailbox>,
    /// Raised by the completion thread when it filled the mailbox.
    delivered: tokio::sync::Notify,
}

// Opcode of a received RDMA WRITE with immediate (IBV_WC_RECV_RDMA_WITH_IMM).
const WC_RECV_RDMA_WITH_IMM: u32 = 1 << 7 | 1;

impl Connection {
    /// Creates the queue pair (in INIT) and its completion machinery, and hands its completion
    /// queue to the device's completion thread.
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
        if config.control_receives > config.receive_depth {
            return Err(RdmaError::verbs(
                "creating a queue pair",
                format!(
                    "{} control receives exceed the receive queue's {} entries",
                    config.control_receives, config.receive_depth
                ),
            ));
        }
        let control = ControlRing::new(&context.pd, config.control_receives, config.control_sends)?;
        let core = Arc::new(ConnectionCore {
            qp: Mutex::new(qp),
            cq,
            channel,
            send_queue: Mutex::new(SendQueue::new(config.send_depth)),
            control: Mutex::new(control),
            counts: Mutex::new(WorkCounts::default()),
            regions: Mutex::new(Vec::new()),
            local,
            local_port,
            _context: Arc::clone(context),
            config,
            mailbox: Mutex::new(Mailbox::default()),
            delivered: tokio::sync::Notify::new(),
        });
        // Receives may be posted from INIT on: the peer's first message finds one waiting.
        for slot in 0..core.config.control_receives {
            core.post_control_receive(slot)?;
        }
        context.poller.register(&core);
        Ok(Connection { core })
    }
}

impl ConnectionCore {
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

    /// Posts the receive of control slot `slot`.
    fn post_control_receive(&self, slot: u32) -> Result<(), RdmaError> {
        let control = self.control.lock().expect("control lock");
        let mut sge = rdma_mummy_sys::ibv_sge {
            addr: control.slot_addr(slot),
            length: CONTROL_MESSAGE_BYTES as u32,
            lkey: control.lkey(),
        };
        let mut wr = rdma_mummy_sys::ibv_recv_wr {
            wr_id: CONTROL_RECEIVE_TAG | u64::from(slot),
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let qp = self.qp.lock().expect("qp lock");
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is alive and locked; the SGE names a receive slot of the control
        // ring, registered and owned by the NIC until this receive completes (the ring
        // outlives the QP); the provider copies the request before returning.
        let rc = unsafe { rdma_mummy_sys::ibv_post_recv(qp.qp().as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(RdmaError::verbs(
                "ibv_post_recv (control slot)",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    fn keep_region(&self, region: &Arc<RegisteredRegion>) {
        let mut regions = self.regions.lock().expect("regions lock");
        if !regions.iter().any(|r| Arc::ptr_eq(r, region)) {
            regions.push(Arc::clone(region));
        }
    }

    /// Entries of the send queue free now (see [`SendQueue`]).
    pub fn send_queue_free(&self) -> u32 {
        self.send_queue.lock().expect("send queue lock").free()
    }

    /// Control slots free for [`Connection::post_message`] now.
    pub fn message_slots_free(&self) -> usize {
        self.control.lock().expect("control lock").free_sends.len()
    }

    pub fn work_counts(&self) -> WorkCounts {
        *self.counts.lock().expect("counts lock")
    }

    /// Posts an RDMA WRITE of `len` bytes at `local_addr` (inside `local`) to `remote_addr`
    /// under `rkey`. Unsignalled writes complete silently; a later signalled request of this
    /// queue pair completing proves they did.
    ///
    /// Safe because the bytes are read by the NIC from memory that stays registered (and so
    /// mapped) for as long as this connection: a caller that reuses the buffer before the
    /// completion can only send wrong bytes, which the receiver's digest check rejects.
    #[allow(clippy::too_many_arguments)]
    pub fn post_write(
        &self,
        wr_id: u64,
        local: &Arc<RegisteredRegion>,
        local_addr: u64,
        len: u32,
        rkey: u32,
        remote_addr: u64,
        signalled: bool,
    ) -> Result<(), RdmaError> {
        self.post_write_op(
            wr_id,
            local,
            (local_addr, len),
            (rkey, remote_addr),
            None,
            signalled,
        )
    }

    /// Posts a signalled RDMA WRITE with immediate; it consumes one receive at the peer.
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
        self.post_write_op(
            wr_id,
            local,
            (local_addr, len),
            (rkey, remote_addr),
            Some(immediate),
            true,
        )
    }

    fn post_write_op(
        &self,
        wr_id: u64,
        local: &Arc<RegisteredRegion>,
        (local_addr, len): (u64, u32),
        (rkey, remote_addr): (u32, u64),
        immediate: Option<u32>,
        signalled: bool,
    ) -> Result<(), RdmaError> {
        if !local.contains(local_addr, u64::from(len)) {
            return Err(RdmaError::verbs(
                "post RDMA WRITE",
                "local buffer lies outside its registered region",
            ));
        }
        self.keep_region(local);
        let mut sge = rdma_mummy_sys::ibv_sge {
            addr: local_addr,
            length: len,
            lkey: local.lkey(),
        };
        // SAFETY: an all-zero ibv_send_wr is a valid empty request; every field used is set.
        let mut wr: rdma_mummy_sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        match immediate {
            Some(value) => {
                wr.opcode = rdma_mummy_sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
                wr.imm_data_invalidated_rkey_union.imm_data = value.to_be();
            }
            None => wr.opcode = rdma_mummy_sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
        }
        wr.wr.rdma = rdma_mummy_sys::rdma_t { remote_addr, rkey };
        self.post_raw(&mut wr, signalled, "ibv_post_send (RDMA WRITE)")
    }

    /// Sends `frame` (at most [`CONTROL_MESSAGE_BYTES`]) as one SEND from a control slot,
    /// signalled: the slot is free again once it completes as `wr_id`. With `invalidate`, a
    /// SEND_WITH_INVALIDATE: the peer's device invalidates that rkey (a window the peer bound
    /// on this queue pair) before it reports the message. Everything posted before on this
    /// queue pair (RDMA WRITEs among it) is placed at the peer before the message is.
    pub fn post_message(
        &self,
        wr_id: u64,
        frame: &[u8],
        invalidate: Option<u32>,
    ) -> Result<(), RdmaError> {
        if frame.len() > CONTROL_MESSAGE_BYTES {
            return Err(RdmaError::verbs(
                "post control message",
                format!(
                    "{} bytes exceed a slot's {CONTROL_MESSAGE_BYTES}",
                    frame.len()
                ),
            ));
        }
        let (addr, lkey, slot) = {
            let mut control = self.control.lock().expect("control lock");
            let slot = control.free_sends.pop().ok_or_else(|| {
                RdmaError::verbs(
                    "post control message",
                    "every control send slot is in flight",
                )
            })?;
            let addr = control.slot_addr(slot);
            // SAFETY: a free send slot inside the ring: no posted request reads it, and the
            // lock keeps every other writer out.
            unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), addr as *mut u8, frame.len()) };
            control.sends_in_flight.insert(wr_id, slot);
            (addr, control.lkey(), slot)
        };
        let mut sge = rdma_mummy_sys::ibv_sge {
            addr,
            length: frame.len() as u32,
            lkey,
        };
        // SAFETY: as in `post_write_op`.
        let mut wr: rdma_mummy_sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        match invalidate {
            Some(rkey) => {
                wr.opcode = rdma_mummy_sys::ibv_wr_opcode::IBV_WR_SEND_WITH_INV;
                wr.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
            }
            None => wr.opcode = rdma_mummy_sys::ibv_wr_opcode::IBV_WR_SEND,
        }
        let posted = self.post_raw(&mut wr, true, "ibv_post_send (control message)");
        let mut control = self.control.lock().expect("control lock");
        match posted {
            Ok(()) => {}
            Err(_) => {
                control.sends_in_flight.remove(&wr_id);
                control.free_sends.push(slot);
            }
        }
        drop(control);
        if posted.is_ok() {
            self.counts.lock().expect("counts lock").messages_sent += 1;
        }
        posted
    }

    /// Binds `window` to `len` bytes at `addr` (inside `region`) for remote writes through
    /// this queue pair only, and returns the rkey to grant. A peer writing outside the range,
    /// through another queue pair, or after the window is invalidated, gets a remote access
    /// error. Requests posted after the bind on this queue pair (the message granting the
    /// rkey) are carried out after it, so the bind need not be waited for.
    ///
    /// # Safety
    /// This hands the peer write access to `addr..addr+len`. The caller must own that range
    /// exclusively (no other buffer, reader or device uses it) from now until the window is
    /// known invalidated: a completed [`Connection::post_invalidate`], a received
    /// SEND_WITH_INVALIDATE naming the rkey, or this queue pair in the error state with its
    /// last request flushed.
    pub unsafe fn post_bind(
        &self,
        wr_id: u64,
        window: &mut MemoryWindow,
        region: &RegisteredRegion,
        addr: u64,
        len: u64,
        signalled: bool,
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
        self.post_raw(&mut wr, signalled, "post bind memory window")?;
        // The provider names the window by `ibv_mw.rkey` in the next bind request, and the
        // device now knows it by the new key: keep the two in step (libibverbs does this for
        // type-1 binds only).
        // SAFETY: the MW is alive and borrowed mutably, so nothing else reads the field now.
        unsafe { (*window.mw.as_ptr()).rkey = rkey };
        Ok(rkey)
    }

    /// Invalidates the window bound under `rkey`: from the time this completes (signalled,
    /// as `wr_id`; or a later signalled request completes), writes through it fail on the
    /// writer's side.
    pub fn post_invalidate(&self, wr_id: u64, rkey: u32, signalled: bool) -> Result<(), RdmaError> {
        // SAFETY: as in `post_bind`.
        let mut wr: rdma_mummy_sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = rdma_mummy_sys::ibv_wr_opcode::IBV_WR_LOCAL_INV;
        wr.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
        self.post_raw(&mut wr, signalled, "post local invalidate")
    }

    /// Posts one send-queue request, accounting its entry (see [`SendQueue`]).
    fn post_raw(
        &self,
        wr: &mut rdma_mummy_sys::ibv_send_wr,
        signalled: bool,
        step: &'static str,
    ) -> Result<(), RdmaError> {
        if signalled {
            wr.send_flags |= rdma_mummy_sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        let qp = self.qp.lock().expect("qp lock");
        let mut queue = self.send_queue.lock().expect("send queue lock");
        queue
            .check(signalled)
            .map_err(|e| RdmaError::verbs(step, e))?;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is alive and locked; `wr` is a complete single request whose memory
        // (SGE, window, MR) outlives its completion by the caller's contract; the provider
        // copies the request (and its SGE) before returning.
        let rc = unsafe { rdma_mummy_sys::ibv_post_send(qp.qp().as_ptr(), wr, &mut bad) };
        if rc != 0 {
            return Err(RdmaError::verbs(
                step,
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        queue.record(wr.wr_id, signalled);
        drop(queue);
        drop(qp);
        let mut counts = self.counts.lock().expect("counts lock");
        counts.send_requests += 1;
        counts.signalled += u64::from(signalled);
        Ok(())
    }

    /// Reaps what the CQ holds now (the completion thread's job: it is the CQ's one reader).
    pub(crate) fn drain(&self) -> Vec<Completion> {
        const BATCH: usize = 32;
        let mut out = Vec::new();
        let mut reposts = Vec::new();
        loop {
            // SAFETY: an all-zero ibv_wc is plain data the poll overwrites.
            let mut wcs: [rdma_mummy_sys::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: the CQ is alive (owned by self); the array has room for BATCH entries.
            let n = unsafe {
                rdma_mummy_sys::ibv_poll_cq(self.cq.cq().as_ptr(), BATCH as i32, wcs.as_mut_ptr())
            };
            if n <= 0 {
                break;
            }
            let mut control = self.control.lock().expect("control lock");
            let mut queue = self.send_queue.lock().expect("send queue lock");
            for wc in &wcs[..n as usize] {
                let status = WcStatus::from_raw(wc.status);
                let opcode = WcOpcode::from_raw(wc.opcode);
                let mut completion = Completion {
                    wr_id: wc.wr_id,
                    status,
                    opcode,
                    byte_len: wc.byte_len,
                    immediate: None,
                    invalidated_rkey: None,
                    message: None,
                };
                if status.is_success() {
                    if opcode == WcOpcode::ReceiveWithImmediate {
                        // SAFETY: a WRITE_WITH_IMM completion carries its immediate here.
                        completion.immediate = Some(u32::from_be(unsafe {
                            wc.imm_data_invalidated_rkey_union.imm_data
                        }));
                    }
                    let invalidated = wc.wc_flags & rdma_mummy_sys::ibv_wc_flags::IBV_WC_WITH_INV.0
                        != 0
                        || (self._context.kernel_wc_flags
                            && opcode == WcOpcode::Receive
                            && wc.wc_flags & KERNEL_WC_WITH_INVALIDATE != 0);
                    if invalidated {
                        // SAFETY: with IBV_WC_WITH_INV the union holds the invalidated rkey.
                        completion.invalidated_rkey =
                            Some(unsafe { wc.imm_data_invalidated_rkey_union.invalidated_rkey });
                    }
                }
                if wc.wr_id & WR_TAG_MASK == CONTROL_RECEIVE_TAG {
                    let slot = (wc.wr_id & !WR_TAG_MASK) as u32;
                    if status.is_success() && opcode == WcOpcode::Receive && slot < control.receives
                    {
                        completion.message = Some(control.take(slot, wc.byte_len));
                        reposts.push(slot);
                    }
                } else {
                    // Receives never carry a send's id (callers keep their ids apart), so
                    // this frees entries only for the send queue's own requests.
                    queue.complete(wc.wr_id);
                    if let Some(slot) = control.sends_in_flight.remove(&wc.wr_id) {
                        control.free_sends.push(slot);
                    }
                }
                out.push(completion);
            }
            drop(queue);
            drop(control);
            if (n as usize) < BATCH {
                break;
            }
        }
        for slot in reposts {
            // A queue pair in the error state refuses: its receives are over anyway.
            if let Err(err) = self.post_control_receive(slot) {
                tracing::debug!(error = %err, "control receive not posted again");
            }
        }
        if !out.is_empty() {
            let mut counts = self.counts.lock().expect("counts lock");
            counts.completions += out.len() as u64;
            counts.messages_received += out.iter().filter(|c| c.message.is_some()).count() as u64;
        }
        out
    }

    /// Waits for the completions the completion thread reaped for this connection. Returns at
    /// least one. Cancel-safe: what was not returned stays in the mailbox.
    pub async fn completions(&self) -> Result<Vec<Completion>, RdmaError> {
        loop {
            {
                let mut mailbox = self.mailbox.lock().expect("mailbox lock");
                if !mailbox.completions.is_empty() {
                    return Ok(std::mem::take(&mut mailbox.completions));
                }
                if let Some(err) = &mailbox.error {
                    return Err(RdmaError::verbs("ibv_req_notify_cq", err));
                }
            }
            // A delivery after the check above leaves a permit: this returns at once.
            self.delivered.notified().await;
        }
    }

    /// The completion thread's hand-over.
    pub(crate) fn deliver(&self, batch: Vec<Completion>) {
        if batch.is_empty() {
            return;
        }
        self.mailbox
            .lock()
            .expect("mailbox lock")
            .completions
            .extend(batch);
        self.delivered.notify_one();
    }

    pub(crate) fn deliver_error(&self, err: RdmaError) {
        self.mailbox.lock().expect("mailbox lock").error = Some(err.to_string());
        self.delivered.notify_one();
    }

    pub(crate) fn channel_fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    /// Asks the CQ for an event at its next completion.
    pub(crate) fn arm(&self) -> Result<(), RdmaError> {
        // SAFETY: the CQ is alive (owned by self).
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        if rc != 0 {
            return Err(RdmaError::verbs(
                "ibv_req_notify_cq",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(())
    }

    /// Takes (and acknowledges) every event waiting on the channel; each counts as a wake-up.
    pub(crate) fn take_channel_events(&self) {
        let mut taken = 0;
        loop {
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
            if rc != 0 {
                break;
            }
            // SAFETY: acknowledges the one event just taken from this channel for its CQ.
            unsafe { rdma_mummy_sys::ibv_ack_cq_events(event_cq, 1) };
            taken += 1;
        }
        if taken > 0 {
            self.counts.lock().expect("counts lock").wakeups += taken;
        }
    }
}

/// The kernel's IB_WC_WITH_INVALIDATE, as soft-RoCE passes it to user space.
const KERNEL_WC_WITH_INVALIDATE: u32 = 1 << 2;

/// The top byte of a work request id (the connection's own control receives use 0xfe).
const WR_TAG_MASK: u64 = 0xff << 56;

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
