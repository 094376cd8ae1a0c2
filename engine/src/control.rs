//! The gRPC control API (`ferry.v1.Ferry`): validation and status codes here, the work in
//! the engine.

use crate::config::ControlTcpConfig;
use crate::daemon::{Admission, Drain};
use crate::dragonfly::pull;
use crate::dragonfly::scheduler::{Plan, PullSpec, Scheduler};
use crate::dragonfly::session::Session;
use crate::geometry::{self, format_digest, GeometryError};
use crate::import::{self, ImportError, ImportOptions};
use crate::manifest::{ContentDigest, ManifestState};
use crate::origin::{OriginError, OriginRequest};
use crate::proto::{self, ferry_server::Ferry, transfer_event::Event};
use crate::store::{StoreError, StoredTask};
use crate::transfer::{
    panic_message, Engine, FailedAttempt, OutputError, PieceOutcome, PreparedTransfer,
    TransferError, TransferRequest, TransferSummary, TransportChoice,
};
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// Host facts reported by `GetCapabilities`.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub host_id: String,
    pub hostname: String,
    pub data_address: String,
}

pub struct ControlService {
    pub engine: Arc<Engine>,
    pub host: HostInfo,
    pub rdma: Arc<crate::rdma::RdmaHost>,
    /// Canonical directories `ImportTask` may read from; empty refuses every import.
    pub import_dirs: Vec<PathBuf>,
    /// Admits transfers and imports until the daemon drains.
    pub drain: Arc<Drain>,
    /// The Dragonfly scheduler client, with `[dragonfly] scheduler` set.
    pub dragonfly: Option<Arc<Scheduler>>,
}

/// New work is refused while the daemon drains: UNAVAILABLE, which callers retry elsewhere.
fn admit(drain: &Arc<Drain>, what: &str) -> Result<Admission, Status> {
    drain.admit().ok_or_else(|| {
        Status::unavailable(format!(
            "the daemon is draining (shutting down) and accepts no new {what}; retry on another daemon or after it restarts"
        ))
    })
}

/// A transfer the drain ended (it stopped taking pieces, or was cancelled at the drain
/// timeout) is UNAVAILABLE: the caller should repeat it once the daemon is back.
fn transfer_status(drain: &Drain, err: TransferError) -> Status {
    match err {
        TransferError::Cancelled(task_id) if drain.was_forced() => Status::unavailable(format!(
            "the daemon is shutting down: its drain ended (the {}s drain timeout passed, or a second signal came) and cancelled the transfer into task {task_id}; the pieces held stay held, so repeat it after the restart",
            drain.timeout().as_secs()
        )),
        err @ TransferError::Draining(_) => Status::unavailable(err.to_string()),
        err => Status::from(err),
    }
}

impl From<TransferError> for Status {
    fn from(err: TransferError) -> Status {
        let message = err.to_string();
        match err {
            TransferError::InvalidArgument(_) => Status::invalid_argument(message),
            TransferError::PermissionDenied(_) => Status::permission_denied(message),
            TransferError::FailedPrecondition(_) => Status::failed_precondition(message),
            TransferError::Geometry(err) => geometry_status(err),
            TransferError::Store(err) => store_status(err),
            TransferError::AlreadyRunning(_) => Status::already_exists(message),
            TransferError::SourcesExhausted(_) => Status::unavailable(message),
            TransferError::Cancelled(_) => Status::cancelled(message),
            TransferError::Draining(_) => Status::unavailable(message),
            TransferError::ResourceExhausted(_) => Status::resource_exhausted(message),
            TransferError::ContentConflict(_) => Status::failed_precondition(message),
            TransferError::ContentMismatch { .. } => Status::data_loss(message),
            TransferError::Manifest { .. } | TransferError::Internal { .. } => {
                Status::internal(message)
            }
            TransferError::Output(OutputError::NoSpace { .. }) => {
                Status::resource_exhausted(message)
            }
            TransferError::Output(_) => Status::internal(message),
            TransferError::Origin(err) => origin_status(&err, message),
        }
    }
}

/// What the origin's failure means to the caller: its 404 is NOT_FOUND, its 401/403
/// PERMISSION_DENIED, other 4xx and no Range support FAILED_PRECONDITION, a content that
/// changed mid-download ABORTED, a body or range that lies DATA_LOSS, and whatever retries
/// could not cure (connect errors, 5xx, stalls) UNAVAILABLE.
fn origin_status(err: &OriginError, message: String) -> Status {
    match err {
        OriginError::InvalidUrl(_) | OriginError::InvalidHeader(_) => {
            Status::invalid_argument(message)
        }
        OriginError::Status { code, .. } => match code {
            404 | 410 => Status::not_found(message),
            401 | 403 => Status::permission_denied(message),
            c if *c >= 500 || *c == 408 || *c == 429 => Status::unavailable(message),
            _ => Status::failed_precondition(message),
        },
        OriginError::TooManyRedirects { .. } | OriginError::NoRangeSupport { .. } => {
            Status::failed_precondition(message)
        }
        OriginError::Changed { .. } => Status::aborted(message),
        OriginError::ShortBody { .. }
        | OriginError::LongBody { .. }
        | OriginError::WrongRange { .. }
        | OriginError::NoLength { .. } => Status::data_loss(message),
        _ => Status::unavailable(message),
    }
}

fn geometry_status(err: GeometryError) -> Status {
    match err {
        GeometryError::PieceOutOfRange { .. } => Status::out_of_range(err.to_string()),
        _ => Status::invalid_argument(err.to_string()),
    }
}

fn store_status(err: StoreError) -> Status {
    let message = err.to_string();
    match err {
        StoreError::NoSpace { .. } => Status::resource_exhausted(message),
        StoreError::NotFound(_) => Status::not_found(message),
        StoreError::GeometryConflict { .. } => Status::failed_precondition(message),
        StoreError::Geometry(err) => geometry_status(err),
        StoreError::Deleted(_) => Status::aborted(message),
        StoreError::Busy { .. } => Status::failed_precondition(message),
        StoreError::TaskFailed { .. } => Status::aborted(message),
        StoreError::Timeout { .. } => Status::deadline_exceeded(message),
        StoreError::SyncFailed { .. } => Status::data_loss(message),
        _ => Status::internal(message),
    }
}

fn import_status(err: ImportError) -> Status {
    let message = err.to_string();
    match err {
        ImportError::RelativePath(_) | ImportError::NotAFile(_) | ImportError::ParentDir(_) => {
            Status::invalid_argument(message)
        }
        ImportError::ImportsDisabled(_) | ImportError::OutsideImportDirs { .. } => {
            Status::permission_denied(message)
        }
        ImportError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Status::not_found(message)
        }
        ImportError::Open { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            Status::permission_denied(message)
        }
        ImportError::Geometry(err) => geometry_status(err),
        ImportError::Store(err) => store_status(err),
        ImportError::Changed { .. } | ImportError::ContentConflict { .. } => {
            Status::failed_precondition(message)
        }
        _ => Status::internal(message),
    }
}

fn known_task(engine: &Engine, task_id: &str) -> Result<Arc<StoredTask>, Status> {
    geometry::validate_task_id(task_id).map_err(geometry_status)?;
    engine
        .store
        .get(task_id)
        .ok_or_else(|| Status::not_found(format!("task {task_id} is not in this daemon's store")))
}

/// The proto view of a task; `with_pieces` adds per-piece detail.
pub fn task_message(task: &StoredTask, with_pieces: bool) -> proto::Task {
    let geometry = task.geometry();
    let digests = task.held_digests();
    let pieces = if with_pieces {
        geometry
            .pieces()
            .map(|p| {
                let digest = digests[p.number as usize];
                proto::Piece {
                    number: p.number,
                    offset: p.offset,
                    length: p.length,
                    digest: digest.map(format_digest).unwrap_or_default(),
                    held: digest.is_some(),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let held = digests.iter().filter(|d| d.is_some()).count() as u32;
    let manifest = task.manifest().unwrap_or_else(|err| {
        tracing::warn!(task_id = %task.id(), error = %err, "unreadable manifest");
        None
    });
    proto::Task {
        task_id: task.id().to_owned(),
        content_length: geometry.content_length(),
        piece_length: geometry.piece_length(),
        piece_count: geometry.piece_count(),
        pieces_held: held,
        complete: held == geometry.piece_count(),
        pieces,
        pieces_served: task.pieces_served(),
        transferring: task.writer().is_some(),
        content_digest: manifest
            .map(|m| m.content_sha256.to_string())
            .unwrap_or_default(),
        content_digest_state: match manifest.map(|m| m.state) {
            Some(ManifestState::Verified) => "verified".into(),
            Some(ManifestState::Pinned) => "pinned".into(),
            None => String::new(),
        },
        import_method: String::new(),
    }
}

fn piece_message(outcome: PieceOutcome) -> proto::PieceResult {
    proto::PieceResult {
        number: outcome.piece.number,
        offset: outcome.piece.offset,
        length: outcome.piece.length,
        digest: outcome.digest,
        source: outcome.source,
        transport: outcome.transport.to_owned(),
        bytes: outcome.piece.length,
        fetch_micros: outcome.fetch_time.as_micros() as u64,
        write_micros: outcome.write_time.as_micros() as u64,
        attempt: outcome.attempt,
        rail: crate::transport::rail_label(&outcome.rails).unwrap_or_default(),
        rails: (outcome.rails.into_iter())
            .map(|share| proto::RailStats {
                rail: share.rail,
                bytes: share.bytes,
                pieces: 1,
            })
            .collect(),
    }
}

pub(crate) fn summary_message(summary: TransferSummary) -> proto::TransferSummary {
    proto::TransferSummary {
        task_id: summary.task_id,
        content_length: summary.geometry.content_length(),
        piece_length: summary.geometry.piece_length(),
        pieces_requested: summary.pieces_requested,
        pieces_fetched: summary.pieces_fetched,
        pieces_reused: summary.pieces_reused,
        retries: summary.retries,
        bytes_fetched: summary.bytes_fetched,
        elapsed_micros: summary.elapsed.as_micros() as u64,
        sources: summary
            .sources
            .into_iter()
            .map(|(source, t)| proto::SourceStats {
                source,
                bytes: t.bytes,
                pieces: t.pieces,
                failures: t.failures,
            })
            .collect(),
        transports: summary
            .transports
            .into_iter()
            .map(|(transport, bytes, pieces)| proto::TransportStats {
                transport,
                bytes,
                pieces,
            })
            .collect(),
        rails: summary
            .rails
            .into_iter()
            .map(|(rail, bytes, pieces)| proto::RailStats {
                rail,
                bytes,
                pieces,
            })
            .collect(),
        output_path: summary
            .output
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        content_digest: summary
            .content_digest
            .map(|d| d.to_string())
            .unwrap_or_default(),
        refused_sources: summary.refused_sources,
        rdma_fallbacks: summary.rdma_fallbacks,
        back_to_source_bytes: summary.back_to_source_bytes,
        origin_retries: summary.origin_retries,
        placement: summary
            .placement
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
    }
}

/// Announces a complete task to the Dragonfly scheduler as a candidate parent, in the
/// background (a slow scheduler must not hold the caller up).
fn announce_held(scheduler: &Arc<Scheduler>, spec: PullSpec) {
    let scheduler = Arc::clone(scheduler);
    tokio::spawn(async move {
        if let Err(status) = scheduler.announce_held(&spec).await {
            tracing::warn!(task_id = %spec.task_id, code = ?status.code(), message = status.message(), "announcing the task to the Dragonfly scheduler failed");
        }
    });
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::TransferEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Ferry for ControlService {
    async fn get_capabilities(
        &self,
        _: Request<proto::GetCapabilitiesRequest>,
    ) -> Result<Response<proto::Capabilities>, Status> {
        let store = &self.engine.store;
        let pool = store.pool().info();
        let tcp = proto::TransportInfo {
            name: "tcp".into(),
            available: true,
            detail: "Dragonfly Vortex protocol over TCP (sendfile on the serving side)".into(),
            properties: [
                ("protocol".to_owned(), "vortex".to_owned()),
                (
                    "streams_per_source".to_owned(),
                    self.engine.settings.streams_per_source.to_string(),
                ),
            ]
            .into_iter()
            .collect(),
        };
        let rdma = self.rdma.transport_info();
        let mut transports = vec![tcp, rdma];
        if let Some(scheduler) = &self.dragonfly {
            transports.push(proto::TransportInfo {
                name: "dragonfly".into(),
                available: true,
                detail: "Dragonfly peer: AnnounceHost to the schedulers, DfdaemonUpload (SyncPieces, SyncHost) served".into(),
                properties: scheduler.peer().info().into_iter().collect(),
            });
        }
        Ok(Response::new(proto::Capabilities {
            host_id: self.host.host_id.clone(),
            hostname: self.host.hostname.clone(),
            data_address: self.host.data_address.clone(),
            transports,
            store: Some(proto::StoreInfo {
                data_dir: store.data_dir().display().to_string(),
                io_backend: store.io_backend().into(),
                direct_io: store.direct_io(),
                pool_bytes: store.pool().total_bytes() as u64,
                pool_slot_bytes: pool.slot_size as u64,
                huge_pages: pool.huge_pages,
                output_dirs: self
                    .engine
                    .output_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect(),
            }),
            version: env!("CARGO_PKG_VERSION").into(),
            rdma_devices: self.rdma.devices_message(),
            rdma_rails: self.rdma.rails_message(),
        }))
    }

    async fn import_task(
        &self,
        request: Request<proto::ImportTaskRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        let _admission = admit(&self.drain, "imports")?;
        let request = request.into_inner();
        if request.path.is_empty() {
            return Err(Status::invalid_argument("path is empty"));
        }
        let options = ImportOptions {
            url: non_empty(request.url),
            tag: non_empty(request.tag),
            application: non_empty(request.application),
            revision: non_empty(request.revision),
            piece_length: request.piece_length,
        };
        let imported = import::import_file_within(
            &self.engine.store,
            &PathBuf::from(&request.path),
            &self.import_dirs,
            &options,
        )
        .await
        .map_err(import_status)?;
        if let (Some(scheduler), Some(url)) = (&self.dragonfly, &options.url) {
            announce_held(
                scheduler,
                PullSpec {
                    task_id: imported.task.id().to_owned(),
                    url: url.clone(),
                    tag: options.tag.clone(),
                    application: options.application.clone(),
                    ..Default::default()
                },
            );
        }
        Ok(Response::new(proto::Task {
            import_method: imported.method.as_str().into(),
            ..task_message(&imported.task, true)
        }))
    }

    type TransferPiecesStream = EventStream;

    async fn transfer_pieces(
        &self,
        request: Request<proto::TransferPiecesRequest>,
    ) -> Result<Response<Self::TransferPiecesStream>, Status> {
        let admission = admit(&self.drain, "transfers")?;
        let mut request = request.into_inner();
        let transport = match proto::TransportPreference::try_from(request.transport) {
            Ok(proto::TransportPreference::Auto) => TransportChoice::Auto,
            Ok(proto::TransportPreference::Tcp) => TransportChoice::Tcp,
            Ok(proto::TransportPreference::Rdma) => TransportChoice::Rdma,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown transport preference {}",
                    request.transport
                )))
            }
        };
        // A URL with a Dragonfly scheduler: with no peers named, the scheduler places this
        // pull (candidate parents, or back to source); with peers named, the task is announced
        // as a candidate parent once complete.
        let mut scheduled: Option<(Arc<Scheduler>, PullSpec, Session)> = None;
        let mut plan: Option<Plan> = None;
        let mut announce_after = None;
        if let (Some(scheduler), false) = (&self.dragonfly, request.url.is_empty()) {
            let user_piece = (request.piece_length != 0).then_some(request.piece_length);
            let tag = non_empty(request.tag.clone());
            let application = non_empty(request.application.clone());
            let task_id = if request.task_id.is_empty() {
                crate::origin::task_id(
                    &request.url,
                    tag.as_deref(),
                    application.as_deref(),
                    user_piece,
                )
                .map_err(|e| Status::invalid_argument(e.to_string()))?
            } else {
                request.task_id.clone()
            };
            let spec = PullSpec {
                task_id: task_id.clone(),
                url: request.url.clone(),
                tag,
                application,
                piece_length: user_piece,
                headers: request.headers.clone(),
                digest: non_empty(request.digest.clone()),
            };
            if request.sources.is_empty() {
                let (settled, opened) = scheduler.schedule(&spec).await;
                match &settled {
                    Plan::Parents { parents, .. } => {
                        tracing::info!(task_id, parents = ?parents.iter().map(|p| (&p.peer_id, &p.vortex, p.weight)).collect::<Vec<_>>(), "scheduled: fetching from candidate parents");
                    }
                    Plan::BackToSource { reason } => {
                        tracing::info!(task_id, reason, "scheduled: back to source");
                    }
                }
                request.task_id = task_id;
                plan = Some(settled);
                if let Some(session) = opened {
                    scheduled = Some((Arc::clone(scheduler), spec, session));
                }
            } else {
                announce_after = Some((Arc::clone(scheduler), spec));
            }
        }
        let template = TransferRequest {
            task_id: request.task_id,
            content_length: request.content_length,
            piece_length: request.piece_length,
            pieces: request.pieces,
            sources: request.sources,
            output: non_empty(request.output_path).map(PathBuf::from),
            streams_per_source: request.streams_per_source,
            transport,
            origin: non_empty(request.url).map(|url| OriginRequest {
                url,
                headers: request.headers,
                tag: non_empty(request.tag),
                application: non_empty(request.application),
            }),
            origin_connections: request.origin_connections,
            digest: non_empty(request.digest)
                .map(|d| d.parse::<ContentDigest>())
                .transpose()
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            source_weights: Vec::new(),
        };
        let first = match &plan {
            Some(plan) => pull::request_for(&template, plan),
            None => template.clone(),
        };
        let prepared = match self.engine.prepare(first).await {
            Ok(prepared) => prepared,
            Err(err) => {
                if let Some((_, _, session)) = scheduled {
                    session.finish(Err(err.to_string())).await;
                }
                return Err(err.into());
            }
        };
        let started = prepared.started();
        let (stream_tx, stream_rx) = mpsc::channel(64);
        let engine = Arc::clone(&self.engine);
        let drain = Arc::clone(&self.drain);
        let started_event = proto::TransferEvent {
            event: Some(Event::Started(proto::TransferStarted {
                task_id: started.task_id,
                content_length: started.geometry.content_length(),
                piece_length: started.geometry.piece_length(),
                pieces_requested: started.pieces_requested,
                pieces_reused: started.pieces_reused,
                sources: started.sources,
                bytes_to_fetch: started.bytes_to_fetch,
                content_digest: started
                    .content_digest
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
                refused_sources: started.refused_sources,
            })),
        };
        let _ = stream_tx.send(Ok(started_event)).await;
        let from_parents = matches!(plan, Some(Plan::Parents { .. }));
        tokio::spawn(async move {
            let result = drive(
                &engine,
                prepared,
                scheduled,
                from_parents,
                template,
                &stream_tx,
            )
            .await;
            if let (Ok(_), Some((scheduler, spec))) = (&result, announce_after) {
                announce_held(&scheduler, spec);
            }
            let last = match result {
                Ok(summary) => Ok(proto::TransferEvent {
                    event: Some(Event::Summary(summary_message(summary))),
                }),
                Err(err) => {
                    tracing::warn!(error = %err, "transfer failed");
                    Err(transfer_status(&drain, err))
                }
            };
            let _ = stream_tx.send(last).await;
            // The transfer is over for the drain once its caller has the last word (or left).
            drop(admission);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(stream_rx))))
    }

    type PullModelStream = crate::model::service::ModelEventStream;

    async fn pull_model(
        &self,
        request: Request<proto::PullModelRequest>,
    ) -> Result<Response<Self::PullModelStream>, Status> {
        let admission = admit(&self.drain, "model pulls")?;
        let stream = crate::model::service::pull_model(
            Arc::clone(&self.engine),
            admission,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn stat_model(
        &self,
        request: Request<proto::StatModelRequest>,
    ) -> Result<Response<proto::Model>, Status> {
        crate::model::service::stat_model(&self.engine, request.into_inner()).map(Response::new)
    }

    async fn list_models(
        &self,
        _: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        crate::model::service::list_models(&self.engine).map(Response::new)
    }

    async fn export_task(
        &self,
        request: Request<proto::ExportTaskRequest>,
    ) -> Result<Response<proto::ExportTaskResponse>, Status> {
        let _admission = admit(&self.drain, "exports")?;
        let request = request.into_inner();
        if request.output_path.is_empty() {
            return Err(Status::invalid_argument("output_path is empty"));
        }
        let (placed_at, placement) = self
            .engine
            .export(&request.task_id, Path::new(&request.output_path))
            .await
            .inspect_err(|err| tracing::warn!(error = %err, "export failed"))?;
        let content_length = self
            .engine
            .store
            .get(&request.task_id)
            .map_or(0, |t| t.geometry().content_length());
        Ok(Response::new(proto::ExportTaskResponse {
            task_id: request.task_id,
            output_path: placed_at.display().to_string(),
            content_length,
            placement: placement.as_str().to_owned(),
        }))
    }

    async fn stat_task(
        &self,
        request: Request<proto::StatTaskRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        let task = known_task(&self.engine, &request.into_inner().task_id)?;
        Ok(Response::new(task_message(&task, true)))
    }

    async fn list_tasks(
        &self,
        _: Request<proto::ListTasksRequest>,
    ) -> Result<Response<proto::ListTasksResponse>, Status> {
        let tasks = self
            .engine
            .store
            .list()
            .iter()
            .map(|t| task_message(t, false))
            .collect();
        Ok(Response::new(proto::ListTasksResponse { tasks }))
    }

    async fn cancel_transfer(
        &self,
        request: Request<proto::CancelTransferRequest>,
    ) -> Result<Response<proto::CancelTransferResponse>, Status> {
        let task_id = request.into_inner().task_id;
        geometry::validate_task_id(&task_id).map_err(geometry_status)?;
        if self.engine.cancel(&task_id) {
            Ok(Response::new(proto::CancelTransferResponse {
                cancelled: true,
            }))
        } else {
            Err(Status::not_found(format!(
                "no transfer into task {task_id} is running"
            )))
        }
    }

    async fn delete_task(
        &self,
        request: Request<proto::DeleteTaskRequest>,
    ) -> Result<Response<proto::DeleteTaskResponse>, Status> {
        let task = known_task(&self.engine, &request.into_inner().task_id)?;
        if let Some(writer) = task.writer() {
            return Err(Status::failed_precondition(format!(
                "task {} has {writer} running; cancel it first",
                task.id()
            )));
        }
        self.engine.store.delete(task.id()).map_err(store_status)?;
        if let Some(scheduler) = &self.dragonfly {
            let (scheduler, task_id) = (Arc::clone(scheduler), task.id().to_owned());
            tokio::spawn(async move { scheduler.forget_task(&task_id).await });
        }
        Ok(Response::new(proto::DeleteTaskResponse {}))
    }
}

/// Runs a transfer, forwarding its pieces to the caller (and, in a scheduled pull, every
/// piece and failed attempt to the scheduler). In a scheduled pull from parents, a transfer
/// whose parents all failed is rescheduled: the scheduler names new parents (or sends the
/// peer back to source) and a next transfer takes the pieces still missing, until the pull
/// completes, fails otherwise or the reschedules are spent. The scheduler hears how the
/// pull ended.
async fn drive(
    engine: &Arc<Engine>,
    mut prepared: PreparedTransfer,
    mut scheduled: Option<(Arc<Scheduler>, PullSpec, Session)>,
    mut from_parents: bool,
    template: TransferRequest,
    stream_tx: &mpsc::Sender<Result<proto::TransferEvent, Status>>,
) -> Result<TransferSummary, TransferError> {
    let mut earlier = pull::Tally::default();
    let result = loop {
        let (events_tx, mut events_rx) = mpsc::channel::<PieceOutcome>(64);
        let (attempts_tx, mut attempts_rx) = mpsc::channel::<FailedAttempt>(1024);
        let session = scheduled.take();
        if session.is_some() {
            prepared.report_attempts(attempts_tx);
        } else {
            drop(attempts_tx);
        }
        let forward = stream_tx.clone();
        let forwarder = tokio::spawn(async move {
            let mut tally = pull::Tally::new();
            let mut attempts_open = true;
            async fn failed(
                tally: &mut pull::Tally,
                session: &Option<(Arc<Scheduler>, PullSpec, Session)>,
                attempt: FailedAttempt,
            ) {
                tally.failed(&attempt);
                if let Some((_, _, session)) = session {
                    session.piece_failed(&attempt).await;
                }
            }
            loop {
                tokio::select! {
                    outcome = events_rx.recv() => {
                        let Some(outcome) = outcome else { break };
                        tally.piece(&outcome);
                        if let Some((_, _, session)) = &session {
                            session.piece(&outcome).await;
                        }
                        let event = proto::TransferEvent {
                            event: Some(Event::Piece(piece_message(outcome))),
                        };
                        if forward.send(Ok(event)).await.is_err() {
                            // The caller hung up: dropping the receiver stops the workers.
                            return (session, tally, true);
                        }
                    }
                    attempt = attempts_rx.recv(), if attempts_open => match attempt {
                        Some(attempt) => failed(&mut tally, &session, attempt).await,
                        None => attempts_open = false,
                    },
                }
            }
            // Reports of the last attempts, sent before the transfer ended.
            while let Ok(attempt) = attempts_rx.try_recv() {
                failed(&mut tally, &session, attempt).await;
            }
            (session, tally, false)
        });
        let task_id = prepared.started().task_id;
        // The transfer runs in a task of its own: should it panic, the caller still gets a
        // last word (INTERNAL, naming it) instead of a stream that just ends.
        let running = Arc::clone(engine);
        let result = tokio::spawn(async move { running.run(prepared, events_tx).await })
            .await
            .unwrap_or_else(|err| {
                Err(TransferError::Internal {
                    task_id,
                    what: format!("the transfer panicked: {}", panic_message(err)),
                })
            });
        let (session, tally, caller_gone) = match forwarder.await {
            Ok(forwarded) => forwarded,
            Err(err) => {
                tracing::error!(error = %panic_message(err), "forwarding a transfer's pieces panicked");
                (None, pull::Tally::default(), true)
            }
        };
        scheduled = session;
        match (result, &mut scheduled) {
            (Err(TransferError::SourcesExhausted(why)), Some((scheduler, spec, session)))
                if from_parents && !caller_gone =>
            {
                earlier.absorb(tally);
                let plan = scheduler.reschedule(spec, session, &why).await;
                from_parents = matches!(plan, Plan::Parents { .. });
                tracing::info!(task_id = %spec.task_id, reschedules = session.reschedules(), from_parents, "rescheduled after every parent failed");
                match engine.prepare(pull::request_for(&template, &plan)).await {
                    Ok(next) => prepared = next,
                    Err(err) => break Err(err),
                }
            }
            // The last transfer's summary counts its own pieces; the earlier ones are added.
            (result, _) => break result.map(|summary| earlier.merge_into(summary)),
        }
    };
    if let Some((_, spec, session)) = scheduled {
        session
            .finish(result.as_ref().map_err(|e| e.to_string()))
            .await;
        // The scheduler now counts this peer a parent of the task; a restarted daemon
        // announces it again from what is kept here.
        if let (Ok(_), Some(task)) = (&result, engine.store.get(&spec.task_id)) {
            let _ =
                tokio::task::spawn_blocking(move || crate::dragonfly::held::remember(&task, &spec))
                    .await;
        }
    }
    result
}

/// Authenticates control requests by bearer token (`authorization: Bearer <token>`), when a
/// token is configured; on the unix socket (mode 0600) none is.
#[derive(Clone, Default)]
pub struct BearerAuth {
    /// SHA-256 of the token: comparing digests in constant time leaks neither the token's
    /// bytes nor its length through timing.
    token_digest: Option<[u8; 32]>,
}

impl BearerAuth {
    /// Every request must carry `token`.
    pub fn token(token: &str) -> BearerAuth {
        BearerAuth {
            token_digest: Some(Sha256::digest(token.as_bytes()).into()),
        }
    }

    /// No token checked (the unix socket, or TCP with client certificates only).
    pub fn none() -> BearerAuth {
        BearerAuth::default()
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token_digest else {
            return Ok(request);
        };
        let Some(header) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "missing authorization metadata (authorization: Bearer <token>)",
            ));
        };
        let presented = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("authorization metadata is not `Bearer <token>`")
            })?;
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        if bool::from(digest.ct_eq(expected)) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

/// Reads a token file: the token is its content without surrounding whitespace.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("token file {} is empty", path.display());
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        anyhow::bail!(
            "token file {} holds more than one word; the token is a single line without spaces",
            path.display()
        );
    }
    Ok(token.to_owned())
}

/// TLS and authentication for a `tcp://` control endpoint, from the validated
/// `[control_tcp]` configuration; every error names the key whose file is at fault.
pub fn tcp_control_security(
    config: &ControlTcpConfig,
) -> anyhow::Result<(ServerTlsConfig, BearerAuth)> {
    let read = |key: &str, path: &Option<PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("{key}: reading {}", p.display())))
            .transpose()
    };
    let (Some(cert), Some(key)) = (
        read("control_tcp.tls_cert", &config.tls_cert)?,
        read("control_tcp.tls_key", &config.tls_key)?,
    ) else {
        anyhow::bail!("control_tcp.tls_cert and control_tcp.tls_key are required for a tcp:// control endpoint");
    };
    // A client that never finishes its handshake is dropped instead of held.
    let mut tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .timeout(std::time::Duration::from_secs(10));
    if let Some(ca) = read("control_tcp.tls_client_ca", &config.tls_client_ca)? {
        tls = tls.client_ca_root(Certificate::from_pem(ca));
    }
    let auth = match &config.token_file {
        Some(path) => {
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "control_tcp.token_file is readable by group or others; chmod 600 it");
                }
            }
            BearerAuth::token(&read_token_file(path).context("control_tcp.token_file")?)
        }
        None => BearerAuth::none(),
    };
    Ok((tls, auth))
}
