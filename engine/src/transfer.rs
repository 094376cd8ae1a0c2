//! Transfers: spreading a task's pieces over its sources, verifying each piece before it is
//! written, retrying a failed piece from another source, and placing the output once every
//! piece is held.

use crate::geometry::{self, Geometry, GeometryError, PieceRange};
use crate::metrics::{Metrics, PieceFailure, TransferResult};
use crate::rdma::RdmaTransport;
use crate::store::{Store, StoreError, StoredTask};
use crate::transport::{FetchedPiece, PieceTransport, TcpTransport, TransportError};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

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

    /// Checks an output path: absolute, no `..`, its directory existing and inside one of
    /// the configured output directories (none configured: no output is placed anywhere).
    pub fn check_output_path(&self, path: &Path) -> Result<PathBuf, TransferError> {
        if !path.is_absolute() {
            return Err(TransferError::InvalidArgument(format!(
                "output path {} is relative; give an absolute path",
                path.display()
            )));
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(TransferError::InvalidArgument(format!(
                "output path {} contains '..'",
                path.display()
            )));
        }
        let name = path.file_name().ok_or_else(|| {
            TransferError::InvalidArgument(format!("output path {} names no file", path.display()))
        })?;
        let parent = path
            .parent()
            .expect("absolute path with a file name has a parent");
        let parent = parent.canonicalize().map_err(|e| {
            TransferError::InvalidArgument(format!(
                "output directory {} is not usable: {e}",
                parent.display()
            ))
        })?;
        if self.output_dirs.is_empty() {
            return Err(TransferError::PermissionDenied(format!(
                "output path {}: this daemon has no output directories; set output_dirs \
                 (--output-dir) to let transfers place files",
                path.display()
            )));
        }
        if !self
            .output_dirs
            .iter()
            .any(|allowed| parent.starts_with(allowed))
        {
            let allowed: Vec<String> = self
                .output_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            return Err(TransferError::PermissionDenied(format!(
                "output path {} is outside the allowed output directories ({})",
                path.display(),
                allowed.join(", ")
            )));
        }
        if parent.starts_with(
            self.store
                .data_dir()
                .canonicalize()
                .unwrap_or_else(|_| self.store.data_dir().to_owned()),
        ) {
            return Err(TransferError::PermissionDenied(format!(
                "output path {} is inside the daemon's data dir",
                path.display()
            )));
        }
        Ok(parent.join(name))
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
        if task.transferring.swap(true, Ordering::AcqRel) {
            return Err(TransferError::AlreadyRunning(request.task_id));
        }
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
        prepared.task.transferring.store(false, Ordering::Release);
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

struct Entry {
    number: u32,
    attempts: u32,
    tried: u64,
    last_error: String,
}

/// Why a transfer stopped early.
enum Failure {
    Store(StoreError),
    Exhausted(String),
    Cancelled,
    Draining,
}

struct Schedule {
    queue: VecDeque<Entry>,
    in_flight: usize,
    dead: Vec<bool>,
    consecutive_failures: Vec<u32>,
    failure: Option<Failure>,
    totals: Vec<SourceTotals>,
    /// Bytes and pieces per transport name.
    transports: Vec<(String, u64, u32)>,
    rdma_fallbacks: u32,
    retries: u32,
}

impl Schedule {
    fn new(pieces: &[u32], sources: usize) -> Schedule {
        Schedule {
            queue: pieces
                .iter()
                .map(|&number| Entry {
                    number,
                    attempts: 0,
                    tried: 0,
                    last_error: String::new(),
                })
                .collect(),
            in_flight: 0,
            dead: vec![false; sources],
            consecutive_failures: vec![0; sources],
            failure: None,
            totals: vec![SourceTotals::default(); sources],
            transports: Vec::new(),
            rdma_fallbacks: 0,
            retries: 0,
        }
    }

    fn count_transport(&mut self, name: &str, bytes: u64) {
        match self.transports.iter_mut().find(|t| t.0 == name) {
            Some(entry) => {
                entry.1 += bytes;
                entry.2 += 1;
            }
            None => self.transports.push((name.to_owned(), bytes, 1)),
        }
    }

    /// The next piece for source `me`: one it has not tried yet, or one that no live source
    /// has left untried.
    fn next_for(&mut self, me: usize) -> Next {
        if self.failure.is_some() || self.dead[me] {
            return Next::Done;
        }
        let alive: u64 = self
            .dead
            .iter()
            .enumerate()
            .filter(|(_, d)| !**d)
            .fold(0, |mask, (i, _)| mask | 1 << i);
        let bit = 1u64 << me;
        let position = self
            .queue
            .iter()
            .position(|e| e.tried & bit == 0)
            .or_else(|| self.queue.iter().position(|e| e.tried & alive == alive));
        match position {
            Some(at) => {
                self.in_flight += 1;
                Next::Piece(self.queue.remove(at).expect("position is valid"))
            }
            None if self.queue.is_empty() && self.in_flight == 0 => Next::Done,
            None => Next::Wait,
        }
    }

    fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
    }
}

enum Next {
    Piece(Entry),
    Wait,
    Done,
}

struct Shared {
    state: Mutex<Schedule>,
    wake: Notify,
    cancel: CancellationToken,
}

struct Worker {
    engine: Arc<Engine>,
    task: Arc<StoredTask>,
    shared: Arc<Shared>,
    /// RDMA, when this transfer may use it; TCP is always there.
    rdma: Option<Arc<RdmaTransport>>,
    rdma_only: bool,
    source: SocketAddr,
    source_index: usize,
    source_name: String,
    events: mpsc::Sender<PieceOutcome>,
}

impl Worker {
    /// Fetches pieces one after another; each verified piece is written while the next one
    /// is fetched (at most one write pending per worker), so the network and the disk work
    /// at the same time instead of taking turns.
    async fn run(self: Arc<Self>) {
        let mut pending: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let wake = self.shared.wake.notified();
            let next = {
                let mut state = self.shared.state.lock().expect("schedule lock");
                if self.engine.draining.is_cancelled() && !state.queue.is_empty() {
                    state.fail(Failure::Draining);
                    self.shared.wake.notify_waiters();
                }
                state.next_for(self.source_index)
            };
            match next {
                Next::Done => break,
                Next::Wait => {
                    tokio::select! {
                        _ = wake => {}
                        _ = self.shared.cancel.cancelled() => break,
                        // A safety net: re-check the schedule even if a wake-up was missed.
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                Next::Piece(entry) => {
                    let fetched = tokio::select! {
                        fetched = self.fetch_verified(&entry) => Some(fetched),
                        _ = self.shared.cancel.cancelled() => None,
                    };
                    let Some(fetched) = fetched else {
                        self.shared
                            .state
                            .lock()
                            .expect("schedule lock")
                            .fail(Failure::Cancelled);
                        self.shared.wake.notify_waiters();
                        break;
                    };
                    match fetched {
                        Err(err) => {
                            self.settle(entry, Err(err)).await;
                            self.shared.wake.notify_waiters();
                        }
                        Ok(verified) => {
                            if let Some(previous) = pending.take() {
                                let _ = previous.await;
                            }
                            let worker = Arc::clone(&self);
                            // A write is never abandoned half-way: it finishes (or fails)
                            // and is settled even when the transfer is being cancelled.
                            pending = Some(tokio::spawn(async move {
                                let outcome = worker.persist(&entry, verified).await;
                                worker.settle(entry, outcome).await;
                                worker.shared.wake.notify_waiters();
                            }));
                        }
                    }
                }
            }
        }
        if let Some(previous) = pending {
            let _ = previous.await;
        }
    }

    /// One transport's fetch, bounded by the piece timeout.
    async fn fetch_with(
        &self,
        transport: &dyn PieceTransport,
        piece: PieceRange,
        buf: &mut crate::io::PieceBuffer,
    ) -> Result<FetchedPiece, TransportError> {
        let limit = self.engine.settings.piece_timeout;
        tokio::time::timeout(
            limit,
            transport.fetch(self.source, self.task.id(), piece, buf),
        )
        .await
        .map_err(|_| {
            TransportError::Failed(format!("piece {} took longer than {limit:?}", piece.number))
        })?
    }

    /// Fetches over RDMA when this transfer and the source allow it, else over TCP; a piece
    /// RDMA fails is fetched over TCP at once (unless the transfer is RDMA-only). Returns what
    /// arrived, the transport that carried it, and whether it fell back.
    async fn fetch(
        &self,
        piece: PieceRange,
        buf: &mut crate::io::PieceBuffer,
    ) -> Result<(FetchedPiece, &'static str, bool), AttemptError> {
        if let Some(rdma) = self.rdma.as_ref().filter(|r| r.supports(self.source)) {
            match self.fetch_with(rdma.as_ref(), piece, buf).await {
                Ok(fetched) => return Ok((fetched, "rdma", false)),
                Err(err @ TransportError::NotHeld(_)) => return Err(AttemptError::Transport(err)),
                Err(err) if self.rdma_only => return Err(AttemptError::Transport(err)),
                Err(TransportError::Unsupported(_)) => {}
                Err(err) => {
                    tracing::warn!(task_id = %self.task.id(), piece = piece.number, source = %self.source_name, error = %err, "RDMA failed for this piece; fetching it over TCP");
                    self.engine.metrics.rdma_fallback();
                    let fetched = self
                        .fetch_with(self.engine.tcp.as_ref(), piece, buf)
                        .await
                        .map_err(AttemptError::Transport)?;
                    return Ok((fetched, "tcp", true));
                }
            }
        }
        if self.rdma_only {
            return Err(AttemptError::Transport(TransportError::Unsupported(
                format!(
                    "{} has no RDMA and the transfer is RDMA-only",
                    self.source_name
                ),
            )));
        }
        let fetched = self
            .fetch_with(self.engine.tcp.as_ref(), piece, buf)
            .await
            .map_err(AttemptError::Transport)?;
        Ok((fetched, "tcp", false))
    }

    /// Fetches one piece into a pool buffer and checks it against the source's digest.
    async fn fetch_verified(&self, entry: &Entry) -> Result<VerifiedPiece, AttemptError> {
        let piece = self
            .task
            .geometry()
            .piece(entry.number)
            .expect("validated piece number");
        let pool = self.engine.store.pool();
        let mut buf = pool
            .acquire(piece.length)
            .await
            .map_err(|e| AttemptError::Store(StoreError::Pool(e)))?;
        let fetch_started = Instant::now();
        let (fetched, transport, fell_back) = self.fetch(piece, &mut buf).await?;
        let fetch_time = fetch_started.elapsed();
        self.engine.metrics.piece_received(transport, piece.length);
        // Verify before anything is written: the bytes must match the digest the source holds.
        match geometry::parse_digest(&fetched.advertised_digest) {
            Some(expected) if expected == fetched.crc32 => {}
            Some(expected) => {
                return Err(AttemptError::Digest(format!(
                    "piece {} from {}: digest mismatch, source says {} but the bytes hash to {}",
                    piece.number,
                    self.source_name,
                    geometry::format_digest(expected),
                    geometry::format_digest(fetched.crc32)
                )))
            }
            None => {
                return Err(AttemptError::Digest(format!(
                    "piece {} from {}: unsupported digest {:?}",
                    piece.number, self.source_name, fetched.advertised_digest
                )))
            }
        }
        Ok(VerifiedPiece {
            piece,
            buf,
            crc32: fetched.crc32,
            transport,
            fell_back,
            fetch_time,
        })
    }

    /// Writes a verified piece to the store (durable and journaled when this returns Ok).
    async fn persist(
        &self,
        entry: &Entry,
        verified: VerifiedPiece,
    ) -> Result<PieceOutcome, AttemptError> {
        let VerifiedPiece {
            piece,
            buf,
            crc32,
            transport,
            fell_back,
            fetch_time,
        } = verified;
        let write_started = Instant::now();
        let (_buf, written) = self
            .engine
            .store
            .write_piece(&self.task, piece, buf, crc32)
            .await;
        written.map_err(AttemptError::Store)?;
        let write_time = write_started.elapsed();
        self.engine
            .metrics
            .piece_fetched(transport, fetch_time, write_time);
        Ok(PieceOutcome {
            piece,
            digest: geometry::format_digest(crc32),
            source: self.source_name.clone(),
            transport,
            fell_back,
            fetch_time,
            write_time,
            attempt: entry.attempts + 1,
        })
    }

    async fn settle(&self, mut entry: Entry, outcome: Result<PieceOutcome, AttemptError>) {
        let settings = &self.engine.settings;
        let send = {
            let mut state = self.shared.state.lock().expect("schedule lock");
            state.in_flight -= 1;
            match outcome {
                Ok(outcome) => {
                    state.consecutive_failures[self.source_index] = 0;
                    let totals = &mut state.totals[self.source_index];
                    totals.bytes += outcome.piece.length;
                    totals.pieces += 1;
                    state.count_transport(outcome.transport, outcome.piece.length);
                    state.rdma_fallbacks += u32::from(outcome.fell_back);
                    Some(outcome)
                }
                Err(AttemptError::Store(err)) => {
                    self.engine.metrics.piece_failed(PieceFailure::Store);
                    tracing::error!(task_id = %self.task.id(), piece = entry.number, error = %err, "store write failed; stopping transfer");
                    state.fail(Failure::Store(err));
                    self.shared.cancel.cancel();
                    None
                }
                Err(err) => {
                    self.engine.metrics.piece_failed(match err {
                        AttemptError::Digest(_) => PieceFailure::Digest,
                        _ => PieceFailure::Transport,
                    });
                    tracing::warn!(task_id = %self.task.id(), piece = entry.number, source = %self.source_name, error = %err, "piece attempt failed; retrying elsewhere");
                    state.totals[self.source_index].failures += 1;
                    if matches!(
                        err,
                        AttemptError::Transport(TransportError::Unreachable(_))
                            | AttemptError::Transport(TransportError::Failed(_))
                    ) {
                        state.consecutive_failures[self.source_index] += 1;
                        if state.consecutive_failures[self.source_index]
                            >= settings.source_failure_limit
                        {
                            tracing::warn!(source = %self.source_name, "giving up on source after repeated failures");
                            state.dead[self.source_index] = true;
                            self.engine.tcp.forget(self.source);
                            if let Some(rdma) = &self.engine.rdma {
                                rdma.forget(self.source);
                            }
                        }
                    }
                    entry.attempts += 1;
                    entry.tried |= 1 << self.source_index;
                    entry.last_error = err.to_string();
                    let all_dead = state.dead.iter().all(|d| *d);
                    if entry.attempts >= settings.max_attempts || all_dead {
                        let why = if all_dead {
                            "every source failed"
                        } else {
                            "too many attempts"
                        };
                        state.fail(Failure::Exhausted(format!(
                            "piece {} failed after {} attempts ({why}); last error: {}",
                            entry.number, entry.attempts, entry.last_error
                        )));
                        self.shared.cancel.cancel();
                    } else {
                        state.retries += 1;
                        self.engine.metrics.piece_retried();
                        state.queue.push_front(entry);
                    }
                    None
                }
            }
        };
        if let Some(outcome) = send {
            if self.events.send(outcome).await.is_err() {
                // Nobody listens any more (the caller went away): stop; held pieces stay held.
                self.shared
                    .state
                    .lock()
                    .expect("schedule lock")
                    .fail(Failure::Cancelled);
                self.shared.cancel.cancel();
            }
        }
    }
}

/// A piece fetched into its buffer and verified, not yet written.
struct VerifiedPiece {
    piece: PieceRange,
    buf: crate::io::PieceBuffer,
    crc32: u32,
    transport: &'static str,
    fell_back: bool,
    fetch_time: Duration,
}

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Transport(TransportError),
    #[error("{0}")]
    Digest(String),
    #[error(transparent)]
    Store(StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(schedule: &mut Schedule, source: usize) -> Option<Entry> {
        match schedule.next_for(source) {
            Next::Piece(entry) => Some(entry),
            _ => None,
        }
    }

    #[test]
    fn pieces_are_handed_out_in_order_and_the_end_waits_for_in_flight_work() {
        let mut s = Schedule::new(&[0, 1], 2);
        assert_eq!(take(&mut s, 0).unwrap().number, 0);
        assert_eq!(take(&mut s, 1).unwrap().number, 1);
        assert!(
            matches!(s.next_for(0), Next::Wait),
            "pieces in flight may still come back"
        );
        s.in_flight = 0;
        assert!(matches!(s.next_for(0), Next::Done));
    }

    #[test]
    fn a_failed_piece_goes_to_another_source_first() {
        let mut s = Schedule::new(&[7], 2);
        let mut entry = take(&mut s, 0).unwrap();
        s.in_flight -= 1;
        entry.tried |= 1;
        entry.attempts = 1;
        s.queue.push_front(entry);
        assert!(
            matches!(s.next_for(0), Next::Wait),
            "source 0 already failed it while source 1 has not tried"
        );
        assert_eq!(take(&mut s, 1).unwrap().number, 7);
    }

    #[test]
    fn with_the_other_source_dead_the_same_source_may_retry() {
        let mut s = Schedule::new(&[3], 2);
        let mut entry = take(&mut s, 0).unwrap();
        s.in_flight -= 1;
        entry.tried |= 1;
        s.queue.push_front(entry);
        s.dead[1] = true;
        assert_eq!(take(&mut s, 0).unwrap().number, 3);
        assert!(
            matches!(s.next_for(1), Next::Done),
            "a dead source takes nothing"
        );
    }

    #[test]
    fn a_failure_stops_every_worker() {
        let mut s = Schedule::new(&[1, 2, 3], 2);
        s.fail(Failure::Exhausted("piece 1".into()));
        s.fail(Failure::Cancelled);
        assert!(
            matches!(s.failure, Some(Failure::Exhausted(_))),
            "the first failure is kept"
        );
        assert!(matches!(s.next_for(0), Next::Done));
        assert!(matches!(s.next_for(1), Next::Done));
    }
}
