//! Prometheus metrics: the instruments the engine updates as pieces move, the values read from
//! other components at scrape time (the data-port server's counters, the buffer pool), and a
//! small HTTP endpoint, `GET /metrics`, that serves them in the OpenMetrics text format.
//!
//! The endpoint is built so that it cannot hurt the daemon: a bounded number of connections,
//! one request per connection, request heads capped at 8 KiB, and every connection (slow
//! client included) closed after a few seconds.

use crate::io::BufferPool;
use bytes::Bytes;
use ferry_fallback_tcp::ServerStats;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The content type of the OpenMetrics text format (Prometheus asks for it and parses it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapes served at once; more connections are closed unanswered.
const MAX_SCRAPERS: usize = 16;
/// The whole exchange on one connection, from accept to the last byte sent.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted (hyper's minimum buffer).
const MAX_REQUEST_HEAD: usize = 8 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportDirection {
    transport: &'static str,
    /// `in`: fetched by this daemon; `out`: served by it.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnnounceLabel {
    /// `host` (AnnounceHost) or `peer` (an AnnouncePeer registration).
    kind: &'static str,
    /// `ok` or `error`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

const RDMA_WORK_KINDS: [&str; 6] = [
    "send_requests",
    "signalled",
    "completions",
    "wakeups",
    "messages_sent",
    "messages_received",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RdmaWorkLabel {
    side: &'static str,
    /// send_requests, signalled, completions, wakeups, messages_sent, messages_received.
    work: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InvalidatedLabel {
    /// `peer`: by the source's SEND_WITH_INVALIDATE; `local`: by our own LOCAL_INV.
    by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabel {
    /// `serving`: peers fetching from us; `fetching`: our sessions to sources.
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RailDirection {
    /// The local rail, `DEVICE:PORT`.
    rail: String,
    /// `in`: fetched by this daemon; `out`: served by it.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RailLabel {
    rail: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Piece latency buckets: 1 ms doubling to about 33 s (16 buckets, then +Inf).
#[derive(Clone)]
struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.001, 2.0, 16))
    }
}

/// Why a piece attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceFailure {
    /// The source could not be reached, or the transfer broke, timed out or was refused.
    Transport,
    /// The bytes arrived but did not match the digest the source holds.
    Digest,
    /// Writing the piece to the local store failed.
    Store,
    /// The piece's task panicked (a bug): the attempt failed and the piece is retried.
    Internal,
}

impl PieceFailure {
    fn label(self) -> &'static str {
        match self {
            PieceFailure::Transport => "transport",
            PieceFailure::Digest => "digest",
            PieceFailure::Store => "store",
            PieceFailure::Internal => "internal",
        }
    }
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferResult {
    Completed,
    Failed,
    Cancelled,
}

/// Every metric of one daemon. Shared as `Arc<Metrics>`; recording is a few atomic adds.
pub struct Metrics {
    registry: Registry,
    transport_bytes: Family<TransportDirection, Counter>,
    pieces_fetched: Family<TransportLabel, Counter>,
    pieces_served: Family<TransportLabel, Counter>,
    piece_failures: Family<ReasonLabel, Counter>,
    piece_retries: Counter,
    rdma_fallbacks: Counter,
    rdma_breaker_trips: Counter,
    rdma_breaker_probes: Counter,
    rdma_abandoned_settled: Counter,
    piece_fetch_seconds: Family<TransportLabel, Histogram, LatencyBuckets>,
    piece_write_seconds: Family<TransportLabel, Histogram, LatencyBuckets>,
    transfers_active: Gauge,
    transfers: Family<ResultLabel, Counter>,
    rdma_sessions: Family<SideLabel, Gauge>,
    rdma_work: Family<RdmaWorkLabel, Counter>,
    rdma_peak_in_flight: Family<SideLabel, Gauge>,
    rdma_buffers_flushed: Family<SideLabel, Counter>,
    rdma_buffers_kept: Family<SideLabel, Counter>,
    rdma_windows_invalidated: Family<InvalidatedLabel, Counter>,
    rdma_rail_bytes: Family<RailDirection, Counter>,
    rdma_rail_pieces: Family<RailDirection, Counter>,
    rdma_rail_completion_errors: Family<RailLabel, Counter>,
    rdma_rail_piece_failures: Family<RailLabel, Counter>,
    rdma_rail_paused_pairs: Family<RailLabel, Gauge>,
    rdma_rail_pauses: Family<RailLabel, Counter>,
    rdma_rail_rejoins: Family<RailLabel, Counter>,
    rdma_pieces_reissued: Counter,
    rdma_buffers_moved_to_rail_node: Counter,
    rdma_pieces_striped: Counter,
    rdma_stripes: Counter,
    rdma_stripes_reissued: Counter,
    rdma_registered_bytes: Gauge,
    buffer_pool_bytes: Gauge,
    buffer_pool_free_bytes: Gauge,
    data_connections_open: Gauge,
    data_connections_accepted: Counter,
    data_connections_rejected: Counter,
    data_bad_frames: Counter,
    back_to_source_bytes: Counter,
    back_to_source_pieces: Counter,
    origin_retries: Counter,
    origin_failures: Family<ReasonLabel, Counter>,
    dragonfly_announces: Family<AnnounceLabel, Counter>,
    dragonfly_reschedules: Counter,
    dragonfly_back_to_source: Counter,
    dragonfly_pieces_reported: Counter,
    dragonfly_piece_failures_reported: Counter,
    /// Read at scrape time: the data-port server's own counters.
    server: OnceLock<Arc<ServerStats>>,
    /// Read at scrape time: free slots.
    pool: OnceLock<Arc<BufferPool>>,
    serve_reads: Counter,
    serve_direct_reads: Counter,
    serve_payload_copies: Counter,
    io_ring_rebuilds: Counter,
    io_quarantined_operations: Gauge,
    buffer_pool_device_owned_drops: Counter,
    /// Read at scrape time: the I/O engine's counters.
    io: OnceLock<Arc<crate::io::IoCounters>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The `side` label of RDMA series: "serving" (peers fetching from us) or "fetching".
fn side_label(serving: bool) -> &'static str {
    if serving {
        "serving"
    } else {
        "fetching"
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ferry");
        let metrics = Metrics {
            registry: Registry::default(),
            transport_bytes: Family::default(),
            pieces_fetched: Family::default(),
            pieces_served: Family::default(),
            piece_failures: Family::default(),
            piece_retries: Counter::default(),
            rdma_fallbacks: Counter::default(),
            rdma_breaker_trips: Counter::default(),
            rdma_breaker_probes: Counter::default(),
            rdma_abandoned_settled: Counter::default(),
            piece_fetch_seconds: Family::new_with_constructor(LatencyBuckets),
            piece_write_seconds: Family::new_with_constructor(LatencyBuckets),
            transfers_active: Gauge::default(),
            transfers: Family::default(),
            rdma_sessions: Family::default(),
            rdma_work: Family::default(),
            rdma_peak_in_flight: Family::default(),
            rdma_buffers_flushed: Family::default(),
            rdma_buffers_kept: Family::default(),
            rdma_windows_invalidated: Family::default(),
            rdma_rail_bytes: Family::default(),
            rdma_rail_pieces: Family::default(),
            rdma_rail_completion_errors: Family::default(),
            rdma_rail_piece_failures: Family::default(),
            rdma_rail_paused_pairs: Family::default(),
            rdma_rail_pauses: Family::default(),
            rdma_rail_rejoins: Family::default(),
            rdma_pieces_reissued: Counter::default(),
            rdma_buffers_moved_to_rail_node: Counter::default(),
            rdma_pieces_striped: Counter::default(),
            rdma_stripes: Counter::default(),
            rdma_stripes_reissued: Counter::default(),
            rdma_registered_bytes: Gauge::default(),
            buffer_pool_bytes: Gauge::default(),
            buffer_pool_free_bytes: Gauge::default(),
            data_connections_open: Gauge::default(),
            data_connections_accepted: Counter::default(),
            data_connections_rejected: Counter::default(),
            data_bad_frames: Counter::default(),
            back_to_source_bytes: Counter::default(),
            back_to_source_pieces: Counter::default(),
            origin_retries: Counter::default(),
            dragonfly_announces: Family::default(),
            dragonfly_reschedules: Counter::default(),
            dragonfly_back_to_source: Counter::default(),
            dragonfly_pieces_reported: Counter::default(),
            dragonfly_piece_failures_reported: Counter::default(),
            origin_failures: Family::default(),
            server: OnceLock::new(),
            pool: OnceLock::new(),
            serve_reads: Counter::default(),
            serve_direct_reads: Counter::default(),
            serve_payload_copies: Counter::default(),
            io_ring_rebuilds: Counter::default(),
            io_quarantined_operations: Gauge::default(),
            buffer_pool_device_owned_drops: Counter::default(),
            io: OnceLock::new(),
        };
        registry.register(
            "build",
            "Ferry's version (always 1)",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        registry.register_with_unit(
            "transport",
            "Piece content bytes moved, by transport and direction (in: fetched whole, verified or not; out: sent)",
            Unit::Bytes,
            metrics.transport_bytes.clone(),
        );
        registry.register(
            "pieces_fetched",
            "Pieces fetched, verified and durably written, by the transport that carried them",
            metrics.pieces_fetched.clone(),
        );
        registry.register(
            "pieces_served",
            "Pieces sent whole to peers, by transport",
            metrics.pieces_served.clone(),
        );
        registry.register(
            "piece_failures",
            "Failed piece attempts, by reason (transport, digest, store)",
            metrics.piece_failures.clone(),
        );
        registry.register(
            "piece_retries",
            "Failed piece attempts put back to be tried again",
            metrics.piece_retries.clone(),
        );
        registry.register(
            "rdma_fallbacks",
            "Pieces that failed over RDMA and were fetched again over TCP",
            metrics.rdma_fallbacks.clone(),
        );
        registry.register(
            "rdma_breaker_trips",
            "Times a source's RDMA circuit breaker opened (its pieces then go over TCP for a back-off)",
            metrics.rdma_breaker_trips.clone(),
        );
        registry.register(
            "rdma_breaker_probes",
            "Pieces sent over RDMA to a source whose back-off ended, to test its RDMA path again",
            metrics.rdma_breaker_probes.clone(),
        );
        registry.register_with_unit(
            "piece_fetch",
            "Time to fetch one piece into memory (successful fetches), by transport",
            Unit::Seconds,
            metrics.piece_fetch_seconds.clone(),
        );
        registry.register_with_unit(
            "piece_write",
            "Time to write and sync one verified piece to the store, by the transport that fetched it",
            Unit::Seconds,
            metrics.piece_write_seconds.clone(),
        );
        registry.register_with_unit(
            "back_to_source",
            "Piece bytes downloaded from origins (back to source), verified and durably written",
            Unit::Bytes,
            metrics.back_to_source_bytes.clone(),
        );
        registry.register(
            "back_to_source_pieces",
            "Pieces downloaded from origins (back to source), verified and durably written",
            metrics.back_to_source_pieces.clone(),
        );
        registry.register(
            "origin_retries",
            "Origin requests tried again after a transient failure (connect error, 5xx, 408, 429, stall, short body)",
            metrics.origin_retries.clone(),
        );
        registry.register(
            "origin_failures",
            "Origin requests that failed for good, by reason (connect, status, stall, length, no_ranges, changed, invalid)",
            metrics.origin_failures.clone(),
        );
        registry.register(
            "dragonfly_announces",
            "Calls to the Dragonfly scheduler, by kind (host: AnnounceHost; peer: an AnnouncePeer registration) and result (ok, error)",
            metrics.dragonfly_announces.clone(),
        );
        registry.register(
            "dragonfly_reschedules",
            "ReschedulePeerRequests sent to the Dragonfly scheduler (no candidate parent was usable)",
            metrics.dragonfly_reschedules.clone(),
        );
        registry.register(
            "dragonfly_back_to_source",
            "Scheduled pulls the Dragonfly scheduler sent back to source (NeedBackToSourceResponse, or reschedules spent)",
            metrics.dragonfly_back_to_source.clone(),
        );
        registry.register(
            "dragonfly_pieces_reported",
            "Pieces reported to the Dragonfly scheduler as downloaded (from a parent or back to source)",
            metrics.dragonfly_pieces_reported.clone(),
        );
        registry.register(
            "dragonfly_piece_failures_reported",
            "Failed piece attempts reported to the Dragonfly scheduler (DownloadPieceFailedRequest, naming the parent)",
            metrics.dragonfly_piece_failures_reported.clone(),
        );
        registry.register(
            "transfers_active",
            "Transfers running now",
            metrics.transfers_active.clone(),
        );
        registry.register(
            "transfers",
            "Transfers ended, by result (completed, failed, cancelled)",
            metrics.transfers.clone(),
        );
        registry.register(
            "rdma_sessions",
            "RDMA queue pairs up, by side (serving: peers fetching from us; fetching: ours to sources)",
            metrics.rdma_sessions.clone(),
        );
        registry.register(
            "rdma_work",
            "Verbs work on RDMA queue pairs, by side and kind: send_requests (posted), signalled (of those), completions (reaped), wakeups (completion-channel events), messages_sent/messages_received (control messages over the queue pair)",
            metrics.rdma_work.clone(),
        );
        registry.register(
            "rdma_peak_pieces_in_flight",
            "Most pieces in flight on one RDMA queue pair at once since start, by side (fetching: requests awaiting their answer; serving: pieces being read, waiting for the send queue, or on the wire)",
            metrics.rdma_peak_in_flight.clone(),
        );
        registry.register(
            "rdma_buffers_released_on_flush",
            "Piece buffers whose device claim a queue pair's flush completion released (the queue pair in the error state: the NIC is done with them), by side",
            metrics.rdma_buffers_flushed.clone(),
        );
        registry.register(
            "rdma_buffers_never_released",
            "Piece buffers kept out of the pool for good: their queue pair died and no flush completion came to prove the NIC done with them, by side",
            metrics.rdma_buffers_kept.clone(),
        );
        registry.register(
            "rdma_abandoned_fetches_settled",
            "Fetches dropped while their request was on an RDMA queue pair (a cancelled transfer, a piece timeout) whose memory windows the session took back once the source answered, keeping the queue pair up for the other fetches",
            metrics.rdma_abandoned_settled.clone(),
        );
        registry.register(
            "rdma_windows_invalidated",
            "Memory windows taken back after a fetch, by who invalidated them (peer: the source's SEND_WITH_INVALIDATE; local: a LOCAL_INV this side posted)",
            metrics.rdma_windows_invalidated.clone(),
        );
        registry.register_with_unit(
            "rdma_rail",
            "Piece bytes carried over RDMA, by local rail (DEVICE:PORT) and direction (in: fetched; out: served)",
            Unit::Bytes,
            metrics.rdma_rail_bytes.clone(),
        );
        registry.register(
            "rdma_rail_pieces",
            "Pieces carried over RDMA, by local rail and direction (each stripe of a piece striped over rail pairs counts on its rail)",
            metrics.rdma_rail_pieces.clone(),
        );
        registry.register(
            "rdma_rail_completion_errors",
            "Work completions with an error status other than a flush, by local rail (both sides)",
            metrics.rdma_rail_completion_errors.clone(),
        );
        registry.register(
            "rdma_rail_piece_failures",
            "Pieces whose fetch failed on a rail (its queue pair broke or could not be set up, or the source failed the piece), by local rail",
            metrics.rdma_rail_piece_failures.clone(),
        );
        registry.register(
            "rdma_rail_paused_pairs",
            "Rail pairs (this rail to one of a source's rails) taken out and paused now, by local rail: 0 means the rail carries pieces to every source it pairs with",
            metrics.rdma_rail_paused_pairs.clone(),
        );
        registry.register(
            "rdma_rail_pauses",
            "Times a rail pair was taken out and paused (a broken queue pair, a failed set-up, repeated piece failures, a failed probe), by local rail",
            metrics.rdma_rail_pauses.clone(),
        );
        registry.register(
            "rdma_rail_rejoins",
            "Times a paused rail pair carried its probe piece and rejoined, by local rail",
            metrics.rdma_rail_rejoins.clone(),
        );
        registry.register(
            "rdma_pieces_reissued",
            "Pieces whose RDMA fetch failed on one rail and were fetched again over RDMA (on another rail, or a new queue pair) instead of over TCP",
            metrics.rdma_pieces_reissued.clone(),
        );
        registry.register(
            "rdma_buffers_moved_to_rail_node",
            "Receive buffers exchanged for one in the pool part (NUMA node) of the rail picked to carry the piece (the pool is split by node; each part is registered only on its node's rails)",
            metrics.rdma_buffers_moved_to_rail_node.clone(),
        );
        registry.register(
            "rdma_pieces_striped",
            "Pieces fetched as stripes over several rail pairs at once (a byte range on each), rather than whole on one",
            metrics.rdma_pieces_striped.clone(),
        );
        registry.register(
            "rdma_stripes",
            "Stripes those pieces were fetched in (each one fetch, one request and one answer on its rail pair)",
            metrics.rdma_stripes.clone(),
        );
        registry.register(
            "rdma_stripes_reissued",
            "Stripes whose rail pair failed, fetched again on another pair while the piece's other stripes were kept",
            metrics.rdma_stripes_reissued.clone(),
        );
        registry.register_with_unit(
            "rdma_registered",
            "Memory registered with the RDMA devices, summed over rails: each rail registers the whole buffer pool, or only its NUMA node's part when the pool is split by node (0 without RDMA)",
            Unit::Bytes,
            metrics.rdma_registered_bytes.clone(),
        );
        registry.register_with_unit(
            "buffer_pool",
            "Size of the pinned buffer pool",
            Unit::Bytes,
            metrics.buffer_pool_bytes.clone(),
        );
        registry.register_with_unit(
            "buffer_pool_free",
            "Buffer pool bytes not holding a piece in flight",
            Unit::Bytes,
            metrics.buffer_pool_free_bytes.clone(),
        );
        registry.register(
            "serve_reads",
            "Pieces read from the store into the pool for serving (by the I/O engine)",
            metrics.serve_reads.clone(),
        );
        registry.register(
            "serve_direct_reads",
            "Of those, reads with O_DIRECT: the device wrote the pool slots, no CPU copied the payload",
            metrics.serve_direct_reads.clone(),
        );
        registry.register(
            "serve_payload_copies",
            "CPU copies of payload those reads cost (one per buffered read: the kernel's copy out of the page cache)",
            metrics.serve_payload_copies.clone(),
        );
        registry.register(
            "io_ring_rebuilds",
            "io_uring rings that failed (a submit error), were drained and replaced",
            metrics.io_ring_rebuilds.clone(),
        );
        registry.register(
            "io_quarantined_operations",
            "Operations of failed io_uring rings not completed within the drain deadline: their buffers stay out of the pool",
            metrics.io_quarantined_operations.clone(),
        );
        registry.register(
            "buffer_pool_device_owned_drops",
            "Buffers dropped while a device could still use them (a cancelled RDMA fetch whose memory windows were still granted, an abandoned I/O), kept out of the pool until a completion proved the device done",
            metrics.buffer_pool_device_owned_drops.clone(),
        );
        registry.register(
            "data_connections_open",
            "Connections open on the data port (an RDMA control channel counts while its queue pair is up)",
            metrics.data_connections_open.clone(),
        );
        registry.register(
            "data_connections_accepted",
            "Connections accepted on the data port",
            metrics.data_connections_accepted.clone(),
        );
        registry.register(
            "data_connections_rejected",
            "Connections refused on the data port because server.max_connections were open",
            metrics.data_connections_rejected.clone(),
        );
        registry.register(
            "data_bad_frames",
            "Data-port connections closed for a malformed, oversized or truncated frame",
            metrics.data_bad_frames.clone(),
        );
        // Every label value is there from the start, so no series appears out of nowhere.
        for transport in ["tcp", "rdma"] {
            for direction in ["in", "out"] {
                let _ = metrics.transport_bytes.get_or_create(&TransportDirection {
                    transport,
                    direction,
                });
            }
            let _ = metrics
                .pieces_fetched
                .get_or_create(&TransportLabel { transport });
            let _ = metrics
                .pieces_served
                .get_or_create(&TransportLabel { transport });
            let _ = metrics
                .piece_fetch_seconds
                .get_or_create(&TransportLabel { transport });
            let _ = metrics
                .piece_write_seconds
                .get_or_create(&TransportLabel { transport });
        }
        for reason in [
            PieceFailure::Transport,
            PieceFailure::Digest,
            PieceFailure::Store,
            PieceFailure::Internal,
        ] {
            let _ = metrics.piece_failures.get_or_create(&ReasonLabel {
                reason: reason.label(),
            });
        }
        for kind in ["host", "peer"] {
            for result in ["ok", "error"] {
                let _ = metrics
                    .dragonfly_announces
                    .get_or_create(&AnnounceLabel { kind, result });
            }
        }
        for result in ["completed", "failed", "cancelled"] {
            let _ = metrics.transfers.get_or_create(&ResultLabel { result });
        }
        for side in ["serving", "fetching"] {
            let _ = metrics.rdma_sessions.get_or_create(&SideLabel { side });
            let _ = metrics
                .rdma_peak_in_flight
                .get_or_create(&SideLabel { side });
            let _ = metrics
                .rdma_buffers_flushed
                .get_or_create(&SideLabel { side });
            let _ = metrics.rdma_buffers_kept.get_or_create(&SideLabel { side });
            for work in RDMA_WORK_KINDS {
                let _ = metrics
                    .rdma_work
                    .get_or_create(&RdmaWorkLabel { side, work });
            }
        }
        for by in ["peer", "local"] {
            let _ = metrics
                .rdma_windows_invalidated
                .get_or_create(&InvalidatedLabel { by });
        }
        Metrics {
            registry,
            ..metrics
        }
    }

    /// A call to the Dragonfly scheduler: `kind` is "host" or "peer".
    pub fn dragonfly_announced(&self, kind: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.dragonfly_announces
            .get_or_create(&AnnounceLabel { kind, result })
            .inc();
    }

    pub fn dragonfly_announces(&self, kind: &'static str, ok: bool) -> u64 {
        let result = if ok { "ok" } else { "error" };
        self.dragonfly_announces
            .get_or_create(&AnnounceLabel { kind, result })
            .get()
    }

    pub fn dragonfly_rescheduled(&self) {
        self.dragonfly_reschedules.inc();
    }

    pub fn dragonfly_sent_back_to_source(&self) {
        self.dragonfly_back_to_source.inc();
    }

    pub fn dragonfly_piece_reported(&self) {
        self.dragonfly_pieces_reported.inc();
    }

    pub fn dragonfly_piece_failure_reported(&self) {
        self.dragonfly_piece_failures_reported.inc();
    }

    /// Piece bytes this daemon has sent (`.0`) and received (`.1`) over every transport and
    /// from origins, since start: what its announced tx/rx rates are computed from.
    pub fn bytes_moved(&self) -> (u64, u64) {
        let get = |transport, direction| {
            self.transport_bytes
                .get_or_create(&TransportDirection {
                    transport,
                    direction,
                })
                .get()
        };
        let tcp_out = match self.server.get() {
            Some(server) => server.snapshot().content_bytes_sent,
            None => get("tcp", "out"),
        };
        let sent = tcp_out + get("rdma", "out");
        let received = get("tcp", "in") + get("rdma", "in") + self.back_to_source_bytes.get();
        (sent, received)
    }

    /// Reads the data-port server's counters at every scrape.
    pub fn observe_server(&self, stats: Arc<ServerStats>) {
        let _ = self.server.set(stats);
    }

    /// Reads the I/O engine's counters at every scrape.
    pub fn observe_io(&self, counters: Arc<crate::io::IoCounters>) {
        let _ = self.io.set(counters);
    }

    /// Reports the pool's size, and its free bytes at every scrape.
    pub fn observe_pool(&self, pool: Arc<BufferPool>) {
        self.buffer_pool_bytes.set(pool.total_bytes() as i64);
        let _ = self.pool.set(pool);
    }

    pub fn set_rdma_registered_bytes(&self, bytes: u64) {
        self.rdma_registered_bytes.set(bytes as i64);
    }

    /// A piece arrived whole over `transport` (before its digest is checked).
    pub fn piece_received(&self, transport: &'static str, bytes: u64) {
        self.transport_bytes
            .get_or_create(&TransportDirection {
                transport,
                direction: "in",
            })
            .inc_by(bytes);
    }

    /// A piece is verified and durable.
    pub fn piece_fetched(&self, transport: &'static str, fetch: Duration, write: Duration) {
        let label = TransportLabel { transport };
        self.pieces_fetched.get_or_create(&label).inc();
        self.piece_fetch_seconds
            .get_or_create(&label)
            .observe(fetch.as_secs_f64());
        self.piece_write_seconds
            .get_or_create(&label)
            .observe(write.as_secs_f64());
    }

    pub fn piece_failed(&self, why: PieceFailure) {
        self.piece_failures
            .get_or_create(&ReasonLabel {
                reason: why.label(),
            })
            .inc();
    }

    /// Failed piece attempts so far for one reason (what `ferry_piece_failures_total` shows).
    pub fn piece_failures(&self, why: PieceFailure) -> u64 {
        self.piece_failures
            .get_or_create(&ReasonLabel {
                reason: why.label(),
            })
            .get()
    }

    pub fn piece_retried(&self) {
        self.piece_retries.inc();
    }

    /// A piece from an origin is verified and durable.
    pub fn back_to_source(&self, bytes: u64) {
        self.back_to_source_bytes.inc_by(bytes);
        self.back_to_source_pieces.inc();
    }

    pub fn origin_retried(&self) {
        self.origin_retries.inc();
    }

    pub fn origin_failed(&self, reason: &'static str) {
        self.origin_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn rdma_fallback(&self) {
        self.rdma_fallbacks.inc();
    }

    pub fn rdma_breaker_tripped(&self) {
        self.rdma_breaker_trips.inc();
    }

    pub fn rdma_breaker_probed(&self) {
        self.rdma_breaker_probes.inc();
    }

    /// A piece was written whole to a peer over RDMA (the TCP side counts in the server).
    /// A piece, or one stripe of it, served over RDMA: its bytes count, and the piece counts
    /// once, with its `first` stripe (or as a whole).
    pub fn rdma_piece_served(&self, first: bool, bytes: u64) {
        self.transport_bytes
            .get_or_create(&TransportDirection {
                transport: "rdma",
                direction: "out",
            })
            .inc_by(bytes);
        if first {
            self.pieces_served
                .get_or_create(&TransportLabel { transport: "rdma" })
                .inc();
        }
    }

    /// Adds the verbs work a queue pair did between two readings of its counts.
    pub fn rdma_work(
        &self,
        serving: bool,
        before: &ferry_rdma::WorkCounts,
        now: &ferry_rdma::WorkCounts,
    ) {
        let side = side_label(serving);
        let deltas = [
            now.send_requests - before.send_requests,
            now.signalled - before.signalled,
            now.completions - before.completions,
            now.wakeups - before.wakeups,
            now.messages_sent - before.messages_sent,
            now.messages_received - before.messages_received,
        ];
        for (work, delta) in RDMA_WORK_KINDS.into_iter().zip(deltas) {
            self.rdma_work
                .get_or_create(&RdmaWorkLabel { side, work })
                .inc_by(delta);
        }
    }

    /// `count` buffers' device claims were released by a flush completion.
    pub fn rdma_buffers_released_on_flush(&self, serving: bool, count: u64) {
        let side = side_label(serving);
        (self.rdma_buffers_flushed)
            .get_or_create(&SideLabel { side })
            .inc_by(count);
    }

    /// `count` buffers stay out of the pool for good (no flush completion came).
    pub fn rdma_buffers_never_released(&self, serving: bool, count: u64) {
        let side = side_label(serving);
        (self.rdma_buffers_kept)
            .get_or_create(&SideLabel { side })
            .inc_by(count);
    }

    /// `count` abandoned fetches' windows were taken back without breaking their queue pair.
    pub fn rdma_abandoned_settled(&self, count: u64) {
        self.rdma_abandoned_settled.inc_by(count);
    }

    /// Raises the peak of pieces in flight on one queue pair to `in_flight` if it is higher.
    pub fn rdma_in_flight(&self, serving: bool, in_flight: usize) {
        let side = side_label(serving);
        let gauge = self.rdma_peak_in_flight.get_or_create(&SideLabel { side });
        gauge
            .inner()
            .fetch_max(in_flight as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Memory windows a fetch took back: `by_peer` invalidated by the source's message,
    /// `locally` by this side.
    pub fn rdma_windows_invalidated(&self, by_peer: u64, locally: u64) {
        self.rdma_windows_invalidated
            .get_or_create(&InvalidatedLabel { by: "peer" })
            .inc_by(by_peer);
        self.rdma_windows_invalidated
            .get_or_create(&InvalidatedLabel { by: "local" })
            .inc_by(locally);
    }

    /// Makes the series of a rail exist (at 0) from start-up, so a rail that never carries a
    /// piece still shows.
    pub fn rdma_rail_opened(&self, rail: &str) {
        let label = || RailLabel { rail: rail.into() };
        for direction in ["in", "out"] {
            let key = RailDirection {
                rail: rail.into(),
                direction,
            };
            let _ = self.rdma_rail_bytes.get_or_create(&key);
            let _ = self.rdma_rail_pieces.get_or_create(&key);
        }
        let _ = self.rdma_rail_completion_errors.get_or_create(&label());
        let _ = self.rdma_rail_piece_failures.get_or_create(&label());
        let _ = self.rdma_rail_paused_pairs.get_or_create(&label());
        let _ = self.rdma_rail_pauses.get_or_create(&label());
        let _ = self.rdma_rail_rejoins.get_or_create(&label());
    }

    /// A piece of `bytes` went over `rail`, fetched (`serving` false) or served.
    pub fn rdma_rail_piece(&self, rail: &str, serving: bool, bytes: u64) {
        let key = RailDirection {
            rail: rail.into(),
            direction: if serving { "out" } else { "in" },
        };
        self.rdma_rail_bytes.get_or_create(&key).inc_by(bytes);
        self.rdma_rail_pieces.get_or_create(&key).inc();
    }

    pub fn rdma_rail_completion_error(&self, rail: &str) {
        (self.rdma_rail_completion_errors)
            .get_or_create(&RailLabel { rail: rail.into() })
            .inc();
    }

    pub fn rdma_rail_piece_failed(&self, rail: &str) {
        (self.rdma_rail_piece_failures)
            .get_or_create(&RailLabel { rail: rail.into() })
            .inc();
    }

    /// A rail pair on `rail` was paused (`true`) or rejoined.
    pub fn rdma_rail_paused(&self, rail: &str, paused: bool) {
        let label = RailLabel { rail: rail.into() };
        let gauge = self.rdma_rail_paused_pairs.get_or_create(&label);
        if paused {
            gauge.inc();
            self.rdma_rail_pauses.get_or_create(&label).inc();
        } else {
            gauge.dec();
            self.rdma_rail_rejoins.get_or_create(&label).inc();
        }
    }

    /// Rail pairs on `rail` given up with their source (forgotten) while paused.
    pub fn rdma_rail_pairs_forgotten(&self, rail: &str, paused: i64) {
        (self.rdma_rail_paused_pairs)
            .get_or_create(&RailLabel { rail: rail.into() })
            .dec_by(paused);
    }

    pub fn rdma_piece_reissued(&self) {
        self.rdma_pieces_reissued.inc();
    }

    pub fn rdma_buffer_moved_to_rail_node(&self) {
        self.rdma_buffers_moved_to_rail_node.inc();
    }

    /// `stripes` stripes of a piece fetched again after their rail pairs failed.
    pub fn rdma_stripes_reissued(&self, stripes: usize) {
        self.rdma_stripes_reissued.inc_by(stripes as u64);
    }

    /// A piece fetched in `stripes` stripes over as many rail pairs.
    pub fn rdma_piece_striped(&self, stripes: usize) {
        self.rdma_pieces_striped.inc();
        self.rdma_stripes.inc_by(stripes as u64);
    }

    /// Counts an RDMA session as up until the returned guard is dropped.
    pub fn rdma_session(self: &Arc<Self>, serving: bool) -> RdmaSessionGuard {
        let side = side_label(serving);
        self.rdma_sessions.get_or_create(&SideLabel { side }).inc();
        RdmaSessionGuard {
            metrics: Arc::clone(self),
            side,
        }
    }

    /// Counts a transfer as active until the guard is finished or dropped (a dropped guard
    /// counts as cancelled: its caller went away).
    pub fn transfer_started(self: &Arc<Self>) -> TransferGuard {
        self.transfers_active.inc();
        TransferGuard {
            metrics: Arc::clone(self),
            result: None,
        }
    }

    /// The exposition, with the values read from other components refreshed first.
    pub fn render(&self) -> String {
        if let Some(server) = self.server.get() {
            let stats = server.snapshot();
            let set = |counter: &Counter, value: u64| {
                counter.inner().store(value, Ordering::Relaxed);
            };
            set(
                &self.transport_bytes.get_or_create(&TransportDirection {
                    transport: "tcp",
                    direction: "out",
                }),
                stats.content_bytes_sent,
            );
            set(
                &self
                    .pieces_served
                    .get_or_create(&TransportLabel { transport: "tcp" }),
                stats.pieces_served,
            );
            set(&self.data_connections_accepted, stats.connections_accepted);
            set(&self.data_connections_rejected, stats.connections_rejected);
            set(&self.data_bad_frames, stats.bad_frames);
            self.data_connections_open
                .set(stats.connections_open as i64);
        }
        if let Some(pool) = self.pool.get() {
            let free = pool.free_slots() * pool.info().slot_size;
            self.buffer_pool_free_bytes.set(free as i64);
            self.buffer_pool_device_owned_drops
                .inner()
                .store(pool.returned_while_device_owned(), Ordering::Relaxed);
        }
        if let Some(io) = self.io.get() {
            let get = crate::io::IoCounters::get;
            let set = |counter: &Counter, value: u64| {
                counter.inner().store(value, Ordering::Relaxed);
            };
            set(&self.serve_reads, get(&io.reads));
            set(&self.serve_direct_reads, get(&io.direct_reads));
            set(&self.serve_payload_copies, get(&io.read_payload_copies));
            set(&self.io_ring_rebuilds, get(&io.ring_rebuilds));
            self.io_quarantined_operations
                .set(get(&io.quarantined_ops) as i64);
        }
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Keeps one RDMA session counted.
pub struct RdmaSessionGuard {
    metrics: Arc<Metrics>,
    side: &'static str,
}

impl Drop for RdmaSessionGuard {
    fn drop(&mut self) {
        self.metrics
            .rdma_sessions
            .get_or_create(&SideLabel { side: self.side })
            .dec();
    }
}

/// Keeps one transfer counted as active.
pub struct TransferGuard {
    metrics: Arc<Metrics>,
    result: Option<TransferResult>,
}

impl TransferGuard {
    pub fn finish(mut self, result: TransferResult) {
        self.result = Some(result);
    }
}

impl Drop for TransferGuard {
    fn drop(&mut self) {
        let result = match self.result.unwrap_or(TransferResult::Cancelled) {
            TransferResult::Completed => "completed",
            TransferResult::Failed => "failed",
            TransferResult::Cancelled => "cancelled",
        };
        self.metrics.transfers_active.dec();
        self.metrics
            .transfers
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

/// What the endpoint answers to one request.
fn respond(metrics: &Metrics, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(text.as_bytes())))
            .expect("static response")
    };
    if path != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(metrics.render())))
        .expect("valid response")
}

/// Serves `GET /metrics` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(err) => {
                tracing::warn!(%err, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: too many scrapers at once; closing");
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<_>| {
                let response = respond(&metrics, request.method(), request.uri().path());
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(%peer, %err, "metrics connection failed"),
                Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The value of one sample line, `name{labels} value` (also for other modules' tests).
    pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().expect("a number"))
    }

    #[test]
    fn recorded_values_appear_under_their_names() {
        let metrics = Arc::new(Metrics::new());
        let fresh = metrics.render();
        assert!(fresh.ends_with("# EOF\n"), "{fresh}");
        assert_eq!(
            sample(&fresh, r#"ferry_build_info{version="0.1.0"}"#),
            Some(1.0)
        );
        for series in [
            r#"ferry_transport_bytes_total{transport="tcp",direction="in"}"#,
            r#"ferry_transport_bytes_total{transport="rdma",direction="out"}"#,
            r#"ferry_piece_failures_total{reason="digest"}"#,
            r#"ferry_transfers_total{result="completed"}"#,
            r#"ferry_rdma_sessions{side="fetching"}"#,
            "ferry_rdma_fallbacks_total",
            "ferry_rdma_breaker_trips_total",
            "ferry_rdma_breaker_probes_total",
            "ferry_rdma_abandoned_fetches_settled_total",
            r#"ferry_rdma_buffers_released_on_flush_total{side="serving"}"#,
            r#"ferry_rdma_buffers_never_released_total{side="fetching"}"#,
            "ferry_transfers_active",
            r#"ferry_piece_fetch_seconds_count{transport="rdma"}"#,
            r#"ferry_piece_write_seconds_count{transport="tcp"}"#,
        ] {
            assert_eq!(sample(&fresh, series), Some(0.0), "{series} in\n{fresh}");
        }

        metrics.piece_received("tcp", 4096);
        metrics.piece_received("tcp", 100);
        metrics.piece_fetched("tcp", Duration::from_millis(3), Duration::from_secs(100));
        metrics.piece_failed(PieceFailure::Digest);
        metrics.piece_retried();
        metrics.rdma_fallback();
        metrics.rdma_piece_served(true, 1 << 20);
        let session = metrics.rdma_session(true);
        let transfer = metrics.transfer_started();
        let text = metrics.render();
        assert_eq!(
            sample(
                &text,
                r#"ferry_transport_bytes_total{transport="tcp",direction="in"}"#
            ),
            Some(4196.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"ferry_transport_bytes_total{transport="rdma",direction="out"}"#
            ),
            Some(1048576.0)
        );
        assert_eq!(
            sample(&text, r#"ferry_pieces_served_total{transport="rdma"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"ferry_pieces_fetched_total{transport="tcp"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"ferry_piece_failures_total{reason="digest"}"#),
            Some(1.0)
        );
        assert_eq!(sample(&text, "ferry_piece_retries_total"), Some(1.0));
        assert_eq!(sample(&text, "ferry_rdma_fallbacks_total"), Some(1.0));
        assert_eq!(
            sample(&text, r#"ferry_rdma_sessions{side="serving"}"#),
            Some(1.0)
        );
        assert_eq!(sample(&text, "ferry_transfers_active"), Some(1.0));
        // 3 ms falls in the 4 ms bucket, not the 2 ms one; 100 s only in +Inf.
        let fetch = |le: &str| {
            sample(
                &text,
                &format!(r#"ferry_piece_fetch_seconds_bucket{{le="{le}",transport="tcp"}}"#),
            )
        };
        assert_eq!(fetch("0.002"), Some(0.0), "{text}");
        assert_eq!(fetch("0.004"), Some(1.0));
        assert_eq!(fetch("+Inf"), Some(1.0));
        let write = |le: &str| {
            sample(
                &text,
                &format!(r#"ferry_piece_write_seconds_bucket{{le="{le}",transport="tcp"}}"#),
            )
        };
        assert_eq!(write("32.768"), Some(0.0), "{text}");
        assert_eq!(write("+Inf"), Some(1.0));
        assert_eq!(
            sample(&text, r#"ferry_piece_write_seconds_sum{transport="tcp"}"#),
            Some(100.0)
        );

        drop(session);
        transfer.finish(TransferResult::Failed);
        drop(metrics.transfer_started());
        let text = metrics.render();
        assert_eq!(
            sample(&text, r#"ferry_rdma_sessions{side="serving"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&text, "ferry_transfers_active"), Some(0.0));
        assert_eq!(
            sample(&text, r#"ferry_transfers_total{result="failed"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"ferry_transfers_total{result="cancelled"}"#),
            Some(1.0),
            "a transfer whose guard was dropped unfinished counts as cancelled"
        );
    }

    #[test]
    fn server_stats_are_read_at_scrape_time() {
        let metrics = Metrics::new();
        let stats = Arc::new(ServerStats::default());
        metrics.observe_server(Arc::clone(&stats));
        // ServerStats is only counted by a running server; an idle one reads as zeros.
        let text = metrics.render();
        assert_eq!(
            sample(
                &text,
                r#"ferry_transport_bytes_total{transport="tcp",direction="out"}"#
            ),
            Some(0.0)
        );
        assert_eq!(sample(&text, "ferry_data_connections_open"), Some(0.0));
        assert_eq!(sample(&text, "ferry_data_bad_frames_total"), Some(0.0));
    }

    #[test]
    fn only_get_metrics_is_answered() {
        let metrics = Metrics::new();
        let ok = respond(&metrics, &Method::GET, "/metrics");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[hyper::header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(
            respond(&metrics, &Method::GET, "/").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&metrics, &Method::GET, "/metrics/x").status(),
            StatusCode::NOT_FOUND
        );
        let post = respond(&metrics, &Method::POST, "/metrics");
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[hyper::header::ALLOW], "GET, HEAD");
    }
}
