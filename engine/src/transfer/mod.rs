//! Transfers: spreading a task's pieces over its sources, verifying each piece before it is
//! written, retrying a failed piece from another source, and placing the output once every
//! piece is held (or later, by an export of the held task).

use crate::geometry::{self, Geometry, GeometryError, PieceRange};
use crate::manifest::{self, ContentDigest, Manifest, ManifestState};
use crate::metrics::{Metrics, TransferResult};
use crate::origin::{Origin, OriginError, OriginRequest, OriginSettings};
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

mod hash;
mod output;
mod pin;
mod prepare;
mod schedule;
#[cfg(test)]
mod tests;
mod verify;
mod worker;

pub use output::{
    check_output_path, place, OutputConfigError, OutputError, OutputPolicy, OutputTarget, Placement,
};
use pin::{Pinning, SourceStat};
use schedule::{Failure, Schedule};
use worker::{Shared, Worker};

/// Longest a transfer's start waits for its sources' `TaskInfo` when the request gives the
/// geometry (a source that has not answered by then is asked again by its workers).
const STAT_AT_START_LIMIT: Duration = Duration::from_secs(3);

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
    /// Largest task a transfer may create (`store.max_task_bytes`).
    pub max_task_bytes: u64,
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
    #[error("{0}")]
    ResourceExhausted(String),
    /// The sources, the request and this daemon's store do not agree on one version.
    #[error("{0}")]
    ContentConflict(String),
    #[error("task {task_id}: the content fetched hashes to {actual}, not the pinned {expected}; nothing was placed and the task's pieces were dropped (sources without a manifest: {unverified})")]
    ContentMismatch {
        task_id: String,
        expected: ContentDigest,
        actual: ContentDigest,
        unverified: String,
    },
    #[error("task {task_id}: its manifest could not be read or written: {source}")]
    Manifest {
        task_id: String,
        source: std::io::Error,
    },
    #[error("internal error in the transfer of task {task_id}: {what}")]
    Internal { task_id: String, what: String },
    #[error("the daemon is draining (shutting down): the transfer into task {0} stopped once its pieces in flight were written; the pieces held stay held, so repeat it after the restart")]
    Draining(String),
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The origin (back to source) failed or lied.
    #[error(transparent)]
    Origin(#[from] OriginError),
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
    /// The whole content's SHA-256 the caller expects (`--digest`).
    pub digest: Option<ContentDigest>,
    /// An `http(s)://` origin: the only source when `sources` is empty, else the fallback
    /// for pieces no peer could serve (back to source). With an empty `task_id`, the task id
    /// is Dragonfly's id of its URL.
    pub origin: Option<OriginRequest>,
    /// Range requests in flight to the origin; 0 takes `origin.connections`.
    pub origin_connections: u32,
    /// Per source, the weight of the per-piece choice (a scheduled pull's `SyncHost`
    /// weights): each piece is assigned to a source at random in proportion to these.
    /// Empty: the next free worker of any source takes the next piece.
    pub source_weights: Vec<u64>,
}

/// A validated transfer, ready to run.
pub struct PreparedTransfer {
    task: Arc<StoredTask>,
    pieces: Vec<u32>,
    sources: Vec<SocketAddr>,
    source_names: Vec<String>,
    /// Empty, or one weight per source (see [`TransferRequest::source_weights`]).
    source_weights: Vec<u64>,
    pinning: Pinning,
    /// Where failed piece attempts are reported, when someone listens (a scheduled pull's
    /// scheduler session).
    attempts: Option<mpsc::Sender<FailedAttempt>>,
    /// Its directory opened when the request was checked.
    output: Option<OutputTarget>,
    streams_per_source: u32,
    transport: TransportChoice,
    /// The origin, when the request named one; its source index is `sources.len()`.
    origin: Option<Arc<Origin>>,
    origin_connections: u32,
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
    pub content_digest: Option<ContentDigest>,
    pub refused_sources: Vec<String>,
}

impl PreparedTransfer {
    /// Reports every failed piece attempt on `attempts` as it happens (best effort: a full
    /// channel drops the report, it never holds up the transfer).
    pub fn report_attempts(&mut self, attempts: mpsc::Sender<FailedAttempt>) {
        self.attempts = Some(attempts);
    }

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
            content_digest: self.pinning.pin,
            refused_sources: self.refused(),
        }
    }

    fn refused(&self) -> Vec<String> {
        self.pinning
            .refused
            .iter()
            .map(|(i, why)| format!("{}: {why}", self.source_names[*i]))
            .collect()
    }
}

/// One piece that arrived, verified and durable.
#[derive(Debug, Clone)]
pub struct PieceOutcome {
    pub piece: PieceRange,
    pub digest: String,
    pub source: String,
    pub transport: &'static str,
    /// The RDMA rail pairs that carried it (one per stripe of a striped piece); none over
    /// TCP.
    pub rails: Vec<crate::transport::RailShare>,
    /// RDMA failed for this piece and TCP carried it.
    pub fell_back: bool,
    pub fetch_time: Duration,
    pub write_time: Duration,
    pub attempt: u32,
}

/// A piece attempt that failed; the piece is retried elsewhere unless the transfer stops.
#[derive(Debug, Clone)]
pub struct FailedAttempt {
    pub piece: u32,
    /// The source's name, as in [`PieceOutcome::source`].
    pub source: String,
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
    /// Per RDMA rail pair: (rail, bytes, pieces).
    pub rails: Vec<(String, u64, u32)>,
    /// Pieces that failed over RDMA and were fetched over TCP instead.
    pub rdma_fallbacks: u32,
    pub output: Option<PathBuf>,
    /// What the complete content was verified against; `None` when the task is not complete.
    pub content_digest: Option<ContentDigest>,
    pub refused_sources: Vec<String>,
    /// How the output was placed, when there was one.
    pub placement: Option<Placement>,
    /// Bytes downloaded from the origin (back to source); also in `sources` and `transports`.
    pub back_to_source_bytes: u64,
    /// Origin requests retried after a transient failure.
    pub origin_retries: u32,
}

/// The daemon's data-plane core: the store and the transports.
pub struct Engine {
    pub store: Arc<Store>,
    pub tcp: Arc<TcpTransport>,
    /// Present when this host has a usable RDMA device.
    pub rdma: Option<Arc<RdmaTransport>>,
    pub settings: TransferSettings,
    pub output_dirs: Vec<PathBuf>,
    /// Mode and owner of placed outputs.
    pub output_policy: OutputPolicy,
    pub metrics: Arc<Metrics>,
    /// How origins are talked to (back to source).
    pub origin_settings: OriginSettings,
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
            output_policy: OutputPolicy::default(),
            metrics: Arc::default(),
            origin_settings: OriginSettings::default(),
            running: Mutex::new(HashMap::new()),
            draining: CancellationToken::new(),
        }
    }

    /// Records into `metrics` (shared with the daemon's endpoint) instead of a private set.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Engine {
        self.metrics = metrics;
        self
    }

    /// Talks to origins with these settings instead of the defaults.
    pub fn with_origin_settings(mut self, settings: OriginSettings) -> Engine {
        self.origin_settings = settings;
        self
    }

    /// Gives placed outputs this mode and owner instead of the default (0644, unchanged).
    pub fn with_output_policy(mut self, policy: OutputPolicy) -> Engine {
        self.output_policy = policy;
        self
    }

    /// Checks an output path (see [`output::check_output_path`]).
    pub fn check_output_path(&self, path: &Path) -> Result<PathBuf, TransferError> {
        output::check_output_path(&self.output_dirs, self.store.data_dir(), path)
    }

    /// Checks an output path and opens its directory: what is placed later goes there even
    /// if the path changes in between.
    pub fn output_target(&self, path: &Path) -> Result<OutputTarget, TransferError> {
        OutputTarget::open(self.check_output_path(path)?)
    }

    /// Places a complete task's content at `target`, on the blocking pool (it may copy
    /// gigabytes across filesystems).
    async fn place(
        &self,
        task: &StoredTask,
        target: OutputTarget,
    ) -> Result<Placement, TransferError> {
        let content = task.content_path();
        let length = task.geometry().content_length();
        let policy = self.output_policy;
        let path = target.path().to_owned();
        let placed =
            tokio::task::spawn_blocking(move || output::place(&content, length, &target, &policy))
                .await
                .map_err(|_| OutputError::Panicked(path))??;
        Ok(placed)
    }

    /// Places a task the store holds completely at `path`, as a transfer with an output
    /// would, without contacting any source.
    pub async fn export(
        &self,
        task_id: &str,
        path: &Path,
    ) -> Result<(PathBuf, Placement), TransferError> {
        geometry::validate_task_id(task_id)?;
        let task = self
            .store
            .get(task_id)
            .ok_or_else(|| StoreError::NotFound(task_id.into()))?;
        if !task.is_complete() {
            return Err(TransferError::FailedPrecondition(format!(
                "task {task_id} is not complete ({} of {} pieces held): pull the rest before exporting it",
                task.held_count(),
                task.geometry().piece_count()
            )));
        }
        let target = self.output_target(path)?;
        let placed_at = target.path().to_owned();
        let placement = self.place(&task, target).await?;
        Ok((placed_at, placement))
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
        // `prepared` (and with it the task's writing flag) drops here.
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
        let peers = prepared.sources.len();
        let mut schedule = Schedule::new(&wanted, peers + usize::from(prepared.origin.is_some()));
        if prepared.origin.is_some() {
            schedule.origin = Some(peers);
        }
        if !prepared.source_weights.is_empty() {
            let mut weights = prepared.source_weights.clone();
            weights.resize(schedule.dead.len(), 0);
            schedule.weigh(weights, seed_of(task.id()));
        }
        for (index, _) in &prepared.pinning.refused {
            schedule.mark_dead(*index);
        }
        let verified = matches!(
            task.manifest(),
            Ok(Some(m)) if m.state == ManifestState::Verified
        );
        let hash = (!verified && !wanted.is_empty()).then(|| {
            hash::InOrderHash::start(
                geometry,
                task.content_path(),
                (0..geometry.piece_count()).filter(|&n| task.held(n).is_some()),
            )
        });
        let shared = Arc::new(Shared {
            attempts: prepared.attempts.clone(),
            hash: Mutex::new(hash),
            state: Mutex::new(schedule),
            wake: Notify::new(),
            cancel: prepared.cancel.child_token(),
            geometry,
            pin: Mutex::new(prepared.pinning.pin),
            manifest_checks: prepared
                .pinning
                .unchecked
                .iter()
                .map(|&unchecked| {
                    // A source whose manifest is known already needs no check.
                    let cell = tokio::sync::OnceCell::new();
                    if !unchecked {
                        let _ = cell.set(Ok(()));
                    }
                    cell
                })
                // The origin's: nothing to check.
                .chain(prepared.origin.as_ref().map(|_| Ok(()).into()))
                .collect(),
        });
        let rdma = match prepared.transport {
            TransportChoice::Tcp => None,
            TransportChoice::Auto | TransportChoice::Rdma => self.rdma.clone(),
        };
        let mut workers = tokio::task::JoinSet::new();
        if !wanted.is_empty() {
            for (index, &source) in prepared.sources.iter().enumerate() {
                if prepared.pinning.refused.iter().any(|(i, _)| *i == index) {
                    continue;
                }
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
                        origin: None,
                        events: events.clone(),
                    };
                    workers.spawn(Arc::new(worker).run());
                }
            }
            if let Some(origin) = &prepared.origin {
                for _ in 0..prepared.origin_connections.max(1) {
                    let worker = Worker {
                        engine: Arc::clone(self),
                        task: Arc::clone(task),
                        shared: Arc::clone(&shared),
                        rdma: None,
                        rdma_only: false,
                        source: SocketAddr::from(([0, 0, 0, 0], 0)),
                        source_index: peers,
                        source_name: origin.name().to_owned(),
                        origin: Some(Arc::clone(origin)),
                        events: events.clone(),
                    };
                    workers.spawn(Arc::new(worker).run());
                }
            }
        }
        drop(events);
        while let Some(joined) = workers.join_next().await {
            if let Err(err) = joined {
                // A worker that panicked stops the transfer with the panic named, instead of
                // taking the caller's stream (and the task's writing flag) down with it.
                let what = panic_message(err);
                tracing::error!(task_id = %task.id(), %what, "transfer worker panicked");
                shared
                    .state
                    .lock()
                    .expect("schedule lock")
                    .fail(Failure::Internal(format!(
                        "a transfer worker panicked: {what}"
                    )));
                shared.cancel.cancel();
            }
        }
        let (bytes_fetched, pieces_fetched, retries, totals, transports, rails, rdma_fallbacks) = {
            let mut state = shared.state.lock().expect("schedule lock");
            if let Some(failure) = state.failure.take() {
                return Err(match failure {
                    Failure::Store(err) => TransferError::Store(err),
                    Failure::Exhausted(msg) => TransferError::SourcesExhausted(msg),
                    Failure::Cancelled => TransferError::Cancelled(task.id().to_owned()),
                    Failure::Draining => TransferError::Draining(task.id().to_owned()),
                    Failure::Internal(what) => TransferError::Internal {
                        task_id: task.id().to_owned(),
                        what,
                    },
                    Failure::Origin(err) => {
                        if matches!(err, OriginError::Changed { .. }) {
                            // Pieces of two versions must never meet: drop what arrived.
                            tracing::error!(task_id = %task.id(), error = %err, "the origin changed; dropping the task");
                            if let Err(err) = self.store.delete(task.id()) {
                                tracing::error!(task_id = %task.id(), error = %err, "dropping the task failed");
                            }
                        }
                        TransferError::Origin(err)
                    }
                });
            }
            (
                state.totals.iter().map(|t| t.bytes).sum::<u64>(),
                state.totals.iter().map(|t| t.pieces).sum::<u32>(),
                state.retries,
                state.totals.clone(),
                std::mem::take(&mut state.transports),
                std::mem::take(&mut state.rails),
                state.rdma_fallbacks,
            )
        };
        let totals_origin_bytes = totals.get(peers).map_or(0, |t| t.bytes);
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
        let content_digest = if task.is_complete() {
            Some(self.verify_content(prepared, &shared).await?)
        } else {
            None
        };
        let placement = match &prepared.output {
            Some(target) => Some(self.place(task, target.clone()).await?),
            None => None,
        };
        Ok(TransferSummary {
            task_id: task.id().to_owned(),
            geometry,
            pieces_requested: prepared.pieces.len() as u32,
            pieces_fetched,
            pieces_reused: reused,
            retries,
            bytes_fetched,
            elapsed: started.elapsed(),
            sources: prepared.source_names.iter().cloned().zip(totals).collect(),
            transports,
            rails,
            rdma_fallbacks,
            output: prepared.output.as_ref().map(|t| t.path().to_owned()),
            placement,
            content_digest,
            refused_sources: prepared.refused(),
            back_to_source_bytes: prepared.origin.as_ref().map_or(0, |_| totals_origin_bytes),
            origin_retries: prepared.origin.as_ref().map_or(0, |o| o.retries()),
        })
    }
}

/// The seed of a transfer's weighted piece choice: its task id's FNV-1a hash, so that a
/// transfer's choices can be replayed.
fn seed_of(task_id: &str) -> u64 {
    task_id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What a panicked (or cancelled) task said, for an error message.
pub fn panic_message(err: tokio::task::JoinError) -> String {
    if !err.is_panic() {
        return err.to_string();
    }
    let payload = err.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into())
}
