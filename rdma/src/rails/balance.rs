//! Spreading pieces over rail pairs by measured throughput, not round robin.
//!
//! Each rail pair (a lane) keeps an EWMA of its service rate: on every completion, the bytes of
//! the piece over the time the lane spent on it (from the later of the piece's start and the
//! lane's previous completion, so pieces queued behind others are not charged their queueing
//! time). A piece goes to the lane where it would finish first: (bytes in flight there + the
//! piece) / rate. A lane not yet measured is assumed as fast as the best measured one (its
//! link rate before anything was measured), so new and recovered lanes get traffic and are
//! measured. Every `probe_every`-th piece goes to the lane measured longest ago if that
//! measurement is older than `stale_after`: the small share of probe traffic that lets a slow
//! lane that recovered, or a fast one that degraded, be seen. Pure: time is passed in.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalancerSettings {
    /// Weight of a new sample in the rate average (0..1].
    pub ewma_weight: f64,
    pub probe_every: u64,
    pub stale_after: Duration,
}

impl Default for BalancerSettings {
    fn default() -> Self {
        BalancerSettings {
            ewma_weight: 0.25,
            probe_every: 32,
            stale_after: Duration::from_secs(2),
        }
    }
}

/// A piece given to a lane: hand it back to [`Balancer::completed`] or [`Balancer::failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a ticket must be completed or failed, or its bytes stay in flight"]
pub struct Ticket {
    pub lane: usize,
    pub bytes: u64,
    pub started: Instant,
    /// Sent to re-measure the lane rather than because it was the fastest.
    pub probe: bool,
}

#[derive(Debug, Clone, Default)]
struct Lane {
    usable: bool,
    /// Link rate, bytes/s: the estimate until a completion is measured.
    link_rate: f64,
    rate: Option<f64>,
    in_flight_bytes: u64,
    last_done: Option<Instant>,
    last_sample: Option<Instant>,
    carried_bytes: u64,
    pieces: u64,
}

/// What a lane has done, for metrics and the pull summary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LaneStats {
    pub usable: bool,
    pub rate: Option<f64>,
    pub in_flight_bytes: u64,
    pub carried_bytes: u64,
    pub pieces: u64,
}

#[derive(Debug, Clone)]
pub struct Balancer {
    settings: BalancerSettings,
    lanes: Vec<Lane>,
    picks: u64,
}

impl Balancer {
    /// One lane per rail pair, with its link rate in Mbit/s (0 if unknown).
    pub fn new(settings: BalancerSettings, link_mbps: &[u32]) -> Balancer {
        Balancer {
            settings,
            lanes: link_mbps
                .iter()
                .map(|&mbps| Lane {
                    usable: true,
                    link_rate: f64::from(mbps.max(1)) * 125_000.0,
                    ..Lane::default()
                })
                .collect(),
            picks: 0,
        }
    }

    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Takes a lane out (failed, paused) or puts it back. A lane put back keeps its old rate
    /// but it is stale, so the next probe re-measures it.
    pub fn set_usable(&mut self, lane: usize, usable: bool) {
        self.lanes[lane].usable = usable;
    }

    /// Drops what was measured of a lane (it failed and came back): what it did before, or
    /// while failing, says nothing of what it does now, so it is assumed as fast as the best
    /// measured lane until its next completions say otherwise.
    pub fn forget_rate(&mut self, lane: usize) {
        let l = &mut self.lanes[lane];
        l.rate = None;
        l.last_done = None;
        l.last_sample = None;
    }

    pub fn stats(&self, lane: usize) -> LaneStats {
        let l = &self.lanes[lane];
        LaneStats {
            usable: l.usable,
            rate: l.rate,
            in_flight_bytes: l.in_flight_bytes,
            carried_bytes: l.carried_bytes,
            pieces: l.pieces,
        }
    }

    fn estimate(&self, lane: &Lane) -> f64 {
        lane.rate.unwrap_or_else(|| {
            let best = self
                .lanes
                .iter()
                .filter_map(|l| l.rate)
                .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
            best.unwrap_or(lane.link_rate)
        })
    }

    /// Every `probe_every`-th pick: the usable lane measured longest ago, if that is longer
    /// than `stale_after` ago.
    fn due_probe(&mut self, now: Instant) -> Option<usize> {
        self.picks += 1;
        if !self.picks.is_multiple_of(self.settings.probe_every.max(1)) {
            return None;
        }
        (self.lanes.iter().enumerate())
            .filter(|(_, l)| l.usable)
            .filter(|(_, l)| {
                l.last_sample
                    .is_none_or(|t| now.saturating_duration_since(t) > self.settings.stale_after)
            })
            .min_by_key(|(_, l)| l.last_sample)
            .map(|(i, _)| i)
    }

    /// The lane for a piece of `bytes`, or None when no lane is usable.
    pub fn pick(&mut self, bytes: u64, now: Instant) -> Option<Ticket> {
        let probe = self.due_probe(now);
        let usable = || self.lanes.iter().enumerate().filter(|(_, l)| l.usable);
        let lane = match probe {
            Some(lane) => lane,
            None => {
                usable()
                    .map(|(i, l)| (i, (l.in_flight_bytes + bytes) as f64 / self.estimate(l)))
                    .min_by(|a, b| a.1.total_cmp(&b.1))?
                    .0
            }
        };
        self.lanes[lane].in_flight_bytes += bytes;
        Some(Ticket {
            lane,
            bytes,
            started: now,
            probe: probe.is_some(),
        })
    }

    /// One piece of `bytes` striped over the usable lanes in stripes of whole `unit`s (the
    /// last stripe takes the short remainder): each unit goes where it would finish first,
    /// counting what that lane has in flight and the units it got already, so the stripes end
    /// together and a lane at half speed gets about half the bytes of a full-speed one (none,
    /// if others are that much faster and the piece is small). A probe that is due gets the
    /// lane one unit at least, so a lane that gets no stripes is still measured. One ticket
    /// per lane that got bytes, in lane order, which is the stripes' order in the piece.
    pub fn pick_split(&mut self, bytes: u64, unit: u64, now: Instant) -> Vec<Ticket> {
        let unit = unit.max(1);
        let probe = self.due_probe(now);
        let mut units = vec![0u64; self.lanes.len()];
        let mut left = bytes.div_ceil(unit);
        if let Some(lane) = probe.filter(|_| left > 0) {
            units[lane] = 1;
            left -= 1;
        }
        for _ in 0..left {
            let best = (self.lanes.iter().enumerate())
                .filter(|(_, l)| l.usable)
                .map(|(i, l)| {
                    let queued = l.in_flight_bytes + (units[i] + 1) * unit;
                    (i, queued as f64 / self.estimate(l))
                })
                .min_by(|a, b| a.1.total_cmp(&b.1));
            let Some((lane, _)) = best else {
                return Vec::new();
            };
            units[lane] += 1;
        }
        let mut tickets = Vec::new();
        let mut at = 0;
        let last = units.iter().rposition(|&u| u > 0);
        for (lane, &count) in units.iter().enumerate().filter(|(_, &u)| u > 0) {
            let stripe = if Some(lane) == last {
                bytes - at
            } else {
                count * unit
            };
            at += stripe;
            self.lanes[lane].in_flight_bytes += stripe;
            tickets.push(Ticket {
                lane,
                bytes: stripe,
                started: now,
                probe: probe == Some(lane),
            });
        }
        tickets
    }

    /// The piece arrived: its bytes leave the lane's flight and update its rate.
    pub fn completed(&mut self, ticket: Ticket, now: Instant) {
        let weight = self.settings.ewma_weight.clamp(f64::MIN_POSITIVE, 1.0);
        let lane = &mut self.lanes[ticket.lane];
        lane.in_flight_bytes = lane.in_flight_bytes.saturating_sub(ticket.bytes);
        let from = lane
            .last_done
            .map_or(ticket.started, |d| d.max(ticket.started));
        let spent = now.saturating_duration_since(from).as_secs_f64();
        if spent > 0.0 {
            let sample = ticket.bytes as f64 / spent;
            lane.rate = Some(match lane.rate {
                Some(rate) => rate + weight * (sample - rate),
                None => sample,
            });
            lane.last_sample = Some(now);
        }
        lane.last_done = Some(now);
        lane.carried_bytes += ticket.bytes;
        lane.pieces += 1;
    }

    /// The piece failed on this lane (it is re-issued elsewhere): only its flight ends.
    pub fn failed(&mut self, ticket: Ticket) {
        let lane = &mut self.lanes[ticket.lane];
        lane.in_flight_bytes = lane.in_flight_bytes.saturating_sub(ticket.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const PIECE: u64 = 4 << 20;

    /// Lanes that serve their pieces first in, first out at fixed rates (bytes/s), with
    /// `window` pieces in flight in all: returns the bytes each lane carried.
    fn simulate(balancer: &mut Balancer, rates: &[f64], window: usize, pieces: usize) -> Vec<u64> {
        let start = Instant::now();
        let mut now = 0.0f64; // seconds since start
        let mut queues: Vec<VecDeque<Ticket>> = vec![VecDeque::new(); rates.len()];
        // When each lane finishes its head piece.
        let mut head_done: Vec<Option<f64>> = vec![None; rates.len()];
        let mut issued = 0;
        let mut carried = vec![0u64; rates.len()];
        let at = |s: f64| start + Duration::from_secs_f64(s);
        loop {
            while issued < pieces && queues.iter().map(VecDeque::len).sum::<usize>() < window {
                let t = balancer.pick(PIECE, at(now)).expect("a usable lane");
                if queues[t.lane].is_empty() {
                    head_done[t.lane] = Some(now + PIECE as f64 / rates[t.lane]);
                }
                queues[t.lane].push_back(t);
                issued += 1;
            }
            let Some((lane, done)) = head_done
                .iter()
                .enumerate()
                .filter_map(|(i, d)| d.map(|d| (i, d)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
            else {
                break;
            };
            now = done;
            let t = queues[lane].pop_front().unwrap();
            carried[lane] += t.bytes;
            balancer.completed(t, at(now));
            head_done[lane] = (!queues[lane].is_empty()).then(|| now + PIECE as f64 / rates[lane]);
        }
        carried
    }

    #[test]
    fn a_rail_at_half_speed_gets_about_a_third_of_the_bytes() {
        let mut balancer = Balancer::new(BalancerSettings::default(), &[400_000, 400_000]);
        let carried = simulate(&mut balancer, &[2e9, 1e9], 8, 3000);
        let share = carried[1] as f64 / carried.iter().sum::<u64>() as f64;
        assert!((0.29..=0.38).contains(&share), "slow lane share {share}");
        let rate = balancer.stats(1).rate.unwrap();
        assert!((0.9e9..1.1e9).contains(&rate), "measured {rate}");
    }

    #[test]
    fn equal_rails_split_evenly() {
        let mut balancer = Balancer::new(BalancerSettings::default(), &[200_000; 4]);
        let carried = simulate(&mut balancer, &[1e9; 4], 16, 4000);
        let total = carried.iter().sum::<u64>() as f64;
        for c in carried {
            let share = c as f64 / total;
            assert!((0.22..=0.28).contains(&share), "share {share}");
        }
    }

    #[test]
    fn a_lane_taken_out_gets_nothing_and_is_probed_when_it_returns() {
        let mut balancer = Balancer::new(BalancerSettings::default(), &[400_000, 400_000]);
        simulate(&mut balancer, &[1e9, 1e9], 8, 200);
        balancer.set_usable(1, false);
        let before = balancer.stats(1).carried_bytes;
        simulate(&mut balancer, &[1e9, 1e9], 8, 200);
        assert_eq!(
            balancer.stats(1).carried_bytes,
            before,
            "a paused lane carries nothing"
        );
        balancer.set_usable(0, false);
        let now = Instant::now();
        assert_eq!(balancer.pick(PIECE, now), None, "no usable lane: no pick");
        balancer.set_usable(0, true);
        balancer.set_usable(1, true);
        // Lane 1's last sample is stale: within one probe period a probe goes to it.
        let later = now + Duration::from_secs(10);
        let probes: Vec<Ticket> = (0..32)
            .filter_map(|_| balancer.pick(PIECE, later))
            .filter(|t| t.probe)
            .collect();
        assert_eq!(probes.len(), 1);
        assert_eq!(probes[0].lane, 1);
    }

    #[test]
    fn a_degraded_lane_loses_traffic_as_measurements_arrive() {
        let mut balancer = Balancer::new(BalancerSettings::default(), &[400_000, 400_000]);
        simulate(&mut balancer, &[1e9, 1e9], 8, 400);
        let before = balancer.stats(0).carried_bytes;
        let carried = simulate(&mut balancer, &[1e9, 0.1e9], 8, 2000);
        let share_slow = carried[1] as f64 / carried.iter().sum::<u64>() as f64;
        assert!(share_slow < 0.15, "degraded lane share {share_slow}");
        assert!(balancer.stats(0).carried_bytes > before);
    }

    #[test]
    fn a_forgotten_lane_is_estimated_as_fast_as_the_best_and_measured_again() {
        let mut balancer = Balancer::new(BalancerSettings::default(), &[400_000, 400_000]);
        simulate(&mut balancer, &[1e9, 0.05e9], 8, 400);
        assert!(balancer.stats(1).rate.unwrap() < 0.1e9);
        balancer.forget_rate(1);
        assert_eq!(balancer.stats(1).rate, None);
        let carried = simulate(&mut balancer, &[1e9, 1e9], 8, 400);
        let share = carried[1] as f64 / carried.iter().sum::<u64>() as f64;
        assert!((0.4..=0.6).contains(&share), "recovered lane share {share}");
    }

    /// Lanes at fixed rates carrying pieces striped over all of them, one piece at a time
    /// (each waits for its slowest stripe): the bytes each lane carried.
    fn simulate_striped(balancer: &mut Balancer, rates: &[f64], pieces: usize) -> Vec<u64> {
        let mut now = Instant::now();
        let mut carried = vec![0u64; rates.len()];
        for _ in 0..pieces {
            let tickets = balancer.pick_split(16 * PIECE, PIECE, now);
            assert_eq!(tickets.iter().map(|t| t.bytes).sum::<u64>(), 16 * PIECE);
            let secs: Vec<f64> = (tickets.iter())
                .map(|t| t.bytes as f64 / rates[t.lane])
                .collect();
            for (t, s) in tickets.iter().zip(&secs) {
                carried[t.lane] += t.bytes;
                balancer.completed(*t, now + Duration::from_secs_f64(*s));
            }
            now += Duration::from_secs_f64(secs.iter().copied().fold(0.0, f64::max));
        }
        carried
    }

    #[test]
    fn a_striped_piece_gives_a_rail_at_half_speed_about_a_third_of_its_bytes() {
        let mut balancer = Balancer::new(BalancerSettings::default(), &[400_000, 400_000]);
        let carried = simulate_striped(&mut balancer, &[2e9, 1e9], 200);
        let share = carried[1] as f64 / carried.iter().sum::<u64>() as f64;
        assert!((0.29..=0.38).contains(&share), "slow lane share {share}");
        // Once measured, one piece's stripes: 11 units on the fast lane, 5 on the slow one
        // (the ends in time, 44 MiB at 2 GB/s and 20 MiB at 1 GB/s, as close as whole units
        // get), laid out in lane order.
        let tickets = balancer.pick_split(16 * PIECE, PIECE, Instant::now());
        let stripes: Vec<(usize, u64)> = tickets.iter().map(|t| (t.lane, t.bytes)).collect();
        assert_eq!(stripes, [(0, 11 * PIECE), (1, 5 * PIECE)]);
    }

    #[test]
    fn equal_rails_get_equal_stripes_and_the_short_tail_goes_last() {
        let mut balancer = Balancer::new(BalancerSettings::default(), &[200_000; 4]);
        let now = Instant::now();
        let tickets = balancer.pick_split(8 * PIECE - 100, PIECE, now);
        let stripes: Vec<(usize, u64)> = tickets.iter().map(|t| (t.lane, t.bytes)).collect();
        assert_eq!(
            stripes,
            [
                (0, 2 * PIECE),
                (1, 2 * PIECE),
                (2, 2 * PIECE),
                (3, 2 * PIECE - 100)
            ]
        );
        // What each lane has in flight counts: lane 0, still busy with its stripe when the
        // others are done, gets none of the next piece.
        let later = now + Duration::from_secs(1);
        for t in tickets.into_iter().filter(|t| t.lane != 0) {
            balancer.completed(t, later);
        }
        let next = balancer.pick_split(3 * PIECE, PIECE, later);
        let stripes: Vec<(usize, u64)> = next.iter().map(|t| (t.lane, t.bytes)).collect();
        assert_eq!(stripes, [(1, PIECE), (2, PIECE), (3, PIECE)]);
        for t in next {
            balancer.completed(t, later);
        }
        // A piece of one unit goes to one lane; a lane taken out gets none.
        balancer.set_usable(1, false);
        let one = balancer.pick_split(PIECE, PIECE, now);
        assert_eq!(one.len(), 1);
        assert_ne!(one[0].lane, 1);
        let carried = simulate_striped(&mut balancer, &[1e9; 4], 50);
        assert_eq!(carried[1], 0);
        for lane in [0, 2, 3] {
            assert!(carried[lane] > 0);
        }
    }

    #[test]
    fn a_lane_too_slow_for_any_stripe_is_still_probed() {
        let mut balancer = Balancer::new(BalancerSettings::default(), &[400_000, 400_000]);
        // Lane 1 at a hundredth of lane 0's speed gets no stripes of a 4-unit piece, except
        // the probe unit it is given when its measurement is stale.
        let mut now = Instant::now();
        let mut probes = 0;
        for round in 0..200 {
            for t in balancer.pick_split(4 * PIECE, PIECE, now) {
                let rate = if t.lane == 0 { 1e9 } else { 1e7 };
                // The first piece splits evenly: neither lane is measured yet.
                if t.lane == 1 && round > 0 {
                    assert!(t.probe && t.bytes == PIECE, "{t:?}");
                    probes += 1;
                }
                balancer.completed(t, now + Duration::from_secs_f64(t.bytes as f64 / rate));
            }
            now += Duration::from_millis(500);
        }
        assert!((1..=10).contains(&probes), "probes {probes}");
    }

    #[test]
    fn failed_pieces_leave_the_flight_without_counting_as_carried() {
        let mut balancer = Balancer::new(BalancerSettings::default(), &[100_000]);
        let t = balancer.pick(PIECE, Instant::now()).unwrap();
        assert_eq!(balancer.stats(0).in_flight_bytes, PIECE);
        balancer.failed(t);
        let s = balancer.stats(0);
        assert_eq!((s.in_flight_bytes, s.carried_bytes, s.pieces), (0, 0, 0));
    }
}
