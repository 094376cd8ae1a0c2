//! The rail pairs to one peer as one pure machine: which pair carries the next piece, given
//! each pair's health ([`super::health`]) and measured throughput ([`super::balance`]).
//!
//! A pick takes a pair whose pause has run out first (its probe: one piece re-measures it),
//! else the balancer's choice among the pairs that are up. A pair that fails is paused; the
//! others go on carrying. When every pair is paused, [`Lanes::pick`] returns None and the
//! caller uses another transport. Time is an argument, so it is tested without a fabric.

use super::balance::{Balancer, BalancerSettings, Ticket};
use super::health::{Change, HealthSettings, RailHealth, RailState, Use};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Lanes {
    balancer: Balancer,
    health: Vec<RailHealth>,
}

/// A lane chosen for one piece: end it with exactly one of [`Lanes::finish`] or
/// [`Lanes::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a pick must be finished or released, or its bytes stay in flight"]
pub struct Pick {
    pub lane: usize,
    ticket: Ticket,
    /// The piece probes a paused lane.
    pub probe: bool,
}

/// How a piece on a lane ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneOutcome {
    Done,
    /// The peer answered without the piece (not held): says nothing against the lane.
    Neutral,
    /// Failed; `hard` when the lane's queue pair broke or could not be set up.
    Failed {
        hard: bool,
    },
}

impl Pick {
    /// The bytes picked for the lane: the piece's, or its stripe's.
    pub fn bytes(&self) -> u64 {
        self.ticket.bytes
    }
}

impl Lanes {
    /// Lanes running at `link_mbps` each until measured.
    pub fn new(link_mbps: &[u32], health: HealthSettings) -> Lanes {
        Lanes {
            balancer: Balancer::new(BalancerSettings::default(), link_mbps),
            health: link_mbps.iter().map(|_| RailHealth::new(health)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.health.len()
    }

    pub fn is_empty(&self) -> bool {
        self.health.is_empty()
    }

    /// Whether any lane may carry a piece now (up, or due for its probe).
    pub fn usable(&self, now: Instant) -> bool {
        self.health.iter().any(|h| h.can_use(now) != Use::No)
    }

    /// Whether `lane` is not within a pause now (a pick made before it was paused may find
    /// it paused by the time its queue pair would be made).
    pub fn open(&self, lane: usize, now: Instant) -> bool {
        !matches!(self.health[lane].state(), RailState::Paused { until } if now < until)
    }

    pub fn is_up(&self, lane: usize) -> bool {
        self.health[lane].is_up()
    }

    /// The lane for a piece of `bytes`; None when every lane is paused or probing.
    pub fn pick(&mut self, bytes: u64, now: Instant) -> Option<Pick> {
        self.pick_where(bytes, now, |_| true)
    }

    /// [`Lanes::pick`] among the lanes `can_carry` allows (those whose rail reaches the pool
    /// part the piece's buffer lies in); a probe due on another lane stays due.
    pub fn pick_where(
        &mut self,
        bytes: u64,
        now: Instant,
        can_carry: impl Fn(usize) -> bool,
    ) -> Option<Pick> {
        let uses: Vec<Use> = (self.health.iter().enumerate())
            .map(|(lane, h)| {
                if can_carry(lane) {
                    h.can_use(now)
                } else {
                    Use::No
                }
            })
            .collect();
        let probe = uses.iter().position(|&u| u == Use::Probe);
        for (lane, &u) in uses.iter().enumerate() {
            let allowed = match probe {
                Some(p) => lane == p,
                None => u == Use::Carry,
            };
            self.balancer.set_usable(lane, allowed);
        }
        let ticket = self.balancer.pick(bytes, now)?;
        if probe.is_some() {
            self.health[ticket.lane].probe_started();
        }
        Some(Pick {
            lane: ticket.lane,
            ticket,
            probe: probe.is_some(),
        })
    }

    /// One piece of `bytes` striped in whole `unit`s over the lanes `can_carry` allows that
    /// are up (see [`Balancer::pick_split`]): one pick per lane that got a stripe, in the
    /// stripes' order. Empty when a paused lane is due for its probe (the probe is one whole
    /// piece: [`Lanes::pick_where`]) or no allowed lane is up.
    pub fn pick_stripes(
        &mut self,
        bytes: u64,
        unit: u64,
        now: Instant,
        can_carry: impl Fn(usize) -> bool,
    ) -> Vec<Pick> {
        let mut probe_due = false;
        for (lane, health) in self.health.iter().enumerate() {
            let carry = can_carry(lane) && {
                let usable = health.can_use(now);
                probe_due |= usable == Use::Probe;
                usable == Use::Carry
            };
            self.balancer.set_usable(lane, carry);
        }
        if probe_due {
            return Vec::new();
        }
        (self.balancer.pick_split(bytes, unit, now).into_iter())
            .map(|ticket| Pick {
                lane: ticket.lane,
                ticket,
                probe: false,
            })
            .collect()
    }

    /// Ends a pick that carried its piece, or tried to.
    pub fn finish(&mut self, pick: Pick, outcome: LaneOutcome, now: Instant) -> Change {
        let health = &mut self.health[pick.lane];
        let change = match outcome {
            LaneOutcome::Done => health.on_success(),
            LaneOutcome::Neutral => health.on_neutral(pick.probe),
            LaneOutcome::Failed { hard } => health.on_failure(hard, now),
        };
        match outcome {
            LaneOutcome::Done => self.balancer.completed(pick.ticket, now),
            _ => self.balancer.failed(pick.ticket),
        }
        if change == Change::Rejoined {
            // Its rate was measured while it was failing, and its probe paid for a new queue
            // pair: neither is what it does now.
            self.balancer.forget_rate(pick.lane);
        }
        change
    }

    /// Ends a pick that carried nothing (every queue pair of the lane was full): it says
    /// nothing of the lane, and a probe stays due.
    pub fn release(&mut self, pick: Pick, now: Instant) {
        self.balancer.failed(pick.ticket);
        if pick.probe {
            self.health[pick.lane].probe_abandoned(now);
        }
    }

    /// Bytes each lane carried.
    pub fn carried_bytes(&self, lane: usize) -> u64 {
        self.balancer.stats(lane).carried_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PIECE: u64 = 4 << 20;

    fn settings() -> HealthSettings {
        HealthSettings {
            first_pause: Duration::from_secs(2),
            max_pause: Duration::from_secs(4),
            ..Default::default()
        }
    }

    /// Runs `pieces` pieces, four in flight at once, each taking `seconds[lane]`;
    /// `fails(lane, n)` says whether a piece picked when `n` were done fails (hard) there.
    fn run(
        lanes: &mut Lanes,
        t: &mut Instant,
        pieces: usize,
        seconds: &[f64],
        fails: impl Fn(usize, usize) -> bool,
    ) -> Vec<usize> {
        let mut carried = vec![0; lanes.len()];
        let mut n = 0;
        let mut rounds = 0;
        while n < pieces {
            rounds += 1;
            assert!(rounds < 100 * pieces, "no progress: {carried:?}");
            let picks: Vec<Pick> = (0..4).filter_map(|_| lanes.pick(PIECE, *t)).collect();
            if picks.is_empty() {
                *t += Duration::from_millis(100);
                continue;
            }
            let longest = picks.iter().map(|p| seconds[p.lane]).fold(0.0, f64::max);
            *t += Duration::from_secs_f64(longest);
            let done = n;
            for pick in picks {
                if n >= pieces {
                    lanes.release(pick, *t);
                    continue;
                }
                if fails(pick.lane, done) {
                    let _ = lanes.finish(pick, LaneOutcome::Failed { hard: true }, *t);
                    continue;
                }
                let _ = lanes.finish(pick, LaneOutcome::Done, *t);
                carried[pick.lane] += 1;
                n += 1;
            }
        }
        carried
    }

    #[test]
    fn a_failed_lane_is_paused_the_other_carries_and_a_probe_brings_it_back() {
        let mut lanes = Lanes::new(&[100_000, 100_000], settings());
        let mut t = Instant::now();
        let even = run(&mut lanes, &mut t, 40, &[0.05, 0.05], |_, _| false);
        assert!(even.iter().all(|&c| c >= 15), "{even:?}");
        // Lane 1 dies: one failure pauses it; everything goes to lane 0 meanwhile. (Two in
        // flight: the second goes to the other lane.)
        let (first, second) = (lanes.pick(PIECE, t).unwrap(), lanes.pick(PIECE, t).unwrap());
        assert_ne!(first.lane, second.lane);
        let (pick, other) = if first.lane == 1 {
            (first, second)
        } else {
            (second, first)
        };
        let _ = lanes.finish(other, LaneOutcome::Done, t);
        assert!(matches!(
            lanes.finish(pick, LaneOutcome::Failed { hard: true }, t),
            Change::Paused { pauses: 1, .. }
        ));
        assert!(!lanes.is_up(1) && !lanes.open(1, t));
        for _ in 0..10 {
            let pick = lanes.pick(PIECE, t).unwrap();
            assert_eq!(pick.lane, 0, "a paused lane gets nothing");
            let _ = lanes.finish(pick, LaneOutcome::Done, t);
        }
        // Its pause over, the very next pick probes it; meanwhile nothing else goes there.
        t += Duration::from_secs(2);
        let probe = lanes.pick(PIECE, t).unwrap();
        assert_eq!((probe.lane, probe.probe), (1, true));
        let other = lanes.pick(PIECE, t).unwrap();
        assert_eq!((other.lane, other.probe), (0, false));
        let _ = lanes.finish(other, LaneOutcome::Done, t);
        // A failed probe pauses it for twice as long.
        assert!(matches!(
            lanes.finish(probe, LaneOutcome::Failed { hard: false }, t),
            Change::Paused { pauses: 2, pause } if pause == Duration::from_secs(4)
        ));
        t += Duration::from_secs(4);
        let probe = lanes.pick(PIECE, t).unwrap();
        assert!(probe.probe);
        t += Duration::from_millis(50);
        assert_eq!(lanes.finish(probe, LaneOutcome::Done, t), Change::Rejoined);
        let after = run(&mut lanes, &mut t, 40, &[0.05, 0.05], |_, _| false);
        assert!(
            after.iter().all(|&c| c >= 10),
            "both carry again: {after:?}"
        );
    }

    #[test]
    fn a_lane_that_rejoins_is_not_held_to_the_slow_rate_it_had_while_failing() {
        let mut lanes = Lanes::new(&[100_000, 100_000], settings());
        let mut t = Instant::now();
        // Lane 0 is quick; lane 1 crawls (retries on a dying link), then fails.
        for (lane, seconds) in [(0, 0.05), (1, 2.0)] {
            for _ in 0..8 {
                let pick = lanes.pick_where(PIECE, t, |l| l == lane).unwrap();
                t += Duration::from_secs_f64(seconds);
                let _ = lanes.finish(pick, LaneOutcome::Done, t);
            }
        }
        let pick = lanes.pick_where(PIECE, t, |lane| lane == 1).unwrap();
        let _ = lanes.finish(pick, LaneOutcome::Failed { hard: true }, t);
        t += Duration::from_secs(2);
        // Its probe is slow too: it waits for a new queue pair.
        let probe = lanes.pick(PIECE, t).unwrap();
        assert_eq!((probe.lane, probe.probe), (1, true));
        t += Duration::from_secs(3);
        assert_eq!(lanes.finish(probe, LaneOutcome::Done, t), Change::Rejoined);
        let after = run(&mut lanes, &mut t, 40, &[0.05, 0.05], |_, _| false);
        assert!(
            after[1] >= 15,
            "the rejoined lane carries its share: {after:?}"
        );
    }

    #[test]
    fn every_lane_paused_means_no_pick_and_a_probe_never_sent_stays_due() {
        let mut lanes = Lanes::new(&[100_000, 100_000], settings());
        let t = Instant::now();
        for _ in 0..2 {
            let pick = lanes.pick(PIECE, t).unwrap();
            let _ = lanes.finish(pick, LaneOutcome::Failed { hard: true }, t);
        }
        assert!(!lanes.usable(t));
        assert_eq!(lanes.pick(PIECE, t), None);
        let later = t + Duration::from_secs(2);
        assert!(lanes.usable(later));
        let probe = lanes.pick(PIECE, later).unwrap();
        assert!(probe.probe);
        lanes.release(probe, later);
        let again = lanes.pick(PIECE, later).unwrap();
        assert!(again.probe, "released, the probe is due again");
        assert_eq!(
            lanes.finish(again, LaneOutcome::Neutral, later),
            Change::Rejoined,
            "a probe the peer answered cleanly proves the lane"
        );
    }

    #[test]
    fn a_pick_restricted_to_some_lanes_stays_among_them_and_leaves_a_probe_due() {
        let mut lanes = Lanes::new(&[100_000, 100_000, 100_000], settings());
        let t = Instant::now();
        for _ in 0..6 {
            let pick = lanes.pick_where(PIECE, t, |lane| lane != 0).unwrap();
            assert_ne!(pick.lane, 0);
            lanes.release(pick, t);
        }
        assert_eq!(lanes.pick_where(PIECE, t, |_| false), None);
        // Lane 2 fails and is paused; once its probe is due, a pick that may not use it does
        // not take the probe, and the next pick that may use it does.
        let pick = lanes.pick_where(PIECE, t, |lane| lane == 2).unwrap();
        let _ = lanes.finish(pick, LaneOutcome::Failed { hard: true }, t);
        let later = t + Duration::from_secs(2);
        let elsewhere = lanes.pick_where(PIECE, later, |lane| lane != 2).unwrap();
        assert!(!elsewhere.probe);
        lanes.release(elsewhere, later);
        let probe = lanes.pick(PIECE, later).unwrap();
        assert!(probe.probe && probe.lane == 2, "{probe:?}");
    }

    #[test]
    fn stripes_go_over_the_lanes_that_are_up_and_a_due_probe_takes_a_whole_piece() {
        let mut lanes = Lanes::new(&[100_000; 3], settings());
        let t = Instant::now();
        let stripes = lanes.pick_stripes(6 * PIECE, PIECE, t, |_| true);
        let got: Vec<(usize, bool)> = stripes.iter().map(|p| (p.lane, p.probe)).collect();
        assert_eq!(got, [(0, false), (1, false), (2, false)]);
        // A stripe that fails pauses its lane like a whole piece does; the others carried.
        for pick in stripes {
            let outcome = if pick.lane == 1 {
                LaneOutcome::Failed { hard: true }
            } else {
                LaneOutcome::Done
            };
            let _ = lanes.finish(pick, outcome, t);
        }
        let without_1 = lanes.pick_stripes(6 * PIECE, PIECE, t, |_| true);
        assert_eq!(without_1.iter().map(|p| p.lane).collect::<Vec<_>>(), [0, 2]);
        for pick in without_1 {
            lanes.release(pick, t);
        }
        // Only lanes allowed (those reaching the buffer's pool part) get stripes.
        let only_2 = lanes.pick_stripes(6 * PIECE, PIECE, t, |lane| lane == 2);
        assert_eq!(only_2.len(), 1);
        assert_eq!(only_2[0].lane, 2);
        lanes.release(only_2[0], t);
        // Lane 1's pause is over: no stripes until its probe, one whole piece, is sent.
        let later = t + Duration::from_secs(2);
        assert!(lanes
            .pick_stripes(6 * PIECE, PIECE, later, |_| true)
            .is_empty());
        let probe = lanes.pick(6 * PIECE, later).unwrap();
        assert_eq!((probe.lane, probe.probe), (1, true));
        assert!(
            lanes.pick_stripes(6 * PIECE, PIECE, later, |_| true).len() == 2,
            "while the probe is out, stripes use the lanes that are up"
        );
    }

    #[test]
    fn a_lane_that_fails_every_few_pieces_carries_a_small_share() {
        // Lane 1 fails every 5th piece it gets: paused each time, it carries far less.
        let mut lanes = Lanes::new(&[100_000, 100_000], settings());
        let mut t = Instant::now();
        let carried = run(&mut lanes, &mut t, 400, &[0.05, 0.05], |lane, n| {
            lane == 1 && n % 5 == 0
        });
        assert_eq!(carried.iter().sum::<usize>(), 400);
        assert!(carried[1] * 4 < carried[0], "{carried:?}");
        assert_eq!(
            lanes.carried_bytes(0) + lanes.carried_bytes(1),
            400 * PIECE,
            "only done pieces count as carried"
        );
    }
}
