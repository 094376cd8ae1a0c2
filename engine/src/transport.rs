//! The seam between the engine and the wires that move pieces. A transport fetches one piece
//! from one source into a pool buffer and reports the CRC32 of what arrived; the engine
//! decides what to fetch from whom, verifies, and writes. TCP (Vortex) is always there; RDMA
//! plugs in as another implementation of [`PieceTransport`].

use crate::geometry::PieceRange;
use crate::io::PieceBuffer;
use async_trait::async_trait;
use ferry_fallback_tcp::{ClientConfig, ClientError, Connection, TaskInfo};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// What arrived: the digest the source claims and the CRC32 of the bytes received.
#[derive(Debug, Clone)]
pub struct FetchedPiece {
    pub advertised_digest: String,
    pub crc32: u32,
    /// The RDMA rail pairs that carried it and their bytes: one, or one per stripe of a
    /// piece striped over several; none over TCP.
    pub rails: Vec<RailShare>,
}

/// The bytes of a piece one RDMA rail pair (`rxe0:1>rxe1:1`) carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailShare {
    pub rail: String,
    pub bytes: u64,
}

/// How a piece result names the rail pairs that carried it: `rxe0:1>rxe1:1`, or for a striped
/// piece every pair joined by `+`; None over TCP.
pub fn rail_label(rails: &[RailShare]) -> Option<String> {
    (!rails.is_empty()).then(|| {
        rails
            .iter()
            .map(|r| r.rail.as_str())
            .collect::<Vec<_>>()
            .join("+")
    })
}

/// What a fetch gives back: the buffer it was handed, once no device can touch it any more,
/// and the outcome. `buf` is `None` when that could not be proved (a queue pair that died
/// without the flush completion that would show its device done): the transport then keeps
/// the buffer out of the pool, and a retry takes another.
#[derive(Debug)]
pub struct Fetched {
    pub buf: Option<PieceBuffer>,
    pub result: Result<FetchedPiece, TransportError>,
}

impl Fetched {
    /// An outcome whose buffer is the caller's again.
    pub fn with(buf: PieceBuffer, result: Result<FetchedPiece, TransportError>) -> Fetched {
        Fetched {
            buf: Some(buf),
            result,
        }
    }
}

/// Why a fetch failed, sorted by what the engine should do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The source could not be reached or its connection broke: try elsewhere, and count
    /// this against the source's health.
    #[error("source unreachable: {0}")]
    Unreachable(String),
    /// The source answered that it does not hold the piece.
    #[error("source does not hold it: {0}")]
    NotHeld(String),
    /// The source answered with something wrong (protocol, length, timeout mid-piece).
    #[error("{0}")]
    Failed(String),
    /// This transport cannot reach that source at all (no RDMA there): use another.
    #[error("transport not supported by the source: {0}")]
    Unsupported(String),
}

/// One way of moving pieces.
#[async_trait]
pub trait PieceTransport: Send + Sync {
    /// "tcp", "rdma": reported per piece.
    fn name(&self) -> &'static str;

    /// Fetches `piece` of `task_id` from `source` into `buf` (whose length is the piece's),
    /// which the transport owns until it gives it back in [`Fetched`]: only once no device
    /// can write it any more. A fetch dropped unfinished drops the buffer with it; the pool
    /// keeps its slots out of use while a device may still hold them.
    async fn fetch(
        &self,
        source: SocketAddr,
        task_id: &str,
        piece: PieceRange,
        buf: PieceBuffer,
    ) -> Fetched;
}

/// Vortex over TCP, with idle connections kept per source for reuse.
pub struct TcpTransport {
    config: ClientConfig,
    idle: Mutex<HashMap<SocketAddr, Vec<Connection>>>,
}

impl TcpTransport {
    pub fn new(config: ClientConfig) -> TcpTransport {
        TcpTransport {
            config,
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// A pooled connection to `source` (`true`), else a new one (`false`).
    async fn connection(&self, source: SocketAddr) -> Result<(Connection, bool), TransportError> {
        let reused = self
            .idle
            .lock()
            .expect("idle lock")
            .get_mut(&source)
            .and_then(Vec::pop);
        match reused {
            Some(connection) => Ok((connection, true)),
            None => Ok((self.connect(source).await?, false)),
        }
    }

    async fn connect(&self, source: SocketAddr) -> Result<Connection, TransportError> {
        Connection::connect(source, self.config.clone())
            .await
            .map_err(classify)
    }

    /// After a pooled connection turned out closed by the source (its idle timeout ran out
    /// while the connection sat in the pool), the others pooled with it are dropped too and
    /// the request goes once more over a fresh connection.
    async fn replace_stale(&self, source: SocketAddr) -> Result<Connection, TransportError> {
        tracing::debug!(%source, "pooled connection was closed by the source; reconnecting");
        self.forget(source);
        self.connect(source).await
    }

    fn give_back(&self, source: SocketAddr, connection: Connection) {
        self.idle
            .lock()
            .expect("idle lock")
            .entry(source)
            .or_default()
            .push(connection);
    }

    /// Asks a source for a task's geometry (Ferry's extension to Vortex).
    pub async fn stat_task(
        &self,
        source: SocketAddr,
        task_id: &str,
    ) -> Result<TaskInfo, TransportError> {
        let (mut connection, reused) = self.connection(source).await?;
        let mut result = connection.stat_task(task_id).await;
        if reused && matches!(&result, Err(err) if closed_while_pooled(err)) {
            connection = self.replace_stale(source).await?;
            result = connection.stat_task(task_id).await;
        }
        match result {
            Ok(info) => {
                self.give_back(source, connection);
                Ok(info)
            }
            Err(err) => {
                if err.connection_reusable() {
                    self.give_back(source, connection);
                }
                Err(classify(err))
            }
        }
    }

    /// Drops idle connections to a source (after it failed).
    pub fn forget(&self, source: SocketAddr) {
        self.idle.lock().expect("idle lock").remove(&source);
    }
}

/// The connection was closed or reset under the request: on a pooled connection, most
/// likely by the source's idle timeout, not a sign the source is down.
fn closed_while_pooled(err: &ClientError) -> bool {
    matches!(err, ClientError::Closed { .. } | ClientError::Io { .. })
}

fn classify(err: ClientError) -> TransportError {
    match &err {
        _ if err.is_not_found() => TransportError::NotHeld(err.to_string()),
        ClientError::Connect { .. } | ClientError::Closed { .. } | ClientError::Io { .. } => {
            TransportError::Unreachable(err.to_string())
        }
        ClientError::Timeout { during, .. } if *during == "connecting" => {
            TransportError::Unreachable(err.to_string())
        }
        _ => TransportError::Failed(err.to_string()),
    }
}

#[async_trait]
impl PieceTransport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    async fn fetch(
        &self,
        source: SocketAddr,
        task_id: &str,
        piece: PieceRange,
        mut buf: PieceBuffer,
    ) -> Fetched {
        // The CPU copies from the socket: the buffer is the caller's again at once.
        let result = self.fetch_into(source, task_id, piece, &mut buf).await;
        Fetched::with(buf, result)
    }
}

impl TcpTransport {
    async fn fetch_into(
        &self,
        source: SocketAddr,
        task_id: &str,
        piece: PieceRange,
        buf: &mut PieceBuffer,
    ) -> Result<FetchedPiece, TransportError> {
        let (mut connection, reused) = self.connection(source).await?;
        let mut result = connection
            .fetch_piece(task_id, piece.number, piece.length, &mut buf.chunks_mut())
            .await;
        if reused && matches!(&result, Err(err) if closed_while_pooled(err)) {
            // Whatever arrived is overwritten and digested again from the start.
            connection = self.replace_stale(source).await?;
            result = connection
                .fetch_piece(task_id, piece.number, piece.length, &mut buf.chunks_mut())
                .await;
        }
        match result {
            Ok(fetched) => {
                self.give_back(source, connection);
                Ok(FetchedPiece {
                    rails: Vec::new(),
                    advertised_digest: fetched.metadata.digest,
                    crc32: fetched.crc32,
                })
            }
            Err(err) => {
                if err.connection_reusable() {
                    self.give_back(source, connection);
                }
                Err(classify(err))
            }
        }
    }
}
