//! The serving side's pieces on one queue pair, as a pure state machine: no verbs, no
//! sockets, no store. `serve.rs` is its I/O shell: it runs the reads, posts what this hands
//! it, and feeds it the completions.
//!
//! A piece is read (into a buffer of the serving budget), then waits for room on the send
//! queue (its chunk writes and its answer at once, and a control slot for the answer), then
//! is on the wire: its buffer stays here until the answer's completion, which (RC completes in
//! order) proves the NIC read every chunk. Pieces go out in the order their reads finish, and
//! none waits for another's acknowledgements.

use super::{WR_ANSWER, WR_DONE, WR_WRITE};
use std::collections::{HashMap, VecDeque};

/// What the machine needs to know of a piece to serve.
pub(super) trait Piece {
    /// Chunk writes the piece takes (its answer is one more send-queue entry).
    fn writes(&self) -> usize;
}

/// A piece to post now: the work-request ids of its writes and of its answer, with the
/// piece and the buffer it is read into (already accounted on the wire, so a post that fails
/// half way still leaves the buffer to the tear-down).
pub(super) struct Posting<'a, P, B> {
    pub write_wrs: Vec<u64>,
    pub answer_wr: u64,
    pub piece: &'a P,
    pub buf: &'a B,
}

/// The pieces of one serving queue pair.
pub(super) struct Served<P, B> {
    /// Reads in flight (the shell runs them).
    reading: usize,
    ready: VecDeque<(P, B)>,
    /// By the work-request id of the piece's answer.
    on_wire: HashMap<u64, (P, B)>,
    next_wr: u64,
}

impl<P: Piece, B> Default for Served<P, B> {
    fn default() -> Self {
        Served {
            reading: 0,
            ready: VecDeque::new(),
            on_wire: HashMap::new(),
            next_wr: 0,
        }
    }
}

impl<P: Piece, B> Served<P, B> {
    /// Pieces being read, waiting for the send queue, or on the wire.
    pub(super) fn in_flight(&self) -> usize {
        self.reading + self.ready.len() + self.on_wire.len()
    }

    pub(super) fn is_idle(&self) -> bool {
        self.in_flight() == 0
    }

    pub(super) fn read_started(&mut self) {
        self.reading += 1;
    }

    /// A read finished: the piece waits for room on the send queue.
    pub(super) fn read(&mut self, piece: P, buf: B) {
        self.reading -= 1;
        self.ready.push_back((piece, buf));
    }

    /// A read failed (its request is answered with the failure instead).
    pub(super) fn read_failed(&mut self) {
        self.reading -= 1;
    }

    /// The work-request id of an answer that carries no piece (a refusal).
    pub(super) fn answer_wr(&mut self) -> u64 {
        self.next_wr += 1;
        WR_ANSWER | self.next_wr
    }

    /// The next read piece, if the send queue has room for its writes and answer and a
    /// control slot is free for the answer; it is on the wire from here.
    pub(super) fn post_next(
        &mut self,
        send_queue_free: u32,
        message_slots_free: usize,
    ) -> Option<Posting<'_, P, B>> {
        let (piece, _) = self.ready.front()?;
        let entries = piece.writes() + 1;
        if (send_queue_free as usize) < entries || message_slots_free == 0 {
            return None;
        }
        let (piece, buf) = self.ready.pop_front().expect("a front");
        self.next_wr += 1;
        let answer_wr = WR_DONE | self.next_wr;
        let write_wrs = (0..piece.writes())
            .map(|_| {
                self.next_wr += 1;
                WR_WRITE | self.next_wr
            })
            .collect();
        let (piece, buf) = self.on_wire.entry(answer_wr).or_insert((piece, buf));
        Some(Posting {
            write_wrs,
            answer_wr,
            piece,
            buf,
        })
    }

    /// A completion arrived: if it is a piece's answer (completed or flushed), the piece and
    /// its buffer come back, the NIC done with every chunk.
    pub(super) fn completed(&mut self, wr_id: u64) -> Option<(P, B)> {
        self.on_wire.remove(&wr_id)
    }

    pub(super) fn on_wire(&self) -> usize {
        self.on_wire.len()
    }

    /// Tear-down: the pieces still waiting for a send-queue slot (never posted: their
    /// buffers are free at once) go; those on the wire stay until their completions.
    pub(super) fn drop_unposted(&mut self) {
        self.ready.clear();
        self.reading = 0;
    }

    /// Tear-down, when no completion came for these: what is still on the wire.
    pub(super) fn take_on_wire(&mut self) -> Vec<(P, B)> {
        self.on_wire.drain().map(|(_, on_wire)| on_wire).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq)]
    struct Test {
        number: u32,
        writes: usize,
    }

    impl Piece for Test {
        fn writes(&self) -> usize {
            self.writes
        }
    }

    fn piece(number: u32, writes: usize) -> Test {
        Test { number, writes }
    }

    #[test]
    fn pieces_go_out_in_read_order_as_the_send_queue_has_room() {
        let mut served: Served<Test, &str> = Served::default();
        for _ in 0..3 {
            served.read_started();
        }
        served.read(piece(7, 4), "a");
        served.read(piece(8, 16), "b");
        assert_eq!(served.in_flight(), 3);
        let first = served.post_next(20, 4).expect("5 entries fit in 20");
        assert_eq!(first.piece.number, 7);
        assert_eq!(first.write_wrs.len(), 4);
        let first_answer = first.answer_wr;
        // 17 entries do not fit in 15: piece 8 waits, and so does anything read after it.
        assert!(served.post_next(15, 4).is_none());
        served.read(piece(9, 1), "c");
        assert!(served.post_next(15, 4).is_none(), "in order");
        assert!(
            served.post_next(17, 0).is_none(),
            "no control slot for the answer"
        );
        assert_eq!(served.post_next(17, 1).expect("fits").piece.number, 8);
        assert_eq!(served.post_next(2, 1).expect("fits").piece.number, 9);
        assert_eq!(served.on_wire(), 3);
        assert_eq!(served.completed(first_answer), Some((piece(7, 4), "a")));
        assert_eq!(served.in_flight(), 2);
    }

    #[test]
    fn a_buffer_comes_back_only_with_its_answer_not_its_writes() {
        let mut served: Served<Test, &str> = Served::default();
        served.read_started();
        served.read(piece(1, 3), "buf");
        let posting = served.post_next(512, 1).unwrap();
        let (writes, answer) = (posting.write_wrs.clone(), posting.answer_wr);
        for wr in writes {
            assert_eq!(
                served.completed(wr),
                None,
                "a write's completion frees nothing"
            );
        }
        assert_eq!(served.completed(answer), Some((piece(1, 3), "buf")));
        assert!(served.is_idle());
    }

    #[test]
    fn tear_down_frees_what_was_never_posted_and_keeps_what_is_on_the_wire() {
        let mut served: Served<Test, &str> = Served::default();
        for _ in 0..3 {
            served.read_started();
        }
        served.read(piece(1, 1), "posted");
        served.read(piece(2, 1), "waiting");
        served.post_next(2, 1).unwrap();
        served.drop_unposted();
        assert_eq!(served.in_flight(), 1, "only the piece on the wire");
        assert_eq!(served.take_on_wire(), vec![(piece(1, 1), "posted")]);
        assert!(served.is_idle());
    }

    proptest! {
        /// Any mix of reads, posts, refusals and completions: work-request ids never repeat,
        /// and every buffer posted comes back exactly once, by its own answer's id.
        #[test]
        fn ids_are_unique_and_buffers_come_back_once(ops in proptest::collection::vec((0u8..4, 1usize..40), 1..200)) {
            let mut served: Served<Test, u32> = Served::default();
            let mut seen = std::collections::HashSet::new();
            let mut answers = Vec::new();
            let mut next = 0u32;
            let mut back = std::collections::HashSet::new();
            for (op, n) in ops {
                match op {
                    0 => {
                        served.read_started();
                        next += 1;
                        served.read(piece(next, n), next);
                    }
                    1 => {
                        if let Some(posting) = served.post_next(n as u32 * 4, 1) {
                            prop_assert!(posting.piece.writes < n * 4);
                            for wr in posting.write_wrs.iter().chain([&posting.answer_wr]) {
                                prop_assert!(seen.insert(*wr), "id {:#x} twice", wr);
                            }
                            answers.push(posting.answer_wr);
                        }
                    }
                    2 => {
                        let wr = served.answer_wr();
                        prop_assert!(seen.insert(wr));
                    }
                    _ => {
                        if !answers.is_empty() {
                            let wr = answers.remove(n % answers.len());
                            let (piece, buf) = served.completed(wr).expect("on the wire");
                            prop_assert_eq!(piece.number, buf);
                            prop_assert!(back.insert(buf), "buffer {} twice", buf);
                        }
                    }
                }
                prop_assert_eq!(served.on_wire(), answers.len());
            }
        }
    }
}
