//! The receiving side: RC queue pairs to sources, each shared by up to `window` fetches.

use super::breaker::{Admission, Breaker, BreakerSettings, Transition};
use super::{rdma_failure, RdmaSettings, WR_BIND, WR_INVALIDATE, WR_KIND, WR_RECEIVE};
use crate::geometry::PieceRange;
use crate::io::PieceBuffer;
use crate::metrics::{Metrics, RdmaSessionGuard};
use crate::transport::{FetchedPiece, PieceTransport, TransportError};
use ferry_rdma::credit::{self, Progress, ReceiveWindow, SlotCredit};
use ferry_rdma::wire::{self, Message};
use ferry_rdma::{
    Connection, ConnectionConfig, MemoryWindow, RdmaContext, RdmaError, RegisteredRegion,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

/// A fetch's progress, as the completion pump and the control reader see it.
#[derive(Default)]
struct Pending {
    binds: usize,
    invalidates: usize,
    /// Every chunk arrived and the source said Done.
    complete: bool,
    digest: Option<String>,
    /// The source answered Failed: (not held, message).
    failed: Option<(bool, String)>,
}

struct SessionState {
    window: ReceiveWindow,
    requests: HashMap<u16, Pending>,
    spare_windows: Vec<MemoryWindow>,
    broken: Option<String>,
    next_wr: u64,
    /// Counts the session in the metrics until it breaks.
    counted: Option<RdmaSessionGuard>,
}

/// One RC queue pair to a source with its control channel, shared by up to `window` fetches
/// at once. A completion pump and a control reader run beside it and route what arrives to
/// the fetch it belongs to (by request id); the session lives until it breaks.
pub(super) struct Session {
    // The queue pair is dropped before the memory windows it may still have bound.
    connection: Connection,
    control: tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    state: Mutex<SessionState>,
    progress: tokio::sync::Notify,
    helpers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Work request ids carry the request id, so completions find their fetch.
fn wr_id(kind: u64, request: u16, seq: u64) -> u64 {
    kind | u64::from(request) << 32 | (seq & 0xffff_ffff)
}

fn wr_request(wr: u64) -> u16 {
    (wr >> 32) as u16
}

impl Session {
    fn in_flight(&self) -> usize {
        self.state.lock().expect("session lock").requests.len()
    }

    fn is_broken(&self) -> bool {
        self.state.lock().expect("session lock").broken.is_some()
    }

    /// Stops the queue pair at once (no write lands after this returns), fails every fetch,
    /// and ends the helper tasks, whose references are what keep the session alive.
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

    /// Routes completions to fetches until the session ends.
    async fn pump(self: Arc<Self>) {
        loop {
            let batch = match self.connection.completions().await {
                Ok(batch) => batch,
                Err(err) => return self.break_with(format!("rdma: {err}")),
            };
            let mut state = self.state.lock().expect("session lock");
            for completion in batch {
                if let Some(status) = &completion.error {
                    drop(state);
                    return self.break_with(format!(
                        "rdma: work request {:#x} completed with {status}",
                        completion.wr_id
                    ));
                }
                let kind = completion.wr_id & WR_KIND;
                if kind == WR_RECEIVE {
                    let Some(immediate) = completion.immediate else {
                        continue;
                    };
                    let progress = state.window.on_immediate(immediate);
                    match progress {
                        Ok(Progress::Complete(request)) => {
                            if let Some(p) = state.requests.get_mut(&request) {
                                p.complete = true;
                            }
                        }
                        Ok(Progress::Pending) => {}
                        Err(err) => {
                            drop(state);
                            return self.break_with(format!("rdma: {err}"));
                        }
                    }
                } else if let Some(pending) = state.requests.get_mut(&wr_request(completion.wr_id))
                {
                    match kind {
                        WR_BIND => pending.binds = pending.binds.saturating_sub(1),
                        WR_INVALIDATE => {
                            pending.invalidates = pending.invalidates.saturating_sub(1)
                        }
                        _ => {}
                    }
                }
            }
            drop(state);
            self.progress.notify_waiters();
        }
    }

    /// Routes the source's Done and Failed answers to fetches until the session ends.
    async fn read_answers(self: Arc<Self>, mut control: tokio::net::tcp::OwnedReadHalf) {
        loop {
            // Idle sessions wait here; a fetch bounds its own waits.
            let message =
                match wire::read_message(&mut control, Duration::from_secs(24 * 3600)).await {
                    Ok(message) => message,
                    Err(err) => return self.break_with(format!("rdma control channel: {err}")),
                };
            let mut state = self.state.lock().expect("session lock");
            match message {
                Message::Done {
                    request, digest, ..
                } => {
                    let progress = state.window.on_done(request);
                    match progress {
                        Ok(progress) => {
                            if let Some(p) = state.requests.get_mut(&request) {
                                p.digest = Some(digest);
                                p.complete |= progress == Progress::Complete(request);
                            }
                        }
                        Err(err) => {
                            drop(state);
                            return self.break_with(format!("rdma: {err}"));
                        }
                    }
                }
                Message::Failed {
                    request,
                    not_held,
                    message,
                } => {
                    if let Some(p) = state.requests.get_mut(&request) {
                        p.failed = Some((not_held, message));
                    }
                }
                other => {
                    drop(state);
                    return self.break_with(format!(
                        "rdma: unexpected control message {:#04x}",
                        other.tag()
                    ));
                }
            }
            drop(state);
            self.progress.notify_waiters();
        }
    }

    /// Waits (at most `limit`) until `ready` holds for `request`, or the session breaks.
    async fn wait_for(
        &self,
        request: u16,
        limit: Duration,
        what: &str,
        ready: impl Fn(&Pending) -> bool,
    ) -> Result<(), TransportError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.progress.notified();
            {
                let state = self.state.lock().expect("session lock");
                if let Some(reason) = &state.broken {
                    return Err(TransportError::Failed(reason.clone()));
                }
                let pending = state.requests.get(&request).expect("request in flight");
                if let Some((not_held, message)) = &pending.failed {
                    return Err(if *not_held {
                        TransportError::NotHeld(message.clone())
                    } else {
                        TransportError::Failed(format!("rdma: source failed: {message}"))
                    });
                }
                if ready(pending) {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(TransportError::Failed(format!(
                    "rdma: {what} within {limit:?}"
                )));
            }
        }
    }

    async fn fetch(
        &self,
        transport: &RdmaTransport,
        task_id: &str,
        piece: PieceRange,
        buf: &mut PieceBuffer,
    ) -> Result<FetchedPiece, TransportError> {
        let settings = &transport.settings;
        let slot_size = buf.slot_size() as u64;
        let slot_count = piece.length.div_ceil(slot_size).max(1) as usize;
        let lens: Vec<u32> = (0..slot_count)
            .map(|i| slot_size.min(piece.length - i as u64 * slot_size) as u32)
            .collect();
        let chunks = credit::chunk_count(piece.length, settings.chunk_size, &lens);
        // Reserve a request id and memory windows.
        let (request, windows, first_wr) = {
            let mut state = self.state.lock().expect("session lock");
            if let Some(reason) = &state.broken {
                return Err(TransportError::Failed(reason.clone()));
            }
            let request = state
                .window
                .open(chunks)
                .map_err(|e| TransportError::Failed(format!("rdma: {e}")))?;
            let mut windows = Vec::with_capacity(slot_count);
            while windows.len() < slot_count {
                match state.spare_windows.pop() {
                    Some(window) => windows.push(window),
                    None => windows.push(transport.context.alloc_window().map_err(rdma_failure)?),
                }
            }
            state.requests.insert(
                request,
                Pending {
                    binds: slot_count,
                    invalidates: slot_count,
                    ..Default::default()
                },
            );
            let first_wr = state.next_wr;
            state.next_wr += 2 * slot_count as u64 + chunks;
            (request, windows, first_wr)
        };
        // Until the windows are invalidated, abandoning this fetch must stop the queue pair.
        let mut guard = AbandonGuard {
            session: self,
            armed: true,
        };
        let result = self
            .fetch_granted(
                transport, task_id, piece, buf, request, &windows, &lens, chunks, first_wr,
            )
            .await;
        if result.is_ok() {
            guard.armed = false;
        }
        drop(guard);
        let mut state = self.state.lock().expect("session lock");
        state.requests.remove(&request);
        state.window.close(request);
        if result.is_ok() {
            state.spare_windows.extend(windows);
        } else {
            // Bound or not, these windows belong to a broken queue pair now.
            drop(windows);
        }
        drop(state);
        self.progress.notify_waiters();
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_granted(
        &self,
        transport: &RdmaTransport,
        task_id: &str,
        piece: PieceRange,
        buf: &mut PieceBuffer,
        request: u16,
        windows: &[MemoryWindow],
        lens: &[u32],
        chunks: u64,
        first_wr: u64,
    ) -> Result<FetchedPiece, TransportError> {
        let settings = &transport.settings;
        let slot_size = buf.slot_size() as u64;
        let mut credits = Vec::with_capacity(windows.len());
        for (index, (window, &len)) in windows.iter().zip(lens).enumerate() {
            let addr = buf.address_of((index as u64 * slot_size) as usize);
            let rkey = self
                .connection
                .post_bind(
                    wr_id(WR_BIND, request, first_wr + index as u64),
                    window,
                    &transport.region,
                    addr,
                    u64::from(len),
                )
                .map_err(rdma_failure)?;
            credits.push(SlotCredit { addr, rkey, len });
        }
        self.wait_for(request, settings.io_timeout, "memory windows bound", |p| {
            p.binds == 0
        })
        .await?;
        self.connection
            .post_receives(
                wr_id(WR_RECEIVE, request, first_wr + windows.len() as u64),
                chunks as u32,
            )
            .map_err(rdma_failure)?;
        let fetch = Message::Fetch {
            request,
            task_id: task_id.to_owned(),
            number: piece.number,
            chunk_size: settings.chunk_size,
            credits: credits.clone(),
        };
        wire::write_message(&mut *self.control.lock().await, &fetch, settings.io_timeout)
            .await
            .map_err(rdma_failure)?;
        // The source answers Done only once every write was acknowledged; the pump counts the
        // immediates against the credit window (strays and duplicates break the session).
        self.wait_for(request, settings.io_timeout, "piece completed", |p| {
            p.complete
        })
        .await?;
        let digest = self
            .state
            .lock()
            .expect("session lock")
            .requests
            .get(&request)
            .and_then(|p| p.digest.clone())
            .expect("complete means done");
        // The credit returns: invalidate every window before the buffer goes anywhere.
        for (index, credit) in credits.iter().enumerate() {
            let wr = wr_id(
                WR_INVALIDATE,
                request,
                first_wr + (windows.len() + index) as u64 + chunks,
            );
            self.connection
                .post_invalidate(wr, credit.rkey)
                .map_err(rdma_failure)?;
        }
        self.wait_for(
            request,
            settings.io_timeout,
            "memory windows invalidated",
            |p| p.invalidates == 0,
        )
        .await?;
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

/// Breaks the session if a fetch ends (or is dropped) with its windows possibly still bound,
/// so no late write can land in a buffer that is about to be reused.
struct AbandonGuard<'a> {
    session: &'a Session,
    armed: bool,
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.session
                .break_with("rdma: a fetch was abandoned with its memory windows bound".into());
        }
    }
}

/// The receiving side: fetches pieces from sources over RDMA.
pub struct RdmaTransport {
    pub(super) context: Arc<RdmaContext>,
    pub(super) region: Arc<RegisteredRegion>,
    pub(super) settings: RdmaSettings,
    pub(super) sessions: Mutex<HashMap<SocketAddr, Vec<Arc<Session>>>>,
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

/// Reports a fetch's outcome to the breaker, once; a fetch dropped before it decided (a piece
/// timeout, a cancelled transfer) counts as a failure.
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
        self.report(false);
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
    /// peer has fewer than `queue_pairs` sessions.
    async fn session(&self, source: SocketAddr) -> Result<Arc<Session>, TransportError> {
        {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            let list = sessions.entry(source).or_default();
            list.retain(|s| !s.is_broken());
            let best = list.iter().min_by_key(|s| s.in_flight()).cloned();
            match best {
                Some(session)
                    if list.len() >= self.settings.queue_pairs || session.in_flight() == 0 =>
                {
                    return Ok(session)
                }
                _ => {}
            }
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
        let config = ConnectionConfig {
            receive_depth: ferry_rdma::verbs::RECEIVER_RECEIVE_DEPTH,
            ..ConnectionConfig::default()
        };
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
                    control: tokio::sync::Mutex::new(write),
                    state: Mutex::new(SessionState {
                        window: ReceiveWindow::new(self.settings.window),
                        requests: HashMap::new(),
                        spare_windows: Vec::new(),
                        broken: None,
                        next_wr: 0,
                        counted: Some(self.metrics.rdma_session(false)),
                    }),
                    progress: tokio::sync::Notify::new(),
                    helpers: Mutex::new(Vec::new()),
                });
                // The helpers hold the session until it breaks (`break_with` aborts them).
                let pump = tokio::spawn(Arc::clone(&session).pump());
                let reader = tokio::spawn(Arc::clone(&session).read_answers(read));
                session
                    .helpers
                    .lock()
                    .expect("helpers lock")
                    .extend([pump, reader]);
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
        buf: &mut PieceBuffer,
    ) -> Result<FetchedPiece, TransportError> {
        if self
            .tcp_only
            .lock()
            .expect("tcp_only lock")
            .contains(&source)
        {
            return Err(TransportError::Unsupported(format!("{source} has no RDMA")));
        }
        let probe = match self.breakers.admit(source, Instant::now()) {
            Admission::Rdma => false,
            Admission::Probe => true,
            Admission::Tcp => {
                return Err(TransportError::Unsupported(format!(
                    "{source}: RDMA circuit breaker open (recent RDMA failures); TCP for now"
                )))
            }
        };
        let mut outcome = Outcome {
            transport: self,
            source,
            probe,
            reported: false,
        };
        let result = self.fetch_admitted(source, task_id, piece, buf).await;
        match &result {
            Ok(_) => outcome.report(true),
            Err(TransportError::NotHeld(_) | TransportError::Unsupported(_)) => outcome.neutral(),
            Err(_) => outcome.report(false),
        }
        result
    }
}

impl RdmaTransport {
    async fn fetch_admitted(
        &self,
        source: SocketAddr,
        task_id: &str,
        piece: PieceRange,
        buf: &mut PieceBuffer,
    ) -> Result<FetchedPiece, TransportError> {
        loop {
            let session = self.session(source).await?;
            let progressed = session.progress.notified();
            match session.fetch(self, task_id, piece, buf).await {
                // Every session is full (more streams than window x queue pairs): wait for a
                // credit to return, then pick again.
                Err(TransportError::Failed(message)) if message.contains("window full") => {
                    let _ = tokio::time::timeout(Duration::from_millis(100), progressed).await;
                }
                result => return result,
            }
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
