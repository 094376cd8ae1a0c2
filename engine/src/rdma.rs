//! The host's RDMA side: which devices exist and, when RDMA is enabled and usable, the chosen
//! device opened with the buffer pool registered on it (once, at start-up).

use crate::config::RdmaConfig;
use crate::io::BufferPool;
use crate::proto;
use ferry_rdma::{DeviceInfo, RdmaContext, RegisteredRegion, Selection, SelectionRequest};
use std::sync::Arc;

pub enum RdmaStatus {
    /// Turned off by configuration (`--no-rdma`).
    Disabled,
    /// No library, no device, no usable GID, or opening it failed: the reason.
    Unavailable(String),
    /// The device is open and the pool registered.
    Ready {
        selection: Selection,
        region: Arc<RegisteredRegion>,
        _pool: Arc<BufferPool>,
    },
}

pub struct RdmaHost {
    pub devices: Vec<DeviceInfo>,
    pub status: RdmaStatus,
}

impl RdmaHost {
    /// Discovers devices and, if enabled, opens the chosen one and registers `pool`. Never
    /// fails: whatever goes wrong leaves RDMA unavailable (logged) and TCP carries everything.
    pub fn start(config: &RdmaConfig, pool: &Arc<BufferPool>) -> RdmaHost {
        let devices = match ferry_rdma::discover() {
            Ok(devices) => devices,
            Err(err) => {
                tracing::info!(reason = %err, "RDMA unavailable; pieces move over TCP");
                return RdmaHost {
                    devices: Vec::new(),
                    status: RdmaStatus::Unavailable(err.to_string()),
                };
            }
        };
        if !config.enabled {
            tracing::info!(devices = devices.len(), "RDMA disabled by configuration");
            return RdmaHost {
                devices,
                status: RdmaStatus::Disabled,
            };
        }
        let request = SelectionRequest {
            device: config.device.clone(),
            port: config.port,
            gid_index: config.gid_index,
        };
        let opened = ferry_rdma::choose(&devices, &request).and_then(|selection| {
            let context = RdmaContext::open(selection.clone())?;
            let region = pool.register_rdma(&context)?;
            Ok((selection, region))
        });
        let status = match opened {
            Ok((selection, region)) => {
                tracing::info!(
                    device = %selection.device,
                    port = selection.port,
                    gid_index = selection.gid.index,
                    gid = %selection.gid.gid,
                    seconds_per_gib = region.seconds_per_gib(),
                    "RDMA device ready, buffer pool registered"
                );
                RdmaStatus::Ready {
                    selection,
                    region: Arc::new(region),
                    _pool: Arc::clone(pool),
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "RDMA device unusable; pieces move over TCP");
                RdmaStatus::Unavailable(err.to_string())
            }
        };
        RdmaHost { devices, status }
    }

    /// The `rdma` entry of `GetCapabilities`.
    pub fn transport_info(&self) -> proto::TransportInfo {
        let (detail, properties) = match &self.status {
            RdmaStatus::Disabled => (
                "disabled by configuration (--no-rdma)".to_owned(),
                Vec::new(),
            ),
            RdmaStatus::Unavailable(reason) => (reason.clone(), Vec::new()),
            RdmaStatus::Ready {
                selection, region, ..
            } => (
                format!(
                    "{} port {} GID {} ({} {})",
                    selection.device,
                    selection.port,
                    selection.gid.index,
                    selection.gid.kind.as_str(),
                    selection.gid.address()
                ),
                vec![
                    ("device", selection.device.clone()),
                    ("port", selection.port.to_string()),
                    ("gid_index", selection.gid.index.to_string()),
                    ("gid", selection.gid.gid.to_string()),
                    ("active_mtu", selection.active_mtu.to_string()),
                    ("registered_bytes", region.len().to_string()),
                    (
                        "registration_seconds_per_gib",
                        format!("{:.4}", region.seconds_per_gib()),
                    ),
                ],
            ),
        };
        proto::TransportInfo {
            name: "rdma".into(),
            available: matches!(self.status, RdmaStatus::Ready { .. }),
            detail,
            properties: properties
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }

    pub fn devices_message(&self) -> Vec<proto::RdmaDevice> {
        self.devices
            .iter()
            .map(|device| proto::RdmaDevice {
                name: device.name.clone(),
                node_guid: device.node_guid.clone(),
                ports: device
                    .ports
                    .iter()
                    .map(|port| proto::RdmaPort {
                        number: u32::from(port.number),
                        state: port.state.clone(),
                        link_layer: port.link_layer.clone(),
                        active_mtu: port.active_mtu,
                        speed_gbps: port.speed_gbps,
                        gids: port
                            .gids
                            .iter()
                            .map(|gid| proto::RdmaGid {
                                index: gid.index,
                                gid: gid.gid.to_string(),
                                r#type: gid.kind.as_str().into(),
                                netdev: gid.netdev.clone().unwrap_or_default(),
                                ipv4: gid.ipv4().map(|ip| ip.to_string()).unwrap_or_default(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The piece exchange. The receiver opens a TCP connection to the source's data port, upgrades
// it with a Connect message carrying its queue pair, and from then on uses it as the control
// channel of one RC queue pair: per piece it binds one memory window per pool slot of the
// piece buffer (remote write, this QP only), posts one receive per chunk, and sends a Fetch
// granting those slots. The source reads the piece from its store into its own registered
// buffer (never remotely accessible), RDMA-WRITEs it in chunks with immediates naming
// (request, chunk), and answers Done with the digest once every write was acknowledged. The
// receiver checks every immediate against its credit window, invalidates the windows (the
// credit returns: later writes fail on the sender's side), and hands the buffer, unchanged,
// to the engine, which verifies the digest and writes it with io_uring.
//
// One piece is in flight per queue pair; pieces in flight per peer = queue pairs per peer.
// A fetch that fails or is dropped midway drops its connection, destroying the queue pair
// before the buffer can be reused, so a late write can never land in someone else's piece.

use crate::geometry::{format_digest, PieceRange};
use crate::io::PieceBuffer;
use crate::store::Store;
use crate::transport::{FetchedPiece, PieceTransport, TransportError};
use ferry_rdma::credit::{self, Progress, ReceiveWindow, SlotCredit};
use ferry_rdma::wire::{self, Message};
use ferry_rdma::{Connection, ConnectionConfig, MemoryWindow, RdmaError};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpStream;

/// Tunables of the RDMA piece exchange.
#[derive(Debug, Clone)]
pub struct RdmaSettings {
    /// Bytes per RDMA WRITE (a power of two, at most the pool slot size).
    pub chunk_size: u32,
    pub connect_timeout: Duration,
    /// Longest wait for any message or completion.
    pub io_timeout: Duration,
}

/// Work request ids: the kind in the top byte, so completions sort themselves.
const WR_BIND: u64 = 1 << 56;
const WR_INVALIDATE: u64 = 2 << 56;
const WR_RECEIVE: u64 = 3 << 56;
const WR_WRITE: u64 = 4 << 56;
const WR_KIND: u64 = 0xff << 56;

fn rdma_failure(err: RdmaError) -> TransportError {
    TransportError::Failed(format!("rdma: {err}"))
}

/// One connected queue pair to a source, with its control channel and memory windows.
struct PeerConnection {
    // Field order is drop order: the queue pair goes first, so no remote write can arrive
    // once the connection is gone.
    connection: Connection,
    windows: Vec<MemoryWindow>,
    control: TcpStream,
    window: ReceiveWindow,
    next_wr: u64,
}

/// Waits until `count` completions of `kind` arrived on `connection`, handing every received
/// immediate to `on_receive`; any failed completion fails.
async fn await_completions(
    connection: &Connection,
    kind: u64,
    mut count: usize,
    limit: Duration,
    mut on_receive: impl FnMut(u32) -> Result<(), TransportError>,
) -> Result<(), TransportError> {
    while count > 0 {
        let batch = tokio::time::timeout(limit, connection.completions())
            .await
            .map_err(|_| TransportError::Failed(format!("rdma: no completion for {limit:?}")))?
            .map_err(rdma_failure)?;
        for completion in batch {
            completion.ok().map_err(rdma_failure)?;
            if completion.wr_id & WR_KIND == WR_RECEIVE {
                let immediate = completion.immediate.ok_or_else(|| {
                    TransportError::Failed("rdma: receive without immediate".into())
                })?;
                on_receive(immediate)?;
            }
            if completion.wr_id & WR_KIND == kind {
                count -= 1;
            }
        }
    }
    Ok(())
}

/// The receiving side: fetches pieces from sources over RDMA.
pub struct RdmaTransport {
    context: Arc<RdmaContext>,
    region: Arc<RegisteredRegion>,
    settings: RdmaSettings,
    idle: Mutex<HashMap<SocketAddr, Vec<PeerConnection>>>,
    /// Sources that refused the upgrade (no RDMA there): TCP only from now on.
    tcp_only: Mutex<HashSet<SocketAddr>>,
}

impl RdmaTransport {
    pub fn supports(&self, source: SocketAddr) -> bool {
        !self
            .tcp_only
            .lock()
            .expect("tcp_only lock")
            .contains(&source)
    }

    /// Drops idle connections to a source (after it failed).
    pub fn forget(&self, source: SocketAddr) {
        self.idle.lock().expect("idle lock").remove(&source);
    }

    async fn connect(&self, source: SocketAddr) -> Result<PeerConnection, TransportError> {
        let limit = self.settings.connect_timeout;
        let mut control = tokio::time::timeout(limit, TcpStream::connect(source))
            .await
            .map_err(|_| {
                TransportError::Unreachable(format!(
                    "connecting to {source} took longer than {limit:?}"
                ))
            })?
            .map_err(|e| TransportError::Unreachable(format!("connecting to {source}: {e}")))?;
        let _ = control.set_nodelay(true);
        let connection =
            Connection::new(&self.context, ConnectionConfig::default()).map_err(rdma_failure)?;
        let hello = Message::Connect {
            endpoint: connection.local_endpoint(),
        };
        wire::write_message(&mut control, &hello, self.settings.io_timeout)
            .await
            .map_err(rdma_failure)?;
        match wire::read_message(&mut control, self.settings.io_timeout).await {
            Ok(Message::Accept { endpoint }) => {
                connection.connect(&endpoint).map_err(rdma_failure)?;
                tracing::debug!(%source, qpn = endpoint.qp_number, "RDMA queue pair connected");
                Ok(PeerConnection {
                    connection,
                    windows: Vec::new(),
                    control,
                    window: ReceiveWindow::new(1),
                    next_wr: 0,
                })
            }
            Ok(Message::Refused { message }) => {
                tracing::info!(%source, reason = %message, "source has no RDMA; using TCP with it");
                self.tcp_only.lock().expect("tcp_only lock").insert(source);
                Err(TransportError::Unsupported(message))
            }
            Ok(other) => Err(TransportError::Failed(format!(
                "source answered the RDMA upgrade with {:#04x}",
                other.tag()
            ))),
            Err(err) => {
                // A stock Vortex peer closes or answers something else: treat it as no RDMA.
                tracing::info!(%source, error = %err, "RDMA upgrade failed; using TCP with this source");
                self.tcp_only.lock().expect("tcp_only lock").insert(source);
                Err(TransportError::Unsupported(err.to_string()))
            }
        }
    }
}

impl PeerConnection {
    fn wr(&mut self, kind: u64) -> u64 {
        self.next_wr = (self.next_wr + 1) & !WR_KIND;
        kind | self.next_wr
    }

    async fn fetch(
        &mut self,
        transport: &RdmaTransport,
        task_id: &str,
        piece: PieceRange,
        buf: &mut PieceBuffer,
    ) -> Result<FetchedPiece, TransportError> {
        let settings = &transport.settings;
        let slot_size = buf.slot_size() as u64;
        let slot_count = piece.length.div_ceil(slot_size).max(1) as usize;
        while self.windows.len() < slot_count {
            self.windows
                .push(transport.context.alloc_window().map_err(rdma_failure)?);
        }
        // Grant exactly the piece's bytes, slot by slot, through windows bound to this QP.
        let mut credits = Vec::with_capacity(slot_count);
        for index in 0..slot_count {
            let offset = index as u64 * slot_size;
            let len = slot_size.min(piece.length - offset);
            let addr = buf.address_of(offset as usize);
            let wr = self.wr(WR_BIND);
            let rkey = self
                .connection
                .post_bind(wr, &self.windows[index], &transport.region, addr, len)
                .map_err(rdma_failure)?;
            credits.push(SlotCredit {
                addr,
                rkey,
                len: len as u32,
            });
        }
        await_completions(
            &self.connection,
            WR_BIND,
            slot_count,
            settings.io_timeout,
            |_| {
                Err(TransportError::Failed(
                    "rdma: write before the grant".into(),
                ))
            },
        )
        .await?;
        let lens: Vec<u32> = credits.iter().map(|c| c.len).collect();
        let chunks = credit::chunk_count(piece.length, settings.chunk_size, &lens);
        let request = self
            .window
            .open(chunks)
            .map_err(|e| TransportError::Failed(format!("rdma: {e}")))?;
        let first = self.wr(WR_RECEIVE);
        self.next_wr += chunks;
        self.connection
            .post_receives(first, chunks as u32)
            .map_err(rdma_failure)?;
        let fetch = Message::Fetch {
            request,
            task_id: task_id.to_owned(),
            number: piece.number,
            chunk_size: settings.chunk_size,
            credits: credits.clone(),
        };
        wire::write_message(&mut self.control, &fetch, settings.io_timeout)
            .await
            .map_err(rdma_failure)?;
        // The source answers only once every write was acknowledged, so the data is in place.
        let digest = match wire::read_message(&mut self.control, settings.io_timeout)
            .await
            .map_err(rdma_failure)?
        {
            Message::Done {
                request: done,
                number,
                length,
                digest,
            } if done == request && number == piece.number && length == piece.length => digest,
            Message::Failed {
                not_held: true,
                message,
                ..
            } => return Err(TransportError::NotHeld(message)),
            Message::Failed { message, .. } => {
                return Err(TransportError::Failed(format!(
                    "rdma: source failed: {message}"
                )))
            }
            other => {
                return Err(TransportError::Failed(format!(
                    "rdma: unexpected answer {other:?}"
                )))
            }
        };
        let mut progress = self
            .window
            .on_done(request)
            .map_err(|e| TransportError::Failed(format!("rdma: {e}")))?;
        // Count every chunk's immediate; the credit window rejects strays and duplicates.
        let window = &mut self.window;
        await_completions(
            &self.connection,
            WR_RECEIVE,
            chunks as usize,
            settings.io_timeout,
            |immediate| {
                progress = window
                    .on_immediate(immediate)
                    .map_err(|e| TransportError::Failed(format!("rdma: {e}")))?;
                Ok(())
            },
        )
        .await?;
        if progress != Progress::Complete(request) {
            return Err(TransportError::Failed(format!(
                "rdma: request {request} incomplete"
            )));
        }
        self.window.close(request);
        // The credit returns: invalidate every window before the buffer goes anywhere.
        for credit in &credits {
            let wr = self.wr(WR_INVALIDATE);
            self.connection
                .post_invalidate(wr, credit.rkey)
                .map_err(rdma_failure)?;
        }
        await_completions(
            &self.connection,
            WR_INVALIDATE,
            credits.len(),
            settings.io_timeout,
            |_| Err(TransportError::Failed("rdma: unexpected write".into())),
        )
        .await?;
        Ok(FetchedPiece {
            advertised_digest: digest,
            crc32: buf.crc32(),
        })
    }
}

#[async_trait::async_trait]
impl PieceTransport for RdmaTransport {
    fn name(&self) -> &'static str {
        "rdma"
    }

    async fn fetch(
        &self,
        source: SocketAddr,
        task_id: &str,
        piece: PieceRange,
        buf: &mut PieceBuffer,
    ) -> Result<FetchedPiece, TransportError> {
        if !self.supports(source) {
            return Err(TransportError::Unsupported(format!("{source} has no RDMA")));
        }
        let reused = self
            .idle
            .lock()
            .expect("idle lock")
            .get_mut(&source)
            .and_then(Vec::pop);
        let mut peer = match reused {
            Some(peer) => peer,
            None => self.connect(source).await?,
        };
        // On any error (or if this future is dropped) `peer` is dropped: the queue pair is
        // destroyed before the caller can reuse the buffer.
        let fetched = peer.fetch(self, task_id, piece, buf).await?;
        self.idle
            .lock()
            .expect("idle lock")
            .entry(source)
            .or_default()
            .push(peer);
        Ok(fetched)
    }
}

/// The serving side: runs a queue pair for each peer that upgrades its connection.
pub struct RdmaService {
    store: Arc<Store>,
    context: Arc<RdmaContext>,
    region: Arc<RegisteredRegion>,
    settings: RdmaSettings,
    idle_timeout: Duration,
}

impl RdmaService {
    /// Runs the control channel of one peer's queue pair until the peer closes it.
    pub async fn serve(self: Arc<Self>, mut stream: TcpStream, connect: Vec<u8>) {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        match self.serve_connection(&mut stream, &connect).await {
            Ok(()) => tracing::debug!(%peer, "RDMA control channel closed"),
            Err(err) => tracing::warn!(%peer, error = %err, "RDMA connection closed on error"),
        }
    }

    async fn serve_connection(
        &self,
        stream: &mut TcpStream,
        connect: &[u8],
    ) -> Result<(), RdmaError> {
        let Message::Connect { endpoint } = Message::decode(wire::TAG_CONNECT, connect)? else {
            return Err(RdmaError::Handshake("expected Connect".into()));
        };
        let connection = Connection::new(&self.context, ConnectionConfig::default())?;
        connection.connect(&endpoint)?;
        wire::write_message(
            stream,
            &Message::Accept {
                endpoint: connection.local_endpoint(),
            },
            self.settings.io_timeout,
        )
        .await?;
        let mut next_wr = 0u64;
        loop {
            let message = match wire::read_message(stream, self.idle_timeout).await {
                Ok(message) => message,
                // The peer hung up or went quiet: the connection ends here.
                Err(RdmaError::Channel(_)) => return Ok(()),
                Err(err) => return Err(err),
            };
            let Message::Fetch {
                request,
                task_id,
                number,
                chunk_size,
                credits,
            } = message
            else {
                return Err(RdmaError::Handshake(format!(
                    "expected Fetch, got {:#04x}",
                    message.tag()
                )));
            };
            let answer = match self
                .write_piece(
                    &connection,
                    &mut next_wr,
                    request,
                    &task_id,
                    number,
                    chunk_size,
                    &credits,
                )
                .await
            {
                Ok(answer) => answer,
                // The queue pair is unusable after a failed write: say so, then close.
                Err(err) => {
                    let failed = Message::Failed {
                        request,
                        not_held: false,
                        message: err.to_string(),
                    };
                    let _ = wire::write_message(stream, &failed, self.settings.io_timeout).await;
                    return Err(err);
                }
            };
            wire::write_message(stream, &answer, self.settings.io_timeout).await?;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_piece(
        &self,
        connection: &Connection,
        next_wr: &mut u64,
        request: u16,
        task_id: &str,
        number: u32,
        chunk_size: u32,
        credits: &[SlotCredit],
    ) -> Result<Message, RdmaError> {
        let not_held = |message: String| {
            Ok(Message::Failed {
                request,
                not_held: true,
                message,
            })
        };
        let Some(task) = self.store.get(task_id) else {
            return not_held(format!("task {task_id} is not held here"));
        };
        let Ok(piece) = task.geometry().piece(number) else {
            return not_held(format!("piece {number} is out of range"));
        };
        let Some(crc) = task.held(number) else {
            return not_held(format!("piece {number} of task {task_id} is not held here"));
        };
        let pool = self.store.pool();
        if !chunk_size.is_power_of_two()
            || chunk_size < 4096
            || chunk_size as usize > pool.info().slot_size
        {
            return Ok(Message::Failed {
                request,
                not_held: false,
                message: format!(
                    "chunk size {chunk_size} must be a power of two from 4096 to {}",
                    pool.info().slot_size
                ),
            });
        }
        let writes = match credit::plan_writes(request, piece.length, chunk_size, credits) {
            Ok(writes) if writes.len() <= ConnectionConfig::default().send_depth as usize => writes,
            Ok(writes) => {
                return Ok(Message::Failed {
                    request,
                    not_held: false,
                    message: format!("{} chunks exceed the send queue", writes.len()),
                })
            }
            Err(err) => {
                return Ok(Message::Failed {
                    request,
                    not_held: false,
                    message: err.to_string(),
                })
            }
        };
        let buf = pool
            .acquire(piece.length)
            .await
            .map_err(|e| RdmaError::verbs("buffer pool", e))?;
        let file = Arc::clone(task.read_file());
        let (buf, read) = tokio::task::spawn_blocking(move || {
            let mut buf = buf;
            let read = crate::store::read_range_into(&file, piece.offset, &mut buf);
            (buf, read)
        })
        .await
        .expect("read task panicked");
        read?;
        for write in &writes {
            *next_wr += 1;
            let local = buf.address_of(write.piece_offset as usize);
            connection.post_write_with_immediate(
                WR_WRITE | *next_wr,
                &self.region,
                local,
                write.len,
                write.rkey,
                write.remote_addr,
                write.immediate,
            )?;
        }
        let mut acknowledged = 0;
        while acknowledged < writes.len() {
            let batch = tokio::time::timeout(self.settings.io_timeout, connection.completions())
                .await
                .map_err(|_| {
                    RdmaError::Handshake(format!(
                        "writes not acknowledged within {:?}",
                        self.settings.io_timeout
                    ))
                })??;
            for completion in batch {
                completion.ok()?;
                acknowledged += 1;
            }
        }
        drop(buf);
        task.count_served();
        Ok(Message::Done {
            request,
            number,
            length: piece.length,
            digest: format_digest(crc),
        })
    }
}

impl RdmaHost {
    /// The receiving transport and the serving service, when the device is ready.
    pub fn exchange(
        &self,
        store: &Arc<Store>,
        settings: RdmaSettings,
        idle_timeout: Duration,
    ) -> Option<(Arc<RdmaTransport>, Arc<RdmaService>)> {
        let RdmaStatus::Ready { region, .. } = &self.status else {
            return None;
        };
        let context = Arc::clone(region.context());
        let region = Arc::clone(region);
        let transport = RdmaTransport {
            context: Arc::clone(&context),
            region: Arc::clone(&region),
            settings: settings.clone(),
            idle: Mutex::new(HashMap::new()),
            tcp_only: Mutex::new(HashSet::new()),
        };
        let service = RdmaService {
            store: Arc::clone(store),
            context,
            region,
            settings,
            idle_timeout,
        };
        Some((Arc::new(transport), Arc::new(service)))
    }
}
