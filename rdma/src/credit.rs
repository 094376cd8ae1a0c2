//! The piece-exchange credit protocol, as pure state machines (no I/O, no device), so every
//! rule is tested deterministically.
//!
//! The receiver grants buffer slots as credits (address, rkey, length). The sender writes the
//! piece into them in chunks with RDMA WRITE WITH IMMEDIATE; the immediate names the request
//! and the chunk. A request is complete once every chunk's immediate arrived and the sender's
//! "done" message (carrying the digest) came over the control channel; then the receiver
//! verifies, hands the buffer to the disk, and the credits return.

use std::collections::HashMap;

/// One granted slot: where the sender may write, under which rkey, how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCredit {
    pub addr: u64,
    pub rkey: u32,
    pub len: u32,
}

/// The immediate value of a chunk write: request id in the high half, chunk in the low half.
pub fn immediate(request: u16, chunk: u16) -> u32 {
    u32::from(request) << 16 | u32::from(chunk)
}

pub fn split_immediate(value: u32) -> (u16, u16) {
    ((value >> 16) as u16, value as u16)
}

/// One RDMA WRITE the sender posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkWrite {
    /// Offset of the chunk within the piece.
    pub piece_offset: u64,
    pub len: u32,
    pub remote_addr: u64,
    pub rkey: u32,
    pub immediate: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreditError {
    #[error("window full: {0} requests in flight")]
    WindowFull(usize),
    #[error("granted slots hold {granted} bytes, the piece has {needed}")]
    GrantTooSmall { granted: u64, needed: u64 },
    #[error("chunk size {0} is invalid (1 byte to 1 GiB)")]
    BadChunkSize(u32),
    #[error("piece needs {0} chunks, more than the 65536 an immediate can name")]
    TooManyChunks(u64),
    #[error("immediate names request {0}, which is not in flight")]
    UnknownRequest(u16),
    #[error("request {request} got chunk {chunk}, but has only {chunks} chunks")]
    ChunkOutOfRange {
        request: u16,
        chunk: u16,
        chunks: u32,
    },
    #[error("request {request} got chunk {chunk} twice")]
    DuplicateChunk { request: u16, chunk: u16 },
}

/// Sender side: how a piece of `piece_len` bytes is cut into writes over the granted slots.
/// Chunks never straddle two slots.
pub fn plan_writes(
    request: u16,
    piece_len: u64,
    chunk_size: u32,
    slots: &[SlotCredit],
) -> Result<Vec<ChunkWrite>, CreditError> {
    if chunk_size == 0 || chunk_size > 1 << 30 {
        return Err(CreditError::BadChunkSize(chunk_size));
    }
    let granted: u64 = slots.iter().map(|s| u64::from(s.len)).sum();
    if granted < piece_len {
        return Err(CreditError::GrantTooSmall {
            granted,
            needed: piece_len,
        });
    }
    let mut writes = Vec::new();
    let mut offset = 0u64;
    for slot in slots {
        let mut within = 0u64;
        while within < u64::from(slot.len) && offset < piece_len {
            let len = (u64::from(chunk_size))
                .min(u64::from(slot.len) - within)
                .min(piece_len - offset);
            let chunk = writes.len();
            if chunk > u16::MAX as usize {
                return Err(CreditError::TooManyChunks(chunk as u64 + 1));
            }
            writes.push(ChunkWrite {
                piece_offset: offset,
                len: len as u32,
                remote_addr: slot.addr + within,
                rkey: slot.rkey,
                immediate: immediate(request, chunk as u16),
            });
            within += len;
            offset += len;
        }
    }
    Ok(writes)
}

/// The number of chunk writes `plan_writes` makes, for the receiver to expect.
pub fn chunk_count(piece_len: u64, chunk_size: u32, slot_lens: &[u32]) -> u64 {
    let mut left = piece_len;
    let mut chunks = 0;
    for &slot in slot_lens {
        let take = left.min(u64::from(slot));
        chunks += take.div_ceil(u64::from(chunk_size));
        left -= take;
    }
    chunks
}

#[derive(Debug)]
struct InFlight {
    seen: Vec<bool>,
    arrived: u32,
    done: bool,
}

impl InFlight {
    fn complete(&self) -> bool {
        self.done && self.arrived as usize == self.seen.len()
    }
}

/// Receiver side: the requests in flight on one connection and their chunks.
#[derive(Debug)]
pub struct ReceiveWindow {
    window: usize,
    next_request: u16,
    in_flight: HashMap<u16, InFlight>,
}

/// What an event did to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Pending,
    /// Every chunk arrived and the sender said done: verify and release.
    Complete(u16),
}

impl ReceiveWindow {
    pub fn new(window: usize) -> ReceiveWindow {
        ReceiveWindow {
            window: window.max(1),
            next_request: 0,
            in_flight: HashMap::new(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.window
    }

    /// Opens a request expecting `chunks` chunk writes; returns its id.
    pub fn open(&mut self, chunks: u64) -> Result<u16, CreditError> {
        if !self.has_room() {
            return Err(CreditError::WindowFull(self.in_flight.len()));
        }
        if chunks > u64::from(u16::MAX) + 1 {
            return Err(CreditError::TooManyChunks(chunks));
        }
        // Ids wrap; skip any still in flight.
        let mut id = self.next_request;
        while self.in_flight.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_request = id.wrapping_add(1);
        self.in_flight.insert(
            id,
            InFlight {
                seen: vec![false; chunks as usize],
                arrived: 0,
                done: false,
            },
        );
        Ok(id)
    }

    /// A write with immediate arrived.
    pub fn on_immediate(&mut self, value: u32) -> Result<Progress, CreditError> {
        let (request, chunk) = split_immediate(value);
        let state = self
            .in_flight
            .get_mut(&request)
            .ok_or(CreditError::UnknownRequest(request))?;
        let chunks = state.seen.len() as u32;
        let seen = state
            .seen
            .get_mut(chunk as usize)
            .ok_or(CreditError::ChunkOutOfRange {
                request,
                chunk,
                chunks,
            })?;
        if *seen {
            return Err(CreditError::DuplicateChunk { request, chunk });
        }
        *seen = true;
        state.arrived += 1;
        Ok(if state.complete() {
            Progress::Complete(request)
        } else {
            Progress::Pending
        })
    }

    /// The sender's "done" for a request arrived on the control channel.
    pub fn on_done(&mut self, request: u16) -> Result<Progress, CreditError> {
        let state = self
            .in_flight
            .get_mut(&request)
            .ok_or(CreditError::UnknownRequest(request))?;
        state.done = true;
        Ok(if state.complete() {
            Progress::Complete(request)
        } else {
            Progress::Pending
        })
    }

    /// Ends a request (complete or failed): its credits return to the window.
    pub fn close(&mut self, request: u16) -> bool {
        self.in_flight.remove(&request).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slots(lens: &[u32]) -> Vec<SlotCredit> {
        lens.iter()
            .enumerate()
            .map(|(i, &len)| SlotCredit {
                addr: 0x10_0000 * (i as u64 + 1),
                rkey: 40 + i as u32,
                len,
            })
            .collect()
    }

    #[test]
    fn writes_cover_the_piece_without_straddling_slots() {
        let writes = plan_writes(3, 10_000, 4096, &slots(&[6000, 6000])).unwrap();
        let lens: Vec<u32> = writes.iter().map(|w| w.len).collect();
        assert_eq!(lens, vec![4096, 1904, 4000]);
        assert_eq!(writes[1].remote_addr, 0x10_0000 + 4096);
        assert_eq!(writes[2].remote_addr, 0x20_0000);
        assert_eq!(writes[2].rkey, 41);
        assert_eq!(
            writes
                .iter()
                .map(|w| split_immediate(w.immediate))
                .collect::<Vec<_>>(),
            vec![(3, 0), (3, 1), (3, 2)]
        );
        assert_eq!(chunk_count(10_000, 4096, &[6000, 6000]), 3);
        assert_eq!(
            plan_writes(0, 20_000, 4096, &slots(&[6000])),
            Err(CreditError::GrantTooSmall {
                granted: 6000,
                needed: 20_000
            })
        );
        assert_eq!(
            plan_writes(0, 1, 0, &slots(&[6000])),
            Err(CreditError::BadChunkSize(0))
        );
    }

    #[test]
    fn a_request_completes_after_all_chunks_and_done_in_any_order() {
        let mut window = ReceiveWindow::new(2);
        let a = window.open(2).unwrap();
        let b = window.open(1).unwrap();
        assert_eq!(window.open(1), Err(CreditError::WindowFull(2)));
        assert_eq!(window.on_done(a).unwrap(), Progress::Pending);
        assert_eq!(
            window.on_immediate(immediate(a, 1)).unwrap(),
            Progress::Pending
        );
        assert_eq!(
            window.on_immediate(immediate(b, 0)).unwrap(),
            Progress::Pending,
            "b is not done yet"
        );
        assert_eq!(
            window.on_immediate(immediate(a, 0)).unwrap(),
            Progress::Complete(a)
        );
        assert_eq!(window.on_done(b).unwrap(), Progress::Complete(b));
        assert!(window.close(a) && window.close(b));
        assert_eq!(window.in_flight(), 0);
        assert!(window.has_room());
    }

    #[test]
    fn stray_duplicate_and_out_of_range_immediates_are_errors() {
        let mut window = ReceiveWindow::new(4);
        let a = window.open(2).unwrap();
        assert_eq!(
            window.on_immediate(immediate(a + 1, 0)),
            Err(CreditError::UnknownRequest(a + 1))
        );
        assert_eq!(
            window.on_immediate(immediate(a, 2)),
            Err(CreditError::ChunkOutOfRange {
                request: a,
                chunk: 2,
                chunks: 2
            })
        );
        window.on_immediate(immediate(a, 0)).unwrap();
        assert_eq!(
            window.on_immediate(immediate(a, 0)),
            Err(CreditError::DuplicateChunk {
                request: a,
                chunk: 0
            })
        );
        window.close(a);
        assert_eq!(
            window.on_immediate(immediate(a, 1)),
            Err(CreditError::UnknownRequest(a)),
            "after its credits returned"
        );
    }

    #[test]
    fn request_ids_wrap_without_reusing_one_in_flight() {
        let mut window = ReceiveWindow::new(2);
        window.next_request = u16::MAX;
        let a = window.open(1).unwrap();
        let b = window.open(1).unwrap();
        assert_eq!((a, b), (u16::MAX, 0));
        window.close(b);
        window.next_request = u16::MAX;
        assert_eq!(window.open(1).unwrap(), 0, "skips {a}, still in flight");
    }

    proptest! {
        #[test]
        fn planned_writes_tile_the_piece(piece in 1u64..(8 << 20), chunk in 1u32..(2 << 20), slot in 4096u32..(4 << 20)) {
            let count = piece.div_ceil(u64::from(slot)) as usize;
            let lens = vec![slot; count];
            prop_assume!(chunk_count(piece, chunk, &lens) <= 65536);
            let writes = plan_writes(0, piece, chunk, &slots(&lens)).unwrap();
            prop_assert_eq!(writes.len() as u64, chunk_count(piece, chunk, &lens));
            let mut next = 0;
            for w in &writes {
                prop_assert_eq!(w.piece_offset, next);
                prop_assert!(w.len > 0 && w.len <= chunk);
                next += u64::from(w.len);
            }
            prop_assert_eq!(next, piece);
            let mut window = ReceiveWindow::new(1);
            let id = window.open(writes.len() as u64).unwrap();
            prop_assert_eq!(id, 0);
            let mut last = Progress::Pending;
            for w in writes.iter().rev() {
                last = window.on_immediate(w.immediate).unwrap();
            }
            prop_assert_eq!(last, Progress::Pending);
            prop_assert_eq!(window.on_done(0).unwrap(), Progress::Complete(0));
        }
    }
}
