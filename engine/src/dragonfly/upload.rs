//! `dfdaemon.v2.DfdaemonUpload` on `[dragonfly] upload_listen`: what a stock dfdaemon child
//! asks a parent for. `SyncPieces` streams the requested pieces' metadata as they become held,
//! with this host's Vortex address (Ferry's data port), and `SyncHost` its bandwidth figures;
//! every other RPC is UNIMPLEMENTED, saying so. Pieces themselves move over Vortex (the data
//! port), not gRPC.

use super::Peer;
use crate::geometry;
use dragonfly_api::common::v2::Host;
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_server::{DfdaemonUpload, DfdaemonUploadServer};
use dragonfly_api::dfdaemon::v2::{SyncHostRequest, SyncPiecesRequest, SyncPiecesResponse};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How often SyncPieces looks for newly held pieces (dfdaemon polls its storage likewise).
const SYNC_POLL: Duration = Duration::from_millis(100);
/// Longest SyncPieces waits for a task this daemon does not hold (yet) to appear.
pub const SYNC_UNKNOWN_TASK_WAIT: Duration = Duration::from_secs(30);
/// Longest SyncPieces waits with no new piece held before ending the stream with
/// DEADLINE_EXCEEDED (a transfer into the task that stalled or was cancelled).
pub const SYNC_IDLE_LIMIT: Duration = Duration::from_secs(300);
/// Longest one message may wait for a child that stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// SyncHost's period, as dfdaemon's.
const SYNC_HOST_INTERVAL: Duration = Duration::from_millis(500);

type Unimplemented<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "dfdaemon.v2.DfdaemonUpload/{rpc} is not implemented by Ferry: it serves SyncPieces and SyncHost here, and pieces over Vortex on its data port"
    ))
}

/// The service; [`server`] wraps it for tonic.
pub struct UploadService {
    pub peer: Arc<Peer>,
}

pub fn server(peer: Arc<Peer>) -> DfdaemonUploadServer<UploadService> {
    DfdaemonUploadServer::new(UploadService { peer })
}

impl UploadService {
    fn piece_message(&self, range: geometry::PieceRange) -> SyncPiecesResponse {
        SyncPiecesResponse {
            number: range.number,
            offset: range.offset,
            length: range.length,
            ip: self.peer.host.ip.clone(),
            tcp_port: Some(i32::from(self.peer.host.data_port)),
            quic_port: None,
        }
    }
}

#[tonic::async_trait]
impl DfdaemonUpload for UploadService {
    type SyncPiecesStream = ReceiverStream<Result<SyncPiecesResponse, Status>>;

    async fn sync_pieces(
        &self,
        request: Request<SyncPiecesRequest>,
    ) -> Result<Response<Self::SyncPiecesStream>, Status> {
        let request = request.into_inner();
        geometry::validate_task_id(&request.task_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let store = Arc::clone(&self.peer.store);
        let task_id = request.task_id;
        // A task not held yet may be on its way (a transfer about to start): wait a while.
        let started = Instant::now();
        let task = loop {
            if let Some(task) = store.get(&task_id) {
                break task;
            }
            if started.elapsed() >= SYNC_UNKNOWN_TASK_WAIT {
                return Err(Status::not_found(format!(
                    "task {task_id} is not held by this Ferry host (waited {SYNC_UNKNOWN_TASK_WAIT:?})"
                )));
            }
            tokio::time::sleep(SYNC_POLL).await;
        };
        let geometry = task.geometry();
        let mut wanted: Vec<u32> = if request.interested_piece_numbers.is_empty() {
            (0..geometry.piece_count()).collect()
        } else {
            request.interested_piece_numbers.clone()
        };
        wanted.sort_unstable();
        wanted.dedup();
        if let Some(&bad) = wanted.iter().find(|&&n| n >= geometry.piece_count()) {
            return Err(Status::invalid_argument(format!(
                "piece {bad} is out of range: task {task_id} has {} pieces",
                geometry.piece_count()
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let messages: Vec<SyncPiecesResponse> = geometry
            .pieces()
            .map(|range| self.piece_message(range))
            .collect();
        tokio::spawn(async move {
            let mut last_progress = Instant::now();
            while !wanted.is_empty() {
                let mut sent_any = false;
                let mut still = Vec::with_capacity(wanted.len());
                for number in wanted {
                    if task.held(number).is_none() {
                        still.push(number);
                        continue;
                    }
                    let message = messages[number as usize].clone();
                    if tx.send_timeout(Ok(message), SEND_TIMEOUT).await.is_err() {
                        return; // the child left, or stopped reading
                    }
                    sent_any = true;
                }
                wanted = still;
                if wanted.is_empty() {
                    break;
                }
                if sent_any {
                    last_progress = Instant::now();
                } else if last_progress.elapsed() >= SYNC_IDLE_LIMIT {
                    let _ = tx
                        .send(Err(Status::deadline_exceeded(format!(
                            "no new piece of task {} held here for {SYNC_IDLE_LIMIT:?}; {} requested pieces still missing",
                            task.id(),
                            wanted.len()
                        ))))
                        .await;
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(SYNC_POLL) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type SyncHostStream = ReceiverStream<Result<Host, Status>>;

    async fn sync_host(
        &self,
        _: Request<SyncHostRequest>,
    ) -> Result<Response<Self::SyncHostStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let peer = Arc::clone(&self.peer);
        tokio::spawn(async move {
            loop {
                let host = Host {
                    network: Some(peer.network()),
                    ..Default::default()
                };
                if tx.send_timeout(Ok(host), SEND_TIMEOUT).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(SYNC_HOST_INTERVAL) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type DownloadTaskStream = Unimplemented<dragonfly_api::dfdaemon::v2::DownloadTaskResponse>;
    type DownloadCacheTaskStream =
        Unimplemented<dragonfly_api::dfdaemon::v2::DownloadCacheTaskResponse>;
    type SyncCachePiecesStream =
        Unimplemented<dragonfly_api::dfdaemon::v2::SyncCachePiecesResponse>;
    type DownloadPersistentTaskStream =
        Unimplemented<dragonfly_api::dfdaemon::v2::DownloadPersistentTaskResponse>;
    type SyncPersistentPiecesStream =
        Unimplemented<dragonfly_api::dfdaemon::v2::SyncPersistentPiecesResponse>;
    type DownloadPersistentCacheTaskStream =
        Unimplemented<dragonfly_api::dfdaemon::v2::DownloadPersistentCacheTaskResponse>;
    type SyncPersistentCachePiecesStream =
        Unimplemented<dragonfly_api::dfdaemon::v2::SyncPersistentCachePiecesResponse>;
    async fn download_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::DownloadTaskRequest>,
    ) -> Result<tonic::Response<Self::DownloadTaskStream>, Status> {
        Err(unimplemented("download_task"))
    }
    async fn stat_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::StatTaskRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::Task>, Status> {
        Err(unimplemented("stat_task"))
    }
    async fn stat_local_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::StatLocalTaskRequest>,
    ) -> Result<tonic::Response<dragonfly_api::dfdaemon::v2::StatLocalTaskResponse>, Status> {
        Err(unimplemented("stat_local_task"))
    }
    async fn list_task_entries(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::ListTaskEntriesRequest>,
    ) -> Result<tonic::Response<dragonfly_api::dfdaemon::v2::ListTaskEntriesResponse>, Status> {
        Err(unimplemented("list_task_entries"))
    }
    async fn delete_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::DeleteTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_task"))
    }
    async fn download_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::DownloadCacheTaskRequest>,
    ) -> Result<tonic::Response<Self::DownloadCacheTaskStream>, Status> {
        Err(unimplemented("download_cache_task"))
    }
    async fn stat_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::StatCacheTaskRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::CacheTask>, Status> {
        Err(unimplemented("stat_cache_task"))
    }
    async fn delete_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::DeleteCacheTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_cache_task"))
    }
    async fn sync_cache_pieces(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::SyncCachePiecesRequest>,
    ) -> Result<tonic::Response<Self::SyncCachePiecesStream>, Status> {
        Err(unimplemented("sync_cache_pieces"))
    }
    async fn download_cache_piece(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::DownloadCachePieceRequest>,
    ) -> Result<tonic::Response<dragonfly_api::dfdaemon::v2::DownloadCachePieceResponse>, Status>
    {
        Err(unimplemented("download_cache_piece"))
    }
    async fn download_persistent_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::DownloadPersistentTaskRequest>,
    ) -> Result<tonic::Response<Self::DownloadPersistentTaskStream>, Status> {
        Err(unimplemented("download_persistent_task"))
    }
    async fn sync_persistent_pieces(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::SyncPersistentPiecesRequest>,
    ) -> Result<tonic::Response<Self::SyncPersistentPiecesStream>, Status> {
        Err(unimplemented("sync_persistent_pieces"))
    }
    async fn update_persistent_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::UpdatePersistentTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("update_persistent_task"))
    }
    async fn stat_persistent_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::StatPersistentTaskRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::PersistentTask>, Status> {
        Err(unimplemented("stat_persistent_task"))
    }
    async fn delete_persistent_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::DeletePersistentTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_persistent_task"))
    }
    async fn download_persistent_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::DownloadPersistentCacheTaskRequest>,
    ) -> Result<tonic::Response<Self::DownloadPersistentCacheTaskStream>, Status> {
        Err(unimplemented("download_persistent_cache_task"))
    }
    async fn update_persistent_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::UpdatePersistentCacheTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("update_persistent_cache_task"))
    }
    async fn stat_persistent_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::StatPersistentCacheTaskRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::PersistentCacheTask>, Status> {
        Err(unimplemented("stat_persistent_cache_task"))
    }
    async fn delete_persistent_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::DeletePersistentCacheTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_persistent_cache_task"))
    }
    async fn sync_persistent_cache_pieces(
        &self,
        _: tonic::Request<dragonfly_api::dfdaemon::v2::SyncPersistentCachePiecesRequest>,
    ) -> Result<tonic::Response<Self::SyncPersistentCachePiecesStream>, Status> {
        Err(unimplemented("sync_persistent_cache_pieces"))
    }
}
