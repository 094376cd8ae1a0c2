//! The receiving side's requests on one queue pair, as a pure state machine: no verbs, no
//! sockets and no clock of its own (every call that needs the time is given it), so each
//! transition is tested deterministically. The session (`session.rs`) is its I/O shell: it
//! posts what this decides, feeds it the completions and answers that arrive, and holds the
//! memory windows.
//!
//! A request's life: opened (a request id from the credit window and its worst-case share of
//! the send queue, reserved up front so no post finds the queue full), granted (its windows
//! bound and the request posted, back to back), answered (Done, or Failed/NotHeld, which do
//! not break the queue pair), taken back (the window the answer's SEND_WITH_INVALIDATE named
//! is already invalid; the others are invalidated here), finished (id, share and the buffer's
//! device lease released). A fetch dropped on the way (a cancelled transfer, a piece timeout)
//! abandons its request: the machine finishes it once the answer came and the windows are
//! back, and only a source that leaves it unanswered breaks the queue pair.

use ferry_rdma::credit::ReceiveWindow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The source's answer to one request, as it came over the queue pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    Done {
        number: u32,
        length: u64,
        digest: String,
    },
    Failed {
        not_held: bool,
        message: String,
    },
}

/// What a source (or the silence of one) did that ends the queue pair.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(super) enum Violation {
    #[error("an answer for request {0}, which is not in flight")]
    NotInFlight(u16),
    #[error("request {0} was answered twice")]
    AnsweredTwice(u16),
    #[error("the source's answer to request {request} invalidated rkey {rkey:#x}, which that request did not grant")]
    ForeignInvalidation { request: u16, rkey: u32 },
    #[error("abandoned request {request} unanswered within {limit:?} (and no other answer on the queue pair meanwhile)")]
    Unanswered { request: u16, limit: Duration },
    #[error("abandoned request {request}'s windows not taken back within {limit:?}")]
    NotTakenBack { request: u16, limit: Duration },
}

/// Why a request could not be opened now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    /// Every request id of the credit window is in flight.
    Window,
    /// The send-queue shares of the requests in flight leave too little for this one.
    SendQueue,
}

/// What the answer left to take back: the windows still bound (to invalidate here, the last
/// signalled) and how many the source's message invalidated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TakeBack {
    pub left: Vec<u32>,
    pub by_peer: u64,
}

/// Work for the shell from [`Requests::poll_abandoned`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Post local invalidations of `rkeys` for `request` (the last one signalled).
    Invalidate { request: u16, take_back: TakeBack },
    /// Every window of `request` is back: finish it.
    Settled(u16),
}

#[derive(Debug)]
struct Request<L> {
    entries: u32,
    lease: Option<L>,
    /// A bind may have been posted: from here the device may write the buffer.
    bound: bool,
    /// The rkeys granted, once the binds and the request are posted.
    granted: Option<Vec<u32>>,
    /// The request's SEND completed (its entries, and its binds', are free on the device).
    sent: bool,
    answer: Option<Answer>,
    remote_invalidated: Option<u32>,
    /// Once the take-back is decided: whether nothing was left to invalidate here.
    nothing_left: Option<bool>,
    /// The local invalidation (the last one, signalled) completed.
    invalidated: bool,
    abandoned_since: Option<Instant>,
}

impl<L> Request<L> {
    fn taken_back(&self) -> bool {
        self.sent && (self.nothing_left == Some(true) || self.invalidated)
    }
}

/// The requests on one queue pair. `L` is what keeps a request's buffer from the pool while
/// a device may write it (a device lease in the daemon).
#[derive(Debug)]
pub(super) struct Requests<L> {
    window: ReceiveWindow,
    table: HashMap<u16, Request<L>>,
    send_queue_depth: u32,
    reserved: u32,
    last_answer: Instant,
    abandoned: usize,
}

impl<L> Requests<L> {
    pub(super) fn new(window: usize, send_queue_depth: u32, now: Instant) -> Requests<L> {
        Requests {
            window: ReceiveWindow::new(window),
            table: HashMap::new(),
            send_queue_depth,
            reserved: 0,
            last_answer: now,
            abandoned: 0,
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.table.len()
    }

    /// Send-queue entries the requests in flight may use at worst.
    #[cfg(test)]
    pub(super) fn reserved(&self) -> u32 {
        self.reserved
    }

    /// Opens a request that may use `entries` send-queue entries (its binds, its request and
    /// its invalidations); `lease` is released when it finishes.
    pub(super) fn open(&mut self, entries: u32, lease: L) -> Result<u16, Full> {
        if !self.window.has_room() {
            return Err(Full::Window);
        }
        if self.reserved + entries > self.send_queue_depth {
            return Err(Full::SendQueue);
        }
        // Answers carry no chunk immediates: a request completes with its answer alone.
        let request = self.window.open(0).map_err(|_| Full::Window)?;
        self.reserved += entries;
        self.table.insert(
            request,
            Request {
                entries,
                lease: Some(lease),
                bound: false,
                granted: None,
                sent: false,
                answer: None,
                remote_invalidated: None,
                nothing_left: None,
                invalidated: false,
                abandoned_since: None,
            },
        );
        Ok(request)
    }

    /// The request's binds are about to be posted.
    pub(super) fn binding(&mut self, request: u16) {
        if let Some(r) = self.table.get_mut(&request) {
            r.bound = true;
        }
    }

    /// Whether a bind of the request may have been posted (its buffer reachable by the device).
    pub(super) fn is_bound(&self, request: u16) -> bool {
        self.table.get(&request).is_some_and(|r| r.bound)
    }

    /// Whether the request still holds its lease on a buffer the device may have been given.
    pub(super) fn holds_bound_lease(&self, request: u16) -> bool {
        self.table
            .get(&request)
            .is_some_and(|r| r.bound && r.lease.is_some())
    }

    /// The request's windows are bound with `rkeys` and the request is posted.
    pub(super) fn granted(&mut self, request: u16, rkeys: Vec<u32>) {
        if let Some(r) = self.table.get_mut(&request) {
            r.bound = true;
            r.granted = Some(rkeys);
        }
    }

    #[cfg(test)]
    pub(super) fn is_granted(&self, request: u16) -> bool {
        self.table
            .get(&request)
            .is_some_and(|r| r.granted.is_some())
    }

    /// The request's SEND completed.
    pub(super) fn on_sent(&mut self, request: u16) {
        if let Some(r) = self.table.get_mut(&request) {
            r.sent = true;
        }
    }

    /// The request's last local invalidation completed.
    pub(super) fn on_invalidated(&mut self, request: u16) {
        if let Some(r) = self.table.get_mut(&request) {
            r.invalidated = true;
        }
    }

    /// The source answered `request`; its message invalidated `invalidated` here.
    pub(super) fn on_answer(
        &mut self,
        request: u16,
        answer: Answer,
        invalidated: Option<u32>,
        now: Instant,
    ) -> Result<(), Violation> {
        let r = (self.table.get_mut(&request)).ok_or(Violation::NotInFlight(request))?;
        if r.answer.is_some() {
            return Err(Violation::AnsweredTwice(request));
        }
        let _ = self.window.on_done(request);
        r.answer = Some(answer);
        r.remote_invalidated = invalidated;
        self.last_answer = now;
        Ok(())
    }

    pub(super) fn answer(&self, request: u16) -> Option<&Answer> {
        self.table.get(&request)?.answer.as_ref()
    }

    /// When a wait for `request` that began at `began` times out: `limit` after the later of
    /// that and the queue pair's last answer, so a request queued behind others on a busy
    /// queue pair is not timed out while they are served.
    pub(super) fn deadline(&self, began: Instant, limit: Duration) -> Instant {
        began.max(self.last_answer) + limit
    }

    /// Decides the take-back of an answered request: the window the answer's message
    /// invalidated must be one this request granted.
    pub(super) fn take_back(&mut self, request: u16) -> Result<TakeBack, Violation> {
        let r = (self.table.get_mut(&request)).ok_or(Violation::NotInFlight(request))?;
        let granted = r.granted.as_deref().unwrap_or_default();
        if let Some(rkey) = r.remote_invalidated {
            if !granted.contains(&rkey) {
                return Err(Violation::ForeignInvalidation { request, rkey });
            }
        }
        let left: Vec<u32> = (granted.iter().copied())
            .filter(|&rkey| Some(rkey) != r.remote_invalidated)
            .collect();
        r.nothing_left = Some(left.is_empty());
        Ok(TakeBack {
            by_peer: (granted.len() - left.len()) as u64,
            left,
        })
    }

    /// Every window of `request` is back and its entries are free.
    pub(super) fn taken_back(&self, request: u16) -> bool {
        self.table.get(&request).is_some_and(Request::taken_back)
    }

    /// The fetch of `request` was dropped: this machine finishes it from here.
    pub(super) fn abandon(&mut self, request: u16, now: Instant) {
        if let Some(r) = self.table.get_mut(&request) {
            if r.abandoned_since.is_none() {
                r.abandoned_since = Some(now);
                self.abandoned += 1;
            }
        }
    }

    pub(super) fn abandoned(&self) -> usize {
        self.abandoned
    }

    /// Moves abandoned requests on: a request never bound, or whose windows are all back,
    /// is settled; an answered one gets its take-back; one still unanswered (or whose
    /// take-back has not completed) `limit` after it was abandoned and after the last answer
    /// breaks the queue pair.
    pub(super) fn poll_abandoned(
        &mut self,
        now: Instant,
        limit: Duration,
    ) -> Result<Vec<Step>, Violation> {
        if self.abandoned == 0 {
            return Ok(Vec::new());
        }
        let mut steps = Vec::new();
        let abandoned: Vec<u16> = (self.table.iter())
            .filter(|(_, r)| r.abandoned_since.is_some())
            .map(|(&request, _)| request)
            .collect();
        for request in abandoned {
            let r = &self.table[&request];
            let since = r.abandoned_since.expect("abandoned");
            let overdue = now >= since.max(self.last_answer) + limit;
            if !r.bound {
                steps.push(Step::Settled(request));
                continue;
            }
            if r.nothing_left.is_none() {
                if r.answer.is_none() {
                    if overdue {
                        return Err(Violation::Unanswered { request, limit });
                    }
                    continue;
                }
                let take_back = self.take_back(request)?;
                let nothing_left = take_back.left.is_empty();
                steps.push(Step::Invalidate { request, take_back });
                if !nothing_left {
                    continue;
                }
            }
            if self.taken_back(request) {
                steps.push(Step::Settled(request));
            } else if overdue {
                return Err(Violation::NotTakenBack { request, limit });
            }
        }
        Ok(steps)
    }

    /// Ends `request`: its id and send-queue share are free again. Returns the lease, to be
    /// released once no device can touch the buffer (now, if the request was taken back).
    pub(super) fn finish(&mut self, request: u16) -> Option<L> {
        let r = self.table.remove(&request)?;
        self.window.close(request);
        self.reserved -= r.entries;
        if r.abandoned_since.is_some() {
            self.abandoned -= 1;
        }
        r.lease
    }

    /// Takes every request's lease (a flush proved the queue pair in the error state, so no
    /// device touches their buffers any more); returns how many there were.
    pub(super) fn release_leases(&mut self) -> usize {
        (self.table.values_mut())
            .filter_map(|r| r.lease.take())
            .count()
    }

    /// Takes `request`'s lease now (a broken queue pair already flushed, or windows never
    /// bound).
    pub(super) fn release_lease(&mut self, request: u16) -> Option<L> {
        self.table.get_mut(&request)?.lease.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: Duration = Duration::from_secs(10);

    fn done() -> Answer {
        Answer::Done {
            number: 0,
            length: 4096,
            digest: "crc32:0".into(),
        }
    }

    #[test]
    fn the_window_and_the_send_queue_bound_what_opens() {
        let t0 = Instant::now();
        let mut requests = Requests::new(2, 10, t0);
        let a = requests.open(3, "a").unwrap();
        assert_eq!(requests.open(8, "b"), Err(Full::SendQueue), "3 + 8 > 10");
        let b = requests.open(7, "b").unwrap();
        assert_eq!(requests.open(1, "c"), Err(Full::Window));
        assert_eq!(requests.reserved(), 10);
        assert_eq!(requests.finish(a), Some("a"));
        assert_eq!(requests.reserved(), 7);
        assert!(requests.open(3, "c").is_ok());
        assert_eq!(requests.finish(b), Some("b"));
        assert_eq!(requests.in_flight(), 1);
    }

    #[test]
    fn an_answer_that_invalidated_a_granted_window_leaves_the_others_to_take_back() {
        let t0 = Instant::now();
        let mut requests = Requests::new(4, 512, t0);
        let r = requests.open(9, ()).unwrap();
        requests.granted(r, vec![10, 11, 12]);
        requests.on_sent(r);
        requests.on_answer(r, done(), Some(11), t0).unwrap();
        let take_back = requests.take_back(r).unwrap();
        assert_eq!(take_back.left, vec![10, 12]);
        assert_eq!(take_back.by_peer, 1);
        assert!(!requests.taken_back(r), "until the invalidation completes");
        requests.on_invalidated(r);
        assert!(requests.taken_back(r));
    }

    #[test]
    fn a_source_invalidating_a_window_it_was_not_granted_or_answering_twice_is_a_violation() {
        let t0 = Instant::now();
        let mut requests = Requests::new(4, 512, t0);
        let r = requests.open(3, ()).unwrap();
        requests.granted(r, vec![10]);
        requests.on_answer(r, done(), Some(99), t0).unwrap();
        assert_eq!(
            requests.take_back(r),
            Err(Violation::ForeignInvalidation {
                request: r,
                rkey: 99
            })
        );
        assert_eq!(
            requests.on_answer(r, done(), None, t0),
            Err(Violation::AnsweredTwice(r))
        );
        assert_eq!(
            requests.on_answer(r + 1, done(), None, t0),
            Err(Violation::NotInFlight(r + 1))
        );
    }

    #[test]
    fn a_not_held_answer_is_taken_back_like_any_other_and_breaks_nothing() {
        let t0 = Instant::now();
        let mut requests = Requests::new(2, 512, t0);
        let r = requests.open(3, "lease").unwrap();
        requests.granted(r, vec![7]);
        requests.on_sent(r);
        let refusal = Answer::Failed {
            not_held: true,
            message: "not here".into(),
        };
        // A plain SEND: the window is left to this side.
        requests.on_answer(r, refusal.clone(), None, t0).unwrap();
        assert_eq!(requests.answer(r), Some(&refusal));
        assert_eq!(requests.take_back(r).unwrap().left, vec![7]);
        requests.on_invalidated(r);
        assert!(requests.taken_back(r));
        assert_eq!(requests.finish(r), Some("lease"));
        assert!(requests.open(3, "next").is_ok(), "the queue pair goes on");
    }

    #[test]
    fn an_abandoned_request_is_settled_once_answered_and_taken_back() {
        let t0 = Instant::now();
        let mut requests = Requests::new(4, 512, t0);
        let r = requests.open(5, "lease").unwrap();
        requests.granted(r, vec![1, 2]);
        requests.abandon(r, t0);
        assert_eq!(requests.abandoned(), 1);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            requests.poll_abandoned(t1, LIMIT),
            Ok(vec![]),
            "no answer yet"
        );
        requests.on_sent(r);
        requests.on_answer(r, done(), Some(1), t1).unwrap();
        let steps = requests.poll_abandoned(t1, LIMIT).unwrap();
        assert_eq!(
            steps,
            vec![Step::Invalidate {
                request: r,
                take_back: TakeBack {
                    left: vec![2],
                    by_peer: 1
                }
            }]
        );
        assert_eq!(
            requests.poll_abandoned(t1, LIMIT),
            Ok(vec![]),
            "posted once"
        );
        requests.on_invalidated(r);
        assert_eq!(
            requests.poll_abandoned(t1, LIMIT),
            Ok(vec![Step::Settled(r)])
        );
        assert_eq!(requests.finish(r), Some("lease"));
        assert_eq!(requests.abandoned(), 0);
    }

    #[test]
    fn an_abandoned_request_whose_answer_invalidated_its_only_window_settles_at_once() {
        let t0 = Instant::now();
        let mut requests = Requests::new(4, 512, t0);
        let r = requests.open(3, ()).unwrap();
        requests.granted(r, vec![5]);
        requests.on_sent(r);
        requests.on_answer(r, done(), Some(5), t0).unwrap();
        requests.abandon(r, t0);
        let steps = requests.poll_abandoned(t0, LIMIT).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[1], Step::Settled(r));
    }

    #[test]
    fn an_abandoned_request_never_bound_settles_at_once() {
        let t0 = Instant::now();
        let mut requests = Requests::new(4, 512, t0);
        let r = requests.open(3, ()).unwrap();
        requests.abandon(r, t0);
        assert_eq!(
            requests.poll_abandoned(t0, LIMIT),
            Ok(vec![Step::Settled(r)])
        );
    }

    #[test]
    fn an_abandoned_request_left_unanswered_times_out_from_the_last_answer() {
        let t0 = Instant::now();
        let mut requests = Requests::new(4, 512, t0);
        let silent = requests.open(3, ()).unwrap();
        let other = requests.open(3, ()).unwrap();
        requests.granted(silent, vec![1]);
        requests.granted(other, vec![2]);
        requests.abandon(silent, t0);
        // Another answer 8 s in: the silent one's deadline moves to 18 s.
        requests
            .on_answer(other, done(), Some(2), t0 + Duration::from_secs(8))
            .unwrap();
        assert!(requests
            .poll_abandoned(t0 + Duration::from_secs(12), LIMIT)
            .is_ok());
        assert_eq!(
            requests.poll_abandoned(t0 + Duration::from_secs(18), LIMIT),
            Err(Violation::Unanswered {
                request: silent,
                limit: LIMIT
            })
        );
        assert_eq!(
            requests.deadline(t0, LIMIT),
            t0 + Duration::from_secs(18),
            "a fetch's own wait counts the same way"
        );
    }

    #[test]
    fn flushed_leases_are_released_once() {
        let t0 = Instant::now();
        let mut requests = Requests::new(4, 512, t0);
        let a = requests.open(3, "a").unwrap();
        let _b = requests.open(3, "b").unwrap();
        assert_eq!(requests.release_lease(a), Some("a"));
        assert_eq!(requests.release_leases(), 1);
        assert_eq!(requests.release_leases(), 0);
        assert_eq!(requests.finish(a), None, "its lease went already");
    }

    #[derive(Debug, Clone)]
    enum Event {
        Open(u32),
        Grant(usize),
        Sent(usize),
        Answer(usize, bool),
        Abandon(usize),
        Poll(u64),
        Finish(usize),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (1u32..40).prop_map(Event::Open),
            (0usize..8).prop_map(Event::Grant),
            (0usize..8).prop_map(Event::Sent),
            (0usize..8, any::<bool>()).prop_map(|(i, by_peer)| Event::Answer(i, by_peer)),
            (0usize..8).prop_map(Event::Abandon),
            (0u64..30).prop_map(Event::Poll),
            (0usize..8).prop_map(Event::Finish),
        ]
    }

    proptest! {
        /// Any interleaving: the reservation is the sum of the open requests' shares and
        /// within the queue; no more than the window is open; every lease comes back at most
        /// once; an abandoned request is settled only when its windows are back.
        #[test]
        fn any_sequence_keeps_the_books(events in proptest::collection::vec(event(), 1..120)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut requests: Requests<u32> = Requests::new(4, 100, t0);
            let mut open: Vec<(u16, u32)> = Vec::new();
            let mut next_lease = 0u32;
            let mut leases_back = std::collections::HashSet::new();
            for event in events {
                match event {
                    Event::Open(entries) => {
                        next_lease += 1;
                        if let Ok(request) = requests.open(entries, next_lease) {
                            open.push((request, entries));
                        }
                    }
                    Event::Grant(i) if !open.is_empty() => {
                        let (request, _) = open[i % open.len()];
                        if !requests.is_granted(request) {
                            requests.granted(request, vec![u32::from(request) * 10, u32::from(request) * 10 + 1]);
                        }
                    }
                    Event::Sent(i) if !open.is_empty() => requests.on_sent(open[i % open.len()].0),
                    Event::Answer(i, by_peer) if !open.is_empty() => {
                        let (request, _) = open[i % open.len()];
                        if requests.is_granted(request) && requests.answer(request).is_none() {
                            let invalidated = by_peer.then_some(u32::from(request) * 10);
                            requests.on_answer(request, done(), invalidated, now).unwrap();
                        }
                    }
                    Event::Abandon(i) if !open.is_empty() => requests.abandon(open[i % open.len()].0, now),
                    Event::Poll(secs) => {
                        now += Duration::from_secs(secs);
                        match requests.poll_abandoned(now, LIMIT) {
                            Ok(steps) => for step in steps {
                                match step {
                                    Step::Invalidate { request, take_back } => {
                                        prop_assert!(!take_back.left.is_empty() || take_back.by_peer == 1);
                                        // The device completes the invalidation at once here.
                                        requests.on_invalidated(request);
                                    }
                                    Step::Settled(request) => {
                                        prop_assert!(!requests.is_granted(request) || requests.taken_back(request));
                                        if let Some(lease) = requests.finish(request) {
                                            prop_assert!(leases_back.insert(lease), "lease {} twice", lease);
                                        }
                                        open.retain(|(r, _)| *r != request);
                                    }
                                }
                            },
                            // A silent source: the shell breaks the session; nothing to check.
                            Err(Violation::Unanswered { .. } | Violation::NotTakenBack { .. }) => return Ok(()),
                            Err(other) => prop_assert!(false, "unexpected {other}"),
                        }
                    }
                    Event::Finish(i) if !open.is_empty() => {
                        let (request, _) = open.remove(i % open.len());
                        if let Some(lease) = requests.finish(request) {
                            prop_assert!(leases_back.insert(lease), "lease {} twice", lease);
                        }
                    }
                    _ => {}
                }
                prop_assert!(requests.in_flight() <= 4);
                prop_assert_eq!(requests.in_flight(), open.len());
                prop_assert_eq!(requests.reserved(), open.iter().map(|(_, e)| e).sum::<u32>());
                prop_assert!(requests.reserved() <= 100);
            }
        }
    }
}
