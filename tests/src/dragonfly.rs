//! A test double of Dragonfly's scheduler (`scheduler.v2.Scheduler`), written with
//! `dragonfly-api`'s generated server trait, reproducing the parts of the stock scheduler
//! (v2.5) that peers see (Ferry daemons and the stock dfdaemon of tests/src/stock.rs):
//! - `grpc.health.v1` on the same port, serving (`""` and `scheduler.v2.Scheduler`): a
//!   dfdaemon without a manager health-checks the schedulers its dynconfig lists and uses only
//!   the serving ones.
//! - `AnnounceHost` records the host (its `Host` message, as announced last) and counts calls;
//!   `DeleteHost` removes it (NOT_FOUND for a host it does not know) and its peers leave;
//!   `DeleteTask` makes the host's peers of the task leave.
//! - `AnnouncePeer`: the first message must be `RegisterPeerRequest`. With
//!   `download.metadata_only` (v2.5.1+) the peer is recorded as holding the task (lengths from
//!   `actual_content_length`/`actual_piece_count`) and answered `MetadataOnlyResponse`.
//!   Otherwise the candidate parents are the task's peers on other hosts that finished (a
//!   download, a back-to-source download, or a metadata-only announcement), at most 3, newest
//!   first, each with its host and task; with none the peer is told `NeedBackToSourceResponse`
//!   (the stock scheduler does that for the first peer of a task, and after its retries run
//!   out; the double does not retry).
//! - `ReschedulePeerRequest` is answered like a registration, leaving out the parents it names
//!   and those named by the peer's temporary `DownloadPieceFailedRequest`s (the stock
//!   scheduler's `BlockParents`). `candidate_limit` caps the parents per answer (3 unless set).
//! - Per piece: `DownloadPieceFinishedRequest` (counted per parent) and
//!   `DownloadPieceBackToSourceFinishedRequest` (counted; they set the task's length and piece
//!   count); `DownloadPieceFailedRequest` recorded with its piece and parent (a non-temporary
//!   one fails the peer). Started, finished and failed move the peer's state.
//! - Like the stock scheduler, the double ends the `AnnouncePeer` stream (status OK) after
//!   `DownloadPeerFinishedRequest`, `DownloadPeerBackToSourceFinishedRequest`,
//!   `DownloadPeerFailedRequest` or `DownloadPeerBackToSourceFailedRequest`: the stock dfdaemon
//!   waits for that close before it reports a download done.
//!
//! Not reproduced: scoring (load, IDC, location), the 15-peer sample, blocklists, retry limits
//! and their back-off, GC, the manager, `StatPeer`/`StatTask` and the other
//! services (UNIMPLEMENTED).

use dragonfly_api::common::v2::{Host, Peer, Task};
use dragonfly_api::scheduler::v2::announce_peer_request::Request as PeerRequest;
use dragonfly_api::scheduler::v2::announce_peer_response::Response as PeerResponse;
use dragonfly_api::scheduler::v2::scheduler_server::{Scheduler, SchedulerServer};
use dragonfly_api::scheduler::v2::{
    AnnounceHostRequest, AnnouncePeerRequest, AnnouncePeerResponse, MetadataOnlyResponse,
    NeedBackToSourceResponse, NormalTaskResponse,
};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type Unimplemented<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "the scheduler test double does not implement {rpc}"
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Registered,
    Running,
    BackToSource,
    Finished,
    BackToSourceFinished,
    /// Announced with `metadata_only`.
    MetadataOnly,
    Failed,
    /// Its host was deleted (DeleteHost).
    Left,
}

impl PeerState {
    fn holds(self) -> bool {
        matches!(
            self,
            PeerState::Finished | PeerState::BackToSourceFinished | PeerState::MetadataOnly
        )
    }
}

#[derive(Debug, Clone)]
pub struct PeerRecord {
    pub id: String,
    pub host_id: String,
    pub state: PeerState,
    /// What the peer was answered, in order: "need_back_to_source", "normal(N)",
    /// "metadata_only".
    pub answers: Vec<String>,
    /// Pieces reported downloaded from parents, per parent peer id.
    pub pieces_from: BTreeMap<String, u32>,
    /// Digests of the pieces reported, by piece number.
    pub digests: BTreeMap<u32, String>,
    pub back_to_source_pieces: u32,
    /// DownloadPieceFailedRequests: (piece number, parent), in order. Temporary failures
    /// block the parent for this peer, as the stock scheduler's `BlockParents` do.
    pub failed_pieces: Vec<(Option<u32>, String)>,
    pub reschedules: u32,
}

#[derive(Debug, Clone, Default)]
pub struct TaskRecord {
    pub url: String,
    pub content_length: u64,
    pub piece_count: u32,
    pub peers: Vec<PeerRecord>,
}

#[derive(Debug, Default)]
pub struct DoubleState {
    pub hosts: HashMap<String, Host>,
    pub host_announces: u32,
    pub tasks: HashMap<String, TaskRecord>,
    /// Most candidate parents in one answer; 0: 3 (configurable on the stock scheduler too,
    /// as `scheduler.algorithm`'s candidate parent limit).
    pub candidate_limit: usize,
    /// Hosts removed by DeleteHost, in order.
    pub deleted_hosts: Vec<String>,
}

impl DoubleState {
    pub fn peer(&self, task_id: &str, peer_id: &str) -> Option<&PeerRecord> {
        self.tasks
            .get(task_id)?
            .peers
            .iter()
            .find(|p| p.id == peer_id)
    }

    fn peer_mut(&mut self, task_id: &str, peer_id: &str) -> Option<&mut PeerRecord> {
        self.tasks
            .get_mut(task_id)?
            .peers
            .iter_mut()
            .find(|p| p.id == peer_id)
    }

    /// The answer to a registration or a reschedule.
    fn schedule(
        &self,
        task_id: &str,
        peer_id: &str,
        host_id: &str,
        exclude: &[String],
    ) -> PeerResponse {
        let Some(task) = self.tasks.get(task_id) else {
            return need_back_to_source("the task has no peers yet");
        };
        let candidates: Vec<Peer> = task
            .peers
            .iter()
            .rev()
            .filter(|p| p.id != peer_id && p.host_id != host_id && p.state.holds())
            .filter(|p| !exclude.contains(&p.id))
            .filter_map(|p| {
                Some(Peer {
                    id: p.id.clone(),
                    state: "Succeeded".into(),
                    host: Some(self.hosts.get(&p.host_id)?.clone()),
                    task: Some(Task {
                        id: task_id.to_owned(),
                        url: task.url.clone(),
                        content_length: task.content_length,
                        piece_count: task.piece_count,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
            })
            .take(match self.candidate_limit {
                0 => 3,
                n => n,
            })
            .collect();
        if candidates.is_empty() {
            need_back_to_source("no peer of the task holds it yet")
        } else {
            PeerResponse::NormalTaskResponse(NormalTaskResponse {
                candidate_parents: candidates,
            })
        }
    }
}

fn need_back_to_source(why: &str) -> PeerResponse {
    PeerResponse::NeedBackToSourceResponse(NeedBackToSourceResponse {
        description: Some(why.into()),
    })
}

fn answer_name(response: &PeerResponse) -> String {
    match response {
        PeerResponse::NeedBackToSourceResponse(_) => "need_back_to_source".into(),
        PeerResponse::NormalTaskResponse(n) => format!("normal({})", n.candidate_parents.len()),
        PeerResponse::MetadataOnlyResponse(_) => "metadata_only".into(),
        PeerResponse::EmptyTaskResponse(_) => "empty".into(),
    }
}

#[derive(Clone, Default)]
pub struct SchedulerDouble {
    pub state: Arc<Mutex<DoubleState>>,
}

/// A running double.
pub struct RunningDouble {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<DoubleState>>,
}

impl SchedulerDouble {
    /// Serves the double on an ephemeral loopback port, in the test's runtime.
    pub async fn start() -> RunningDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let double = SchedulerDouble::default();
        let state = Arc::clone(&double.state);
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<SchedulerServer<SchedulerDouble>>()
            .await;
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(SchedulerServer::new(double))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        RunningDouble { addr, state }
    }

    fn handle(&self, message: AnnouncePeerRequest) -> Option<PeerResponse> {
        let mut state = self.state.lock().unwrap();
        let (task_id, peer_id, host_id) = (message.task_id, message.peer_id, message.host_id);
        match message.request? {
            PeerRequest::RegisterPeerRequest(register) => {
                let download = register.download.unwrap_or_default();
                let task = state.tasks.entry(task_id.clone()).or_default();
                if task.url.is_empty() {
                    task.url = download.url.clone();
                }
                let mut record = PeerRecord {
                    id: peer_id.clone(),
                    host_id: host_id.clone(),
                    state: PeerState::Registered,
                    answers: Vec::new(),
                    pieces_from: BTreeMap::new(),
                    digests: BTreeMap::new(),
                    back_to_source_pieces: 0,
                    failed_pieces: Vec::new(),
                    reschedules: 0,
                };
                let response = if download.metadata_only {
                    task.content_length = download.actual_content_length.unwrap_or(0);
                    task.piece_count = download.actual_piece_count.unwrap_or(0) as u32;
                    record.state = PeerState::MetadataOnly;
                    PeerResponse::MetadataOnlyResponse(MetadataOnlyResponse {})
                } else {
                    task.peers.push(record.clone());
                    let response = state.schedule(&task_id, &peer_id, &host_id, &[]);
                    let task = state.tasks.get_mut(&task_id).unwrap();
                    task.peers.pop();
                    response
                };
                record.answers.push(answer_name(&response));
                state.tasks.get_mut(&task_id).unwrap().peers.push(record);
                Some(response)
            }
            PeerRequest::ReschedulePeerRequest(reschedule) => {
                let mut exclude: Vec<String> = reschedule
                    .candidate_parents
                    .iter()
                    .map(|p| p.id.clone())
                    .collect();
                if let Some(peer) = state.peer(&task_id, &peer_id) {
                    exclude.extend(peer.failed_pieces.iter().map(|(_, parent)| parent.clone()));
                }
                let response = state.schedule(&task_id, &peer_id, &host_id, &exclude);
                if let Some(peer) = state.peer_mut(&task_id, &peer_id) {
                    peer.reschedules += 1;
                    peer.answers.push(answer_name(&response));
                }
                Some(response)
            }
            other => {
                let task = state.tasks.get_mut(&task_id)?;
                if let PeerRequest::DownloadPieceBackToSourceFinishedRequest(r) = &other {
                    if let Some(piece) = &r.piece {
                        task.content_length = task.content_length.max(piece.offset + piece.length);
                        task.piece_count = task.piece_count.max(piece.number + 1);
                    }
                }
                let peer = task.peers.iter_mut().find(|p| p.id == peer_id)?;
                match other {
                    PeerRequest::DownloadPeerStartedRequest(_)
                        if peer.state != PeerState::MetadataOnly =>
                    {
                        peer.state = PeerState::Running
                    }
                    PeerRequest::DownloadPeerBackToSourceStartedRequest(_) => {
                        peer.state = PeerState::BackToSource
                    }
                    PeerRequest::DownloadPeerFinishedRequest(_)
                        if peer.state != PeerState::MetadataOnly =>
                    {
                        peer.state = PeerState::Finished
                    }
                    PeerRequest::DownloadPeerBackToSourceFinishedRequest(_) => {
                        peer.state = PeerState::BackToSourceFinished
                    }
                    PeerRequest::DownloadPeerFailedRequest(_)
                    | PeerRequest::DownloadPeerBackToSourceFailedRequest(_) => {
                        peer.state = PeerState::Failed
                    }
                    PeerRequest::DownloadPieceFinishedRequest(r) => {
                        let piece = r.piece.unwrap_or_default();
                        *peer
                            .pieces_from
                            .entry(piece.parent_id.unwrap_or_default())
                            .or_default() += 1;
                        peer.digests.insert(piece.number, piece.digest);
                    }
                    PeerRequest::DownloadPieceBackToSourceFinishedRequest(r) => {
                        let piece = r.piece.unwrap_or_default();
                        peer.back_to_source_pieces += 1;
                        peer.digests.insert(piece.number, piece.digest);
                    }
                    PeerRequest::DownloadPieceFailedRequest(r) => {
                        if r.temporary {
                            peer.failed_pieces.push((r.piece_number, r.parent_id))
                        } else {
                            peer.state = PeerState::Failed
                        }
                    }
                    _ => {}
                }
                None
            }
        }
    }
}

#[tonic::async_trait]
impl Scheduler for SchedulerDouble {
    type AnnouncePeerStream = ReceiverStream<Result<AnnouncePeerResponse, Status>>;

    async fn announce_peer(
        &self,
        request: Request<Streaming<AnnouncePeerRequest>>,
    ) -> Result<Response<Self::AnnouncePeerStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let double = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = incoming.next().await {
                let last = matches!(
                    message.request,
                    Some(
                        PeerRequest::DownloadPeerFinishedRequest(_)
                            | PeerRequest::DownloadPeerBackToSourceFinishedRequest(_)
                            | PeerRequest::DownloadPeerFailedRequest(_)
                            | PeerRequest::DownloadPeerBackToSourceFailedRequest(_)
                    )
                );
                let response = double.handle(message);
                if last {
                    // The stock scheduler returns from AnnouncePeer here: the stream ends.
                    return;
                }
                if let Some(response) = response {
                    let response = AnnouncePeerResponse {
                        response: Some(response),
                    };
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn announce_host(
        &self,
        request: Request<AnnounceHostRequest>,
    ) -> Result<Response<()>, Status> {
        let host = request
            .into_inner()
            .host
            .ok_or_else(|| Status::invalid_argument("AnnounceHostRequest without a host"))?;
        let mut state = self.state.lock().unwrap();
        state.host_announces += 1;
        state.hosts.insert(host.id.clone(), host);
        Ok(Response::new(()))
    }

    type AnnounceCachePeerStream =
        Unimplemented<dragonfly_api::scheduler::v2::AnnounceCachePeerResponse>;
    type AnnouncePersistentPeerStream =
        Unimplemented<dragonfly_api::scheduler::v2::AnnouncePersistentPeerResponse>;
    type AnnouncePersistentCachePeerStream =
        Unimplemented<dragonfly_api::scheduler::v2::AnnouncePersistentCachePeerResponse>;
    async fn stat_peer(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatPeerRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::Peer>, Status> {
        Err(unimplemented("stat_peer"))
    }
    async fn delete_peer(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::DeletePeerRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_peer"))
    }
    async fn stat_task(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatTaskRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::Task>, Status> {
        Err(unimplemented("stat_task"))
    }
    async fn delete_task(
        &self,
        request: tonic::Request<dragonfly_api::scheduler::v2::DeleteTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        let request = request.into_inner();
        let mut state = self.state.lock().unwrap();
        if !state.hosts.contains_key(&request.host_id) {
            return Err(Status::not_found(format!(
                "host {} not found",
                request.host_id
            )));
        }
        // As the stock scheduler: the host's peers of the task leave.
        if let Some(task) = state.tasks.get_mut(&request.task_id) {
            for peer in task
                .peers
                .iter_mut()
                .filter(|p| p.host_id == request.host_id)
            {
                peer.state = PeerState::Left;
            }
        }
        Ok(tonic::Response::new(()))
    }
    async fn list_hosts(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::ListHostsRequest>,
    ) -> Result<tonic::Response<dragonfly_api::scheduler::v2::ListHostsResponse>, Status> {
        Err(unimplemented("list_hosts"))
    }
    async fn delete_host(
        &self,
        request: tonic::Request<dragonfly_api::scheduler::v2::DeleteHostRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        let host_id = request.into_inner().host_id;
        let mut state = self.state.lock().unwrap();
        if state.hosts.remove(&host_id).is_none() {
            return Err(Status::not_found(format!("host {host_id} not found")));
        }
        // The stock scheduler makes the host's peers leave: none is a parent any more.
        for task in state.tasks.values_mut() {
            for peer in task.peers.iter_mut().filter(|p| p.host_id == host_id) {
                peer.state = PeerState::Left;
            }
        }
        state.deleted_hosts.push(host_id);
        Ok(tonic::Response::new(()))
    }
    async fn announce_cache_peer(
        &self,
        _: tonic::Request<tonic::Streaming<dragonfly_api::scheduler::v2::AnnounceCachePeerRequest>>,
    ) -> Result<tonic::Response<Self::AnnounceCachePeerStream>, Status> {
        Err(unimplemented("announce_cache_peer"))
    }
    async fn stat_cache_peer(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatCachePeerRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::CachePeer>, Status> {
        Err(unimplemented("stat_cache_peer"))
    }
    async fn delete_cache_peer(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::DeleteCachePeerRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_cache_peer"))
    }
    async fn stat_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatCacheTaskRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::CacheTask>, Status> {
        Err(unimplemented("stat_cache_task"))
    }
    async fn delete_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::DeleteCacheTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_cache_task"))
    }
    async fn announce_persistent_peer(
        &self,
        _: tonic::Request<
            tonic::Streaming<dragonfly_api::scheduler::v2::AnnouncePersistentPeerRequest>,
        >,
    ) -> Result<tonic::Response<Self::AnnouncePersistentPeerStream>, Status> {
        Err(unimplemented("announce_persistent_peer"))
    }
    async fn stat_persistent_peer(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatPersistentPeerRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::PersistentPeer>, Status> {
        Err(unimplemented("stat_persistent_peer"))
    }
    async fn delete_persistent_peer(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::DeletePersistentPeerRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_persistent_peer"))
    }
    async fn upload_persistent_task_started(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::UploadPersistentTaskStartedRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("upload_persistent_task_started"))
    }
    async fn upload_persistent_task_finished(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::UploadPersistentTaskFinishedRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::PersistentTask>, Status> {
        Err(unimplemented("upload_persistent_task_finished"))
    }
    async fn upload_persistent_task_failed(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::UploadPersistentTaskFailedRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("upload_persistent_task_failed"))
    }
    async fn stat_persistent_task(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatPersistentTaskRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::PersistentTask>, Status> {
        Err(unimplemented("stat_persistent_task"))
    }
    async fn delete_persistent_task(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::DeletePersistentTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_persistent_task"))
    }
    async fn announce_persistent_cache_peer(
        &self,
        _: tonic::Request<
            tonic::Streaming<dragonfly_api::scheduler::v2::AnnouncePersistentCachePeerRequest>,
        >,
    ) -> Result<tonic::Response<Self::AnnouncePersistentCachePeerStream>, Status> {
        Err(unimplemented("announce_persistent_cache_peer"))
    }
    async fn stat_persistent_cache_peer(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatPersistentCachePeerRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::PersistentCachePeer>, Status> {
        Err(unimplemented("stat_persistent_cache_peer"))
    }
    async fn delete_persistent_cache_peer(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::DeletePersistentCachePeerRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_persistent_cache_peer"))
    }
    async fn upload_persistent_cache_task_started(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::UploadPersistentCacheTaskStartedRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("upload_persistent_cache_task_started"))
    }
    async fn upload_persistent_cache_task_finished(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::UploadPersistentCacheTaskFinishedRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::PersistentCacheTask>, Status> {
        Err(unimplemented("upload_persistent_cache_task_finished"))
    }
    async fn upload_persistent_cache_task_failed(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::UploadPersistentCacheTaskFailedRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("upload_persistent_cache_task_failed"))
    }
    async fn stat_persistent_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatPersistentCacheTaskRequest>,
    ) -> Result<tonic::Response<dragonfly_api::common::v2::PersistentCacheTask>, Status> {
        Err(unimplemented("stat_persistent_cache_task"))
    }
    async fn delete_persistent_cache_task(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::DeletePersistentCacheTaskRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("delete_persistent_cache_task"))
    }
    async fn preheat_image(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::PreheatImageRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("preheat_image"))
    }
    async fn stat_image(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatImageRequest>,
    ) -> Result<tonic::Response<dragonfly_api::scheduler::v2::StatImageResponse>, Status> {
        Err(unimplemented("stat_image"))
    }
    async fn preheat_file(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::PreheatFileRequest>,
    ) -> Result<tonic::Response<()>, Status> {
        Err(unimplemented("preheat_file"))
    }
    async fn stat_file(
        &self,
        _: tonic::Request<dragonfly_api::scheduler::v2::StatFileRequest>,
    ) -> Result<tonic::Response<dragonfly_api::scheduler::v2::StatFileResponse>, Status> {
        Err(unimplemented("stat_file"))
    }
}

/// A Ferry daemon as a Dragonfly peer of `scheduler`: AnnounceHost every second, idc
/// "idc-test", hostname `name` (so several peers share one machine), its upload and metrics
/// ports on loopback, quick origin retries, and `dragonfly` (more `[dragonfly]` TOML lines).
pub async fn ferry_peer(
    root: &std::path::Path,
    name: &str,
    scheduler: &str,
    dragonfly: &str,
) -> crate::Daemon {
    let config = root.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("[dragonfly]\nannounce_interval_secs = 1\nidc = \"idc-test\"\nhostname = \"{name}\"\n{dragonfly}\n[origin]\nconnections = 4\nretries = 2\nretry_base_ms = 50\nretry_max_ms = 200\n"),
    )
    .unwrap();
    crate::Daemon::start(
        root,
        name,
        crate::DaemonOptions {
            extra_args: vec![
                "--config".into(),
                config.display().to_string(),
                "--dragonfly-scheduler".into(),
                scheduler.into(),
                "--dragonfly-upload".into(),
                "127.0.0.1:0".into(),
                "--metrics".into(),
                "127.0.0.1:0".into(),
            ],
            ..Default::default()
        },
    )
    .await
}
