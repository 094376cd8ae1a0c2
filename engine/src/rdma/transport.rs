//! The receiving side's transport: the rail pairs to each source (learned in a set-up
//! exchange of rail lists, see [`super::rails`]), their queue pairs, made one at a time per
//! rail pair and shared by fetches; per-source circuit breakers; the RDMA upgrade of a data
//! connection.

use super::breaker::{Admission, Breaker, BreakerSettings, Transition};
use super::host::LocalRail;
use super::rails::{LaneCapacity, LaneOutcome, PeerRails, Pick};
use super::session::{FetchError, Session, Wanted};
use super::{rdma_failure, RdmaSettings};
use crate::geometry::PieceRange;
use crate::io::PieceBuffer;
use crate::metrics::Metrics;
use crate::transport::{Fetched, FetchedPiece, PieceTransport, RailShare, TransportError};
use ferry_rdma::rails::matching::{match_rails, RailAd};
use ferry_rdma::rails::wire::Features;
use ferry_rdma::wire::{self, Message};
use ferry_rdma::{Connection, ConnectionConfig, RdmaError};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

/// The receiving side: fetches pieces from sources over RDMA, on every rail pair it shares
/// with each.
pub struct RdmaTransport {
    /// This host's open rails (at least one).
    pub(super) rails: Vec<Arc<LocalRail>>,
    pub(super) settings: RdmaSettings,
    /// Per source, its rail pairs once the set-up exchange has told them.
    pub(super) peers: Mutex<HashMap<SocketAddr, Arc<PeerRails>>>,
    /// Per source, held while the rail lists are being exchanged with it.
    pub(super) exchanging: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    /// Sources that refused the upgrade (no RDMA there, or no rail in common): TCP only.
    pub(super) tcp_only: Mutex<HashSet<SocketAddr>>,
    /// Per source, whether its RDMA path as a whole is trusted now (see [`super::breaker`]).
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
    /// Whether pieces from `source` should go over RDMA now: it has RDMA, a rail pair to it
    /// is up (or due for its probe), and its circuit breaker is closed or its back-off ran out
    /// (one probe).
    pub fn supports(&self, source: SocketAddr) -> bool {
        let now = Instant::now();
        !self
            .tcp_only
            .lock()
            .expect("tcp_only lock")
            .contains(&source)
            && self.known_peer(source).is_none_or(|p| p.usable(now))
            && self.breakers.would_admit(source, now)
    }

    /// Drops the rail pairs and queue pairs to a source (after it failed): the next fetch
    /// exchanges rails with it afresh.
    pub fn forget(&self, source: SocketAddr) {
        let dropped = self.peers.lock().expect("peers lock").remove(&source);
        if let Some(peer) = dropped {
            peer.forget("it was given up on");
        }
    }

    /// Breaks the queue pairs to a source; its rail pairs stay known.
    fn drop_sessions(&self, source: SocketAddr, why: &str) {
        if let Some(peer) = self.known_peer(source) {
            peer.break_sessions(why);
        }
    }

    fn known_peer(&self, source: SocketAddr) -> Option<Arc<PeerRails>> {
        self.peers.lock().expect("peers lock").get(&source).cloned()
    }

    fn refuse_rdma(&self, source: SocketAddr) {
        self.tcp_only.lock().expect("tcp_only lock").insert(source);
    }

    /// A set-up TCP connection to `to`, from `rail` when given. On a RoCE rail with an IPv4
    /// GID it leaves from that GID's address, which the source checks against the GID this
    /// side sends. The rail exchange names no rail: it goes however the host routes to the
    /// source's data address (often a front-end network no rail is on).
    async fn dial(
        &self,
        rail: Option<&LocalRail>,
        to: SocketAddr,
    ) -> Result<TcpStream, TransportError> {
        let limit = self.settings.connect_timeout;
        let dial = async {
            match (rail.and_then(LocalRail::ipv4), to) {
                (Some(local), SocketAddr::V4(_)) => {
                    let socket = TcpSocket::new_v4()?;
                    socket.bind(SocketAddr::new(local.into(), 0))?;
                    socket.connect(to).await
                }
                _ => TcpStream::connect(to).await,
            }
        };
        let stream = tokio::time::timeout(limit, dial)
            .await
            .map_err(|_| {
                TransportError::Unreachable(format!(
                    "connecting to {to} took longer than {limit:?}"
                ))
            })?
            .map_err(|e| TransportError::Unreachable(format!("connecting to {to}: {e}")))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// The rail pairs to `source`: known, or learned now by exchanging rail lists with it
    /// (one exchange per source at a time).
    async fn peer(&self, source: SocketAddr) -> Result<Arc<PeerRails>, TransportError> {
        if let Some(peer) = self.known_peer(source) {
            return Ok(peer);
        }
        let exchanging = Arc::clone(
            self.exchanging
                .lock()
                .expect("exchanging lock")
                .entry(source)
                .or_default(),
        );
        let _one_at_a_time = exchanging.lock().await;
        if let Some(peer) = self.known_peer(source) {
            return Ok(peer);
        }
        let (remote, features) = self.exchange_rails(source).await?;
        let ours: Vec<RailAd> = self.rails.iter().map(|r| r.ad()).collect();
        let pairs = match_rails(&ours, &remote);
        let names = |ads: &[RailAd]| {
            ads.iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if pairs.is_empty() {
            let why = format!(
                "no rail of this host ({}) shares a fabric with a rail of {source} ({})",
                names(&ours),
                names(&remote)
            );
            tracing::info!(%source, reason = %why, "no rail pair to this source; using TCP with it");
            self.refuse_rdma(source);
            return Err(TransportError::Unsupported(why));
        }
        let peer = Arc::new(
            PeerRails::new(
                source,
                &self.rails,
                &remote,
                &pairs,
                self.settings.rail_health,
                LaneCapacity {
                    queue_pairs: self.settings.queue_pairs,
                    window: self.settings.window,
                },
                &self.metrics,
            )
            .serving_ranges(features.ranges),
        );
        let labels: Vec<String> = peer.lanes.iter().map(|l| l.label()).collect();
        tracing::info!(%source, rail_pairs = %labels.join(", "), serves_ranges = features.ranges, "RDMA rails matched with the source");
        self.peers
            .lock()
            .expect("peers lock")
            .insert(source, Arc::clone(&peer));
        Ok(peer)
    }

    /// Sends this host's rails to `source` and returns its own, and what it serves.
    async fn exchange_rails(
        &self,
        source: SocketAddr,
    ) -> Result<(Vec<RailAd>, Features), TransportError> {
        let io = self.settings.io_timeout;
        let mut control = self.dial(None, source).await?;
        let ours = Message::Rails {
            rails: self.rails.iter().map(|r| r.ad()).collect(),
            features: Features::ALL,
        };
        wire::write_message(&mut control, &ours, io)
            .await
            .map_err(rdma_failure)?;
        match wire::read_message(&mut control, io).await {
            Ok(Message::Rails { rails, features }) => Ok((rails, features)),
            Ok(Message::Refused { message }) => {
                tracing::info!(%source, reason = %message, "source has no RDMA; using TCP with it");
                self.refuse_rdma(source);
                Err(TransportError::Unsupported(message))
            }
            Ok(Message::Failed { message, .. }) => Err(TransportError::Failed(format!(
                "rdma: source refused the rail exchange: {message}"
            ))),
            Ok(other) => Err(TransportError::Failed(format!(
                "source answered the RDMA rail exchange with {:#04x}",
                other.tag()
            ))),
            Err(RdmaError::Channel(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                // A stock Vortex peer (or a Ferry speaking another handshake version) hangs
                // up on the upgrade: treat it as no RDMA.
                tracing::info!(%source, error = %err, "source closed the RDMA upgrade; using TCP with it");
                self.refuse_rdma(source);
                Err(TransportError::Unsupported(err.to_string()))
            }
            // Anything else (a timeout, a reset, a garbled answer) may pass: the circuit
            // breaker decides when to stop trying.
            Err(err) => Err(rdma_failure(err)),
        }
    }

    /// A queue pair on `lane` with room for one more fetch: the least busy one, or a new one
    /// while the lane has fewer than `queue_pairs`. Queue pairs on one lane are made one at a
    /// time, so many fetches starting at once share them instead of each making its own.
    async fn session(&self, peer: &PeerRails, lane: usize) -> Result<Arc<Session>, TransportError> {
        let queue_pairs = self.settings.queue_pairs;
        if let Some(session) = peer.usable_session(lane, queue_pairs) {
            return Ok(session);
        }
        let _one_at_a_time = peer.lanes[lane].connecting.lock().await;
        if let Some(session) = peer.usable_session(lane, queue_pairs) {
            return Ok(session);
        }
        if !peer.lane_open(lane, Instant::now()) {
            // Paused while this fetch waited for the one before it to set up.
            return Err(TransportError::Failed(format!(
                "rdma: rail pair {} was paused",
                peer.lanes[lane].label()
            )));
        }
        let session = self.connect(peer, lane).await?;
        peer.add_session(lane, &session);
        Ok(session)
    }

    /// Sets up one queue pair on `lane`: from the local rail's address to the source's rail
    /// address (RoCE with IPv4 GIDs; the source's data port listens on each of its rails), or
    /// to the source's data address (InfiniBand). Either side checks that the other's GID is
    /// the address its TCP connection uses, so a peer cannot point RDMA traffic elsewhere.
    async fn connect(&self, peer: &PeerRails, lane: usize) -> Result<Arc<Session>, TransportError> {
        let source = peer.source;
        let lane = &peer.lanes[lane];
        let target = match lane.remote.gid.to_ipv4_mapped() {
            Some(v4) if lane.remote.link_layer == ferry_rdma::LinkLayer::Ethernet => {
                SocketAddr::new(IpAddr::V4(v4), source.port())
            }
            _ => source,
        };
        let mut control = self.dial(Some(&lane.local), target).await?;
        let connection = Connection::new(&lane.local.context, ConnectionConfig::default())
            .map_err(rdma_failure)?;
        let hello = Message::ConnectRail {
            rail: lane.remote.index,
            endpoint: connection.local_endpoint(),
        };
        let io = self.settings.io_timeout;
        wire::write_message(&mut control, &hello, io)
            .await
            .map_err(rdma_failure)?;
        match wire::read_message(&mut control, io)
            .await
            .map_err(rdma_failure)?
        {
            Message::Accept { endpoint } => {
                if endpoint.gid != lane.remote.gid || endpoint.link_layer != lane.remote.link_layer
                {
                    return Err(TransportError::Failed(format!(
                        "rdma: {source} accepted on GID {} for its rail {} ({}), which it said has GID {}",
                        endpoint.gid, lane.remote.index, lane.remote.name, lane.remote.gid
                    )));
                }
                ferry_rdma::address::check_peer_gid(&endpoint, target.ip())
                    .map_err(|e| rdma_failure(e.into()))?;
                connection.connect(&endpoint).map_err(rdma_failure)?;
                tracing::debug!(%source, rail = %lane.label(), qpn = endpoint.qp_number, "RDMA queue pair connected");
                Ok(Session::start(
                    connection,
                    Arc::clone(&lane.local),
                    control.into_split(),
                    self.settings.window,
                    self.settings.io_timeout,
                    &self.metrics,
                ))
            }
            Message::Failed { message, .. } | Message::Refused { message } => Err(
                TransportError::Failed(format!("rdma: source refused the queue pair: {message}")),
            ),
            other => Err(TransportError::Failed(format!(
                "source answered the RDMA upgrade with {:#04x}",
                other.tag()
            ))),
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
            // A rail pair failed but another is up: the piece is re-issued there, and the
            // source's RDMA path as a whole has not failed.
            Err(_) if !probe && self.supports(source) => outcome.reported = true,
            Err(_) => outcome.report(false),
        }
        fetched
    }
}

/// What one fetch on one lane brought: the digest the source advertised, and the lane.
pub(super) struct Carried {
    pub(super) digest: String,
    pub(super) lane: usize,
}

impl RdmaTransport {
    async fn fetch_admitted(
        &self,
        source: SocketAddr,
        task_id: &str,
        piece: PieceRange,
        buf: PieceBuffer,
    ) -> Fetched {
        let peer = match self.peer(source).await {
            Ok(peer) => peer,
            Err(err) => return Fetched::with(buf, Err(err)),
        };
        if self.settings.stripe_pieces {
            // Stripes only over lanes whose rail reaches the buffer's pool part: every stripe
            // is a part of this one buffer.
            let at = buf.part();
            let unit = buf.slot_size() as u64;
            let stripes =
                peer.pick_stripes(piece.length, unit, Instant::now(), |l| l.local.reaches(at));
            if !stripes.is_empty() {
                return self
                    .fetch_striped(&peer, task_id, piece, buf, stripes)
                    .await;
            }
        }
        let (back, carried) = self
            .fetch_on_lanes(&peer, task_id, Wanted::whole(piece), buf, None)
            .await;
        let result = carried.map(|carried| {
            let share = RailShare {
                rail: peer.lanes[carried.lane].label(),
                bytes: piece.length,
            };
            (carried.digest, vec![share])
        });
        digested(back, result).await
    }

    /// Fetches `wanted` into `buf` over the lanes to `peer`: on `first` when given (a
    /// stripe's lane), else on the lane the balancer picks; again on another lane while every
    /// queue pair of the picked one is full. A whole piece whose buffer lies in another pool
    /// part than the picked rail's is moved to a buffer there, or goes on a rail that reaches
    /// it; a stripe, a part of a buffer shared with the other stripes, always does the latter.
    pub(super) async fn fetch_on_lanes(
        &self,
        peer: &PeerRails,
        task_id: &str,
        wanted: Wanted,
        mut buf: PieceBuffer,
        mut first: Option<Pick>,
    ) -> (Option<PieceBuffer>, Result<Carried, TransportError>) {
        let source = peer.source;
        let bytes = wanted.length();
        let stripe = wanted.range.is_some();
        loop {
            let pick = match first.take() {
                Some(pick) => pick,
                None if stripe => {
                    let at = buf.part();
                    match peer.pick_where(bytes, Instant::now(), |l| l.local.reaches(at)) {
                        Some(pick) => pick,
                        None => {
                            let paused = TransportError::Failed(format!(
                                "rdma: every rail pair to {source} that reaches the piece's buffer is paused"
                            ));
                            return (Some(buf), Err(paused));
                        }
                    }
                }
                None => {
                    let Some(pick) = peer.pick(bytes, Instant::now()) else {
                        let paused = TransportError::Failed(format!(
                            "rdma: every rail pair to {source} is paused"
                        ));
                        return (Some(buf), Err(paused));
                    };
                    // The pool is split by NUMA node and each rail registered on its node's
                    // part: the buffer must lie in the picked rail's part. Exchanged for one
                    // there if that part has one free; else the piece goes on a rail that
                    // reaches the buffer.
                    match peer.lanes[pick.lane].local.part {
                        Some(part) if part != buf.part() => match buf.sibling_in(part) {
                            Ok(Some(near)) => {
                                buf = near;
                                self.metrics.rdma_buffer_moved_to_rail_node();
                                pick
                            }
                            _ => {
                                peer.release(pick, Instant::now());
                                let at = buf.part();
                                let reaching =
                                    peer.pick_where(bytes, Instant::now(), |l| l.local.reaches(at));
                                match reaching {
                                    Some(pick) => pick,
                                    None => {
                                        // Neither: wait for buffers to come back (bounded by
                                        // the piece timeout), then pick again.
                                        tokio::time::sleep(Duration::from_millis(10)).await;
                                        continue;
                                    }
                                }
                            }
                        },
                        _ => pick,
                    }
                }
            };
            let lane = &peer.lanes[pick.lane];
            let session = match self.session(peer, pick.lane).await {
                Ok(session) => session,
                Err(err) => {
                    let outcome = match err {
                        TransportError::Unsupported(_) => LaneOutcome::Neutral,
                        _ => {
                            self.metrics.rdma_rail_piece_failed(&lane.local.name());
                            LaneOutcome::Failed { hard: true }
                        }
                    };
                    peer.finish(pick, outcome, Instant::now());
                    return (Some(buf), Err(err));
                }
            };
            let progressed = session.progress.notified();
            let (back, result) = session.fetch(self, task_id, wanted, buf).await;
            let now = Instant::now();
            let result = match result {
                // Every queue pair of the lane is full (more streams than window x queue
                // pairs): wait for a credit to return, then pick again. (No device touched
                // the buffer.)
                Err(FetchError::WindowFull) => {
                    peer.release(pick, now);
                    buf = back.expect("a fetch refused for a full window keeps no lease");
                    let _ = tokio::time::timeout(Duration::from_millis(100), progressed).await;
                    continue;
                }
                Ok(digest) => {
                    peer.finish(pick, LaneOutcome::Done, now);
                    self.metrics
                        .rdma_rail_piece(&lane.local.name(), false, bytes);
                    Ok(Carried {
                        digest,
                        lane: pick.lane,
                    })
                }
                Err(FetchError::Transport(err)) => {
                    let outcome = match err {
                        TransportError::NotHeld(_) | TransportError::Unsupported(_) => {
                            LaneOutcome::Neutral
                        }
                        _ => {
                            self.metrics.rdma_rail_piece_failed(&lane.local.name());
                            LaneOutcome::Failed {
                                hard: session.is_broken(),
                            }
                        }
                    };
                    peer.finish(pick, outcome, now);
                    Err(err)
                }
            };
            return (back, result);
        }
    }
}

/// The one digest pass over a fetched piece, over the bytes the NICs wrote (4 ms for 64 MiB),
/// on the blocking pool: no runtime worker (other sessions' tasks, sendfile) waits behind it.
pub(super) async fn digested(
    back: Option<PieceBuffer>,
    result: Result<(String, Vec<RailShare>), TransportError>,
) -> Fetched {
    let (buf, (advertised_digest, rails)) = match (back, result) {
        (Some(buf), Ok(carried)) => (buf, carried),
        (buf, Err(err)) => {
            return Fetched {
                buf,
                result: Err(err),
            }
        }
        (None, Ok(_)) => unreachable!("a fetch that succeeded gives its buffer back"),
    };
    let pass = tokio::task::spawn_blocking(move || {
        let crc32 = buf.crc32();
        (buf, crc32)
    })
    .await;
    match pass {
        Ok((buf, crc32)) => Fetched::with(
            buf,
            Ok(FetchedPiece {
                advertised_digest,
                crc32,
                rails,
            }),
        ),
        Err(err) => Fetched {
            buf: None,
            result: Err(TransportError::Failed(format!(
                "rdma: the digest pass failed: {err}"
            ))),
        },
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
