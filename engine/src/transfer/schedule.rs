//! The schedule of one transfer: which piece goes to which source next, retries and the
//! first failure that stops every worker. Pure state, no I/O.

use super::SourceTotals;
use crate::store::StoreError;
use crate::transport::RailShare;
use std::collections::VecDeque;

pub(super) struct Entry {
    pub(super) number: u32,
    pub(super) attempts: u32,
    pub(super) tried: u64,
    pub(super) last_error: String,
    /// The source this piece was assigned to by weighted choice (scheduled pulls only).
    pub(super) owner: Option<usize>,
}

/// Why a transfer stopped early.
pub(super) enum Failure {
    Store(StoreError),
    Exhausted(String),
    Cancelled,
    Draining,
    /// A bug: a piece's task panicked twice over, or a worker did.
    Internal(String),
    /// The origin failed for good (its retries spent) or lied.
    Origin(crate::origin::OriginError),
}

pub(super) struct Schedule {
    pub(super) queue: VecDeque<Entry>,
    pub(super) in_flight: usize,
    pub(super) dead: Vec<bool>,
    pub(super) consecutive_failures: Vec<u32>,
    pub(super) failure: Option<Failure>,
    pub(super) totals: Vec<SourceTotals>,
    /// Bytes and pieces per transport name.
    pub(super) transports: Vec<(String, u64, u32)>,
    /// Per RDMA rail pair: (rail, bytes, pieces).
    pub(super) rails: Vec<(String, u64, u32)>,
    pub(super) rdma_fallbacks: u32,
    pub(super) retries: u32,
    /// The origin's source index, when there is one: it takes only pieces every live peer
    /// has tried (back to source), or any piece once no peer is left.
    pub(super) origin: Option<usize>,
    /// Per source, the weight of the per-piece choice (Dragonfly's `SyncHost` weight);
    /// empty when the transfer does not weigh its sources (any free worker takes the next
    /// piece).
    weights: Vec<u64>,
    /// The seeded generator of the weighted choice (deterministic for a given seed).
    rng: u64,
}

impl Schedule {
    pub(super) fn new(pieces: &[u32], sources: usize) -> Schedule {
        Schedule {
            queue: pieces
                .iter()
                .map(|&number| Entry {
                    number,
                    attempts: 0,
                    tried: 0,
                    last_error: String::new(),
                    owner: None,
                })
                .collect(),
            in_flight: 0,
            dead: vec![false; sources],
            consecutive_failures: vec![0; sources],
            failure: None,
            totals: vec![SourceTotals::default(); sources],
            transports: Vec::new(),
            rails: Vec::new(),
            rdma_fallbacks: 0,
            retries: 0,
            origin: None,
            weights: Vec::new(),
            rng: 0,
        }
    }

    /// Assigns every piece to a source by weighted random choice (Dragonfly's second-phase
    /// parent choice: a parent's share follows its spare upload bandwidth). A source takes
    /// its own pieces first, pieces whose owner died or failed them next, and another live
    /// source's pieces only in the endgame (no more pieces queued than in flight), so that a
    /// parent the scheduler found busy is not loaded beyond its share, and a slow one does
    /// not hold up the last pieces. A weight of 0 counts as 1.
    pub(super) fn weigh(&mut self, weights: Vec<u64>, seed: u64) {
        debug_assert_eq!(weights.len(), self.dead.len());
        self.weights = weights;
        self.rng = seed;
        let mut queue = std::mem::take(&mut self.queue);
        for entry in &mut queue {
            entry.owner = self.choose(entry.tried);
        }
        self.queue = queue;
    }

    /// A weighted random live source that has not tried the piece (`tried` mask), the
    /// origin left out; `None` when weights are off or no such source is left.
    fn choose(&mut self, tried: u64) -> Option<usize> {
        let candidates: Vec<(usize, u64)> = self
            .weights
            .iter()
            .enumerate()
            .filter(|&(i, _)| !self.dead[i] && self.origin != Some(i) && tried & (1 << i) == 0)
            .map(|(i, &w)| (i, w.max(1)))
            .collect();
        let total: u64 = candidates.iter().map(|c| c.1).sum();
        if total == 0 {
            return None;
        }
        // splitmix64: small, seedable, good enough to spread pieces.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let mut pick = ((u128::from(z) * u128::from(total)) >> 64) as u64;
        for (i, w) in candidates {
            if pick < w {
                return Some(i);
            }
            pick -= w;
        }
        None
    }

    /// Puts a piece that failed back at the front of the queue, assigned afresh (weighted,
    /// among the live sources that have not tried it).
    pub(super) fn requeue(&mut self, mut entry: Entry) {
        entry.owner = self.choose(entry.tried);
        self.queue.push_front(entry);
    }

    /// Gives up on a source: it takes no more pieces, and the pieces assigned to it are
    /// assigned afresh.
    pub(super) fn mark_dead(&mut self, source: usize) {
        self.dead[source] = true;
        let mut queue = std::mem::take(&mut self.queue);
        for entry in &mut queue {
            if entry.owner == Some(source) {
                entry.owner = self.choose(entry.tried);
            }
        }
        self.queue = queue;
    }

    /// Counts a piece into its transport's totals, and each stripe into its rail pair's (a
    /// striped piece counts as a piece on every pair that carried a stripe of it).
    pub(super) fn count_transport(&mut self, name: &str, rails: &[RailShare], bytes: u64) {
        count_into(&mut self.transports, name, bytes);
        for share in rails {
            count_into(&mut self.rails, &share.rail, share.bytes);
        }
    }

    /// The next piece for source `me`: one it has not tried yet, or one that no live source
    /// has left untried.
    pub(super) fn next_for(&mut self, me: usize) -> Next {
        if self.failure.is_some() || self.dead[me] {
            return Next::Done;
        }
        let alive: u64 = self
            .dead
            .iter()
            .enumerate()
            .filter(|(_, d)| !**d)
            .fold(0, |mask, (i, _)| mask | 1 << i);
        let bit = 1u64 << me;
        let position = if self.origin == Some(me) {
            let peers = alive & !bit;
            self.queue.iter().position(|e| e.tried & peers == peers)
        } else if !self.weights.is_empty() {
            let dead = &self.dead;
            let endgame = self.queue.len() <= self.in_flight;
            let untried = |e: &Entry| e.tried & bit == 0;
            let orphan = |e: &Entry| {
                e.owner
                    .is_none_or(|owner| dead[owner] || e.tried & (1 << owner) != 0)
            };
            self.queue
                .iter()
                .position(|e| untried(e) && e.owner == Some(me))
                .or_else(|| self.queue.iter().position(|e| untried(e) && orphan(e)))
                .or_else(|| {
                    endgame
                        .then(|| self.queue.iter().position(untried))
                        .flatten()
                })
                .or_else(|| self.queue.iter().position(|e| e.tried & alive == alive))
        } else {
            self.queue
                .iter()
                .position(|e| e.tried & bit == 0)
                .or_else(|| self.queue.iter().position(|e| e.tried & alive == alive))
        };
        match position {
            Some(at) => {
                self.in_flight += 1;
                Next::Piece(self.queue.remove(at).expect("position is valid"))
            }
            None if self.queue.is_empty() && self.in_flight == 0 => Next::Done,
            None => Next::Wait,
        }
    }

    pub(super) fn fail(&mut self, failure: Failure) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
    }
}

pub(super) enum Next {
    Piece(Entry),
    Wait,
    Done,
}

/// Adds one piece of `bytes` to `name`'s (name, bytes, pieces) entry.
fn count_into(totals: &mut Vec<(String, u64, u32)>, name: &str, bytes: u64) {
    match totals.iter_mut().find(|t| t.0 == name) {
        Some(entry) => {
            entry.1 += bytes;
            entry.2 += 1;
        }
        None => totals.push((name.to_owned(), bytes, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(schedule: &mut Schedule, source: usize) -> Option<Entry> {
        match schedule.next_for(source) {
            Next::Piece(entry) => Some(entry),
            _ => None,
        }
    }

    #[test]
    fn pieces_are_handed_out_in_order_and_the_end_waits_for_in_flight_work() {
        let mut s = Schedule::new(&[0, 1], 2);
        assert_eq!(take(&mut s, 0).unwrap().number, 0);
        assert_eq!(take(&mut s, 1).unwrap().number, 1);
        assert!(
            matches!(s.next_for(0), Next::Wait),
            "pieces in flight may still come back"
        );
        s.in_flight = 0;
        assert!(matches!(s.next_for(0), Next::Done));
    }

    #[test]
    fn a_failed_piece_goes_to_another_source_first() {
        let mut s = Schedule::new(&[7], 2);
        let mut entry = take(&mut s, 0).unwrap();
        s.in_flight -= 1;
        entry.tried |= 1;
        entry.attempts = 1;
        s.queue.push_front(entry);
        assert!(
            matches!(s.next_for(0), Next::Wait),
            "source 0 already failed it while source 1 has not tried"
        );
        assert_eq!(take(&mut s, 1).unwrap().number, 7);
    }

    #[test]
    fn with_the_other_source_dead_the_same_source_may_retry() {
        let mut s = Schedule::new(&[3], 2);
        let mut entry = take(&mut s, 0).unwrap();
        s.in_flight -= 1;
        entry.tried |= 1;
        s.queue.push_front(entry);
        s.dead[1] = true;
        assert_eq!(take(&mut s, 0).unwrap().number, 3);
        assert!(
            matches!(s.next_for(1), Next::Done),
            "a dead source takes nothing"
        );
    }

    #[test]
    fn the_origin_takes_only_what_every_live_peer_failed() {
        let mut s = Schedule::new(&[0, 1], 3);
        s.origin = Some(2);
        assert!(
            matches!(s.next_for(2), Next::Wait),
            "nothing for the origin while peers have pieces untried"
        );
        let mut entry = take(&mut s, 0).unwrap();
        s.in_flight -= 1;
        entry.tried |= 1;
        s.queue.push_front(entry);
        assert!(
            matches!(s.next_for(2), Next::Wait),
            "peer 1 has not tried it"
        );
        s.dead[1] = true;
        assert_eq!(take(&mut s, 2).unwrap().number, 0, "back to source");
        s.dead[0] = true;
        assert_eq!(take(&mut s, 2).unwrap().number, 1, "no peer left");
    }

    /// Takes every piece a source may take now (no settling), by source.
    fn drain_owned(s: &mut Schedule, sources: usize) -> Vec<u32> {
        let mut taken = vec![0; sources];
        loop {
            let mut progressed = false;
            for (source, count) in taken.iter_mut().enumerate() {
                if take(s, source).is_some() {
                    *count += 1;
                    progressed = true;
                }
            }
            if !progressed {
                return taken;
            }
        }
    }

    #[test]
    fn weighted_pieces_follow_the_weights_and_replay_from_the_seed() {
        let pieces: Vec<u32> = (0..4000).collect();
        let mut s = Schedule::new(&pieces, 2);
        s.weigh(vec![3_000, 1_000], 7);
        let owners: Vec<Option<usize>> = s.queue.iter().map(|e| e.owner).collect();
        let first = owners.iter().filter(|o| **o == Some(0)).count();
        assert!(
            (2850..=3150).contains(&first),
            "a 3:1 weight gives about three quarters: {first} of 4000"
        );
        let mut again = Schedule::new(&pieces, 2);
        again.weigh(vec![3_000, 1_000], 7);
        assert!(again
            .queue
            .iter()
            .map(|e| e.owner)
            .eq(owners.iter().copied()));
        let mut other = Schedule::new(&pieces, 2);
        other.weigh(vec![3_000, 1_000], 8);
        assert!(!other
            .queue
            .iter()
            .map(|e| e.owner)
            .eq(owners.iter().copied()));
    }

    #[test]
    fn a_light_parent_takes_only_its_share_until_the_endgame() {
        let pieces: Vec<u32> = (0..100).collect();
        let mut s = Schedule::new(&pieces, 2);
        s.weigh(vec![9, 1], 1);
        let share_1 = s.queue.iter().filter(|e| e.owner == Some(1)).count();
        assert!(share_1 > 0 && share_1 < 30, "{share_1}");
        // Source 1 drains its own pieces, then waits while source 0 has many queued.
        let mut own = 0;
        while let Some(entry) = take(&mut s, 1) {
            assert_eq!(entry.owner, Some(1), "only its own pieces");
            own += 1;
        }
        assert_eq!(own, share_1);
        assert!(matches!(s.next_for(1), Next::Wait));
        // Endgame: no more queued than in flight, then anyone takes what is left.
        while s.queue.len() > s.in_flight {
            take(&mut s, 0).unwrap();
        }
        let stolen = take(&mut s, 1).expect("the endgame lets a light parent help");
        assert_eq!(stolen.owner, Some(0));
    }

    #[test]
    fn a_failed_or_orphaned_piece_is_assigned_again_among_the_others() {
        let mut s = Schedule::new(&[0, 1, 2, 3, 4, 5, 6, 7], 3);
        s.weigh(vec![1, 1, 1], 3);
        let mut entry = take(&mut s, 0).expect("source 0 owns a piece with this seed");
        s.in_flight -= 1;
        entry.tried |= 1;
        s.requeue(entry);
        let front = s.queue.front().unwrap();
        assert!(
            matches!(front.owner, Some(1) | Some(2)),
            "{:?}",
            front.owner
        );
        s.mark_dead(1);
        assert!(
            s.queue.iter().all(|e| e.owner != Some(1)),
            "a dead source's pieces go to the live ones"
        );
        let counts = drain_owned(&mut s, 3);
        assert_eq!(counts[1], 0);
        assert_eq!(counts[0] + counts[2], 8);
    }

    #[test]
    fn a_failure_stops_every_worker() {
        let mut s = Schedule::new(&[1, 2, 3], 2);
        s.fail(Failure::Exhausted("piece 1".into()));
        s.fail(Failure::Cancelled);
        assert!(
            matches!(s.failure, Some(Failure::Exhausted(_))),
            "the first failure is kept"
        );
        assert!(matches!(s.next_for(0), Next::Done));
        assert!(matches!(s.next_for(1), Next::Done));
    }
}
