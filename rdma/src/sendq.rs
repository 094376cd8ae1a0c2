//! Send-queue accounting under selective signalling, as a pure state machine.
//!
//! An unsignalled work request produces no completion when it succeeds, yet it holds its
//! send-queue entry until the provider sees a later signalled request of the same queue pair
//! complete (RC completes a send queue in order). So the entries in use are the requests
//! posted since the oldest signalled request whose completion has not been reaped. This keeps
//! that count, so a poster never overruns the queue (which the provider would refuse with
//! ENOMEM, or worse on some hardware, silently corrupt).

use std::collections::VecDeque;

/// The entries of one send queue: what is posted and not yet known complete.
#[derive(Debug, Clone)]
pub struct SendQueue {
    depth: u32,
    in_use: u32,
    /// Unsignalled requests posted since the last signalled one.
    trailing_unsignalled: u32,
    /// Signalled requests not yet completed, oldest first, each with the entries its
    /// completion frees (itself and the unsignalled ones before it).
    signalled: VecDeque<(u64, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendQueueError {
    #[error("send queue full: {wanted} entries wanted, {free} of {depth} free")]
    Full { wanted: u32, free: u32, depth: u32 },
    #[error("{0} unsignalled requests would follow the last signalled one: post a signalled request within every {1}")]
    UnsignalledRun(u32, u32),
}

impl SendQueue {
    pub fn new(depth: u32) -> SendQueue {
        SendQueue {
            depth,
            in_use: 0,
            trailing_unsignalled: 0,
            signalled: VecDeque::new(),
        }
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    pub fn free(&self) -> u32 {
        self.depth - self.in_use
    }

    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Whether `entries` more fit now.
    pub fn has_room(&self, entries: u32) -> bool {
        entries <= self.free()
    }

    /// Accounts one request about to be posted. A run of unsignalled requests is allowed only
    /// while a signalled one can still follow it in the queue: otherwise nothing would ever
    /// free their entries.
    pub fn post(&mut self, wr_id: u64, signalled: bool) -> Result<(), SendQueueError> {
        self.check(signalled)?;
        self.record(wr_id, signalled);
        Ok(())
    }

    /// Whether one more request (signalled or not) may be posted now; changes nothing, so a
    /// poster can check, post, and only then [`SendQueue::record`].
    pub fn check(&self, signalled: bool) -> Result<(), SendQueueError> {
        if !self.has_room(1) {
            return Err(SendQueueError::Full {
                wanted: 1,
                free: self.free(),
                depth: self.depth,
            });
        }
        if !signalled && self.in_use + 1 >= self.depth {
            return Err(SendQueueError::UnsignalledRun(
                self.trailing_unsignalled + 1,
                self.depth,
            ));
        }
        Ok(())
    }

    /// Accounts a request that [`SendQueue::check`] allowed and that was posted.
    pub fn record(&mut self, wr_id: u64, signalled: bool) {
        if signalled {
            self.signalled
                .push_back((wr_id, self.trailing_unsignalled + 1));
            self.trailing_unsignalled = 0;
        } else {
            self.trailing_unsignalled += 1;
        }
        self.in_use += 1;
    }

    /// A send-side completion arrived. For a signalled request, it and every older request
    /// are done. A completion naming anything else (an unsignalled request that failed, or a
    /// flush in the error state) frees nothing by itself: the signalled ones after it still
    /// complete, with a flush status, and free the entries then. Returns whether `wr_id` was
    /// a signalled request of this queue.
    pub fn complete(&mut self, wr_id: u64) -> bool {
        let Some(position) = self.signalled.iter().position(|&(id, _)| id == wr_id) else {
            return false;
        };
        for (_, entries) in self.signalled.drain(..=position) {
            self.in_use -= entries;
        }
        true
    }

    /// Every request is gone (the queue pair was destroyed or reset).
    pub fn is_idle(&self) -> bool {
        self.in_use == 0
    }

    /// Signalled requests still owed a completion.
    pub fn awaited(&self) -> usize {
        self.signalled.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_signalled_completion_frees_the_unsignalled_requests_before_it() {
        let mut queue = SendQueue::new(8);
        for wr in 0..3 {
            queue.post(wr, false).unwrap();
        }
        queue.post(3, true).unwrap();
        queue.post(4, false).unwrap();
        queue.post(5, true).unwrap();
        assert_eq!(queue.in_use(), 6);
        assert!(!queue.complete(1), "an unsignalled request frees nothing");
        assert!(queue.complete(3));
        assert_eq!(queue.in_use(), 2);
        assert!(queue.complete(5));
        assert!(queue.is_idle());
        assert!(!queue.complete(5), "a completion is counted once");
    }

    #[test]
    fn a_later_completion_implies_the_earlier_ones() {
        let mut queue = SendQueue::new(8);
        queue.post(1, true).unwrap();
        queue.post(2, false).unwrap();
        queue.post(3, true).unwrap();
        // In order on RC; should a provider report the later one first, both are done.
        assert!(queue.complete(3));
        assert!(queue.is_idle());
        assert_eq!(queue.awaited(), 0);
    }

    #[test]
    fn the_queue_refuses_overrun_and_unsignalled_runs_that_could_never_be_freed() {
        let mut queue = SendQueue::new(4);
        for wr in 0..3 {
            queue.post(wr, false).unwrap();
        }
        assert_eq!(
            queue.post(9, false),
            Err(SendQueueError::UnsignalledRun(4, 4))
        );
        queue.post(3, true).unwrap();
        assert_eq!(
            queue.post(4, true),
            Err(SendQueueError::Full {
                wanted: 1,
                free: 0,
                depth: 4
            })
        );
        assert!(queue.complete(3));
        assert_eq!(queue.free(), 4);
    }

    proptest! {
        /// Whatever the pattern, entries in use never exceed the depth, and once every
        /// signalled request completed nothing is in use.
        #[test]
        fn entries_are_conserved(pattern in proptest::collection::vec(any::<bool>(), 1..200)) {
            let mut queue = SendQueue::new(16);
            let mut posted_signalled = Vec::new();
            for (wr, signalled) in pattern.into_iter().enumerate() {
                let wr = wr as u64;
                if queue.post(wr, signalled).is_ok() && signalled {
                    posted_signalled.push(wr);
                }
                prop_assert!(queue.in_use() <= queue.depth());
                if queue.free() == 0 {
                    let oldest = posted_signalled.remove(0);
                    prop_assert!(queue.complete(oldest));
                }
            }
            // Close the trailing run the way a poster must: there is always room for that.
            prop_assert!(queue.post(u64::MAX, true).is_ok());
            prop_assert!(queue.complete(u64::MAX));
            prop_assert!(queue.is_idle());
        }
    }
}
