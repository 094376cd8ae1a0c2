//! Whether one rail pair to a peer may carry pieces now: a pure state machine (time is an
//! argument), so pausing, back-off and probing are tested without a fabric.
//!
//! A rail pair is `Up` until it fails. A hard failure (its queue pair broke: link down, retry
//! exceeded, a completion error; or its set-up failed) takes it out at once; soft failures (a
//! piece the source failed while the queue pair stayed up) take it out when
//! [`HealthSettings::errors_to_pause`] of them fall within [`HealthSettings::error_window`].
//! Taken out, it is `Paused` for a back-off that starts at [`HealthSettings::first_pause`] and
//! doubles with each pause in a row up to [`HealthSettings::max_pause`]. When the back-off has
//! run out, one piece probes it: success brings it back (and resets the back-off), failure
//! pauses it again for longer. No state waits on anything but time, so nothing here is
//! unbounded.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    pub errors_to_pause: u32,
    pub error_window: Duration,
    pub first_pause: Duration,
    pub max_pause: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            errors_to_pause: 3,
            error_window: Duration::from_secs(10),
            first_pause: Duration::from_secs(30),
            max_pause: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RailState {
    Up,
    /// Taken out until `until`; then one piece probes it.
    Paused {
        until: Instant,
    },
    /// The back-off ran out and a probe piece is on it: nothing else goes there meanwhile.
    Probing,
}

/// What a pick may do with the rail pair now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Carry pieces.
    Carry,
    /// Carry exactly one piece, the probe (the caller then calls [`RailHealth::probe_started`]).
    Probe,
    No,
}

/// A change worth logging and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// Taken out for `pause` (the `pauses`-th pause in a row).
    Paused {
        pause: Duration,
        pauses: u32,
    },
    /// A probe succeeded: the rail pair carries pieces again.
    Rejoined,
}

#[derive(Debug, Clone)]
pub struct RailHealth {
    settings: HealthSettings,
    state: RailState,
    /// When the recent soft failures happened (within the error window).
    errors: VecDeque<Instant>,
    /// Pauses in a row since the rail pair last worked.
    pauses: u32,
}

impl RailHealth {
    pub fn new(settings: HealthSettings) -> RailHealth {
        RailHealth {
            settings,
            state: RailState::Up,
            errors: VecDeque::new(),
            pauses: 0,
        }
    }

    pub fn state(&self) -> RailState {
        self.state
    }

    /// Up, or paused with its back-off over (a probe may go): not given up on for now.
    pub fn is_up(&self) -> bool {
        self.state == RailState::Up
    }

    pub fn can_use(&self, now: Instant) -> Use {
        match self.state {
            RailState::Up => Use::Carry,
            RailState::Paused { until } if now >= until => Use::Probe,
            RailState::Paused { .. } | RailState::Probing => Use::No,
        }
    }

    /// The probe piece was sent: no other piece goes here until it ends.
    pub fn probe_started(&mut self) {
        if matches!(self.state, RailState::Paused { .. }) {
            self.state = RailState::Probing;
        }
    }

    /// The probe piece never went (nothing carried it): the probe is due again.
    pub fn probe_abandoned(&mut self, now: Instant) {
        if self.state == RailState::Probing {
            self.state = RailState::Paused { until: now };
        }
    }

    pub fn on_success(&mut self) -> Change {
        match self.state {
            RailState::Up => {
                self.errors.clear();
                Change::None
            }
            // A piece that was in flight before the pause: only the probe decides.
            RailState::Paused { .. } => Change::None,
            RailState::Probing => {
                self.errors.clear();
                self.pauses = 0;
                self.state = RailState::Up;
                Change::Rejoined
            }
        }
    }

    /// A probe that ended without deciding (the source does not hold the piece): the rail
    /// pair worked, as far as it went.
    pub fn on_neutral(&mut self, probe: bool) -> Change {
        if probe {
            self.on_success()
        } else {
            Change::None
        }
    }

    /// A piece failed on the rail pair. `hard`: its queue pair or set-up failed.
    pub fn on_failure(&mut self, hard: bool, now: Instant) -> Change {
        match self.state {
            // Already out (the other pieces that were in flight on a broken queue pair).
            RailState::Paused { .. } => return Change::None,
            RailState::Probing => return self.pause(now),
            RailState::Up => {}
        }
        if hard {
            return self.pause(now);
        }
        let window = self.settings.error_window;
        self.errors.push_back(now);
        while self
            .errors
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > window)
        {
            self.errors.pop_front();
        }
        if self.errors.len() >= self.settings.errors_to_pause.max(1) as usize {
            self.pause(now)
        } else {
            Change::None
        }
    }

    fn pause(&mut self, now: Instant) -> Change {
        self.errors.clear();
        self.pauses = self.pauses.saturating_add(1);
        let doubled = self
            .settings
            .first_pause
            .saturating_mul(1u32.checked_shl(self.pauses - 1).unwrap_or(u32::MAX));
        let pause = doubled.min(self.settings.max_pause);
        self.state = RailState::Paused { until: now + pause };
        Change::Paused {
            pause,
            pauses: self.pauses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_hard_failure_pauses_at_once_and_a_probe_brings_it_back() {
        let t0 = Instant::now();
        let mut health = RailHealth::new(HealthSettings::default());
        assert_eq!(health.can_use(t0), Use::Carry);
        assert_eq!(
            health.on_failure(true, t0),
            Change::Paused {
                pause: secs(30),
                pauses: 1
            }
        );
        // The other pieces that were on the broken queue pair change nothing, and neither
        // does one that was in flight elsewhere and succeeds.
        assert_eq!(health.on_failure(true, t0), Change::None);
        assert_eq!(health.on_success(), Change::None);
        assert_eq!(health.can_use(t0 + secs(29)), Use::No);
        assert_eq!(health.can_use(t0 + secs(30)), Use::Probe);
        health.probe_started();
        assert_eq!(
            health.can_use(t0 + secs(31)),
            Use::No,
            "one probe at a time"
        );
        assert_eq!(health.on_success(), Change::Rejoined);
        assert_eq!(health.can_use(t0 + secs(31)), Use::Carry);
    }

    #[test]
    fn three_soft_failures_within_ten_seconds_pause_it() {
        let t0 = Instant::now();
        let mut health = RailHealth::new(HealthSettings::default());
        assert_eq!(health.on_failure(false, t0), Change::None);
        assert_eq!(health.on_failure(false, t0 + secs(6)), Change::None);
        // The first is out of the window by now: still two.
        assert_eq!(health.on_failure(false, t0 + secs(11)), Change::None);
        assert!(matches!(
            health.on_failure(false, t0 + secs(12)),
            Change::Paused { pauses: 1, .. }
        ));
        // A success in between resets the count.
        let mut other = RailHealth::new(HealthSettings::default());
        other.on_failure(false, t0);
        other.on_failure(false, t0);
        assert_eq!(other.on_success(), Change::None);
        assert_eq!(other.on_failure(false, t0), Change::None);
    }

    #[test]
    fn failed_probes_double_the_pause_up_to_five_minutes_and_success_resets_it() {
        let mut now = Instant::now();
        let mut health = RailHealth::new(HealthSettings::default());
        let mut pauses = Vec::new();
        health.on_failure(true, now);
        for _ in 0..6 {
            let RailState::Paused { until } = health.state() else {
                panic!("paused")
            };
            now = until;
            assert_eq!(health.can_use(now), Use::Probe);
            health.probe_started();
            match health.on_failure(false, now) {
                Change::Paused { pause, .. } => pauses.push(pause.as_secs()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(pauses, [60, 120, 240, 300, 300, 300]);
        let RailState::Paused { until } = health.state() else {
            panic!("paused")
        };
        health.probe_started();
        assert_eq!(health.on_success(), Change::Rejoined);
        assert_eq!(
            health.on_failure(true, until),
            Change::Paused {
                pause: secs(30),
                pauses: 1
            },
            "back-off starts over after the rail worked"
        );
    }

    #[test]
    fn a_probe_the_source_could_not_serve_still_proves_the_rail() {
        let t0 = Instant::now();
        let mut health = RailHealth::new(HealthSettings::default());
        health.on_failure(true, t0);
        assert_eq!(health.on_neutral(false), Change::None);
        assert!(!health.is_up());
        health.probe_started();
        assert_eq!(health.on_neutral(true), Change::Rejoined);
        assert!(health.is_up());
    }
}
