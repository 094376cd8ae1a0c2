//! Transfers: spreading a task's pieces over its sources, verifying each piece before it is
//! written, retrying a failed piece from another source, and placing the output once every
//! piece is held.

use crate::geometry::{self, Geometry, GeometryError, PieceRange};
use crate::metrics::{Metrics, TransferResult};
use crate::rdma::RdmaTransport;
use crate::store::{Store, StoreError, StoredTask, WriteGuard, WriterKind};
use crate::transport::TcpTransport;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

mod output;
mod schedule;
mod worker;

pub use output::check_output_path;
use schedule::{Failure, Schedule};
use worker::{Shared, Worker};

/// Most sources one transfer may name (a piece's tried-sources set is a 64-bit mask).
pub const MAX_SOURCES: usize = 64;

/// Defaults a transfer request may override.
#[derive(Debug, Clone)]
pub struct TransferSettings {
    pub streams_per_source: u32,
    /// Longest a single piece fetch may take, end to end.
    pub piece_timeout: Duration,
    /// Attempts per piece, over all sources, before the transfer fails.
    pub max_attempts: u32,
    /// Consecutive connection failures after which a source is given up on.
    pub source_failure_limit: u32,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a transfer into task {0} is already running")]
    AlreadyRunning(String),
    #[error("{0}")]
    SourcesExhausted(String),
    #[error("transfer of task {0} was cancelled")]
    Cancelled(String),
    #[error("the daemon is draining (shutting down): the transfer into task {0} stopped once its pieces in flight were written; the pieces held stay held, so repeat it after the restart")]
    Draining(String),
}

/// Which transports a transfer may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// RDMA where both sides have it, TCP otherwise, and TCP again for a piece RDMA failed.
    #[default]
    Auto,
    Tcp,
    /// RDMA only: a source or piece that cannot use it fails.
    Rdma,
}

/// A transfer as asked for.
#[derive(Debug, Clone)]
pub struct TransferRequest {
    pub task_id: String,
    pub content_length: u64,
    pub piece_length: u64,
    pub pieces: Vec<u32>,
    pub sources: Vec<String>,
    pub output: Option<PathBuf>,
    pub streams_per_source: u32,
    pub transport: TransportChoice,
}

/// A validated transfer, ready to run.
pub struct PreparedTransfer {
    task: Arc<StoredTask>,
    pieces: Vec<u32>,
    sources: Vec<SocketAddr>,
    source_names: Vec<String>,
    output: Option<PathBuf>,
    streams_per_source: u32,
    transport: TransportChoice,
    cancel: CancellationToken,
    /// This transfer is the task's one writer until it is dropped (at the end of
    /// [`Engine::run`], or with an unused preparation).
    _writing: WriteGuard,
}

/// What a prepared transfer will do, for its first event.
#[derive(Debug, Clone)]
pub struct TransferStart {
    pub task_id: String,
    pub geometry: Geometry,
    pub pieces_requested: u32,
    pub pieces_reused: u32,
    pub bytes_to_fetch: u64,
    pub sources: Vec<String>,
}

impl PreparedTransfer {
    pub fn started(&self) -> TransferStart {
        let geometry = self.task.geometry();
        let missing: Vec<u32> = self
            .pieces
            .iter()
            .copied()
            .filter(|&n| self.task.held(n).is_none())
            .collect();
        let bytes_to_fetch = missing
            .iter()
            .map(|&n| geometry.piece(n).expect("validated").length)
            .sum();
        let reused = (self.pieces.len() - missing.len()) as u32;
        TransferStart {
            task_id: self.task.id().to_owned(),
            geometry: self.task.geometry(),
            pieces_requested: self.pieces.len() as u32,
            pieces_reused: reused,
            bytes_to_fetch,
            sources: self.source_names.clone(),
        }
    }
}

/// One piece that arrived, verified and durable.
#[derive(Debug, Clone)]
pub struct PieceOutcome {
    pub piece: PieceRange,
    pub digest: String,
    pub source: String,
    pub transport: &'static str,
    /// RDMA failed for this piece and TCP carried it.
    pub fell_back: bool,
    pub fetch_time: Duration,
    pub write_time: Duration,
    pub attempt: u32,
}

#[derive(Debug, Clone, Default)]
pub struct SourceTotals {
    pub bytes: u64,
    pub pieces: u32,
    pub failures: u32,
}

#[derive(Debug, Clone)]
pub struct TransferSummary {
    pub task_id: String,
    pub geometry: Geometry,
    pub pieces_requested: u32,
    pub pieces_fetched: u32,
    pub pieces_reused: u32,
    pub retries: u32,
    pub bytes_fetched: u64,
    pub elapsed: Duration,
    pub sources: Vec<(String, SourceTotals)>,
    pub transports: Vec<(String, u64, u32)>,
    /// Pieces that failed over RDMA and were fetched over TCP instead.
    pub rdma_fallbacks: u32,
    pub output: Option<PathBuf>,
}

/// The daemon's data-plane core: the store and the transports.
pub struct Engine {
    pub store: Arc<Store>,
    pub tcp: Arc<TcpTransport>,
    /// Present when this host has a usable RDMA device.
    pub rdma: Option<Arc<RdmaTransport>>,
    pub settings: TransferSettings,
    pub output_dirs: Vec<PathBuf>,
    pub metrics: Arc<Metrics>,
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Set when the daemon drains: transfers take no new pieces.
    draining: CancellationToken,
}

impl Engine {
    pub fn new(
        store: Arc<Store>,
        tcp: Arc<TcpTransport>,
        rdma: Option<Arc<RdmaTransport>>,
        settings: TransferSettings,
        output_dirs: Vec<PathBuf>,
    ) -> Engine {
        Engine {
            store,
            tcp,
            rdma,
            settings,
            output_dirs,
            metrics: Arc::default(),
            running: Mutex::new(HashMap::new()),
            draining: CancellationToken::new(),
        }
    }

    /// Records into `metrics` (shared with the daemon's endpoint) instead of a private set.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Engine {
        self.metrics = metrics;
        self
    }

    /// Checks an output path (see [`output::check_output_path`]).
    pub fn check_output_path(&self, path: &Path) -> Result<PathBuf, TransferError> {
        output::check_output_path(&self.output_dirs, self.store.data_dir(), path)
    }

    /// Validates a request and reserves its task; errors here are the caller's mistakes or
    /// the store's state, reported before any byte moves.
    pub async fn prepare(
        &self,
        request: TransferRequest,
    ) -> Result<PreparedTransfer, TransferError> {
        geometry::validate_task_id(&request.task_id)?;
        if request.transport == TransportChoice::Rdma && self.rdma.is_none() {
            return Err(TransferError::FailedPrecondition(
                "RDMA was asked for but this daemon has no usable RDMA device (see `ferry devices`)".into(),
            ));
        }
        if request.sources.is_empty() {
            return Err(TransferError::InvalidArgument(
                "no source peers given".into(),
            ));
        }
        if request.sources.len() > MAX_SOURCES {
            return Err(TransferError::InvalidArgument(format!(
                "{} sources given; at most {MAX_SOURCES}",
                request.sources.len()
            )));
        }
        let mut sources = Vec::new();
        for source in &request.sources {
            let addr = tokio::net::lookup_host(source.as_str())
                .await
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| {
                    TransferError::InvalidArgument(format!(
                        "source {source:?} is not a reachable host:port"
                    ))
                })?;
            if !sources.contains(&addr) {
                sources.push(addr);
            }
        }
        let output = request
            .output
            .as_deref()
            .map(|p| self.check_output_path(p))
            .transpose()?;
        if request.piece_length != 0 {
            geometry::validate_piece_length(request.piece_length)?;
        }
        let geometry = self.resolve_geometry(&request, &sources).await?;
        for &number in &request.pieces {
            geometry.piece(number)?;
        }
        let mut pieces = if request.pieces.is_empty() {
            (0..geometry.piece_count()).collect()
        } else {
            request.pieces.clone()
        };
        pieces.sort_unstable();
        pieces.dedup();
        if output.is_some() && pieces.len() as u32 != geometry.piece_count() {
            return Err(TransferError::InvalidArgument(
                "an output path needs every piece of the task; request all pieces or no output"
                    .into(),
            ));
        }
        let task = self.store.create_or_get(&request.task_id, geometry)?;
        let writing = match task.try_begin_writing(WriterKind::Transfer) {
            Ok(guard) => guard,
            Err(StoreError::Busy {
                writer: WriterKind::Transfer,
                ..
            }) => return Err(TransferError::AlreadyRunning(request.task_id)),
            Err(err) => return Err(err.into()),
        };
        let cancel = CancellationToken::new();
        self.running
            .lock()
            .expect("running lock")
            .insert(request.task_id.clone(), cancel.clone());
        let streams_per_source = if request.streams_per_source == 0 {
            self.settings.streams_per_source
        } else {
            request.streams_per_source.min(64)
        };
        Ok(PreparedTransfer {
            task,
            pieces,
            source_names: sources.iter().map(|s| s.to_string()).collect(),
            sources,
            output,
            streams_per_source,
            transport: request.transport,
            cancel,
            _writing: writing,
        })
    }

    async fn resolve_geometry(
        &self,
        request: &TransferRequest,
        sources: &[SocketAddr],
    ) -> Result<Geometry, TransferError> {
        if request.content_length != 0 && request.piece_length != 0 {
            return Ok(Geometry::new(request.content_length, request.piece_length)?);
        }
        if let Some(task) = self.store.get(&request.task_id) {
            return Ok(task.geometry());
        }
        let mut errors = Vec::new();
        for &source in sources {
            match self.tcp.stat_task(source, &request.task_id).await {
                Ok(info) => {
                    let learnt = Geometry::new(info.content_length, info.piece_length)?;
                    let conflicts = (request.content_length != 0
                        && request.content_length != info.content_length)
                        || (request.piece_length != 0 && request.piece_length != info.piece_length);
                    if conflicts {
                        return Err(TransferError::InvalidArgument(format!(
                            "source {source} holds task {} with content length {} and piece length {}, not what was asked",
                            request.task_id, info.content_length, info.piece_length
                        )));
                    }
                    return Ok(learnt);
                }
                Err(err) => errors.push(format!("{source}: {err}")),
            }
        }
        Err(TransferError::SourcesExhausted(format!(
            "no source could tell the geometry of task {} (pass content and piece length): {}",
            request.task_id,
            errors.join("; ")
        )))
    }

    /// Cancels the running transfer into a task; false if none runs.
    pub fn cancel(&self, task_id: &str) -> bool {
        match self.running.lock().expect("running lock").get(task_id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Daemon drain: running transfers finish the pieces they have in flight, take no new
    /// ones, and end with [`TransferError::Draining`] (one with nothing left to fetch ends
    /// normally).
    pub fn stop_taking_pieces(&self) {
        self.draining.cancel();
    }

    /// Cancels every running transfer (daemon shutdown).
    pub fn cancel_all(&self) {
        for token in self.running.lock().expect("running lock").values() {
            token.cancel();
        }
    }

    /// Runs a prepared transfer, sending one outcome per fetched piece.
    pub async fn run(
        self: &Arc<Self>,
        prepared: PreparedTransfer,
        events: mpsc::Sender<PieceOutcome>,
    ) -> Result<TransferSummary, TransferError> {
        let task_id = prepared.task.id().to_owned();
        let counted = self.metrics.transfer_started();
        let result = self.run_inner(&prepared, events).await;
        counted.finish(match &result {
            Ok(_) => TransferResult::Completed,
            Err(TransferError::Cancelled(_)) => TransferResult::Cancelled,
            Err(_) => TransferResult::Failed,
        });
        drop(prepared);
        self.running.lock().expect("running lock").remove(&task_id);
        result
    }

    async fn run_inner(
        self: &Arc<Self>,
        prepared: &PreparedTransfer,
        events: mpsc::Sender<PieceOutcome>,
    ) -> Result<TransferSummary, TransferError> {
        let started = Instant::now();
        let task = &prepared.task;
        let geometry = task.geometry();
        let wanted: Vec<u32> = prepared
            .pieces
            .iter()
            .copied()
            .filter(|&n| task.held(n).is_none())
            .collect();
        let reused = (prepared.pieces.len() - wanted.len()) as u32;
        let shared = Arc::new(Shared {
            state: Mutex::new(Schedule::new(&wanted, prepared.sources.len())),
            wake: Notify::new(),
            cancel: prepared.cancel.child_token(),
        });
        let rdma = match prepared.transport {
            TransportChoice::Tcp => None,
            TransportChoice::Auto | TransportChoice::Rdma => self.rdma.clone(),
        };
        let mut workers = tokio::task::JoinSet::new();
        if !wanted.is_empty() {
            for (index, &source) in prepared.sources.iter().enumerate() {
                for _ in 0..prepared.streams_per_source {
                    let worker = Worker {
                        engine: Arc::clone(self),
                        task: Arc::clone(task),
                        shared: Arc::clone(&shared),
                        rdma: rdma.clone(),
                        rdma_only: prepared.transport == TransportChoice::Rdma,
                        source,
                        source_index: index,
                        source_name: prepared.source_names[index].clone(),
                        events: events.clone(),
                    };
                    workers.spawn(Arc::new(worker).run());
                }
            }
        }
        drop(events);
        while let Some(joined) = workers.join_next().await {
            joined.expect("transfer worker panicked");
        }
        let mut state = shared.state.lock().expect("schedule lock");
        if let Some(failure) = state.failure.take() {
            return Err(match failure {
                Failure::Store(err) => TransferError::Store(err),
                Failure::Exhausted(msg) => TransferError::SourcesExhausted(msg),
                Failure::Cancelled => TransferError::Cancelled(task.id().to_owned()),
                Failure::Draining => TransferError::Draining(task.id().to_owned()),
            });
        }
        if prepared.cancel.is_cancelled() {
            return Err(TransferError::Cancelled(task.id().to_owned()));
        }
        let missing: Vec<u32> = prepared
            .pieces
            .iter()
            .copied()
            .filter(|&n| task.held(n).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(TransferError::SourcesExhausted(format!(
                "{} pieces not fetched (first: {})",
                missing.len(),
                missing[0]
            )));
        }
        if let Some(output) = &prepared.output {
            self.store.place_output(task, output)?;
        }
        let bytes_fetched: u64 = state.totals.iter().map(|t| t.bytes).sum();
        let pieces_fetched: u32 = state.totals.iter().map(|t| t.pieces).sum();
        Ok(TransferSummary {
            task_id: task.id().to_owned(),
            geometry,
            pieces_requested: prepared.pieces.len() as u32,
            pieces_fetched,
            pieces_reused: reused,
            retries: state.retries,
            bytes_fetched,
            elapsed: started.elapsed(),
            sources: prepared
                .source_names
                .iter()
                .cloned()
                .zip(state.totals.iter().cloned())
                .collect(),
            transports: std::mem::take(&mut state.transports),
            rdma_fallbacks: state.rdma_fallbacks,
            output: prepared.output.clone(),
        })
    }
}
