//! One RC queue pair to a source, shared by up to `window` fetches: the I/O shell of the
//! request machine in `requests.rs` (it posts what that decides and feeds it what arrives).

use super::host::LocalRail;
use super::requests::{Answer, Full, Requests, Step};
use super::transport::RdmaTransport;
use super::{rdma_failure, WR_BIND, WR_FETCH, WR_INVALIDATE, WR_KIND};
use crate::geometry::PieceRange;
use crate::io::{DeviceLease, PieceBuffer};
use crate::metrics::{Metrics, RdmaSessionGuard};
use crate::transport::TransportError;
use ferry_rdma::credit::SlotCredit;
use ferry_rdma::wire::{ByteRange, Message};
use ferry_rdma::{Connection, MemoryWindow, RdmaError, WorkCounts};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct SessionState {
    /// The requests in flight and their lifecycle (the pure part: `requests.rs`).
    requests: Requests<DeviceLease>,
    /// The windows of abandoned requests, until the requests are settled.
    abandoned_windows: HashMap<u16, Vec<MemoryWindow>>,
    /// Unbound windows (every one here was invalidated, or never bound).
    spare_windows: Vec<MemoryWindow>,
    broken: Option<String>,
    /// After a break: a flush completion arrived, so the device no longer carries out
    /// anything for this queue pair.
    flushed: bool,
    next_wr: u64,
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
    /// The local rail the queue pair is on (its device's windows, the pool's registration).
    rail: Arc<LocalRail>,
    /// Kept open for the queue pair's life: closing it tells the source to end its side.
    _set_up: tokio::net::tcp::OwnedWriteHalf,
    state: Mutex<SessionState>,
    pub(super) progress: tokio::sync::Notify,
    helpers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// How long a request may go unanswered while the queue pair answers nothing else.
    io_timeout: Duration,
}

/// The longest a broken session's pump waits for the flushes that release its buffers.
const FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// How often the pump looks at abandoned requests while no completion arrives (their
/// timeouts; completions settle them at once).
const ABANDONED_TICK: Duration = Duration::from_secs(1);

/// What one fetch asks a source for: a whole piece, or one stripe of it (a byte range, with
/// the other stripes on other rail pairs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Wanted {
    pub(super) piece: PieceRange,
    pub(super) range: Option<ByteRange>,
}

impl Wanted {
    pub(super) fn whole(piece: PieceRange) -> Wanted {
        Wanted { piece, range: None }
    }

    /// The bytes the fetch carries.
    pub(super) fn length(&self) -> u64 {
        self.range.map_or(self.piece.length, |r| r.length)
    }
}

/// Work request ids carry the request id, so completions find their fetch.
fn wr_id(kind: u64, request: u16, seq: u64) -> u64 {
    kind | u64::from(request) << 32 | (seq & 0xffff_ffff)
}

fn wr_request(wr: u64) -> u16 {
    (wr >> 32) as u16
}

/// Why a fetch did not run on a session.
pub(super) enum FetchError {
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
    /// A session on `connection` (connected) whose set-up TCP connection is `set_up`: the
    /// completion pump and the set-up watcher run beside it and hold it until it breaks
    /// (`break_with` aborts the watcher; the pump ends once it has seen the flushes).
    pub(super) fn start(
        connection: Connection,
        rail: Arc<LocalRail>,
        set_up: (
            tokio::net::tcp::OwnedReadHalf,
            tokio::net::tcp::OwnedWriteHalf,
        ),
        window: usize,
        io_timeout: Duration,
        metrics: &Arc<Metrics>,
    ) -> Arc<Session> {
        let (read, write) = set_up;
        let session = Arc::new(Session {
            connection,
            rail,
            _set_up: write,
            state: Mutex::new(SessionState {
                requests: Requests::new(
                    window,
                    ferry_rdma::verbs::SEND_QUEUE_DEPTH,
                    Instant::now(),
                ),
                abandoned_windows: HashMap::new(),
                spare_windows: Vec::new(),
                broken: None,
                flushed: false,
                next_wr: 0,
                counted_work: WorkCounts::default(),
                counted: Some(metrics.rdma_session(false)),
            }),
            progress: tokio::sync::Notify::new(),
            helpers: Mutex::new(Vec::new()),
            metrics: Arc::clone(metrics),
            io_timeout,
        });
        tokio::spawn(Arc::clone(&session).pump());
        let watcher = tokio::spawn(Arc::clone(&session).watch_set_up(read));
        session.helpers.lock().expect("helpers lock").push(watcher);
        session
    }

    pub(super) fn in_flight(&self) -> usize {
        self.state
            .lock()
            .expect("session lock")
            .requests
            .in_flight()
    }

    pub(super) fn is_broken(&self) -> bool {
        self.state.lock().expect("session lock").broken.is_some()
    }

    /// Stops the queue pair at once (no write lands after this returns), fails every fetch,
    /// and ends the set-up watcher; the pump goes on a while to see the flushes that release
    /// the requests' buffers, then ends too. Their references are what keep the session alive.
    pub(super) fn break_with(&self, reason: String) {
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
        let released = state.requests.release_leases() as u64;
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
                if state.flushed || !state.requests.holds_bound_lease(request) {
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
            let batch =
                match tokio::time::timeout(ABANDONED_TICK, self.connection.completions()).await {
                    Ok(Ok(batch)) => batch,
                    Ok(Err(err)) => return self.break_with(format!("rdma: {err}")),
                    Err(_) => {
                        self.settle_abandoned();
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
                    if completion.status != ferry_rdma::WcStatus::Flushed {
                        self.metrics.rdma_rail_completion_error(&self.rail.name());
                    }
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
                    } else {
                        let request = wr_request(completion.wr_id);
                        match completion.wr_id & WR_KIND {
                            WR_INVALIDATE => state.requests.on_invalidated(request),
                            WR_FETCH => state.requests.on_sent(request),
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
            self.settle_abandoned();
            self.progress.notify_waiters();
        }
    }

    /// Takes over the windows of a fetch dropped before it took them back: the session
    /// finishes its request once the source answered and the windows are invalidated.
    fn adopt(&self, request: u16, windows: Vec<MemoryWindow>) {
        {
            let mut state = self.state.lock().expect("session lock");
            if state.broken.is_some() {
                // The flush (or the session's drop, queue pair first) releases the lease; a
                // flush already seen, or windows never bound, release it now. These windows
                // belong to a broken queue pair: dropped here.
                if state.flushed || !state.requests.is_bound(request) {
                    drop(state.requests.release_lease(request));
                }
                return;
            }
            state.requests.abandon(request, Instant::now());
            state.abandoned_windows.insert(request, windows);
        }
        self.settle_abandoned();
    }

    /// Carries out what the request machine decides for abandoned requests: invalidations of
    /// the windows their answers left bound, then their end (windows spare, lease released).
    /// A source that leaves one unanswered past the timeout breaks the session.
    fn settle_abandoned(&self) {
        let mut posts = Vec::new();
        let mut settled = 0;
        let decided = {
            let mut state = self.state.lock().expect("session lock");
            if state.requests.abandoned() == 0 || state.broken.is_some() {
                return;
            }
            let decided = state
                .requests
                .poll_abandoned(Instant::now(), self.io_timeout);
            if let Ok(steps) = &decided {
                for step in steps {
                    match step {
                        Step::Invalidate { request, take_back } => {
                            for (index, &rkey) in take_back.left.iter().enumerate() {
                                state.next_wr += 1;
                                let wr = wr_id(WR_INVALIDATE, *request, state.next_wr);
                                posts.push((wr, rkey, index + 1 == take_back.left.len()));
                            }
                            self.metrics.rdma_windows_invalidated(
                                take_back.by_peer,
                                take_back.left.len() as u64,
                            );
                        }
                        &Step::Settled(request) => {
                            let windows =
                                (state.abandoned_windows.remove(&request)).unwrap_or_default();
                            Self::finish(&self.metrics, &mut state, request, windows, true);
                            settled += 1;
                        }
                    }
                }
            }
            decided
        };
        if let Err(violation) = decided {
            return self.break_with(format!("rdma: {violation}"));
        }
        for (wr, rkey, signalled) in posts {
            if let Err(err) = self.connection.post_invalidate(wr, rkey, signalled) {
                return self.break_with(format!("rdma: {err}"));
            }
        }
        if settled > 0 {
            self.metrics.rdma_abandoned_settled(settled);
            self.count_work();
            self.progress.notify_waiters();
        }
    }

    /// Ends a request: its id and send-queue share are free, its windows spare again when
    /// `settled` (every one invalidated, or the session not broken), and its buffer's lease
    /// released unless the device may still hold the buffer. Returns false when the lease is
    /// kept for good (broken, bound, and no flush proved the device done).
    fn finish(
        metrics: &Metrics,
        state: &mut SessionState,
        request: u16,
        windows: Vec<MemoryWindow>,
        settled: bool,
    ) -> bool {
        let bound = state.requests.is_bound(request);
        let mut released = true;
        match state.requests.finish(request) {
            Some(lease) if settled || !bound => drop(lease),
            Some(lease) => {
                lease.keep_forever();
                metrics.rdma_buffers_never_released(false, 1);
                released = false;
            }
            None => {}
        }
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
        (state.requests)
            .on_answer(request, answer, invalidated, Instant::now())
            .map_err(|violation| format!("rdma: {violation}"))
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

    /// Waits until `ready` holds, or the session breaks, or `limit` passes with
    /// no progress: since the wait began and since the session's last answer, so a request
    /// queued behind many others on a busy queue pair is not timed out while they are served.
    async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        ready: impl Fn(&Requests<DeviceLease>) -> bool,
    ) -> Result<(), TransportError> {
        let began = Instant::now();
        loop {
            let notified = self.progress.notified();
            let deadline = {
                let state = self.state.lock().expect("session lock");
                if let Some(reason) = &state.broken {
                    return Err(TransportError::Failed(reason.clone()));
                }
                if ready(&state.requests) {
                    return Ok(());
                }
                state.requests.deadline(began, limit)
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

    /// Fetches `wanted` into `buf` (a buffer of its length) and returns the digest the
    /// source advertised for the piece. The buffer comes back only if no device can write it
    /// any more: `None` when the queue pair died and no flush completion proved that (the
    /// buffer then stays out of the pool for good).
    pub(super) async fn fetch(
        &self,
        transport: &RdmaTransport,
        task_id: &str,
        wanted: Wanted,
        mut buf: PieceBuffer,
    ) -> (Option<PieceBuffer>, Result<String, FetchError>) {
        let mut device_may_hold = false;
        let result = self
            .fetch_into(transport, task_id, wanted, &mut buf, &mut device_may_hold)
            .await;
        // A buffer whose lease is kept for good is quarantined when dropped.
        let back = (result.is_ok() || !device_may_hold).then_some(buf);
        (back, result)
    }

    async fn fetch_into(
        &self,
        transport: &RdmaTransport,
        task_id: &str,
        wanted: Wanted,
        buf: &mut PieceBuffer,
        device_may_hold: &mut bool,
    ) -> Result<String, FetchError> {
        let runs = granted_runs(buf, wanted.length());
        let window_count = runs.len();
        // The worst case on the send queue: a bind and an invalidation per window, the request.
        let entries = 2 * window_count as u32 + 1;
        // Reserve a request id, its send-queue share and memory windows.
        let (request, windows, first_wr) = {
            let mut state = self.state.lock().expect("session lock");
            if let Some(reason) = &state.broken {
                return Err(TransportError::Failed(reason.clone()).into());
            }
            let depth = ferry_rdma::verbs::SEND_QUEUE_DEPTH;
            if entries > depth {
                return Err(TransportError::Failed(format!(
                    "rdma: a piece of {window_count} windows needs {entries} send-queue entries, more than {depth}"
                ))
                .into());
            }
            // The lease is taken before any bind: from here a dropped buffer waits for the
            // device.
            let request = match state.requests.open(entries, buf.lease_to_device()) {
                Ok(request) => request,
                Err(Full::Window | Full::SendQueue) => return Err(FetchError::WindowFull),
            };
            let mut windows = Vec::with_capacity(window_count);
            while windows.len() < window_count {
                match state.spare_windows.pop() {
                    Some(window) => windows.push(window),
                    None => match self.rail.context.alloc_window() {
                        Ok(window) => windows.push(window),
                        Err(err) => {
                            // Nothing is bound: the windows go back, the request ends.
                            state.spare_windows.extend(windows);
                            drop(state.requests.finish(request));
                            return Err(rdma_failure(err).into());
                        }
                    },
                }
            }
            self.metrics
                .rdma_in_flight(false, state.requests.in_flight());
            let first_wr = state.next_wr;
            state.next_wr += 2 * window_count as u64 + 1;
            (request, windows, first_wr)
        };
        // Until the windows are taken back, a dropped fetch leaves them to the session.
        let mut guard = AbandonGuard {
            session: self,
            request,
            windows: Some(windows),
        };
        let result = self
            .fetch_granted(
                transport,
                task_id,
                wanted,
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
        let released = Self::finish(&self.metrics, &mut state, request, windows, settled);
        drop(state);
        *device_may_hold = !released;
        self.count_work();
        self.progress.notify_waiters();
        result.map_err(FetchError::Transport)
    }

    /// Grants the windows and asks for the piece, then takes every window back. Returns the
    /// digest the source advertised, with every window invalidated, or fails with the
    /// session broken (or on a clean refusal, with the queue pair up).
    #[allow(clippy::too_many_arguments)]
    async fn fetch_granted(
        &self,
        transport: &RdmaTransport,
        task_id: &str,
        wanted: Wanted,
        buf: &mut PieceBuffer,
        request: u16,
        windows: &mut [MemoryWindow],
        runs: &[(usize, u32)],
        first_wr: u64,
    ) -> Result<String, TransportError> {
        let settings = &transport.settings;
        let mut credits = Vec::with_capacity(windows.len());
        let mut seq = first_wr;
        (self.state.lock().expect("session lock"))
            .requests
            .binding(request);
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
                    &self.rail.region,
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
            number: wanted.piece.number,
            chunk_size: settings.chunk_size,
            credits: credits.clone(),
            range: wanted.range,
        };
        seq += 1;
        self.or_break(self.connection.post_message(
            wr_id(WR_FETCH, request, seq),
            &fetch.encode(),
            None,
        ))?;
        // What the session needs to take the windows back if this fetch is dropped.
        (self.state.lock().expect("session lock"))
            .requests
            .granted(request, credits.iter().map(|c| c.rkey).collect());
        // The timeout runs from the request's posting or the queue pair's last answer, so
        // waiting behind other pieces on a busy queue pair does not count.
        let answered = self
            .wait_for(settings.io_timeout, "piece answered", |r| {
                r.answer(request).is_some()
            })
            .await;
        if let Err(err) = answered {
            // A silent source may still write: stop the queue pair before the buffer is free.
            self.break_with(err.to_string());
            return Err(err);
        }
        // The credit returns. The device already invalidated the window the answer named; the
        // others are invalidated here, the last one signalled. A source that invalidated a
        // window it was not answering for (another fetch's) is not trusted further: taking that
        // window back again is an error (and crashes soft-RoCE in Linux 6.1). Decided under the
        // lock, so a fetch dropped after this leaves the session only the completions to wait
        // for.
        let (answer, take_back) = {
            let mut state = self.state.lock().expect("session lock");
            let answer = state.requests.answer(request).expect("answered").clone();
            (answer, state.requests.take_back(request))
        };
        let take_back = match take_back {
            Ok(take_back) => take_back,
            Err(violation) => {
                let reason = format!("rdma: {violation}");
                self.break_with(reason.clone());
                return Err(TransportError::Failed(reason));
            }
        };
        for (index, &rkey) in take_back.left.iter().enumerate() {
            seq += 1;
            let last = index + 1 == take_back.left.len();
            self.or_break(self.connection.post_invalidate(
                wr_id(WR_INVALIDATE, request, seq),
                rkey,
                last,
            ))?;
        }
        // The request's own completion is due before the answer's in practice; waiting for it
        // too (and the invalidation's) frees every entry the request reserved.
        let taken_back = self
            .wait_for(settings.io_timeout, "memory windows invalidated", |r| {
                r.taken_back(request)
            })
            .await;
        if let Err(err) = taken_back {
            self.break_with(err.to_string());
            return Err(err);
        }
        (transport.metrics)
            .rdma_windows_invalidated(take_back.by_peer, take_back.left.len() as u64);
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
                if number != wanted.piece.number || length != wanted.length() {
                    return Err(TransportError::Failed(format!(
                        "rdma: source answered piece {number} with {length} bytes for piece {} ({} bytes wanted)",
                        wanted.piece.number,
                        wanted.length()
                    )));
                }
                digest
            }
        };
        Ok(digest)
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
    windows: Option<Vec<MemoryWindow>>,
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if let Some(windows) = self.windows.take() {
            self.session.adopt(self.request, windows);
        }
    }
}
