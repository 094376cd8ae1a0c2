//! The `scheduler.v2.Scheduler` client: AnnounceHost every `announce_interval_secs`, the
//! AnnouncePeer conversation of a scheduled pull (register, candidate parents or back to
//! source, a report per piece, finished or failed), and the announcement that makes a task
//! this daemon holds a candidate parent (metadata only on scheduler v2.5.1+, the back-to-source
//! sequence on older v2 schedulers).

use super::held::{recall, remember, ANNOUNCED_FILE};
use super::session::{piece, Conversation, Session};
use super::Peer;
use crate::geometry::{self, Geometry};
use dragonfly_api::common::v2::{Download, Priority, TaskType, TrafficType};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::{SyncHostRequest, SyncPiecesRequest};
use dragonfly_api::scheduler::v2::announce_peer_request::Request as PeerRequest;
use dragonfly_api::scheduler::v2::announce_peer_response::Response as PeerResponse;
use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
use dragonfly_api::scheduler::v2::{
    AnnounceHostRequest, AnnouncePeerResponse, DeleteHostRequest, DeleteTaskRequest,
    DownloadPeerBackToSourceFinishedRequest, DownloadPeerBackToSourceStartedRequest,
    DownloadPeerFinishedRequest, DownloadPeerStartedRequest,
    DownloadPieceBackToSourceFinishedRequest, RegisterPeerRequest, ReschedulePeerRequest,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// One scheduler call's limit (AnnounceHost, a registration's first answer).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a candidate parent may take to answer SyncPieces' first piece.
const PARENT_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a candidate parent may take to answer SyncHost.
const PARENT_HOST_TIMEOUT: Duration = Duration::from_secs(3);
/// Reschedules asked for before this daemon goes back to source on its own.
pub const MAX_RESCHEDULES: u32 = 3;
/// How long the last reports may take to reach the scheduler once a pull ended.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long DeleteHost (the daemon stops) or DeleteTask may take per scheduler.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

fn channel(addr: &str) -> Result<Channel, Status> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::invalid_argument(format!("scheduler {addr:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy())
}

pub(super) fn duration(d: Duration) -> prost_wkt_types::Duration {
    prost_wkt_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub(super) fn now() -> prost_wkt_types::Timestamp {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    prost_wkt_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

static PEER_SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A fresh peer id: `<host id>-<16 hex>`, like dfdaemon's `<ip>-<hostname>-<uuid>`.
fn new_peer_id(host_id: &str) -> String {
    use sha2::Digest as _;
    let seed = format!(
        "{host_id}/{}/{:?}/{}",
        std::process::id(),
        std::time::SystemTime::now(),
        PEER_SEQUENCE.fetch_add(1, Ordering::Relaxed)
    );
    let digest = sha2::Sha256::digest(seed.as_bytes());
    format!("{host_id}-{}", hex::encode(&digest[..8]))
}

/// The Dragonfly side of a pull with a URL.
#[derive(Debug, Clone, Default)]
pub struct PullSpec {
    pub task_id: String,
    pub url: String,
    pub tag: Option<String>,
    pub application: Option<String>,
    /// The user's piece length (part of the task id), if set.
    pub piece_length: Option<u64>,
    /// `Name: value` origin headers.
    pub headers: Vec<String>,
    pub digest: Option<String>,
}

impl PullSpec {
    fn download(&self) -> Download {
        let request_header = self
            .headers
            .iter()
            .filter_map(|h| h.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Download {
            url: self.url.clone(),
            digest: self.digest.clone(),
            r#type: TaskType::Standard as i32,
            tag: self.tag.clone(),
            application: self.application.clone(),
            priority: Priority::Level0 as i32,
            request_header,
            piece_length: self.piece_length,
            ..Default::default()
        }
    }
}

/// A candidate parent that answered SyncPieces.
#[derive(Debug, Clone)]
pub struct Parent {
    pub peer_id: String,
    pub host_id: String,
    /// Its Vortex address, from SyncPieces' `ip`/`tcp_port`.
    pub vortex: String,
    /// Dragonfly's second-phase weight from SyncHost: max(max_tx - tx, max_tx / 10).
    pub weight: u64,
}

/// What the scheduler decided for a pull.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Fetch from these parents (heaviest first), with the geometry they agree on.
    Parents {
        parents: Vec<Parent>,
        geometry: Geometry,
    },
    /// Download from the origin (the scheduler said so, or no parent was usable).
    BackToSource { reason: String },
}

/// This daemon's scheduler client.
pub struct Scheduler {
    peer: Arc<Peer>,
    schedulers: Vec<(String, Channel)>,
}

impl Scheduler {
    pub fn new(peer: Arc<Peer>) -> Result<Arc<Scheduler>, Status> {
        let schedulers = peer
            .config
            .scheduler
            .iter()
            .map(|addr| Ok((addr.clone(), channel(addr)?)))
            .collect::<Result<_, Status>>()?;
        Ok(Arc::new(Scheduler { peer, schedulers }))
    }

    pub fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    /// The schedulers to try for a task: from one chosen by its id (so every peer of a task
    /// meets on the same scheduler while it is up), then the others.
    fn for_task(&self, task_id: &str) -> Vec<(String, Channel)> {
        let n = self.schedulers.len();
        let first = task_id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % n.max(1);
        (0..n)
            .map(|i| self.schedulers[(first + i) % n].clone())
            .collect()
    }

    /// AnnounceHost to every scheduler; how many took it.
    pub async fn announce_host(&self) -> usize {
        let interval = self.peer.config.announce_interval();
        let mut ok = 0;
        for (addr, channel) in &self.schedulers {
            let request = AnnounceHostRequest {
                host: Some(self.peer.host_message()),
                interval: Some(duration(interval)),
            };
            let mut client = SchedulerClient::new(channel.clone());
            let result = tokio::time::timeout(CALL_TIMEOUT, client.announce_host(request)).await;
            match result {
                Ok(Ok(_)) => {
                    ok += 1;
                    self.peer.metrics.dragonfly_announced("host", true);
                    tracing::debug!(scheduler = %addr, "host announced");
                }
                Ok(Err(status)) => {
                    self.peer.metrics.dragonfly_announced("host", false);
                    tracing::warn!(scheduler = %addr, code = ?status.code(), message = status.message(), "AnnounceHost failed");
                }
                Err(_) => {
                    self.peer.metrics.dragonfly_announced("host", false);
                    tracing::warn!(scheduler = %addr, "AnnounceHost timed out after {CALL_TIMEOUT:?}");
                }
            }
        }
        ok
    }

    /// Announces the host at once and then every interval, until `stop`.
    pub fn spawn_announcer(self: &Arc<Self>, stop: CancellationToken) {
        let scheduler = Arc::clone(self);
        tokio::spawn(async move {
            let interval = scheduler.peer.config.announce_interval();
            let mut held_announced = false;
            loop {
                let ok = scheduler.announce_host().await;
                if ok > 0 && !held_announced {
                    // The scheduler knows the host now: the tasks held from before a restart
                    // become candidate parents again.
                    held_announced = true;
                    let announcing = Arc::clone(&scheduler);
                    tokio::spawn(async move { announcing.announce_all_held().await });
                }
                // A host no scheduler took yet is retried sooner than a full interval.
                let wait = if ok == 0 {
                    interval.min(Duration::from_secs(5))
                } else {
                    interval
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        });
    }

    /// DeleteHost on every scheduler (the daemon is stopping), each bounded by 2 s: the
    /// schedulers stop handing this host out as a parent at once instead of after its
    /// announcements lapse.
    pub async fn leave(&self) {
        for (addr, channel) in &self.schedulers {
            let request = DeleteHostRequest {
                host_id: self.peer.host.id.clone(),
            };
            let mut client = SchedulerClient::new(channel.clone());
            goodbye(addr, "DeleteHost", "", client.delete_host(request)).await;
        }
    }

    /// DeleteTask for a task this daemon no longer holds, on every scheduler (bounded like
    /// [`Scheduler::leave`]): the scheduler makes this host's peers of the task leave, so no
    /// child is handed a parent that has nothing to give.
    pub async fn forget_task(&self, task_id: &str) {
        for (addr, channel) in self.for_task(task_id) {
            let request = DeleteTaskRequest {
                host_id: self.peer.host.id.clone(),
                task_id: task_id.to_owned(),
            };
            let mut client = SchedulerClient::new(channel);
            goodbye(&addr, "DeleteTask", task_id, client.delete_task(request)).await;
        }
    }

    /// Announces every complete task this daemon holds that was announced (or scheduled)
    /// before, from what [`remember`] kept in its directory.
    pub async fn announce_all_held(&self) {
        let mut announced = 0;
        for task in self.peer.store.list() {
            if !task.is_complete() {
                continue;
            }
            let Some(spec) = recall(task.dir()) else {
                continue;
            };
            if spec.task_id != task.id() {
                tracing::warn!(task_id = %task.id(), recorded = %spec.task_id, "{ANNOUNCED_FILE} names another task; not announced");
                continue;
            }
            match self.announce_held(&spec).await {
                Ok(()) => announced += 1,
                Err(status) => {
                    tracing::warn!(task_id = %task.id(), code = ?status.code(), message = status.message(), "re-announcing a held task failed")
                }
            }
        }
        if announced > 0 {
            tracing::info!(
                tasks = announced,
                "held tasks announced to the scheduler after start"
            );
        }
    }

    /// Opens an AnnouncePeer stream with `register` as its first message, on the first
    /// scheduler that answers it.
    async fn register(
        &self,
        task_id: &str,
        peer_id: &str,
        download: Download,
    ) -> Result<(Conversation, AnnouncePeerResponse), Status> {
        let mut last = Status::unavailable("no scheduler configured");
        for (addr, channel) in self.for_task(task_id) {
            let (tx, rx) = mpsc::channel(256);
            let conversation = Conversation {
                scheduler: addr.clone(),
                host_id: self.peer.host.id.clone(),
                task_id: task_id.to_owned(),
                peer_id: peer_id.to_owned(),
                tx,
                rx: None,
                stalled: Default::default(),
            };
            conversation
                .send(PeerRequest::RegisterPeerRequest(RegisterPeerRequest {
                    download: Some(download.clone()),
                }))
                .await;
            let mut client = SchedulerClient::new(channel);
            let opened = tokio::time::timeout(CALL_TIMEOUT, async {
                let mut responses = client
                    .announce_peer(ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                let first = responses
                    .message()
                    .await?
                    .ok_or_else(|| Status::unavailable("the scheduler closed the stream"))?;
                Ok::<_, Status>((responses, first))
            })
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "no answer within {CALL_TIMEOUT:?}"
                )))
            });
            match opened {
                Ok((responses, first)) => {
                    self.peer.metrics.dragonfly_announced("peer", true);
                    let mut conversation = conversation;
                    conversation.rx = Some(responses);
                    return Ok((conversation, first));
                }
                Err(status) => {
                    self.peer.metrics.dragonfly_announced("peer", false);
                    tracing::warn!(scheduler = %addr, task_id, code = ?status.code(), message = status.message(), "AnnouncePeer registration failed");
                    last = Status::new(
                        status.code(),
                        format!("scheduler {addr}: {}", status.message()),
                    );
                }
            }
        }
        Err(last)
    }

    /// Registers a pull and settles its plan: candidate parents that answered SyncPieces, or
    /// back to source. A scheduler that cannot be reached means back to source without a
    /// session (as dfdaemon does when its scheduler is down).
    pub async fn schedule(self: &Arc<Self>, spec: &PullSpec) -> (Plan, Option<Session>) {
        let peer_id = new_peer_id(&self.peer.host.id);
        let (conversation, first) = match self
            .register(&spec.task_id, &peer_id, spec.download())
            .await
        {
            Ok(opened) => opened,
            Err(status) => {
                self.peer.metrics.dragonfly_sent_back_to_source();
                let reason = format!(
                    "no scheduler took the registration ({}); back to source",
                    status.message()
                );
                tracing::warn!(task_id = %spec.task_id, "{reason}");
                return (Plan::BackToSource { reason }, None);
            }
        };
        let mut session = Session {
            conversation,
            parents: HashMap::new(),
            back_to_source: false,
            started: false,
            reschedules: 0,
            peer: Arc::clone(&self.peer),
        };
        let plan = self.settle(spec, &mut session, first).await;
        (plan, Some(session))
    }

    /// Mid-transfer, when every parent of the plan failed: ReschedulePeerRequest naming
    /// them, then the scheduler's new answer settled like the first one (new parents, or
    /// back to source; back to source at once once [`MAX_RESCHEDULES`] are spent).
    pub async fn reschedule(&self, spec: &PullSpec, session: &mut Session, why: &str) -> Plan {
        if session.reschedules >= MAX_RESCHEDULES {
            let reason = format!(
                "{MAX_RESCHEDULES} reschedules spent and the parents failed ({why}); back to source"
            );
            return self.begin(session, Plan::BackToSource { reason }).await;
        }
        let failed: Vec<dragonfly_api::common::v2::Peer> = session
            .parents
            .values()
            .map(|id| dragonfly_api::common::v2::Peer {
                id: id.clone(),
                ..Default::default()
            })
            .collect();
        tracing::info!(task_id = %spec.task_id, reason = %why, "every parent failed; rescheduling");
        self.ask_again(session, failed, why.to_owned()).await;
        let answer = match session.conversation.next(CALL_TIMEOUT).await {
            Ok(answer) => answer,
            Err(status) => {
                let reason = format!(
                    "the scheduler did not answer a reschedule ({}); back to source",
                    status.message()
                );
                return self.begin(session, Plan::BackToSource { reason }).await;
            }
        };
        self.settle(spec, session, answer).await
    }

    /// ReschedulePeerRequest naming the parents that failed, counted against the pull's
    /// [`MAX_RESCHEDULES`].
    async fn ask_again(
        &self,
        session: &mut Session,
        failed: Vec<dragonfly_api::common::v2::Peer>,
        why: String,
    ) {
        session.reschedules += 1;
        self.peer.metrics.dragonfly_rescheduled();
        session
            .conversation
            .send(PeerRequest::ReschedulePeerRequest(ReschedulePeerRequest {
                candidate_parents: failed,
                description: Some(why),
            }))
            .await;
    }

    /// Reports `plan` begun (and counts a back to source) and returns it.
    async fn begin(&self, session: &mut Session, plan: Plan) -> Plan {
        if matches!(plan, Plan::BackToSource { .. }) {
            self.peer.metrics.dragonfly_sent_back_to_source();
        }
        session.begin(&plan).await;
        plan
    }

    /// Follows the scheduler's answers to a plan: candidate parents are probed (SyncPieces,
    /// SyncHost) and, when none is usable, rescheduled (at most [`MAX_RESCHEDULES`] per
    /// pull); anything else is back to source. The plan is reported begun.
    async fn settle(
        &self,
        spec: &PullSpec,
        session: &mut Session,
        first: AnnouncePeerResponse,
    ) -> Plan {
        let mut answer = first;
        let plan = loop {
            match answer.response {
                Some(PeerResponse::NeedBackToSourceResponse(need)) => {
                    break Plan::BackToSource {
                        reason: format!(
                            "the scheduler sent this peer back to source{}",
                            need.description
                                .map(|d| format!(": {d}"))
                                .unwrap_or_default()
                        ),
                    };
                }
                Some(PeerResponse::EmptyTaskResponse(_)) => {
                    break Plan::BackToSource {
                        reason: "the scheduler says the task is empty".into(),
                    };
                }
                Some(PeerResponse::NormalTaskResponse(normal)) => {
                    let tried = normal.candidate_parents.clone();
                    match self.probe_parents(spec, &normal.candidate_parents).await {
                        Ok((parents, geometry)) => break Plan::Parents { parents, geometry },
                        Err(why) if session.reschedules < MAX_RESCHEDULES => {
                            tracing::info!(task_id = %spec.task_id, reason = %why, "rescheduling");
                            self.ask_again(session, tried, why).await;
                        }
                        Err(why) => {
                            break Plan::BackToSource {
                                reason: format!("{MAX_RESCHEDULES} reschedules gave no usable parent ({why}); back to source"),
                            };
                        }
                    }
                }
                Some(PeerResponse::MetadataOnlyResponse(_)) | None => {
                    break Plan::BackToSource {
                        reason: "the scheduler answered a download with no plan; back to source"
                            .into(),
                    };
                }
            }
            answer = match session.conversation.next(CALL_TIMEOUT).await {
                Ok(next) => next,
                Err(status) => {
                    break Plan::BackToSource {
                        reason: format!(
                            "the scheduler stopped answering ({}); back to source",
                            status.message()
                        ),
                    }
                }
            };
        };
        self.begin(session, plan).await
    }

    /// SyncPieces (and SyncHost) on every candidate at once; the ones that answered, heaviest
    /// first, and the geometry they agree on.
    async fn probe_parents(
        &self,
        spec: &PullSpec,
        candidates: &[dragonfly_api::common::v2::Peer],
    ) -> Result<(Vec<Parent>, Geometry), String> {
        if candidates.is_empty() {
            return Err("no candidate parents".into());
        }
        let mut probes = tokio::task::JoinSet::new();
        for candidate in candidates {
            let candidate = candidate.clone();
            let (host_id, task_id) = (self.peer.host.id.clone(), spec.task_id.clone());
            let piece_length = spec.piece_length;
            probes.spawn(async move { probe(&host_id, &task_id, piece_length, &candidate).await });
        }
        let mut parents = Vec::new();
        let mut errors = Vec::new();
        let mut agreed: Option<Geometry> = None;
        while let Some(joined) = probes.join_next().await {
            match joined {
                Ok(Ok((parent, geometry))) => {
                    if agreed.is_some_and(|g| g != geometry) {
                        errors.push(format!(
                            "parent {} disagrees on the geometry",
                            parent.peer_id
                        ));
                        continue;
                    }
                    agreed = Some(geometry);
                    parents.push(parent);
                }
                Ok(Err(why)) => errors.push(why),
                Err(err) => errors.push(format!("probe panicked: {err}")),
            }
        }
        for why in &errors {
            tracing::warn!(task_id = %spec.task_id, "candidate parent unusable: {why}");
        }
        match agreed {
            Some(geometry) if !parents.is_empty() => {
                parents.sort_by_key(|p| std::cmp::Reverse(p.weight));
                Ok((parents, geometry))
            }
            _ => Err(errors.join("; ")),
        }
    }

    /// Makes a task this daemon holds completely a candidate parent: RegisterPeerRequest with
    /// `metadata_only` and the actual lengths, answered by MetadataOnlyResponse (scheduler
    /// v2.5.1+), then started and finished. An older scheduler answers a download instead; it
    /// then gets the back-to-source sequence with every piece, which registers the same.
    pub async fn announce_held(&self, spec: &PullSpec) -> Result<(), Status> {
        let task = self
            .peer
            .store
            .get(&spec.task_id)
            .filter(|t| t.is_complete())
            .ok_or_else(|| {
                Status::failed_precondition(format!("task {} is not held completely", spec.task_id))
            })?;
        let geometry = task.geometry();
        let mut download = spec.download();
        download.metadata_only = true;
        download.actual_content_length = Some(geometry.content_length());
        download.actual_piece_length = Some(geometry.piece_length());
        download.actual_piece_count = Some(u64::from(geometry.piece_count()));
        let peer_id = new_peer_id(&self.peer.host.id);
        let (conversation, first) = self.register(&spec.task_id, &peer_id, download).await?;
        match first.response {
            Some(PeerResponse::MetadataOnlyResponse(_)) => {
                conversation
                    .send(PeerRequest::DownloadPeerStartedRequest(
                        DownloadPeerStartedRequest {},
                    ))
                    .await;
                conversation
                    .send(PeerRequest::DownloadPeerFinishedRequest(
                        DownloadPeerFinishedRequest {},
                    ))
                    .await;
            }
            _ => {
                conversation
                    .send(PeerRequest::DownloadPeerBackToSourceStartedRequest(
                        DownloadPeerBackToSourceStartedRequest {
                            description: Some("held by this Ferry host".into()),
                        },
                    ))
                    .await;
                for range in geometry.pieces() {
                    let digest = task
                        .held(range.number)
                        .map(geometry::format_digest)
                        .unwrap_or_default();
                    conversation
                        .send(PeerRequest::DownloadPieceBackToSourceFinishedRequest(
                            DownloadPieceBackToSourceFinishedRequest {
                                piece: Some(piece(
                                    range,
                                    digest,
                                    None,
                                    TrafficType::BackToSource,
                                    Duration::ZERO,
                                )),
                            },
                        ))
                        .await;
                }
                conversation
                    .send(PeerRequest::DownloadPeerBackToSourceFinishedRequest(
                        DownloadPeerBackToSourceFinishedRequest {},
                    ))
                    .await;
            }
        }
        conversation.close().await;
        let kept = spec.clone();
        let _ = tokio::task::spawn_blocking(move || remember(&task, &kept)).await;
        tracing::info!(task_id = %spec.task_id, peer_id, "task announced to the scheduler as a candidate parent");
        Ok(())
    }
}

/// Awaits a DeleteHost or DeleteTask call for at most [`LEAVE_TIMEOUT`] and logs how it
/// went; nothing waits on its outcome.
async fn goodbye(
    addr: &str,
    rpc: &str,
    task_id: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<()>, Status>>,
) {
    match tokio::time::timeout(LEAVE_TIMEOUT, call).await {
        Ok(Ok(_)) => tracing::info!(scheduler = %addr, task_id, "{rpc} done"),
        Ok(Err(status)) => {
            tracing::warn!(scheduler = %addr, task_id, code = ?status.code(), message = status.message(), "{rpc} failed")
        }
        Err(_) => {
            tracing::warn!(scheduler = %addr, task_id, "{rpc} timed out after {LEAVE_TIMEOUT:?}")
        }
    }
}

/// One candidate: its SyncPieces' first answer (the Vortex address, the piece length) and
/// its SyncHost figures (the weight).
async fn probe(
    host_id: &str,
    task_id: &str,
    user_piece_length: Option<u64>,
    candidate: &dragonfly_api::common::v2::Peer,
) -> Result<(Parent, Geometry), String> {
    let name = &candidate.id;
    let host = candidate
        .host
        .as_ref()
        .ok_or_else(|| format!("parent {name}: the scheduler gave no host"))?;
    let task = candidate
        .task
        .as_ref()
        .ok_or_else(|| format!("parent {name}: the scheduler gave no task"))?;
    if task.content_length == 0 || task.piece_count == 0 {
        return Err(format!("parent {name}: the scheduler gave an empty task"));
    }
    let upload = format!("{}:{}", host.ip, host.port);
    let endpoint = Endpoint::from_shared(format!("http://{upload}"))
        .map_err(|e| format!("parent {name} at {upload}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = tokio::time::timeout(PARENT_SYNC_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| {
            format!("parent {name} at {upload}: no connection within {PARENT_SYNC_TIMEOUT:?}")
        })?
        .map_err(|e| format!("parent {name} at {upload}: {e}"))?;
    let mut client = DfdaemonUploadClient::new(channel);
    let first = tokio::time::timeout(PARENT_SYNC_TIMEOUT, async {
        let mut stream = client
            .sync_pieces(SyncPiecesRequest {
                host_id: host_id.to_owned(),
                task_id: task_id.to_owned(),
                interested_piece_numbers: (0..task.piece_count).collect(),
            })
            .await?
            .into_inner();
        stream
            .message()
            .await?
            .ok_or_else(|| Status::not_found("SyncPieces ended without a piece"))
    })
    .await
    .map_err(|_| {
        format!(
            "parent {name} at {upload}: no piece from SyncPieces within {PARENT_SYNC_TIMEOUT:?}"
        )
    })?
    .map_err(|s| {
        format!(
            "parent {name} at {upload}: SyncPieces: {:?}: {}",
            s.code(),
            s.message()
        )
    })?;
    let port = first
        .tcp_port
        .ok_or_else(|| format!("parent {name}: SyncPieces gave no tcp_port (QUIC only?)"))?;
    let vortex = if first.ip.contains(':') {
        format!("[{}]:{port}", first.ip)
    } else {
        format!("{}:{port}", first.ip)
    };
    let piece_length = if first.number + 1 < task.piece_count {
        first.length
    } else if first.number > 0 {
        first.offset / u64::from(first.number)
    } else {
        user_piece_length.unwrap_or_else(|| geometry::default_piece_length(task.content_length))
    };
    let geometry = Geometry::new(task.content_length, piece_length)
        .map_err(|e| format!("parent {name}: {e}"))?;
    if geometry.piece_count() != task.piece_count {
        return Err(format!(
            "parent {name}: {} bytes in pieces of {piece_length} is {} pieces, not the {} the scheduler states",
            task.content_length,
            geometry.piece_count(),
            task.piece_count
        ));
    }
    let weight = tokio::time::timeout(PARENT_HOST_TIMEOUT, async {
        let mut stream = client
            .sync_host(SyncHostRequest {
                host_id: host_id.to_owned(),
                peer_id: name.clone(),
            })
            .await
            .ok()?
            .into_inner();
        let host = stream.message().await.ok()??;
        let network = host.network?;
        Some(weight(
            network.max_tx_bandwidth,
            network.tx_bandwidth.unwrap_or(0),
        ))
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(1);
    Ok((
        Parent {
            peer_id: name.clone(),
            host_id: host.id.clone(),
            vortex,
            weight,
        },
        geometry,
    ))
}

/// Dragonfly's parent weight: the spare upload bandwidth, at least a tenth of the maximum.
pub fn weight(max_tx: u64, tx: u64) -> u64 {
    max_tx.saturating_sub(tx).max(max_tx / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_dragonfly() {
        assert_eq!(weight(1000, 100), 900);
        assert_eq!(weight(1000, 950), 100);
        assert_eq!(weight(1000, 5000), 100);
        assert_eq!(weight(0, 0), 0);
    }

    #[test]
    fn peer_ids_are_unique_and_name_the_host() {
        let a = new_peer_id("127.0.0.1-h");
        let b = new_peer_id("127.0.0.1-h");
        assert_ne!(a, b);
        assert!(a.starts_with("127.0.0.1-h-"));
    }
}
