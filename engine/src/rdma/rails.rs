//! The rail pairs to one source: matched from the rail lists both sides sent in the set-up
//! exchange, each with its queue pairs. Which pair carries a piece (health, back-off, probes,
//! throughput balancing) is the pure machine `ferry_rdma::rails::lanes`; this is its shell:
//! it breaks a paused pair's queue pairs, logs, and counts into the metrics. Only when every
//! pair is paused does [`PeerRails::usable`] say no, and the source's pieces go over TCP.

use super::host::LocalRail;
use super::session::Session;
use crate::metrics::Metrics;
use ferry_rdma::rails::health::{Change, HealthSettings};
use ferry_rdma::rails::lanes::Lanes;
pub(super) use ferry_rdma::rails::lanes::{LaneOutcome, Pick};
use ferry_rdma::rails::matching::{RailAd, RailPair};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One rail pair: a local rail and the source's rail it talks to.
pub(super) struct Lane {
    pub(super) local: Arc<LocalRail>,
    pub(super) remote: RailAd,
    /// Held while a queue pair on this lane is being made (one at a time).
    pub(super) connecting: tokio::sync::Mutex<()>,
}

impl Lane {
    /// `rxe0:1>rxe1:1`: how logs and piece results name the pair.
    pub(super) fn label(&self) -> String {
        format!("{}>{}", self.local.name(), self.remote.name)
    }
}

struct LanesState {
    /// Which lane carries the next piece (the pure part: `ferry_rdma::rails::lanes`).
    lanes: Lanes,
    sessions: Vec<Vec<Arc<Session>>>,
}

/// How many fetches a lane holds at once: queue pairs per lane, each with a window of
/// fetches.
#[derive(Debug, Clone, Copy)]
pub(super) struct LaneCapacity {
    pub(super) queue_pairs: usize,
    pub(super) window: usize,
}

impl LaneCapacity {
    /// Whether a lane with these queue pairs takes one more fetch without waiting: one of its
    /// live queue pairs has a free window, or another queue pair may still be made.
    fn has_room(&self, sessions: &[Arc<Session>]) -> bool {
        let mut live = 0;
        for session in sessions.iter().filter(|s| !s.is_broken()) {
            if session.in_flight() < self.window {
                return true;
            }
            live += 1;
        }
        live < self.queue_pairs
    }
}

/// The rail pairs to one source and what is known of each.
pub(super) struct PeerRails {
    pub(super) source: SocketAddr,
    pub(super) lanes: Vec<Lane>,
    /// The source serves byte ranges of a piece: large pieces may be striped over lanes.
    pub(super) serves_ranges: bool,
    capacity: LaneCapacity,
    state: Mutex<LanesState>,
    metrics: Arc<Metrics>,
}

impl PeerRails {
    pub(super) fn new(
        source: SocketAddr,
        local: &[Arc<LocalRail>],
        remote: &[RailAd],
        pairs: &[RailPair],
        health: HealthSettings,
        capacity: LaneCapacity,
        metrics: &Arc<Metrics>,
    ) -> PeerRails {
        let lanes: Vec<Lane> = pairs
            .iter()
            .filter_map(|pair| {
                let local = local.iter().find(|l| l.index == pair.local)?;
                let remote = remote.iter().find(|r| r.index == pair.remote)?;
                Some(Lane {
                    local: Arc::clone(local),
                    remote: remote.clone(),
                    connecting: tokio::sync::Mutex::new(()),
                })
            })
            .collect();
        // A pair runs at the slower end's link rate until it is measured.
        let link_mbps: Vec<u32> = lanes
            .iter()
            .map(|lane| {
                let local = (lane.local.rail.speed_gbps * 1000.0).clamp(1.0, f64::from(u32::MAX));
                (local as u32).min(lane.remote.speed_mbps.max(1))
            })
            .collect();
        PeerRails {
            source,
            serves_ranges: false,
            capacity,
            state: Mutex::new(LanesState {
                lanes: Lanes::new(&link_mbps, health),
                sessions: lanes.iter().map(|_| Vec::new()).collect(),
            }),
            lanes,
            metrics: Arc::clone(metrics),
        }
    }

    /// Says whether the source serves byte ranges (its rail list's features): only then are
    /// pieces striped over the lanes.
    pub(super) fn serving_ranges(mut self, serves_ranges: bool) -> PeerRails {
        self.serves_ranges = serves_ranges;
        self
    }

    /// Whether any lane may carry a piece now (up, or due for its probe).
    pub(super) fn usable(&self, now: Instant) -> bool {
        self.state.lock().expect("lanes lock").lanes.usable(now)
    }

    /// The lane for a piece of `bytes` (see `Lanes::pick`); None when every lane is paused.
    pub(super) fn pick(&self, bytes: u64, now: Instant) -> Option<Pick> {
        self.pick_where(bytes, now, |_| true)
    }

    /// [`PeerRails::pick`] among the lanes `can_carry` allows (see `Lanes::pick_where`).
    /// Lanes with room for the fetch (a queue pair with a free window, or one still to make)
    /// come first: a piece waits for a full lane only when every lane is full, so the lane
    /// measured faster cannot hoard fetches while another has windows free.
    pub(super) fn pick_where(
        &self,
        bytes: u64,
        now: Instant,
        can_carry: impl Fn(&Lane) -> bool,
    ) -> Option<Pick> {
        let pick = {
            let mut state = self.state.lock().expect("lanes lock");
            let room: Vec<bool> = (state.sessions.iter())
                .map(|list| self.capacity.has_room(list))
                .collect();
            let with_room = state.lanes.pick_where(bytes, now, |lane| {
                room[lane] && can_carry(&self.lanes[lane])
            });
            match with_room {
                Some(pick) => pick,
                None => state
                    .lanes
                    .pick_where(bytes, now, |lane| can_carry(&self.lanes[lane]))?,
            }
        };
        if pick.probe {
            tracing::info!(source = %self.source, rail = %self.lanes[pick.lane].label(), "rail pair's pause is over; probing it with one piece");
        }
        Some(pick)
    }

    /// Stripes of one piece of `bytes`, in whole `unit`s (the pool's slots), over the lanes
    /// with room for a fetch that `can_carry` allows (see `Lanes::pick_stripes`): one pick
    /// per lane, in the stripes' order. Empty, and the piece goes whole, when the source
    /// serves no ranges, the piece is one unit, a paused lane's probe is due, or fewer than
    /// two lanes would get a stripe.
    pub(super) fn pick_stripes(
        &self,
        bytes: u64,
        unit: u64,
        now: Instant,
        can_carry: impl Fn(&Lane) -> bool,
    ) -> Vec<Pick> {
        if !self.serves_ranges || bytes <= unit || self.lanes.len() < 2 {
            return Vec::new();
        }
        let mut state = self.state.lock().expect("lanes lock");
        let room: Vec<bool> = (state.sessions.iter())
            .map(|list| self.capacity.has_room(list))
            .collect();
        let picks = state.lanes.pick_stripes(bytes, unit, now, |lane| {
            room[lane] && can_carry(&self.lanes[lane])
        });
        if picks.len() < 2 {
            for pick in picks {
                state.lanes.release(pick, now);
            }
            return Vec::new();
        }
        picks
    }

    /// Ends a pick; a lane it pauses has its queue pairs broken (the probe makes a fresh one).
    pub(super) fn finish(&self, pick: Pick, outcome: LaneOutcome, now: Instant) {
        let lane = &self.lanes[pick.lane];
        let change = {
            let mut state = self.state.lock().expect("lanes lock");
            let change = state.lanes.finish(pick, outcome, now);
            if matches!(change, Change::Paused { .. }) {
                for session in state.sessions[pick.lane].drain(..) {
                    session.break_with(format!("rdma: rail pair {} paused", lane.label()));
                }
            }
            change
        };
        let rail = lane.local.name();
        match change {
            Change::Paused { pause, pauses } => {
                tracing::warn!(source = %self.source, rail = %lane.label(), pause_secs = pause.as_secs(), pauses_in_a_row = pauses, "RDMA rail pair failed; its pieces go over the other rails while it is paused");
                // A failed probe pauses a pair that is already counted as paused.
                if pauses == 1 {
                    self.metrics.rdma_rail_paused(&rail, true);
                }
            }
            Change::Rejoined => {
                tracing::info!(source = %self.source, rail = %lane.label(), "RDMA rail pair works again and rejoins");
                self.metrics.rdma_rail_paused(&rail, false);
            }
            Change::None => {}
        }
    }

    /// Ends a pick that carried nothing (every queue pair of the lane was full).
    pub(super) fn release(&self, pick: Pick, now: Instant) {
        (self.state.lock().expect("lanes lock"))
            .lanes
            .release(pick, now);
    }

    /// The least busy queue pair on `lane` when it is idle or no other may be made.
    pub(super) fn usable_session(&self, lane: usize, queue_pairs: usize) -> Option<Arc<Session>> {
        let mut state = self.state.lock().expect("lanes lock");
        let list = &mut state.sessions[lane];
        list.retain(|s| !s.is_broken());
        let best = list.iter().min_by_key(|s| s.in_flight()).cloned()?;
        (list.len() >= queue_pairs || best.in_flight() == 0).then_some(best)
    }

    pub(super) fn add_session(&self, lane: usize, session: &Arc<Session>) {
        let mut state = self.state.lock().expect("lanes lock");
        state.sessions[lane].push(Arc::clone(session));
    }

    /// Whether `lane` may still take pieces (a pick made before it was paused may find it
    /// paused by the time its queue pair would be made).
    pub(super) fn lane_open(&self, lane: usize, now: Instant) -> bool {
        self.state.lock().expect("lanes lock").lanes.open(lane, now)
    }

    /// Breaks every queue pair (the source's breaker opened): the next piece makes fresh
    /// ones. What is known of each rail pair stays.
    pub(super) fn break_sessions(&self, why: &str) {
        let mut state = self.state.lock().expect("lanes lock");
        for session in state.sessions.iter_mut().flat_map(|list| list.drain(..)) {
            session.break_with(format!("rdma: source {}: {why}", self.source));
        }
    }

    /// Breaks every queue pair and takes this source's paused pairs out of the metrics: the
    /// source is given up on, and a later transfer exchanges rails with it afresh.
    pub(super) fn forget(&self, why: &str) {
        self.break_sessions(why);
        let state = self.state.lock().expect("lanes lock");
        for lane in 0..self.lanes.len() {
            if !state.lanes.is_up(lane) {
                (self.metrics).rdma_rail_pairs_forgotten(&self.lanes[lane].local.name(), 1);
            }
        }
    }
}
