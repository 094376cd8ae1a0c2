//! A transfer's workers: each fetches pieces from one source, verifies them and writes them
//! to the store while fetching the next.

use super::schedule::{Entry, Failure, Next, Schedule};
use super::{Engine, FailedAttempt, PieceOutcome};
use crate::geometry::{self, Geometry, PieceRange};
use crate::io::PieceBuffer;
use crate::manifest::ContentDigest;
use crate::metrics::PieceFailure;
use crate::origin::{Origin, OriginError};
use crate::rdma::RdmaTransport;
use crate::store::{StoreError, StoredTask};
use crate::transport::{Fetched, FetchedPiece, PieceTransport, RailShare, TransportError};

/// RDMA fetches one piece may take before it goes over TCP: a rail pair that fails is paused,
/// so each re-issue goes over another (or waits for none and goes over TCP).
const RDMA_ATTEMPTS_PER_PIECE: u32 = 4;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

pub(super) struct Shared {
    pub(super) state: Mutex<Schedule>,
    pub(super) wake: Notify,
    pub(super) cancel: CancellationToken,
    pub(super) geometry: Geometry,
    /// The content digest the transfer pinned: at its start, or later by the first source
    /// that states one when none had at the start.
    pub(super) pin: Mutex<Option<ContentDigest>>,
    /// Per source: whether it may serve this version (set once, by the first of its workers
    /// to ask, for a source whose manifest was not known when the transfer started).
    pub(super) manifest_checks: Vec<tokio::sync::OnceCell<Result<(), String>>>,
    /// The whole-content SHA-256, fed as pieces are written (none when the task's content
    /// is verified already).
    pub(super) hash: Mutex<Option<super::hash::InOrderHash>>,
    /// Where failed attempts are reported (see `PreparedTransfer::report_attempts`).
    pub(super) attempts: Option<mpsc::Sender<super::FailedAttempt>>,
}

pub(super) struct Worker {
    pub(super) engine: Arc<Engine>,
    pub(super) task: Arc<StoredTask>,
    pub(super) shared: Arc<Shared>,
    /// RDMA, when this transfer may use it; TCP is always there.
    pub(super) rdma: Option<Arc<RdmaTransport>>,
    pub(super) rdma_only: bool,
    pub(super) source: SocketAddr,
    pub(super) source_index: usize,
    pub(super) source_name: String,
    /// Set for the origin's workers (back to source): pieces come over HTTP from it, and
    /// `source` is unused.
    pub(super) origin: Option<Arc<Origin>>,
    pub(super) events: mpsc::Sender<PieceOutcome>,
}

impl Worker {
    /// Fetches pieces one after another; each verified piece is written while the next one
    /// is fetched (at most one write pending per worker), so the network and the disk work
    /// at the same time instead of taking turns.
    pub(super) async fn run(self: Arc<Self>) {
        let checked = match self.origin {
            Some(_) => Ok(()),
            None => self.check_manifest().await,
        };
        if let Err(why) = checked {
            tracing::warn!(task_id = %self.task.id(), source = %self.source_name, reason = %why, "source refused");
            let mut state = self.shared.state.lock().expect("schedule lock");
            state.mark_dead(self.source_index);
            if state.dead.iter().all(|d| *d) {
                state.fail(Failure::Exhausted(format!(
                    "every source was refused or failed; {}: {why}",
                    self.source_name
                )));
                self.shared.cancel.cancel();
            }
            drop(state);
            self.shared.wake.notify_waiters();
            return;
        }
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
                                Self::finish_write(previous).await;
                            }
                            let worker = Arc::clone(&self);
                            // A write is never abandoned half-way: it finishes (or fails)
                            // and is settled even when the transfer is being cancelled. It
                            // runs in a task of its own so that a panic in it is settled as
                            // a failed attempt, not lost with the piece still "in flight".
                            pending = Some(tokio::spawn(async move {
                                let writer = Arc::clone(&worker);
                                let attempt = entry.attempts + 1;
                                let outcome =
                                    tokio::spawn(
                                        async move { writer.persist(attempt, verified).await },
                                    )
                                    .await
                                    .unwrap_or_else(|err| {
                                        Err(AttemptError::Panicked(super::panic_message(err)))
                                    });
                                worker.settle(entry, outcome).await;
                                worker.shared.wake.notify_waiters();
                            }));
                        }
                    }
                }
            }
        }
        if let Some(previous) = pending {
            Self::finish_write(previous).await;
        }
    }

    async fn finish_write(pending: tokio::task::JoinHandle<()>) {
        if let Err(err) = pending.await {
            // Only settling itself can get here (the write's own panic is settled).
            tracing::error!(error = %super::panic_message(err), "settling a piece panicked");
        }
    }

    /// For a source whose manifest was not known when the transfer started: ask it now,
    /// once for all its workers (cancellably). A source that states another version is
    /// refused; one that states a digest when none is pinned yet pins it (first wins, and it
    /// is recorded in the manifest); one that still cannot say may serve, and the
    /// whole-content check vouches for what it sends.
    async fn check_manifest(&self) -> Result<(), String> {
        let check = &self.shared.manifest_checks[self.source_index];
        let asked = check.get_or_init(|| async {
            let limit = self.engine.settings.piece_timeout;
            let stat = tokio::select! {
                stat = tokio::time::timeout(limit, self.engine.tcp.stat_task(self.source, self.task.id())) => stat,
                _ = self.shared.cancel.cancelled() => return Ok(()),
            };
            let Ok(Ok(info)) = stat else { return Ok(()) };
            let newly_pinned = {
                let mut pin = self.shared.pin.lock().expect("pin lock");
                super::pin::judge(*pin, self.shared.geometry, &info)?;
                match (*pin, info.content_sha256) {
                    (None, Some(stated)) => {
                        *pin = Some(ContentDigest(stated));
                        *pin
                    }
                    _ => None,
                }
            };
            if let Some(content_sha256) = newly_pinned {
                let task = Arc::clone(&self.task);
                let saved = tokio::task::spawn_blocking(move || {
                    task.set_manifest(crate::manifest::Manifest {
                        content_sha256,
                        state: crate::manifest::ManifestState::Pinned,
                    })
                })
                .await;
                if let Ok(Err(err)) | Err(err) = saved.map_err(std::io::Error::other) {
                    // The pin still holds in memory for this transfer's final check.
                    tracing::warn!(task_id = %self.task.id(), error = %err, "recording the pin failed");
                }
            }
            Ok(())
        });
        asked.await.clone()
    }

    /// One transport's fetch, bounded by the piece timeout. A fetch that ran out of time is
    /// dropped with its buffer (the pool keeps the slots out of use while a device may still
    /// write them), so no buffer comes back then.
    async fn fetch_with(
        &self,
        transport: &dyn PieceTransport,
        piece: PieceRange,
        buf: PieceBuffer,
    ) -> Fetched {
        let limit = self.engine.settings.piece_timeout;
        let fetch = transport.fetch(self.source, self.task.id(), piece, buf);
        tokio::time::timeout(limit, fetch)
            .await
            .unwrap_or_else(|_| Fetched {
                buf: None,
                result: Err(TransportError::Failed(format!(
                    "piece {} took longer than {limit:?}",
                    piece.number
                ))),
            })
    }

    /// Fetches over RDMA when this transfer and the source allow it, else over TCP; a piece
    /// RDMA fails is fetched over TCP at once (unless the transfer is RDMA-only). Returns what
    /// arrived, the transport that carried it, and whether it fell back.
    async fn fetch(
        &self,
        piece: PieceRange,
        mut buf: PieceBuffer,
    ) -> Result<(FetchedPiece, PieceBuffer, &'static str, bool), AttemptError> {
        let mut rdma_attempts = 0;
        while let Some(rdma) = self.rdma.as_ref().filter(|r| r.supports(self.source)) {
            rdma_attempts += 1;
            let Fetched { buf: back, result } = self.fetch_with(rdma.as_ref(), piece, buf).await;
            let err = match (result, back) {
                (Ok(fetched), Some(back)) => return Ok((fetched, back, "rdma", false)),
                (Ok(_), None) => unreachable!("a fetch that succeeded gives its buffer back"),
                (Err(err), back) => {
                    // Not given back: a device may still write it, so a retry takes another.
                    buf = match back {
                        Some(back) => back,
                        None => self.fresh_buffer(piece).await?,
                    };
                    err
                }
            };
            match err {
                err @ TransportError::NotHeld(_) => return Err(AttemptError::Transport(err)),
                TransportError::Unsupported(_) if !self.rdma_only => break,
                err @ TransportError::Unsupported(_) => return Err(AttemptError::Transport(err)),
                // A rail pair failed and another is up: the piece goes there, over RDMA.
                err if rdma_attempts < RDMA_ATTEMPTS_PER_PIECE && rdma.supports(self.source) => {
                    tracing::info!(task_id = %self.task.id(), piece = piece.number, source = %self.source_name, error = %err, "RDMA failed for this piece on one rail; fetching it again over another");
                    self.engine.metrics.rdma_piece_reissued();
                }
                err if self.rdma_only => return Err(AttemptError::Transport(err)),
                err => {
                    tracing::warn!(task_id = %self.task.id(), piece = piece.number, source = %self.source_name, error = %err, "RDMA failed for this piece; fetching it over TCP");
                    self.engine.metrics.rdma_fallback();
                    let (fetched, buf) = self.fetch_over_tcp(piece, buf).await?;
                    return Ok((fetched, buf, "tcp", true));
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
        let (fetched, buf) = self.fetch_over_tcp(piece, buf).await?;
        Ok((fetched, buf, "tcp", false))
    }

    async fn fetch_over_tcp(
        &self,
        piece: PieceRange,
        buf: PieceBuffer,
    ) -> Result<(FetchedPiece, PieceBuffer), AttemptError> {
        let Fetched { buf, result } = self.fetch_with(self.engine.tcp.as_ref(), piece, buf).await;
        let fetched = result.map_err(AttemptError::Transport)?;
        Ok((
            fetched,
            buf.expect("a fetch that succeeded gives its buffer back"),
        ))
    }

    /// A buffer for `piece` from the pool.
    async fn fresh_buffer(&self, piece: PieceRange) -> Result<PieceBuffer, AttemptError> {
        (self.engine.store.pool().acquire(piece.length).await)
            .map_err(|e| AttemptError::Store(StoreError::Pool(e)))
    }

    /// Fetches one piece into a pool buffer and checks it against the source's digest.
    async fn fetch_verified(&self, entry: &Entry) -> Result<VerifiedPiece, AttemptError> {
        let piece = self
            .task
            .geometry()
            .piece(entry.number)
            .expect("validated piece number");
        let mut buf = self.fresh_buffer(piece).await?;
        let fetch_started = Instant::now();
        if let Some(origin) = &self.origin {
            // No digest to hold the bytes to: the origin's length, range and version are
            // checked per response, and the whole content against its SHA-256 at the end.
            let crc32 = origin
                .fetch(piece, self.shared.geometry.content_length(), &mut buf)
                .await
                .map_err(AttemptError::Origin)?;
            self.engine.metrics.piece_received("origin", piece.length);
            return Ok(VerifiedPiece {
                piece,
                buf,
                crc32,
                transport: "origin",
                rails: Vec::new(),
                fell_back: false,
                fetch_time: fetch_started.elapsed(),
            });
        }
        let (fetched, buf, transport, fell_back) = self.fetch(piece, buf).await?;
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
            rails: fetched.rails,
            fell_back,
            fetch_time,
        })
    }

    /// Writes a verified piece to the store (durable and journaled when this returns Ok).
    async fn persist(
        &self,
        attempt: u32,
        verified: VerifiedPiece,
    ) -> Result<PieceOutcome, AttemptError> {
        let VerifiedPiece {
            piece,
            buf,
            crc32,
            transport,
            rails,
            fell_back,
            fetch_time,
        } = verified;
        let write_started = Instant::now();
        let (buf, written) = self
            .engine
            .store
            .write_piece(&self.task, piece, buf, crc32)
            .await;
        written.map_err(AttemptError::Store)?;
        if let (Some(buf), Some(hash)) = (buf, self.shared.hash.lock().expect("hash lock").as_ref())
        {
            hash.written(piece.number, buf);
        }
        let write_time = write_started.elapsed();
        self.engine
            .metrics
            .piece_fetched(transport, fetch_time, write_time);
        if self.origin.is_some() {
            self.engine.metrics.back_to_source(piece.length);
        }
        Ok(PieceOutcome {
            piece,
            digest: geometry::format_digest(crc32),
            source: self.source_name.clone(),
            transport,
            rails,
            fell_back,
            fetch_time,
            write_time,
            attempt,
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
                    state.count_transport(outcome.transport, &outcome.rails, outcome.piece.length);
                    state.rdma_fallbacks += u32::from(outcome.fell_back);
                    Some(outcome)
                }
                Err(AttemptError::Origin(err)) => {
                    // The origin already retried what was worth retrying: it is the last
                    // source, so the transfer stops with its error.
                    self.engine.metrics.piece_failed(PieceFailure::Transport);
                    tracing::error!(task_id = %self.task.id(), piece = entry.number, error = %err, "origin failed; stopping transfer");
                    state.totals[self.source_index].failures += 1;
                    state.fail(Failure::Origin(err));
                    self.shared.cancel.cancel();
                    None
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
                        AttemptError::Panicked(_) => PieceFailure::Internal,
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
                            state.mark_dead(self.source_index);
                            self.engine.tcp.forget(self.source);
                            if let Some(rdma) = &self.engine.rdma {
                                rdma.forget(self.source);
                            }
                        }
                    }
                    if let Some(attempts) = &self.shared.attempts {
                        let report = FailedAttempt {
                            piece: entry.number,
                            source: self.source_name.clone(),
                        };
                        if attempts.try_send(report).is_err() {
                            tracing::debug!(task_id = %self.task.id(), "failed-attempt report dropped: nobody reads them fast enough");
                        }
                    }
                    let panicked = matches!(err, AttemptError::Panicked(_));
                    entry.attempts += 1;
                    entry.tried |= 1 << self.source_index;
                    entry.last_error = err.to_string();
                    let all_dead = state.dead.iter().all(|d| *d);
                    if let (Some(origin), true) =
                        (state.origin, entry.attempts >= settings.max_attempts)
                    {
                        // The peers had their tries: the piece goes back to source.
                        entry.tried = !(1u64 << origin);
                        state.retries += 1;
                        self.engine.metrics.piece_retried();
                        state.queue.push_front(entry);
                    } else if entry.attempts >= settings.max_attempts || all_dead {
                        let why = if all_dead {
                            "every source failed"
                        } else {
                            "too many attempts"
                        };
                        let message = format!(
                            "piece {} failed after {} attempts ({why}); last error: {}",
                            entry.number, entry.attempts, entry.last_error
                        );
                        // A piece that panicked to the end is a bug of this daemon, not the
                        // sources' doing: INTERNAL, not UNAVAILABLE.
                        state.fail(if panicked {
                            Failure::Internal(message)
                        } else {
                            Failure::Exhausted(message)
                        });
                        self.shared.cancel.cancel();
                    } else {
                        state.retries += 1;
                        self.engine.metrics.piece_retried();
                        state.requeue(entry);
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
    rails: Vec<RailShare>,
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
    #[error("writing the piece panicked: {0}")]
    Panicked(String),
    #[error(transparent)]
    Origin(OriginError),
}
