//! Ferry's RDMA side in the engine: the host's devices ([`host`]), the receiving sessions
//! ([`session`]) and the serving side ([`serve`]).

pub mod breaker;
mod host;
mod rails;
mod requests;
mod serve;
mod served;
mod session;
mod stripe;
mod transport;

pub use host::{pool_layout, Discovered, LocalRail, RdmaHost, RdmaStatus};
pub use serve::{RdmaService, MAX_WRITES_PER_PIECE};
pub use transport::RdmaTransport;

use crate::metrics::Metrics;
use crate::store::Store;
use crate::transport::TransportError;
use ferry_rdma::RdmaError;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// The piece exchange. Once per source, the receiver opens a TCP connection to the source's
// data port and upgrades it with a Rails message listing its rails (device, port, GID, fabric,
// link rate); the source answers with its own and closes. Rails on one fabric pair up (see
// `ferry_rdma::rails::matching`). For each queue pair on a rail pair, the receiver connects
// from its rail's address to the source's rail address (RoCE; the data port listens on every
// rail) and sends ConnectRail naming the source's rail and carrying its queue pair; the source
// answers Accept with its own, made on that rail. From then on everything goes over the RC
// queue pair; the TCP connection carries no further byte and ends the queue pair by closing.
//
// Per piece, the receiver binds one memory window per pool slot of the piece buffer (remote
// write, this queue pair only) and, right behind the binds on the same send queue (which
// carries them out first), SENDs a Fetch granting those windows. The source reads the piece
// from its store straight into its own registered buffer (never remotely accessible), posts
// the chunks as unsignalled RDMA WRITEs and completes the piece with one signalled
// SEND_WITH_INVALIDATE carrying the digest: RC places every write before the receiver sees
// that message, and the receiver's device invalidates the first window before reporting it.
// The receiver invalidates any other window locally and hands the buffer, unchanged, to the
// engine, which verifies the digest and writes it with io_uring. A source that cannot serve a
// piece answers Failed (not held, or why) over the queue pair, which stays up.
//
// Up to `window` pieces are in flight on one queue pair, over up to `queue_pairs` queue pairs
// per rail pair; pieces are spread over the rail pairs by measured throughput, and a rail pair
// that fails is paused while the others carry on (`rails.rs`). A piece of several pool slots
// is striped over the rail pairs that have room (`stripe.rs`): a Fetch with a byte range on
// each, the same exchange per stripe, one digest pass over the joined piece. The source reads the next
// pieces while earlier ones are on the wire. A fetch dropped while its windows are bound
// leaves them to its session, which takes them back once the source answered.

/// Tunables of the RDMA piece exchange.
#[derive(Debug, Clone)]
pub struct RdmaSettings {
    /// Bytes per RDMA WRITE (a power of two, at most the pool slot size).
    pub chunk_size: u32,
    pub connect_timeout: Duration,
    /// Longest wait for any message or completion.
    pub io_timeout: Duration,
    /// Pieces in flight on one queue pair (the credit window).
    pub window: usize,
    /// Queue pairs per rail pair to a source.
    pub queue_pairs: usize,
    /// Stripe a piece of several pool slots over the rail pairs that have room for it (one
    /// byte range each, fetched at once), when the source serves ranges.
    pub stripe_pieces: bool,
    /// When a failing rail pair is paused, and for how long.
    pub rail_health: ferry_rdma::rails::health::HealthSettings,
}

/// Work request ids: the kind in the top byte, so completions sort themselves (0xfe is the
/// connection's own control receives).
pub(super) const WR_BIND: u64 = 1 << 56;
pub(super) const WR_INVALIDATE: u64 = 2 << 56;
pub(super) const WR_FETCH: u64 = 3 << 56;
pub(super) const WR_WRITE: u64 = 4 << 56;
pub(super) const WR_DONE: u64 = 5 << 56;
pub(super) const WR_ANSWER: u64 = 6 << 56;
pub(super) const WR_KIND: u64 = 0xff << 56;

pub(super) fn rdma_failure(err: RdmaError) -> TransportError {
    TransportError::Failed(format!("rdma: {err}"))
}

impl RdmaHost {
    /// The receiving transport and the serving service, when the device is ready.
    pub fn exchange(
        &self,
        store: &Arc<Store>,
        settings: RdmaSettings,
        idle_timeout: Duration,
    ) -> Option<(Arc<RdmaTransport>, Arc<RdmaService>)> {
        self.exchange_observed(store, settings, idle_timeout, &Arc::default())
    }

    /// [`RdmaHost::exchange`], counting sessions and bytes served into `metrics`.
    pub fn exchange_observed(
        &self,
        store: &Arc<Store>,
        settings: RdmaSettings,
        idle_timeout: Duration,
        metrics: &Arc<Metrics>,
    ) -> Option<(Arc<RdmaTransport>, Arc<RdmaService>)> {
        let RdmaStatus::Ready { rails, .. } = &self.status else {
            return None;
        };
        for rail in rails {
            metrics.rdma_rail_opened(&rail.name());
        }
        let transport = RdmaTransport {
            rails: rails.clone(),
            settings: settings.clone(),
            peers: Mutex::new(HashMap::new()),
            exchanging: Mutex::new(HashMap::new()),
            tcp_only: Mutex::new(HashSet::new()),
            breakers: transport::Breakers::new(breaker::BreakerSettings::default(), metrics),
            metrics: Arc::clone(metrics),
        };
        let service = RdmaService {
            store: Arc::clone(store),
            rails: rails.clone(),
            settings,
            idle_timeout,
            metrics: Arc::clone(metrics),
        };
        Some((Arc::new(transport), Arc::new(service)))
    }
}
