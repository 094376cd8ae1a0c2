//! The receiving side's transport: sessions (queue pairs) to each source, made one at a time
//! and shared by fetches; per-source circuit breakers; the RDMA upgrade of a data connection.

use super::breaker::{Admission, Breaker, BreakerSettings, Transition};
use super::session::{FetchError, Session};
use super::{rdma_failure, RdmaSettings};
use crate::geometry::PieceRange;
use crate::io::PieceBuffer;
use crate::metrics::Metrics;
use crate::transport::{Fetched, PieceTransport, TransportError};
use ferry_rdma::wire::{self, Message};
use ferry_rdma::{Connection, ConnectionConfig, RdmaContext, RdmaError, RegisteredRegion};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

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
                let session = Session::start(
                    connection,
                    control.into_split(),
                    self.settings.window,
                    self.settings.io_timeout,
                    &self.metrics,
                );
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
