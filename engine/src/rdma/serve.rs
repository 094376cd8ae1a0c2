//! The serving side: a queue pair for each peer that upgrades its data connection.

use super::{RdmaSettings, WR_WRITE};
use crate::geometry::format_digest;
use crate::metrics::Metrics;
use crate::store::Store;
use ferry_rdma::credit::{self, SlotCredit};
use ferry_rdma::wire::{self, Message};
use ferry_rdma::{Connection, ConnectionConfig, RdmaContext, RdmaError, RegisteredRegion};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// The most chunk writes the source posts for one piece: all of them are on its send queue at
/// once. `Config::validate` refuses an `rdma.chunk_kib` that would need more.
pub const MAX_WRITES_PER_PIECE: u32 = ferry_rdma::verbs::SEND_QUEUE_DEPTH;

/// The serving side: runs a queue pair for each peer that upgrades its connection.
pub struct RdmaService {
    pub(super) store: Arc<Store>,
    pub(super) context: Arc<RdmaContext>,
    pub(super) region: Arc<RegisteredRegion>,
    pub(super) settings: RdmaSettings,
    pub(super) idle_timeout: Duration,
    pub(super) metrics: Arc<Metrics>,
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
        let peer = stream.peer_addr()?;
        let set_up = ferry_rdma::address::check_peer_gid(&endpoint, peer.ip())
            .map_err(RdmaError::from)
            .and_then(|()| Connection::new(&self.context, ConnectionConfig::default()))
            .and_then(|connection| connection.connect(&endpoint).map(|()| connection));
        let connection = match set_up {
            Ok(connection) => connection,
            Err(err) => {
                // Say why before hanging up: the receiver logs it and its breaker counts it.
                let refused = Message::Failed {
                    request: 0,
                    not_held: false,
                    message: err.to_string(),
                };
                let _ = wire::write_message(stream, &refused, self.settings.io_timeout).await;
                return Err(err);
            }
        };
        let _counted = self.metrics.rdma_session(true);
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
            Ok(writes) if writes.len() <= MAX_WRITES_PER_PIECE as usize => writes,
            Ok(writes) => {
                return Ok(Message::Failed {
                    request,
                    not_held: false,
                    message: format!(
                        "{} chunks exceed the {MAX_WRITES_PER_PIECE} writes a piece may take (the send queue)",
                        writes.len()
                    ),
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
        // From disk straight into the registered pool (O_DIRECT where possible), in a buffer
        // of the serving budget.
        let buf = self
            .store
            .read_piece(&task, piece)
            .await
            .map_err(|e| RdmaError::verbs("reading the piece", e))?;
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
        self.metrics.rdma_piece_served(piece.length);
        Ok(Message::Done {
            request,
            number,
            length: piece.length,
            digest: format_digest(crc),
        })
    }
}
