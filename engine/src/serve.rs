//! The data port's provider: the store's held pieces served to peers over TCP (Vortex), and
//! connections that ask for RDMA handed to the RDMA service, so the store knows nothing of
//! either.

use crate::geometry::format_digest;
use crate::store::Store;
use ferry_fallback_tcp::{PieceMetadata, PieceProvider, ProviderError, ServedPiece, TaskInfo};
use std::sync::Arc;

/// Pieces read ahead of the one a peer asks for.
const READ_AHEAD_PIECES: u64 = 2;

/// Serves the store's held pieces to peers over the TCP data port.
pub struct StoreProvider {
    pub store: Arc<Store>,
    /// Sent as the Vortex parent id, so a Dragonfly peer knows where the piece came from.
    pub host_id: String,
    /// Serves pieces over RDMA to peers that upgrade their connection, when this host can.
    pub rdma: Option<Arc<crate::rdma::RdmaService>>,
}

/// Dragonfly's traffic type for pieces sent to a remote peer.
const TRAFFIC_REMOTE_PEER: u8 = 1;

impl PieceProvider for StoreProvider {
    fn piece(&self, task_id: &str, number: u32) -> Result<ServedPiece, ProviderError> {
        let task = self
            .store
            .get(task_id)
            .ok_or_else(|| ProviderError::NotFound(format!("task {task_id} is not held here")))?;
        let range = task
            .geometry()
            .piece(number)
            .map_err(|e| ProviderError::NotFound(e.to_string()))?;
        let crc = task.held(number).ok_or_else(|| {
            ProviderError::NotFound(format!("piece {number} of task {task_id} is not held here"))
        })?;
        let file = task.read_file().map_err(|e| {
            ProviderError::Internal(format!("opening the content of task {task_id}: {e}"))
        })?;
        // Peers fetch a task's pieces roughly in order: start reading the next pieces from
        // disk now, so a cold seed's disk works ahead of its network instead of each piece's
        // read starting only when that piece is asked for.
        let ahead = range.offset + range.length;
        if ahead < task.geometry().content_length() {
            let _ = nix::fcntl::posix_fadvise(
                file.as_ref(),
                ahead as i64,
                (READ_AHEAD_PIECES * range.length) as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
        Ok(ServedPiece {
            metadata: PieceMetadata {
                number,
                offset: range.offset,
                length: range.length,
                digest: format_digest(crc),
                parent_id: self.host_id.clone(),
                traffic_type: TRAFFIC_REMOTE_PEER,
                cost: std::time::Duration::ZERO,
                created_at: chrono::Utc::now().naive_utc(),
            },
            file,
            file_offset: range.offset,
        })
    }

    fn task_info(&self, task_id: &str) -> Option<TaskInfo> {
        let task = self.store.get(task_id)?;
        Some(TaskInfo {
            content_length: task.geometry().content_length(),
            piece_length: task.geometry().piece_length(),
            pieces_held: task.held_count(),
            complete: task.is_complete(),
            // A manifest that cannot be read is stated as none: the receiver then verifies
            // the content it gets against its own pin.
            content_sha256: task
                .manifest()
                .unwrap_or_else(|err| {
                    tracing::warn!(task_id, error = %err, "unreadable manifest");
                    None
                })
                .map(|m| m.content_sha256.0),
        })
    }

    fn served(&self, task_id: &str, _number: u32, _bytes: u64) {
        if let Some(task) = self.store.get(task_id) {
            task.count_served();
        }
    }

    fn upgrade(
        &self,
        tag: u8,
        value: Vec<u8>,
        stream: tokio::net::TcpStream,
    ) -> Result<ferry_fallback_tcp::UpgradeFuture, (tokio::net::TcpStream, String)> {
        use ferry_rdma::wire::{TAG_CONNECT, TAG_CONNECT_RAIL, TAG_RAILS};
        match (&self.rdma, tag) {
            (Some(service), TAG_CONNECT | TAG_CONNECT_RAIL | TAG_RAILS) => {
                Ok(Box::pin(Arc::clone(service).serve(stream, tag, value)))
            }
            (None, TAG_CONNECT | TAG_CONNECT_RAIL | TAG_RAILS) => {
                Err((stream, "RDMA is not available on this peer".into()))
            }
            _ => Err((
                stream,
                format!("extension {tag:#04x} is not supported by this peer"),
            )),
        }
    }
}
