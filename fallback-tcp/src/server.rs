//! The serving side: answers Vortex `DownloadPiece` requests from whatever the daemon holds,
//! sending content straight from the store file with `sendfile` (no copy through user space).

use crate::codec::{self, ErrorCode, FrameHeader, Request, Response, TaskInfo};
use crate::error::CodecError;
use bytes::BytesMut;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};
use vortex_protocol::tlv::piece_metadata::PieceMetadata;
use vortex_protocol::HEADER_SIZE;

/// A piece ready to be sent: its metadata and where its bytes lie.
pub struct ServedPiece {
    pub metadata: PieceMetadata,
    /// A file holding the content (opened for buffered reads, so `sendfile` can use the page
    /// cache).
    pub file: Arc<File>,
    /// Where in `file` the content starts.
    pub file_offset: u64,
}

/// Why a piece cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
}

/// What the server serves from: the daemon's store, or anything else that holds pieces.
pub trait PieceProvider: Send + Sync + 'static {
    /// The piece, if it is held (its bytes durable and its digest known).
    fn piece(&self, task_id: &str, number: u32) -> Result<ServedPiece, ProviderError>;
    /// The task's geometry, if the task is known.
    fn task_info(&self, task_id: &str) -> Option<TaskInfo>;
    /// Called after a piece's bytes were all handed to the kernel.
    fn served(&self, _task_id: &str, _number: u32, _bytes: u64) {}

    /// A client asked to switch the connection to another protocol (a Ferry extension tag in
    /// `FIRST_UPGRADE_TAG..=LAST_UPGRADE_TAG`). Return the future that takes the connection
    /// over, or `Err` with the reason to send back (the connection then stays Vortex).
    fn upgrade(
        &self,
        tag: u8,
        _value: Vec<u8>,
        _stream: TcpStream,
    ) -> Result<UpgradeFuture, (TcpStream, String)> {
        Err((
            _stream,
            format!("extension {tag:#04x} is not supported by this peer"),
        ))
    }
}

/// A connection taken over by an upgrade; it runs until the protocol ends.
pub type UpgradeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Limits the server enforces on every connection.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A connection that sends no complete request for this long is closed.
    pub idle_timeout: Duration,
    /// A peer that does not drain what we send for this long is dropped.
    pub write_timeout: Duration,
    /// Connections beyond this are refused (closed at once).
    pub max_connections: usize,
    /// Connections from one IP address beyond this are refused (closed at once).
    pub max_connections_per_peer: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_connections_per_peer: 128,
        }
    }
}

/// Open connections, in total and per peer IP. A connection's [`ConnectionSlot`] gives its
/// place back when dropped, however its task ends.
#[derive(Debug, Default)]
struct ConnectionCounts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OverCap {
    Total,
    Peer,
}

struct ConnectionSlot {
    counts: Arc<Mutex<ConnectionCounts>>,
    peer: IpAddr,
}

impl ConnectionSlot {
    fn take(
        counts: &Arc<Mutex<ConnectionCounts>>,
        peer: IpAddr,
        config: &ServerConfig,
    ) -> Result<ConnectionSlot, OverCap> {
        let mut locked = counts.lock().expect("connection counts lock");
        if locked.total >= config.max_connections {
            return Err(OverCap::Total);
        }
        let from_peer = locked.per_peer.entry(peer).or_insert(0);
        if *from_peer >= config.max_connections_per_peer {
            return Err(OverCap::Peer);
        }
        *from_peer += 1;
        locked.total += 1;
        Ok(ConnectionSlot {
            counts: Arc::clone(counts),
            peer,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut locked = self.counts.lock().expect("connection counts lock");
        locked.total -= 1;
        if let Some(from_peer) = locked.per_peer.get_mut(&self.peer) {
            *from_peer -= 1;
            if *from_peer == 0 {
                locked.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Logs refused connections at most once per interval, with how many were refused since, so
/// a flood of connections cannot flood the log.
struct RefusalLog {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    fn new(interval: Duration) -> Self {
        RefusalLog {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    fn refused(&mut self, peer: SocketAddr, why: OverCap, config: &ServerConfig) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < self.interval) {
            self.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        self.last = Some(now);
        match why {
            OverCap::Total => tracing::warn!(
                %peer,
                max = config.max_connections,
                refused_since_last_log = suppressed,
                "refusing data connection: server.max_connections reached"
            ),
            OverCap::Peer => tracing::warn!(
                %peer,
                max = config.max_connections_per_peer,
                refused_since_last_log = suppressed,
                "refusing data connection: server.max_connections_per_peer reached for this peer"
            ),
        }
    }
}

/// What a server has done, counted as it happens; whoever holds the `Arc` (a metrics
/// exporter, a test) reads it at any time. Plain atomics: counting costs nothing on the hot path.
#[derive(Debug, Default)]
pub struct ServerStats {
    connections_open: AtomicU64,
    connections_accepted: AtomicU64,
    connections_rejected: AtomicU64,
    content_bytes_sent: AtomicU64,
    pieces_served: AtomicU64,
    bad_frames: AtomicU64,
}

/// A consistent-enough copy of [`ServerStats`] (each field read once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStatsSnapshot {
    /// Connections being served now (an upgraded connection counts until its protocol ends).
    pub connections_open: u64,
    pub connections_accepted: u64,
    /// Refused at accept: `max_connections` in total or `max_connections_per_peer` from its
    /// address were open.
    pub connections_rejected: u64,
    /// Piece content bytes handed to the kernel (frames not included), partial pieces too.
    pub content_bytes_sent: u64,
    /// Pieces whose content was sent in full.
    pub pieces_served: u64,
    /// Connections closed for a malformed, oversized or truncated frame.
    pub bad_frames: u64,
}

impl ServerStats {
    pub fn snapshot(&self) -> ServerStatsSnapshot {
        ServerStatsSnapshot {
            connections_open: self.connections_open.load(Ordering::Relaxed),
            connections_accepted: self.connections_accepted.load(Ordering::Relaxed),
            connections_rejected: self.connections_rejected.load(Ordering::Relaxed),
            content_bytes_sent: self.content_bytes_sent.load(Ordering::Relaxed),
            pieces_served: self.pieces_served.load(Ordering::Relaxed),
            bad_frames: self.bad_frames.load(Ordering::Relaxed),
        }
    }
}

/// Counts a connection as open for as long as it lives, however its task ends.
struct OpenConnection(Arc<ServerStats>);

impl OpenConnection {
    fn new(stats: &Arc<ServerStats>) -> Self {
        stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(stats))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The accept loop. Dropping the future returned by [`Server::run`] closes every connection.
pub struct Server<P> {
    /// The first is the data port; the others serve the same port on more addresses.
    listeners: Vec<TcpListener>,
    provider: Arc<P>,
    config: ServerConfig,
    stats: Arc<ServerStats>,
}

impl<P: PieceProvider> Server<P> {
    pub fn new(listener: TcpListener, provider: Arc<P>, config: ServerConfig) -> Self {
        Server {
            listeners: vec![listener],
            provider,
            config,
            stats: Arc::default(),
        }
    }

    /// The server's counters, live: keep the `Arc` and read it whenever.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Serves on `listener` too, with the same connection limits (counted over all).
    pub fn also_listen(mut self, listener: TcpListener) -> Self {
        self.listeners.push(listener);
        self
    }

    /// The first listener's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listeners[0].local_addr()
    }

    /// The next connection on any listener.
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        std::future::poll_fn(|cx| {
            for listener in &self.listeners {
                if let std::task::Poll::Ready(accepted) = listener.poll_accept(cx) {
                    return std::task::Poll::Ready(accepted);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// Serves until the future is dropped.
    pub async fn run(self) {
        let counts = Arc::new(Mutex::new(ConnectionCounts::default()));
        // One log per reason, so one kind of refusal does not hide the other.
        let mut refusals_total = RefusalLog::new(Duration::from_secs(1));
        let mut refusals_peer = RefusalLog::new(Duration::from_secs(1));
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(pair) => pair,
                        Err(err) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(%err, "data port accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let slot = match ConnectionSlot::take(&counts, peer.ip(), &self.config) {
                        Ok(slot) => slot,
                        Err(why) => {
                            // Dropping the stream closes it at once.
                            drop(stream);
                            self.stats.connections_rejected.fetch_add(1, Ordering::Relaxed);
                            match why {
                                OverCap::Total => refusals_total.refused(peer, why, &self.config),
                                OverCap::Peer => refusals_peer.refused(peer, why, &self.config),
                            }
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let provider = Arc::clone(&self.provider);
                    let config = self.config.clone();
                    let counted = OpenConnection::new(&self.stats);
                    connections.spawn(async move {
                        let _slot = slot;
                        let stats = &counted.0;
                        match serve_connection(stream, peer, provider.as_ref(), &config, stats).await {
                            Ok(()) => tracing::debug!(%peer, "data connection closed"),
                            Err(err) => {
                                if err.is_bad_frame() {
                                    stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                                }
                                tracing::warn!(%peer, error = %err, "data connection closed on error")
                            }
                        }
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }
}

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("bad frame: {0}")]
    Codec(#[from] CodecError),
    #[error("no complete request within {0:?}")]
    Idle(Duration),
    #[error("peer stopped reading for {0:?}")]
    WriteStalled(Duration),
    #[error("frame truncated: peer closed after {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    #[error("store file ended early while sending piece {0}")]
    ShortFile(u32),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ConnectionError {
    /// The peer sent something that is not a valid request frame.
    fn is_bad_frame(&self) -> bool {
        matches!(
            self,
            ConnectionError::Codec(_) | ConnectionError::Truncated { .. }
        )
    }
}

/// Reads exactly `buf.len()` bytes by `deadline`, distinguishing a clean close before the
/// first byte. The deadline covers the whole request, so a peer trickling a byte at a time
/// cannot keep a connection longer than the idle timeout.
async fn read_frame_part(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    idle: Duration,
) -> Result<bool, ConnectionError> {
    let mut got = 0;
    while got < buf.len() {
        let n = timeout_at(deadline, stream.read(&mut buf[got..]))
            .await
            .map_err(|_| ConnectionError::Idle(idle))??;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(ConnectionError::Truncated {
                got,
                want: buf.len(),
            });
        }
        got += n;
    }
    Ok(true)
}

async fn serve_connection<P: PieceProvider>(
    mut stream: TcpStream,
    peer: SocketAddr,
    provider: &P,
    config: &ServerConfig,
    stats: &ServerStats,
) -> Result<(), ConnectionError> {
    let mut out = BytesMut::with_capacity(512);
    let mut value = vec![0u8; codec::MAX_REQUEST_VALUE_LEN as usize];
    loop {
        let mut header_bytes = [0u8; HEADER_SIZE];
        let deadline = Instant::now() + config.idle_timeout;
        let idle = config.idle_timeout;
        if !read_frame_part(&mut stream, &mut header_bytes, deadline, idle).await? {
            return Ok(());
        }
        let header: FrameHeader =
            codec::decode_header(&header_bytes, codec::MAX_REQUEST_VALUE_LEN)?;
        let value = &mut value[..header.value_len as usize];
        if !value.is_empty() && !read_frame_part(&mut stream, value, deadline, idle).await? {
            return Err(ConnectionError::Truncated {
                got: HEADER_SIZE,
                want: HEADER_SIZE + value.len(),
            });
        }
        let request = Request::decode(header, value)?;
        out.clear();
        match request {
            Request::Close => return Ok(()),
            Request::Upgrade { tag, value } => match provider.upgrade(tag, value, stream) {
                Ok(protocol) => {
                    tracing::debug!(%peer, tag, "connection upgraded");
                    protocol.await;
                    return Ok(());
                }
                Err((back, reason)) => {
                    stream = back;
                    Response::Error {
                        code: ErrorCode::InvalidArgument,
                        message: reason,
                    }
                    .encode(&mut out);
                    write_all(&mut stream, &out, config.write_timeout).await?;
                }
            },
            Request::StatTask { task_id } => {
                let response = match provider.task_info(&task_id) {
                    Some(info) => Response::TaskInfo(info),
                    None => Response::Error {
                        code: ErrorCode::NotFound,
                        message: format!("task {task_id} is not held here"),
                    },
                };
                response.encode(&mut out);
                write_all(&mut stream, &out, config.write_timeout).await?;
            }
            Request::DownloadPiece { task_id, number } => match provider.piece(&task_id, number) {
                Ok(piece) => {
                    let length = piece.metadata.length;
                    Response::PieceContent(piece.metadata).encode(&mut out);
                    write_all(&mut stream, &out, config.write_timeout).await?;
                    send_file_range(
                        &stream,
                        &piece.file,
                        piece.file_offset,
                        length,
                        number,
                        config.write_timeout,
                        stats,
                    )
                    .await?;
                    stats.pieces_served.fetch_add(1, Ordering::Relaxed);
                    provider.served(&task_id, number, length);
                    tracing::trace!(%peer, %task_id, number, length, "piece served");
                }
                Err(err) => {
                    let code = match err {
                        ProviderError::NotFound(_) => ErrorCode::NotFound,
                        ProviderError::Internal(_) => ErrorCode::Internal,
                    };
                    Response::Error {
                        code,
                        message: err.to_string(),
                    }
                    .encode(&mut out);
                    write_all(&mut stream, &out, config.write_timeout).await?;
                }
            },
        }
    }
}

async fn write_all(
    stream: &mut TcpStream,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), ConnectionError> {
    timeout(limit, stream.write_all(bytes))
        .await
        .map_err(|_| ConnectionError::WriteStalled(limit))??;
    Ok(())
}

/// Sends `length` bytes of `file` from `offset` with `sendfile`, waiting for socket space
/// between calls; each wait is bounded by `limit`.
async fn send_file_range(
    stream: &TcpStream,
    file: &File,
    offset: u64,
    length: u64,
    number: u32,
    limit: Duration,
    stats: &ServerStats,
) -> Result<(), ConnectionError> {
    // Ask for the whole piece to be read ahead at once: a cold piece otherwise streams in at
    // the default readahead window, one small synchronous read at a time.
    let _ = nix::fcntl::posix_fadvise(
        file.as_fd(),
        offset as i64,
        length as i64,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    );
    let mut position = offset as i64;
    let end = offset + length;
    while (position as u64) < end {
        timeout(limit, stream.writable())
            .await
            .map_err(|_| ConnectionError::WriteStalled(limit))??;
        let remaining = (end - position as u64).min(1 << 30) as usize;
        let sent = stream.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile64(
                stream.as_fd(),
                file.as_fd(),
                Some(&mut position),
                remaining,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(0) => return Err(ConnectionError::ShortFile(number)),
            Ok(sent) => {
                stats
                    .content_bytes_sent
                    .fetch_add(sent as u64, Ordering::Relaxed);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}
