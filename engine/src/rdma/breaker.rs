//! A per-source circuit breaker for the RDMA path, as a pure state machine: no clock of its
//! own (every call is given `now`), no I/O, so every transition is tested deterministically.
//!
//! Closed: pieces go over RDMA. `failures` RDMA failures within `window` trip it: Open, the
//! source's pieces go over TCP for a back-off (`backoff`, doubling with every consecutive trip,
//! at most `max_backoff`). When the back-off has run out, one piece probes RDMA (HalfOpen; the
//! others keep using TCP): its success closes the breaker and resets the back-off, its failure
//! opens it again for twice as long. So a source whose RDMA path is broken costs a bounded
//! number of failed pieces per back-off, never a queue-pair rebuild and a stall per piece.
//!
//! A peer that has no RDMA at all (it refuses the upgrade) is not the breaker's business: the
//! transport marks it TCP-only at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failures within `window` that open the breaker.
    pub failures: u32,
    pub window: Duration,
    /// The first back-off; doubled for every consecutive trip.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 3,
            window: Duration::from_secs(10),
            backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// How one piece may go to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed: over RDMA.
    Rdma,
    /// The back-off ran out: this piece tests RDMA again; report its outcome as a probe.
    Probe,
    /// Open (or a probe is in flight): over TCP.
    Tcp,
}

/// What an outcome did, for the caller to count and act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The breaker opened for `backoff` (its `trip`-th consecutive trip).
    Tripped {
        backoff: Duration,
        trip: u32,
    },
    /// A probe succeeded: closed again.
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Closed { failures: VecDeque<Instant> },
    Open { until: Instant, trips: u32 },
    HalfOpen { trips: u32 },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    state: State,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Breaker {
        Breaker {
            settings,
            state: State::Closed {
                failures: VecDeque::new(),
            },
        }
    }

    /// The back-off of the `trip`-th consecutive trip: `backoff * 2^(trip-1)`, bounded.
    pub fn backoff(&self, trip: u32) -> Duration {
        let doubled = self
            .settings
            .backoff
            .checked_mul(1u32 << trip.saturating_sub(1).min(31))
            .unwrap_or(self.settings.max_backoff);
        doubled.min(self.settings.max_backoff)
    }

    /// Whether a piece asked for now would be let onto RDMA (as a plain piece or a probe),
    /// without changing anything.
    pub fn would_admit(&self, now: Instant) -> bool {
        match &self.state {
            State::Closed { .. } => true,
            State::Open { until, .. } => now >= *until,
            State::HalfOpen { .. } => false,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// Decides how a piece asked for at `now` goes; a `Probe` must be reported back with
    /// `probe: true`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Rdma,
            State::Open { until, trips } if now >= until => {
                self.state = State::HalfOpen { trips };
                Admission::Probe
            }
            State::Open { .. } | State::HalfOpen { .. } => Admission::Tcp,
        }
    }

    /// A piece admitted as `probe` (or not) succeeded over RDMA.
    pub fn on_success(&mut self, probe: bool, _now: Instant) -> Transition {
        match self.state {
            State::HalfOpen { .. } if probe => {
                self.state = State::Closed {
                    failures: VecDeque::new(),
                };
                Transition::Closed
            }
            // A plain piece admitted before a trip says nothing about the path now.
            _ => Transition::None,
        }
    }

    /// A piece admitted as `probe` (or not) failed over RDMA (or was abandoned).
    pub fn on_failure(&mut self, probe: bool, now: Instant) -> Transition {
        match &mut self.state {
            State::Closed { failures } if !probe => {
                failures.push_back(now);
                while failures
                    .front()
                    .is_some_and(|&at| now.saturating_duration_since(at) > self.settings.window)
                {
                    failures.pop_front();
                }
                if failures.len() as u32 >= self.settings.failures.max(1) {
                    self.trip(1, now)
                } else {
                    Transition::None
                }
            }
            State::HalfOpen { trips } if probe => {
                let trip = trips.saturating_add(1);
                self.trip(trip, now)
            }
            // Late outcomes of pieces admitted before the trip change nothing.
            _ => Transition::None,
        }
    }

    fn trip(&mut self, trip: u32, now: Instant) -> Transition {
        let backoff = self.backoff(trip);
        self.state = State::Open {
            until: now + backoff,
            trips: trip,
        };
        Transition::Tripped { backoff, trip }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn three_failures_within_the_window_trip_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerSettings::default());
        assert_eq!(b.admit(t0), Admission::Rdma);
        assert_eq!(b.on_failure(false, t0), Transition::None);
        assert_eq!(b.on_failure(false, t0 + secs(4)), Transition::None);
        assert!(b.would_admit(t0 + secs(5)));
        assert_eq!(
            b.on_failure(false, t0 + secs(9)),
            Transition::Tripped {
                backoff: secs(30),
                trip: 1
            }
        );
        assert!(!b.would_admit(t0 + secs(10)));
        assert_eq!(b.admit(t0 + secs(10)), Admission::Tcp);
        assert_eq!(b.admit(t0 + secs(38)), Admission::Tcp, "until 9 + 30 s");
    }

    #[test]
    fn failures_spread_wider_than_the_window_do_not() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerSettings::default());
        for i in 0..10 {
            assert_eq!(b.on_failure(false, t0 + secs(6 * i)), Transition::None);
        }
        assert!(b.is_closed());
        assert_eq!(b.admit(t0 + secs(60)), Admission::Rdma);
    }

    #[test]
    fn after_the_backoff_one_probe_goes_and_its_success_closes_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerSettings::default());
        for _ in 0..3 {
            b.on_failure(false, t0);
        }
        let later = t0 + secs(30);
        assert!(b.would_admit(later));
        assert_eq!(b.admit(later), Admission::Probe);
        // Only one probe at a time: the others go over TCP meanwhile.
        assert!(!b.would_admit(later));
        assert_eq!(b.admit(later), Admission::Tcp);
        // A plain piece's late outcome does not decide anything.
        assert_eq!(b.on_success(false, later), Transition::None);
        assert_eq!(b.on_failure(false, later), Transition::None);
        assert_eq!(b.on_success(true, later + secs(1)), Transition::Closed);
        assert!(b.is_closed());
        assert_eq!(b.admit(later + secs(1)), Admission::Rdma);
        // Closed again from scratch: the next trip backs off 30 s, not 60.
        for _ in 0..3 {
            b.on_failure(false, later + secs(2));
        }
        assert_eq!(b.admit(later + secs(31)), Admission::Tcp);
        assert_eq!(b.admit(later + secs(32)), Admission::Probe);
    }

    #[test]
    fn a_failed_probe_doubles_the_backoff_up_to_the_bound() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerSettings::default());
        for _ in 0..3 {
            b.on_failure(false, t0);
        }
        let mut now = t0;
        let mut seen = Vec::new();
        let mut backoff = secs(30);
        for _ in 0..6 {
            now += backoff;
            assert_eq!(b.admit(now - Duration::from_millis(1)), Admission::Tcp);
            assert_eq!(b.admit(now), Admission::Probe);
            match b.on_failure(true, now) {
                Transition::Tripped {
                    backoff: next,
                    trip,
                } => {
                    seen.push((trip, next.as_secs()));
                    backoff = next;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            seen,
            [(2, 60), (3, 120), (4, 240), (5, 300), (6, 300), (7, 300)]
        );
        assert_eq!(b.backoff(40), secs(300), "no overflow however many trips");
    }

    #[test]
    fn settings_shape_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerSettings {
            failures: 1,
            window: secs(1),
            backoff: secs(2),
            max_backoff: secs(3),
        });
        assert!(matches!(
            b.on_failure(false, t0),
            Transition::Tripped { trip: 1, .. }
        ));
        assert_eq!(b.admit(t0 + secs(2)), Admission::Probe);
        assert_eq!(
            b.on_failure(true, t0 + secs(2)),
            Transition::Tripped {
                backoff: secs(3),
                trip: 2
            }
        );
    }
}
