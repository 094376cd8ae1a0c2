//! The receiving side: RC queue pairs to sources, each shared by up to `window` fetches.

use super::breaker::{Admission, Breaker, BreakerSettings, Transition};
use super::{rdma_failure, RdmaSettings, WR_BIND, WR_FETCH, WR_INVALIDATE, WR_KIND};
use crate::geometry::PieceRange;
use crate::io::{DeviceLease, PieceBuffer};
use crate::metrics::{Metrics, RdmaSessionGuard};
use crate::transport::{Fetched, FetchedPiece, PieceTransport, TransportError};
use ferry_rdma::credit::{ReceiveWindow, SlotCredit};
use ferry_rdma::wire::{self, Message};
use ferry_rdma::{
    Connection, ConnectionConfig, MemoryWindow, RdmaContext, RdmaError, RegisteredRegion,
    WorkCounts,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

/// The source's answer to one request, as it came over the queue pair.
#[derive(Clone)]
enum Answer {
    Done {
        number: u32,
        length: u64,
        digest: String,
    },
    Failed {
        not_held: bool,
        message: String,
    },
}

/// A fetch's progress, as the completion pump sees it.
#[derive(Default)]
struct Pending {
    answer: Option<Answer>,
    /// The rkey the answer's SEND_WITH_INVALIDATE invalidated here.
    remote_invalidated: Option<u32>,
    /// The local invalidation of the windows the answer left bound completed.
    invalidated: bool,
    /// The request's SEND completed: the entries of its binds and itself are free again.
    sent: bool,
    /// The piece buffer's slots, lent to the device while its windows may be bound. Released
    /// by the fetch once they are invalidated; after a break, once a flush completion proved
    /// the queue pair in the error state; else when the session (queue pair first) is
    /// dropped. A buffer dropped before that waits in the pool's quarantine.
    lease: Option<DeviceLease>,
    /// A window bind was posted for this request.
    posted: bool,
    /// The rkeys of the windows the request granted, once its binds are posted.
    rkeys: Vec<u32>,
    /// The work-request sequence number the request's last post used.
    last_seq: u64,
    /// Once the answer's left-over windows are being invalidated here: whether none were left.
    invalidating: Option<bool>,
    /// The fetch was dropped before it took its windows back: the session does that for it.
    orphan: Option<Orphan>,
}

/// What a fetch dropped mid-flight (a cancelled transfer, a piece timeout) leaves to its
/// session: the windows it granted, which come back once the source's answer arrived and the
/// left-over ones are invalidated, so one transfer's cancellation does not stop a queue pair
/// other transfers' pieces are on.
struct Orphan {
    windows: Vec<MemoryWindow>,
    /// The request's send-queue reservation.
    entries: u32,
    since: Instant,
}

struct SessionState {
    window: ReceiveWindow,
    requests: HashMap<u16, Pending>,
    /// Unbound windows (every one here was invalidated, or never bound).
    spare_windows: Vec<MemoryWindow>,
    broken: Option<String>,
    /// After a break: a flush completion arrived, so the device no longer carries out
    /// anything for this queue pair.
    flushed: bool,
    next_wr: u64,
    /// When the last answer arrived (or the session was made): what request timeouts count
    /// from.
    last_answer: Instant,
    /// Send-queue entries the requests in flight may use at worst (binds, request,
    /// invalidations): a fetch starts only when its share fits, so no post finds the queue
    /// full.
    send_queue_reserved: u32,
    /// Requests whose fetch was dropped, still to be settled by the session.
    orphans: usize,
    /// The connection's work counts already added to the metrics.
    counted_work: WorkCounts,
    /// Counts the session in the metrics until it breaks.
    counted: Option<RdmaSessionGuard>,
}

/// One RC queue pair to a source, shared by up to `window` fetches at once. A completion pump
/// runs beside it and routes what arrives to the fetch it belongs to (by request id); a
/// watcher ends the session when the source closes the set-up connection. The session lives
/// until it breaks.
pub(super) struct Session {
    // The queue pair is dropped before the memory windows it may still have bound.
    connection: Connection,
    /// Kept open for the queue pair's life: closing it tells the source to end its side.
    _set_up: tokio::net::tcp::OwnedWriteHalf,
    state: Mutex<SessionState>,
    progress: tokio::sync::Notify,
    helpers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// How long a request may go unanswered while the queue pair answers nothing else.
    io_timeout: Duration,
}

/// The longest a broken session's pump waits for the flushes that release its buffers.
const FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// How often the pump looks at abandoned requests while no completion arrives (their
/// timeouts; completions settle them at once).
const ORPHAN_TICK: Duration = Duration::from_secs(1);

/// Work request ids carry the request id, so completions find their fetch.
fn wr_id(kind: u64, request: u16, seq: u64) -> u64 {
    kind | u64::from(request) << 32 | (seq & 0xffff_ffff)
}

fn wr_request(wr: u64) -> u16 {
    (wr >> 32) as u16
}

/// Why a fetch did not run on a session.
enum FetchError {
    /// Every request of the session's window is in flight: pick again once one returns.
    WindowFull,
    Transport(TransportError),
}

impl From<TransportError> for FetchError {
    fn from(err: TransportError) -> FetchError {
        FetchError::Transport(err)
    }
}

impl Session {
    fn in_flight(&self) -> usize {
        self.state.lock().expect("session lock").requests.len()
    }

    fn is_broken(&self) -> bool {
        self.state.lock().expect("session lock").broken.is_some()
    }

    /// Stops the queue pair at once (no write lands after this returns), fails every fetch,
    /// and ends the set-up watcher; the pump goes on a while to see the flushes that release
    /// the requests' buffers, then ends too. Their references are what keep the session alive.
    fn break_with(&self, reason: String) {
        let mut state = self.state.lock().expect("session lock");
        if state.broken.is_none() {
            tracing::debug!(%reason, "RDMA session broken");
            let _ = self.connection.fail();
            state.broken = Some(reason);
            state.counted = None;
        }
        drop(state);
        self.progress.notify_waiters();
        for helper in self.helpers.lock().expect("helpers lock").drain(..) {
            helper.abort();
        }
    }

    /// After a break: waits (at most `limit`) for a flush completion, the proof that the
    /// queue pair is in the error state, and releases every request's lease with it (a
    /// fetch still running finds its buffer its own again; an abandoned one's quarantined
    /// buffer goes back to the pool).
    async fn flush(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.state.lock().expect("session lock").flushed {
                return;
            }
            match tokio::time::timeout_at(deadline, self.connection.completions()).await {
                Ok(Ok(batch)) => self.note_flushed(&batch),
                Ok(Err(_)) | Err(_) => return,
            }
        }
    }

    /// After a break: a flush completion in `batch` proves the queue pair in the error state,
    /// and releases every request's lease.
    fn note_flushed(&self, batch: &[ferry_rdma::Completion]) {
        if !batch
            .iter()
            .any(|c| c.status == ferry_rdma::WcStatus::Flushed)
        {
            return;
        }
        let mut state = self.state.lock().expect("session lock");
        if state.broken.is_none() {
            return;
        }
        state.flushed = true;
        let mut released = 0;
        for pending in state.requests.values_mut() {
            released += u64::from(pending.lease.take().is_some());
        }
        drop(state);
        self.metrics.rdma_buffers_released_on_flush(false, released);
        self.progress.notify_waiters();
    }

    /// A fetch on a broken session: waits (at most `limit`) until the flush released its lease.
    async fn wait_flushed(&self, request: u16, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.progress.notified();
            {
                let state = self.state.lock().expect("session lock");
                let leased = state
                    .requests
                    .get(&request)
                    .is_some_and(|p| p.lease.is_some() && p.posted);
                if state.flushed || !leased {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// A verbs call that failed leaves the queue pair in an unknown state: break the session
    /// and fail the fetch with the call's error.
    fn or_break<T>(&self, result: Result<T, RdmaError>) -> Result<T, TransportError> {
        result.map_err(|err| {
            self.break_with(format!("rdma: {err}"));
            rdma_failure(err)
        })
    }

    /// Adds the work the connection did since the last call to the metrics.
    fn count_work(&self) {
        let now = self.connection.work_counts();
        let mut state = self.state.lock().expect("session lock");
        let before = std::mem::replace(&mut state.counted_work, now);
        drop(state);
        self.metrics.rdma_work(false, &before, &now);
    }

    /// Routes completions to fetches until the session ends.
    async fn pump(self: Arc<Self>) {
        loop {
            if self.is_broken() {
                // Broken elsewhere (a fetch's timeout, an abandoned fetch, a closed set-up
                // connection): the queue pair is in the error state and flushes.
                return self.flush(FLUSH_LIMIT).await;
            }
            // Completions are not lost when the wait times out: they stay on the queue.
            let batch = match tokio::time::timeout(ORPHAN_TICK, self.connection.completions()).await
            {
                Ok(Ok(batch)) => batch,
                Ok(Err(err)) => return self.break_with(format!("rdma: {err}")),
                Err(_) => {
                    self.settle_orphans();
                    continue;
                }
            };
            let failure = {
                let mut state = self.state.lock().expect("session lock");
                let mut failure = None;
                // The cause rather than its flushes: one CQ serves both queues, and the
                // receive queue's flushes may come before the failed request's completion.
                let first_error = batch
                    .iter()
                    .filter(|c| c.is_error())
                    .min_by_key(|c| c.status == ferry_rdma::WcStatus::Flushed);
                if let Some(completion) = first_error {
                    failure = Some(format!(
                        "rdma: work request {:#x} completed with {}",
                        completion.wr_id, completion.status
                    ));
                }
                for completion in batch.iter().take_while(|_| failure.is_none()) {
                    if let Some(frame) = &completion.message {
                        if let Err(reason) =
                            Self::on_answer(&mut state, frame, completion.invalidated_rkey)
                        {
                            failure = Some(reason);
                            break;
                        }
                    } else if let Some(pending) =
                        state.requests.get_mut(&wr_request(completion.wr_id))
                    {
                        match completion.wr_id & WR_KIND {
                            WR_INVALIDATE => pending.invalidated = true,
                            WR_FETCH => pending.sent = true,
                            _ => {}
                        }
                    }
                }
                failure
            };
            if let Some(reason) = failure {
                self.break_with(reason);
                // This batch may hold the flushes already.
                self.note_flushed(&batch);
                return self.flush(FLUSH_LIMIT).await;
            }
            self.settle_orphans();
            self.progress.notify_waiters();
        }
    }

    /// Takes over the windows of a fetch dropped before it took them back (see [`Orphan`]).
    fn adopt(&self, request: u16, entries: u32, windows: Vec<MemoryWindow>) {
        {
            let mut state = self.state.lock().expect("session lock");
            let flushed = state.flushed;
            let broken = state.broken.is_some();
            let Some(pending) = state.requests.get_mut(&request) else {
                return;
            };
            if broken {
                // The flush (or the session's drop, queue pair first) releases the lease; a
                // flush already seen, or windows never bound, release it now.
                if flushed || !pending.posted {
                    drop(pending.lease.take());
                }
                // Else the lease waits for the flush (or the session's drop, which releases
                // it after the queue pair is destroyed).
                return;
            }
            pending.orphan = Some(Orphan {
                windows,
                entries,
                since: Instant::now(),
            });
            state.orphans += 1;
        }
        self.settle_orphans();
    }

    /// Moves abandoned requests on: once a request is answered, invalidates the windows the
    /// answer left bound; once those invalidations (and the request's own send) completed,
    /// frees its request id, send-queue share, windows and buffer lease. A request the
    /// source leaves unanswered past the timeout breaks the session, as a fetch would.
    fn settle_orphans(&self) {
        let mut posts = Vec::new();
        let mut settled = 0;
        let failure = {
            let mut state = self.state.lock().expect("session lock");
            if state.orphans == 0 || state.broken.is_some() {
                return;
            }
            let now = Instant::now();
            let quiet_since = state.last_answer;
            let mut failure = None;
            let mut done = Vec::new();
            let mut invalidated = (0, 0);
            for (&request, pending) in &mut state.requests {
                let Some(orphan) = &pending.orphan else {
                    continue;
                };
                let overdue = now >= orphan.since.max(quiet_since) + self.io_timeout;
                if !pending.posted {
                    done.push(request);
                    continue;
                }
                if pending.invalidating.is_none() {
                    if pending.answer.is_none() {
                        if overdue {
                            failure = Some(format!(
                                "rdma: abandoned request {request} unanswered within {:?} (and no other answer on the queue pair meanwhile)",
                                self.io_timeout
                            ));
                            break;
                        }
                        continue;
                    }
                    let remote = pending.remote_invalidated;
                    if let Some(rkey) = remote.filter(|rkey| !pending.rkeys.contains(rkey)) {
                        failure = Some(format!(
                            "rdma: the source's answer to request {request} invalidated rkey {rkey:#x}, which that request did not grant"
                        ));
                        break;
                    }
                    let left: Vec<u32> = (pending.rkeys.iter().copied())
                        .filter(|&rkey| Some(rkey) != remote)
                        .collect();
                    for (index, &rkey) in left.iter().enumerate() {
                        pending.last_seq += 1;
                        let wr = wr_id(WR_INVALIDATE, request, pending.last_seq);
                        posts.push((wr, rkey, index + 1 == left.len()));
                    }
                    invalidated.0 += (pending.rkeys.len() - left.len()) as u64;
                    invalidated.1 += left.len() as u64;
                    pending.invalidating = Some(left.is_empty());
                }
                let none_left = pending.invalidating == Some(true);
                if pending.sent && (none_left || pending.invalidated) {
                    done.push(request);
                } else if overdue {
                    failure = Some(format!(
                        "rdma: abandoned request {request}'s windows not taken back within {:?}",
                        self.io_timeout
                    ));
                    break;
                }
            }
            if failure.is_none() {
                for request in done {
                    let orphan = (state.requests.get_mut(&request))
                        .and_then(|pending| pending.orphan.take())
                        .expect("an orphan");
                    state.orphans -= 1;
                    Self::finish(
                        &self.metrics,
                        &mut state,
                        request,
                        orphan.entries,
                        orphan.windows,
                        true,
                    );
                    settled += 1;
                }
                self.metrics
                    .rdma_windows_invalidated(invalidated.0, invalidated.1);
            }
            failure
        };
        if let Some(reason) = failure {
            return self.break_with(reason);
        }
        for (wr, rkey, signalled) in posts {
            if let Err(err) = self.connection.post_invalidate(wr, rkey, signalled) {
                return self.break_with(format!("rdma: {err}"));
            }
        }
        if settled > 0 {
            for _ in 0..settled {
                self.metrics.rdma_abandoned_settled();
            }
            self.count_work();
            self.progress.notify_waiters();
        }
    }

    /// Frees what a request held: its id, send-queue share, windows (spare again when
    /// `settled`: every one invalidated, or the session not broken) and its buffer's lease.
    /// Returns false when the lease is kept for good (no flush proved the device done).
    fn finish(
        metrics: &Metrics,
        state: &mut SessionState,
        request: u16,
        entries: u32,
        windows: Vec<MemoryWindow>,
        settled: bool,
    ) -> bool {
        let mut released = true;
        if let Some(pending) = state.requests.remove(&request) {
            match pending.lease {
                // Every window is invalidated, or none was ever bound.
                Some(lease) if settled || !pending.posted => drop(lease),
                // Broken, and no flush came to prove the device done.
                Some(lease) => {
                    lease.keep_forever();
                    metrics.rdma_buffers_never_released(false, 1);
                    released = false;
                }
                None => {}
            }
        }
        state.window.close(request);
        state.send_queue_reserved -= entries;
        if settled {
            state.spare_windows.extend(windows);
        }
        // Else, bound or not, these windows belong to a broken queue pair: dropped here.
        released
    }

    /// A message from the source: the answer to one request in flight, exactly once.
    fn on_answer(
        state: &mut SessionState,
        frame: &[u8],
        invalidated: Option<u32>,
    ) -> Result<(), String> {
        let (request, answer) = match Message::decode_frame(frame) {
            Ok(Message::Done {
                request,
                number,
                length,
                digest,
            }) => (
                request,
                Answer::Done {
                    number,
                    length,
                    digest,
                },
            ),
            Ok(Message::Failed {
                request,
                not_held,
                message,
            }) => (request, Answer::Failed { not_held, message }),
            Ok(other) => {
                return Err(format!(
                    "rdma: unexpected message {:#04x} from the source",
                    other.tag()
                ))
            }
            Err(err) => return Err(format!("rdma: garbled message from the source: {err}")),
        };
        state
            .window
            .on_done(request)
            .map_err(|e| format!("rdma: {e}"))?;
        let pending = state
            .requests
            .get_mut(&request)
            .ok_or_else(|| format!("rdma: an answer for request {request}, not in flight"))?;
        if pending.answer.is_some() {
            return Err(format!("rdma: request {request} was answered twice"));
        }
        pending.answer = Some(answer);
        pending.remote_invalidated = invalidated;
        state.last_answer = Instant::now();
        Ok(())
    }

    /// Ends the session when the source closes the set-up connection, or sends anything on
    /// it (nothing travels there after set-up).
    async fn watch_set_up(self: Arc<Self>, mut set_up: tokio::net::tcp::OwnedReadHalf) {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        let reason = match set_up.read(&mut byte).await {
            Ok(0) => "rdma: the source closed the connection".to_owned(),
            Ok(_) => "rdma: the source sent bytes on the set-up connection".to_owned(),
            Err(err) => format!("rdma: set-up connection: {err}"),
        };
        self.break_with(reason);
    }

    /// Waits until `ready` holds for `request`, or the session breaks, or `limit` passes with
    /// no progress: since the wait began and since the session's last answer, so a request
    /// queued behind many others on a busy queue pair is not timed out while they are served.
    async fn wait_for(
        &self,
        request: u16,
        limit: Duration,
        what: &str,
        ready: impl Fn(&Pending) -> bool,
    ) -> Result<(), TransportError> {
        let began = Instant::now();
        loop {
            let notified = self.progress.notified();
            let deadline = {
                let state = self.state.lock().expect("session lock");
                if let Some(reason) = &state.broken {
                    return Err(TransportError::Failed(reason.clone()));
                }
                let pending = state.requests.get(&request).expect("request in flight");
                if ready(pending) {
                    return Ok(());
                }
                began.max(state.last_answer) + limit
            };
            let now = Instant::now();
            if now >= deadline
                || tokio::time::timeout(deadline - now, notified)
                    .await
                    .is_err()
                    && Instant::now() >= deadline
            {
                return Err(TransportError::Failed(format!(
                    "rdma: {what} within {limit:?} (and no other answer on the queue pair meanwhile)"
                )));
            }
        }
    }

    /// Fetches `piece` into `buf`, which comes back only if no device can write it any more:
    /// `None` when the queue pair died and no flush completion proved that (the buffer then
    /// stays out of the pool for good).
    async fn fetch(
        &self,
        transport: &RdmaTransport,
        task_id: &str,
        piece: PieceRange,
        mut buf: PieceBuffer,
    ) -> (Option<PieceBuffer>, Result<FetchedPiece, FetchError>) {
        let mut device_may_hold = false;
        let result = self
            .fetch_into(transport, task_id, piece, &mut buf, &mut device_may_hold)
            .await;
        // A buffer whose lease is kept for good is quarantined when dropped.
        ((!device_may_hold).then_some(buf), result)
    }

    async fn fetch_into(
        &self,
        transport: &RdmaTransport,
        task_id: &str,
        piece: PieceRange,
        buf: &mut PieceBuffer,
        device_may_hold: &mut bool,
    ) -> Result<FetchedPiece, FetchError> {
        let runs = granted_runs(buf, piece.length);
        let slot_count = runs.len();
        // The worst case on the send queue: a bind and an invalidation per window, the request.
        let entries = 2 * slot_count as u32 + 1;
        // Reserve a request id and memory windows.
        let (request, windows, first_wr) = {
            let mut state = self.state.lock().expect("session lock");
            if let Some(reason) = &state.broken {
                return Err(TransportError::Failed(reason.clone()).into());
            }
            let depth = ferry_rdma::verbs::SEND_QUEUE_DEPTH;
            if entries > depth {
                return Err(TransportError::Failed(format!(
                    "rdma: a piece of {slot_count} windows needs {entries} send-queue entries, more than {depth}"
                ))
                .into());
            }
            if !state.window.has_room() || state.send_queue_reserved + entries > depth {
                return Err(FetchError::WindowFull);
            }
            let mut windows = Vec::with_capacity(slot_count);
            while windows.len() < slot_count {
                match state.spare_windows.pop() {
                    Some(window) => windows.push(window),
                    None => match transport.context.alloc_window() {
                        Ok(window) => windows.push(window),
                        Err(err) => {
                            // Nothing is reserved yet: the windows go back, no id is taken.
                            state.spare_windows.extend(windows);
                            return Err(rdma_failure(err).into());
                        }
                    },
                }
            }
            // Answers carry no chunk immediates: a request completes with its answer alone.
            let request = state.window.open(0).expect("the window has room");
            state.requests.insert(
                request,
                Pending {
                    // Before any bind: from here a dropped buffer waits for the device.
                    lease: Some(buf.lease_to_device()),
                    ..Pending::default()
                },
            );
            state.send_queue_reserved += entries;
            self.metrics.rdma_in_flight(false, state.requests.len());
            let first_wr = state.next_wr;
            state.next_wr += 2 * slot_count as u64 + 1;
            (request, windows, first_wr)
        };
        // Until the windows are taken back, a dropped fetch leaves them to the session.
        let mut guard = AbandonGuard {
            session: self,
            request,
            entries,
            windows: Some(windows),
        };
        let result = self
            .fetch_granted(
                transport,
                task_id,
                piece,
                buf,
                request,
                guard.windows.as_mut().expect("windows"),
                &runs,
                first_wr,
            )
            .await;
        let settled = !self.is_broken();
        if !settled {
            // The queue pair is in the error state; the buffer is the caller's again (a TCP
            // retry may fill it) only once its last request's flush proved the device done.
            self.wait_flushed(request, transport.settings.io_timeout)
                .await;
        }
        let windows = guard.windows.take().expect("windows");
        let mut state = self.state.lock().expect("session lock");
        let released = Self::finish(
            &self.metrics,
            &mut state,
            request,
            entries,
            windows,
            settled,
        );
        drop(state);
        *device_may_hold = !released;
        self.count_work();
        self.progress.notify_waiters();
        result.map_err(FetchError::Transport)
    }

    /// Grants the windows and asks for the piece, then takes every window back. Returns with
    /// every window invalidated, or with the session broken.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_granted(
        &self,
        transport: &RdmaTransport,
        task_id: &str,
        piece: PieceRange,
        buf: &mut PieceBuffer,
        request: u16,
        windows: &mut [MemoryWindow],
        runs: &[(usize, u32)],
        first_wr: u64,
    ) -> Result<FetchedPiece, TransportError> {
        let settings = &transport.settings;
        let mut credits = Vec::with_capacity(windows.len());
        let mut seq = first_wr;
        if let Some(pending) = self
            .state
            .lock()
            .expect("session lock")
            .requests
            .get_mut(&request)
        {
            pending.posted = true;
        }
        for (window, &(offset, len)) in windows.iter_mut().zip(runs) {
            let addr = buf.address_of(offset);
            seq += 1;
            // SAFETY: `buf` is borrowed mutably by this fetch, so nothing else uses its slots,
            // and they are leased to the device (`Pending::lease`) until the windows are known
            // invalidated or the queue pair flushed: a buffer dropped before that stays out of
            // the pool. The windows are invalidated before this function returns, or the queue
            // pair is moved to the error state (`AbandonGuard`, `break_with`).
            let rkey = self.or_break(unsafe {
                self.connection.post_bind(
                    wr_id(WR_BIND, request, seq),
                    window,
                    &transport.region,
                    addr,
                    u64::from(len),
                    false,
                )
            })?;
            credits.push(SlotCredit { addr, rkey, len });
        }
        // Right behind the binds on the send queue, which carries them out first.
        let fetch = Message::Fetch {
            request,
            task_id: task_id.to_owned(),
            number: piece.number,
            chunk_size: settings.chunk_size,
            credits: credits.clone(),
        };
        seq += 1;
        self.or_break(self.connection.post_message(
            wr_id(WR_FETCH, request, seq),
            &fetch.encode(),
            None,
        ))?;
        if let Some(pending) = (self.state.lock().expect("session lock"))
            .requests
            .get_mut(&request)
        {
            // What the session needs to take the windows back if this fetch is dropped.
            pending.rkeys = credits.iter().map(|c| c.rkey).collect();
            pending.last_seq = seq;
        }
        // The timeout runs from the request's posting or the queue pair's last answer, so
        // waiting behind other pieces on a busy queue pair does not count.
        let answered = self
            .wait_for(request, settings.io_timeout, "piece answered", |p| {
                p.answer.is_some()
            })
            .await;
        if let Err(err) = answered {
            // A silent source may still write: stop the queue pair before the buffer is free.
            self.break_with(err.to_string());
            return Err(err);
        }
        let (answer, remote_invalidated) = {
            let state = self.state.lock().expect("session lock");
            let pending = state.requests.get(&request).expect("in flight");
            (
                // Read, not taken: a fetch dropped before its invalidations are posted
                // leaves the answer to the session.
                pending.answer.as_ref().expect("answered").clone(),
                pending.remote_invalidated,
            )
        };
        // The credit returns. The device already invalidated the window the answer named; the
        // others are invalidated here, the last request signalled. A source that invalidated
        // a window it was not answering for (another fetch's) is not trusted further: taking
        // that window back again is an error (and crashes soft-RoCE in Linux 6.1).
        if let Some(rkey) = remote_invalidated {
            if !credits.iter().any(|c| c.rkey == rkey) {
                let reason = format!(
                    "rdma: the source's answer to request {request} invalidated rkey {rkey:#x}, which that request did not grant"
                );
                self.break_with(reason.clone());
                return Err(TransportError::Failed(reason));
            }
        }
        let left: Vec<u32> = credits
            .iter()
            .map(|c| c.rkey)
            .filter(|&rkey| Some(rkey) != remote_invalidated)
            .collect();
        if let Some(pending) = (self.state.lock().expect("session lock"))
            .requests
            .get_mut(&request)
        {
            // Posted from here on: a dropped fetch leaves the session only their completion
            // to wait for.
            pending.invalidating = Some(left.is_empty());
            pending.last_seq = seq + left.len() as u64;
        }
        for (index, &rkey) in left.iter().enumerate() {
            seq += 1;
            let last = index + 1 == left.len();
            self.or_break(self.connection.post_invalidate(
                wr_id(WR_INVALIDATE, request, seq),
                rkey,
                last,
            ))?;
        }
        // The request's own completion is due before the answer's in practice; waiting for it
        // too (and the invalidation's) frees every entry the request reserved.
        let left_none = left.is_empty();
        let taken_back = self
            .wait_for(
                request,
                settings.io_timeout,
                "memory windows invalidated",
                |p| p.sent && (left_none || p.invalidated),
            )
            .await;
        if let Err(err) = taken_back {
            self.break_with(err.to_string());
            return Err(err);
        }
        transport
            .metrics
            .rdma_windows_invalidated((credits.len() - left.len()) as u64, left.len() as u64);
        let digest = match answer {
            Answer::Failed { not_held, message } => {
                return Err(if not_held {
                    TransportError::NotHeld(message)
                } else {
                    TransportError::Failed(format!("rdma: source failed: {message}"))
                })
            }
            Answer::Done {
                number,
                length,
                digest,
            } => {
                if number != piece.number || length != piece.length {
                    return Err(TransportError::Failed(format!(
                        "rdma: source answered piece {number} of {length} bytes for piece {} of {}",
                        piece.number, piece.length
                    )));
                }
                digest
            }
        };
        // The digest pass over the bytes the NIC wrote (4 ms for 64 MiB) must not stall the
        // other tasks of this runtime worker (other sessions' completion pumps among them):
        // on a multi-thread runtime the worker hands them to the others while it hashes.
        let crc32 = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| buf.crc32())
            }
            _ => buf.crc32(),
        };
        Ok(FetchedPiece {
            advertised_digest: digest,
            crc32,
        })
    }
}

/// The ranges of `buf` a fetch grants, one memory window each: its slots merged into runs of
/// adjacent memory (the pool hands a piece one run whenever one is free, so one window and
/// one invalidation by the source's answer cover the whole piece), as (offset, length).
fn granted_runs(buf: &PieceBuffer, length: u64) -> Vec<(usize, u32)> {
    let slot_size = buf.slot_size() as u64;
    let mut runs: Vec<(usize, u32)> = Vec::new();
    for index in 0..length.div_ceil(slot_size).max(1) {
        let offset = index * slot_size;
        let len = slot_size.min(length - offset) as u32;
        match runs.last_mut() {
            Some((start, run))
                if buf.address_of(*start) + u64::from(*run) == buf.address_of(offset as usize)
                    && run.checked_add(len).is_some() =>
            {
                *run += len;
            }
            _ => runs.push((offset as usize, len)),
        }
    }
    runs
}

/// Holds a fetch's windows; a fetch dropped before it took them back (its windows still
/// here) hands them to the session, which takes them back once the source answered. The
/// buffer's lease keeps it out of the pool until then.
struct AbandonGuard<'a> {
    session: &'a Session,
    request: u16,
    entries: u32,
    windows: Option<Vec<MemoryWindow>>,
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if let Some(windows) = self.windows.take() {
            self.session.adopt(self.request, self.entries, windows);
        }
    }
}

/// The receiving side: fetches pieces from sources over RDMA.
pub struct RdmaTransport {
    pub(super) context: Arc<RdmaContext>,
    pub(super) region: Arc<RegisteredRegion>,
    pub(super) settings: RdmaSettings,
    pub(super) sessions: Mutex<HashMap<SocketAddr, Vec<Arc<Session>>>>,
    /// Per source, held while a session to it is being made.
    pub(super) connecting: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    /// Sources that refused the upgrade (no RDMA there): TCP only from now on.
    pub(super) tcp_only: Mutex<HashSet<SocketAddr>>,
    /// Per source, whether its RDMA path is trusted now (see [`super::breaker`]).
    pub(super) breakers: Breakers,
    pub(super) metrics: Arc<Metrics>,
}

/// The circuit breakers of every source, counting trips and probes into the metrics.
pub(super) struct Breakers {
    settings: BreakerSettings,
    by_source: Mutex<HashMap<SocketAddr, Breaker>>,
    metrics: Arc<Metrics>,
}

impl Breakers {
    pub(super) fn new(settings: BreakerSettings, metrics: &Arc<Metrics>) -> Breakers {
        Breakers {
            settings,
            by_source: Mutex::new(HashMap::new()),
            metrics: Arc::clone(metrics),
        }
    }

    fn would_admit(&self, source: SocketAddr, now: Instant) -> bool {
        self.by_source
            .lock()
            .expect("breakers lock")
            .get(&source)
            .is_none_or(|b| b.would_admit(now))
    }

    fn admit(&self, source: SocketAddr, now: Instant) -> Admission {
        let mut map = self.by_source.lock().expect("breakers lock");
        let admission = map
            .entry(source)
            .or_insert_with(|| Breaker::new(self.settings))
            .admit(now);
        if admission == Admission::Probe {
            tracing::info!(%source, "RDMA back-off over; probing the source's RDMA path with one piece");
            self.metrics.rdma_breaker_probed();
        }
        admission
    }

    /// Records one RDMA outcome; returns true when it opened the breaker.
    fn record(&self, source: SocketAddr, probe: bool, ok: bool, now: Instant) -> bool {
        let mut map = self.by_source.lock().expect("breakers lock");
        let breaker = map
            .entry(source)
            .or_insert_with(|| Breaker::new(self.settings));
        let transition = if ok {
            breaker.on_success(probe, now)
        } else {
            breaker.on_failure(probe, now)
        };
        match transition {
            Transition::Tripped { backoff, trip } => {
                tracing::warn!(%source, backoff_secs = backoff.as_secs(), consecutive_trips = trip, "RDMA to this source keeps failing; using TCP with it for a back-off");
                self.metrics.rdma_breaker_tripped();
                true
            }
            Transition::Closed => {
                tracing::info!(%source, "RDMA probe succeeded; the source's RDMA path is used again");
                false
            }
            Transition::None => false,
        }
    }
}

/// Reports a fetch's outcome to the breaker, once. A fetch dropped before it decided (a
/// cancelled transfer, a piece timeout) says nothing about the RDMA path and is not counted,
/// unless it was the probe, which must end as one or the other: then it counts as a failure.
/// A source that stays silent is found by the session's own timeouts.
struct Outcome<'a> {
    transport: &'a RdmaTransport,
    source: SocketAddr,
    probe: bool,
    reported: bool,
}

impl Outcome<'_> {
    fn report(&mut self, ok: bool) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        let tripped = self
            .transport
            .breakers
            .record(self.source, self.probe, ok, Instant::now());
        if tripped {
            // The next probe builds a fresh queue pair.
            self.transport
                .drop_sessions(self.source, "its RDMA circuit breaker opened");
        }
    }

    /// Not a failure of the RDMA path: the source answered cleanly that it does not hold the
    /// piece (which a probe takes as its queue pair working), or it turned out to have no RDMA.
    fn neutral(&mut self) {
        if self.probe {
            self.report(true);
        }
        self.reported = true;
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.report(false);
        }
    }
}

impl RdmaTransport {
    /// Whether pieces from `source` should go over RDMA now: it has RDMA, and its circuit
    /// breaker is closed or its back-off ran out (one probe).
    pub fn supports(&self, source: SocketAddr) -> bool {
        !self
            .tcp_only
            .lock()
            .expect("tcp_only lock")
            .contains(&source)
            && self.breakers.would_admit(source, Instant::now())
    }

    /// Drops the sessions to a source (after it failed).
    pub fn forget(&self, source: SocketAddr) {
        self.drop_sessions(source, "it was given up on");
    }

    fn drop_sessions(&self, source: SocketAddr, why: &str) {
        let dropped = self.sessions.lock().expect("sessions lock").remove(&source);
        for session in dropped.into_iter().flatten() {
            session.break_with(format!("rdma: source {source}: {why}"));
        }
    }

    /// The TCP connection of a new queue pair. With a RoCE v2 IPv4 GID it leaves from that
    /// GID's address, which the source checks against the GID this side sends.
    async fn dial(&self, source: SocketAddr) -> std::io::Result<TcpStream> {
        let selection = self.context.selection();
        match (selection.gid.ipv4(), source) {
            (Some(local), SocketAddr::V4(_))
                if selection.link_layer == ferry_rdma::LinkLayer::Ethernet =>
            {
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(local.into(), 0))?;
                socket.connect(source).await
            }
            _ => TcpStream::connect(source).await,
        }
    }

    /// A session with room for one more fetch: the least busy one, or a new one while the
    /// peer has fewer than `queue_pairs` sessions. Sessions to one source are made one at a
    /// time, so many fetches starting at once share `queue_pairs` queue pairs instead of each
    /// making its own.
    async fn session(&self, source: SocketAddr) -> Result<Arc<Session>, TransportError> {
        if let Some(session) = self.usable_session(source) {
            return Ok(session);
        }
        let connecting = Arc::clone(
            self.connecting
                .lock()
                .expect("connecting lock")
                .entry(source)
                .or_default(),
        );
        let _one_at_a_time = connecting.lock().await;
        if let Some(session) = self.usable_session(source) {
            return Ok(session);
        }
        let session = self.connect(source).await?;
        self.sessions
            .lock()
            .expect("sessions lock")
            .entry(source)
            .or_default()
            .push(Arc::clone(&session));
        Ok(session)
    }

    /// The least busy session to `source` when it is idle or no other may be made.
    fn usable_session(&self, source: SocketAddr) -> Option<Arc<Session>> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let list = sessions.entry(source).or_default();
        list.retain(|s| !s.is_broken());
        let best = list.iter().min_by_key(|s| s.in_flight()).cloned()?;
        (list.len() >= self.settings.queue_pairs || best.in_flight() == 0).then_some(best)
    }

    async fn connect(&self, source: SocketAddr) -> Result<Arc<Session>, TransportError> {
        let limit = self.settings.connect_timeout;
        let mut control = tokio::time::timeout(limit, self.dial(source))
            .await
            .map_err(|_| {
                TransportError::Unreachable(format!(
                    "connecting to {source} took longer than {limit:?}"
                ))
            })?
            .map_err(|e| TransportError::Unreachable(format!("connecting to {source}: {e}")))?;
        let _ = control.set_nodelay(true);
        let config = ConnectionConfig::default();
        let connection = Connection::new(&self.context, config).map_err(rdma_failure)?;
        let hello = Message::Connect {
            endpoint: connection.local_endpoint(),
        };
        wire::write_message(&mut control, &hello, self.settings.io_timeout)
            .await
            .map_err(rdma_failure)?;
        match wire::read_message(&mut control, self.settings.io_timeout).await {
            Ok(Message::Accept { endpoint }) => {
                ferry_rdma::address::check_peer_gid(&endpoint, source.ip())
                    .map_err(|e| rdma_failure(e.into()))?;
                connection.connect(&endpoint).map_err(rdma_failure)?;
                tracing::debug!(%source, qpn = endpoint.qp_number, "RDMA queue pair connected");
                let (read, write) = control.into_split();
                let session = Arc::new(Session {
                    connection,
                    _set_up: write,
                    state: Mutex::new(SessionState {
                        window: ReceiveWindow::new(self.settings.window),
                        requests: HashMap::new(),
                        spare_windows: Vec::new(),
                        broken: None,
                        flushed: false,
                        next_wr: 0,
                        last_answer: Instant::now(),
                        send_queue_reserved: 0,
                        orphans: 0,
                        counted_work: WorkCounts::default(),
                        counted: Some(self.metrics.rdma_session(false)),
                    }),
                    progress: tokio::sync::Notify::new(),
                    helpers: Mutex::new(Vec::new()),
                    metrics: Arc::clone(&self.metrics),
                    io_timeout: self.settings.io_timeout,
                });
                // The pump and the watcher hold the session until it breaks: `break_with`
                // aborts the watcher, and the pump ends once it has seen the flushes.
                tokio::spawn(Arc::clone(&session).pump());
                let watcher = tokio::spawn(Arc::clone(&session).watch_set_up(read));
                session.helpers.lock().expect("helpers lock").push(watcher);
                Ok(session)
            }
            Ok(Message::Refused { message }) => {
                tracing::info!(%source, reason = %message, "source has no RDMA; using TCP with it");
                self.tcp_only.lock().expect("tcp_only lock").insert(source);
                Err(TransportError::Unsupported(message))
            }
            Ok(Message::Failed { message, .. }) => Err(TransportError::Failed(format!(
                "rdma: source refused the queue pair: {message}"
            ))),
            Ok(other) => Err(TransportError::Failed(format!(
                "source answered the RDMA upgrade with {:#04x}",
                other.tag()
            ))),
            Err(RdmaError::Channel(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                // A stock Vortex peer (or a Ferry speaking another handshake version) hangs
                // up on the upgrade: treat it as no RDMA.
                tracing::info!(%source, error = %err, "source closed the RDMA upgrade; using TCP with it");
                self.tcp_only.lock().expect("tcp_only lock").insert(source);
                Err(TransportError::Unsupported(err.to_string()))
            }
            // Anything else (a timeout, a reset, a garbled answer) may pass: the circuit
            // breaker decides when to stop trying.
            Err(err) => Err(rdma_failure(err)),
        }
    }
}

#[async_trait::async_trait]
impl PieceTransport for RdmaTransport {
    fn name(&self) -> &'static str {
        "rdma"
    }

    async fn fetch(
        &self,
        source: SocketAddr,
        task_id: &str,
        piece: PieceRange,
        buf: PieceBuffer,
    ) -> Fetched {
        if self
            .tcp_only
            .lock()
            .expect("tcp_only lock")
            .contains(&source)
        {
            let refused = TransportError::Unsupported(format!("{source} has no RDMA"));
            return Fetched::with(buf, Err(refused));
        }
        let probe = match self.breakers.admit(source, Instant::now()) {
            Admission::Rdma => false,
            Admission::Probe => true,
            Admission::Tcp => {
                let refused = TransportError::Unsupported(format!(
                    "{source}: RDMA circuit breaker open (recent RDMA failures); TCP for now"
                ));
                return Fetched::with(buf, Err(refused));
            }
        };
        let mut outcome = Outcome {
            transport: self,
            source,
            probe,
            reported: false,
        };
        let fetched = self.fetch_admitted(source, task_id, piece, buf).await;
        match &fetched.result {
            Ok(_) => outcome.report(true),
            Err(TransportError::NotHeld(_) | TransportError::Unsupported(_)) => outcome.neutral(),
            Err(_) => outcome.report(false),
        }
        fetched
    }
}

impl RdmaTransport {
    async fn fetch_admitted(
        &self,
        source: SocketAddr,
        task_id: &str,
        piece: PieceRange,
        mut buf: PieceBuffer,
    ) -> Fetched {
        loop {
            let session = match self.session(source).await {
                Ok(session) => session,
                Err(err) => return Fetched::with(buf, Err(err)),
            };
            let progressed = session.progress.notified();
            let (back, result) = session.fetch(self, task_id, piece, buf).await;
            let result = match result {
                // Every session is full (more streams than window x queue pairs): wait for a
                // credit to return, then pick again. (No device touched the buffer.)
                Err(FetchError::WindowFull) => {
                    buf = back.expect("a fetch refused for a full window keeps no lease");
                    let _ = tokio::time::timeout(Duration::from_millis(100), progressed).await;
                    continue;
                }
                Err(FetchError::Transport(err)) => Err(err),
                Ok(fetched) => Ok(fetched),
            };
            return Fetched { buf: back, result };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::metrics::tests::sample;

    #[test]
    fn breakers_are_per_source_and_count_trips_and_probes() {
        let metrics = Arc::new(Metrics::new());
        let breakers = Breakers::new(BreakerSettings::default(), &metrics);
        let (bad, good): (SocketAddr, SocketAddr) = (
            "10.0.0.1:4100".parse().unwrap(),
            "10.0.0.2:4100".parse().unwrap(),
        );
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(breakers.admit(bad, t0), Admission::Rdma);
            let tripped = breakers.record(bad, false, false, t0 + Duration::from_secs(i));
            assert_eq!(tripped, i == 2, "the third failure trips it");
        }
        // Only the failing source is affected.
        assert!(!breakers.would_admit(bad, t0 + Duration::from_secs(3)));
        assert!(breakers.would_admit(good, t0 + Duration::from_secs(3)));
        assert_eq!(breakers.admit(good, t0), Admission::Rdma);
        let text = metrics.render();
        assert_eq!(sample(&text, "ferry_rdma_breaker_trips_total"), Some(1.0));
        assert_eq!(sample(&text, "ferry_rdma_breaker_probes_total"), Some(0.0));
        // 30 s after the trip: one probe; it fails, so 60 s more of TCP.
        let probe_at = t0 + Duration::from_secs(32);
        assert_eq!(breakers.admit(bad, probe_at), Admission::Probe);
        assert_eq!(breakers.admit(bad, probe_at), Admission::Tcp);
        assert!(breakers.record(bad, true, false, probe_at));
        assert!(!breakers.would_admit(bad, probe_at + Duration::from_secs(59)));
        let again = probe_at + Duration::from_secs(60);
        assert_eq!(breakers.admit(bad, again), Admission::Probe);
        assert!(
            !breakers.record(bad, true, true, again),
            "success closes it"
        );
        assert_eq!(breakers.admit(bad, again), Admission::Rdma);
        let text = metrics.render();
        assert_eq!(sample(&text, "ferry_rdma_breaker_trips_total"), Some(2.0));
        assert_eq!(sample(&text, "ferry_rdma_breaker_probes_total"), Some(2.0));
    }
}
