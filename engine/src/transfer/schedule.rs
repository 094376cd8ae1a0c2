//! The schedule of one transfer: which piece goes to which source next, retries and the
//! first failure that stops every worker. Pure state, no I/O.

use super::SourceTotals;
use crate::store::StoreError;
use std::collections::VecDeque;

pub(super) struct Entry {
    pub(super) number: u32,
    pub(super) attempts: u32,
    pub(super) tried: u64,
    pub(super) last_error: String,
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
    pub(super) rdma_fallbacks: u32,
    pub(super) retries: u32,
    /// The origin's source index, when there is one: it takes only pieces every live peer
    /// has tried (back to source), or any piece once no peer is left.
    pub(super) origin: Option<usize>,
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
                })
                .collect(),
            in_flight: 0,
            dead: vec![false; sources],
            consecutive_failures: vec![0; sources],
            failure: None,
            totals: vec![SourceTotals::default(); sources],
            transports: Vec::new(),
            rdma_fallbacks: 0,
            retries: 0,
            origin: None,
        }
    }

    pub(super) fn count_transport(&mut self, name: &str, bytes: u64) {
        match self.transports.iter_mut().find(|t| t.0 == name) {
            Some(entry) => {
                entry.1 += bytes;
                entry.2 += 1;
            }
            None => self.transports.push((name.to_owned(), bytes, 1)),
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
