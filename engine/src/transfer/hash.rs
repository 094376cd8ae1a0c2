//! The whole-content SHA-256 of a transfer, computed while its pieces arrive.
//!
//! SHA-256 is sequential, and pieces arrive out of order. A thread of the transfer's own
//! hashes the pieces in content order as they become contiguous: a piece written at the
//! frontier (or close behind it) is hashed from the pool buffer it arrived in, before the
//! buffer goes back to the pool, so the common case reads nothing twice and the hash is done
//! about when the last piece is written. Pieces held before the transfer, or written too far
//! ahead of the frontier, are read back from the content file when the frontier reaches
//! them. Buffers kept for the hashers of all transfers together are capped by the pool's
//! linger limit (a quarter of the receive budget, [`PieceBuffer::linger`]), so fetches always
//! have buffers and a slow piece at one transfer's frontier cannot starve any transfer's
//! pieces: a cap per transfer let 64 concurrent transfers keep every receive slot while
//! their frontier pieces waited for one (found by tests/tests/load.rs).

use crate::geometry::Geometry;
use crate::io::{LingeringBuffer, PieceBuffer};
use crate::manifest::{ContentDigest, ContentHasher};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

enum Offer {
    /// A piece written, its bytes still in this buffer.
    Buffer(u32, LingeringBuffer),
    /// A piece written whose buffer was not kept: read it back when its turn comes.
    OnDisk(u32),
    /// Every piece is held: hash what is left and answer.
    Finish,
}

/// Counts how the hash got its bytes, for tests and the design figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HashCounts {
    /// Pieces hashed from the buffer they arrived in.
    pub from_buffer: u32,
    /// Pieces read back from the content file to be hashed.
    pub read_back: u32,
}

struct Frontier {
    /// The next piece number to hash.
    next: AtomicU32,
}

pub(super) struct InOrderHash {
    offers: mpsc::Sender<Offer>,
    frontier: Arc<Frontier>,
    thread: Option<JoinHandle<io::Result<(ContentDigest, HashCounts)>>>,
}

impl InOrderHash {
    /// Starts the hasher for a task whose content lives at `content` (for read-backs);
    /// `held` are the pieces already on disk.
    pub(super) fn start(
        geometry: Geometry,
        content: PathBuf,
        held: impl Iterator<Item = u32>,
    ) -> InOrderHash {
        let (offers, received) = mpsc::channel();
        for number in held {
            offers.send(Offer::OnDisk(number)).expect("receiver alive");
        }
        let frontier = Arc::new(Frontier {
            next: AtomicU32::new(0),
        });
        let shared = Arc::clone(&frontier);
        let thread = std::thread::Builder::new()
            .name("ferry-sha256".into())
            .spawn(move || hash_in_order(geometry, content, received, &shared))
            .expect("spawning the hash thread");
        InOrderHash {
            offers,
            frontier,
            thread: Some(thread),
        }
    }

    /// A piece is durable: hand its buffer over when the frontier will soon need it (and
    /// the pool's linger limit allows), else let the buffer go and have the piece read back
    /// later.
    pub(super) fn written(&self, number: u32, buf: PieceBuffer) {
        let next = self.frontier.next.load(Ordering::Acquire);
        let offer = if number >= next {
            match buf.linger() {
                Ok(kept) => Offer::Buffer(number, kept),
                Err(_returned) => Offer::OnDisk(number),
            }
        } else {
            drop(buf);
            Offer::OnDisk(number)
        };
        // The hasher is gone only once the transfer is over: nothing to hash then.
        let _ = self.offers.send(offer);
    }

    /// Waits (blocking) for the digest of the whole content; call once every piece is held.
    pub(super) fn finish(mut self) -> io::Result<(ContentDigest, HashCounts)> {
        let _ = self.offers.send(Offer::Finish);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the hash thread panicked")))
    }
}

fn hash_in_order(
    geometry: Geometry,
    content: PathBuf,
    received: mpsc::Receiver<Offer>,
    frontier: &Frontier,
) -> io::Result<(ContentDigest, HashCounts)> {
    let mut hasher = ContentHasher::default();
    let mut counts = HashCounts::default();
    // Pieces ahead of the frontier: Some(buffer), or None to read back.
    let mut waiting: BTreeMap<u32, Option<LingeringBuffer>> = BTreeMap::new();
    let mut file: Option<File> = None;
    let mut scratch = Vec::new();
    let mut next = 0u32;
    let mut finishing = false;
    loop {
        if !finishing {
            // The transfer dropped its end (it failed or was cancelled): stop, buffers go
            // back to the pool as `waiting` drops.
            let offer = received
                .recv()
                .map_err(|_| io::Error::new(io::ErrorKind::Interrupted, "transfer ended"))?;
            match offer {
                // A piece offered again (written twice, or hashed already) changes nothing.
                Offer::Buffer(number, _buf) if number < next || waiting.contains_key(&number) => {}
                Offer::Buffer(number, buf) => {
                    waiting.insert(number, Some(buf));
                }
                Offer::OnDisk(number) => {
                    if number >= next {
                        waiting.entry(number).or_insert(None);
                    }
                }
                Offer::Finish => finishing = true,
            }
        }
        while next < geometry.piece_count() {
            let piece = geometry.piece(next).expect("in range");
            let offered = waiting.remove(&next);
            match offered {
                Some(Some(buf)) => {
                    for chunk in buf.chunks() {
                        hasher.update(chunk);
                    }
                    counts.from_buffer += 1;
                }
                // Not yet written: wait for the next offer (at the end every piece is held).
                None if !finishing => break,
                // Written without its buffer kept, held before the transfer, or (at the end)
                // held all along: read it back.
                Some(None) | None => {
                    let file = match &mut file {
                        Some(file) => file,
                        None => file.insert(File::open(&content)?),
                    };
                    scratch.resize(piece.length as usize, 0);
                    file.read_exact_at(&mut scratch, piece.offset)?;
                    hasher.update(&scratch);
                    counts.read_back += 1;
                }
            }
            next += 1;
            frontier.next.store(next, Ordering::Release);
        }
        if finishing {
            return Ok((hasher.finish(), counts));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::BufferPool;

    fn content(dir: &std::path::Path, len: usize) -> (PathBuf, Vec<u8>) {
        let bytes: Vec<u8> = (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
            .collect();
        let path = dir.join("content");
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    fn buffer(pool: &Arc<BufferPool>, bytes: &[u8]) -> PieceBuffer {
        let mut buf = pool
            .try_acquire(bytes.len() as u64)
            .unwrap()
            .expect("a free slot");
        let mut at = 0;
        for chunk in buf.chunks_mut() {
            chunk.copy_from_slice(&bytes[at..at + chunk.len()]);
            at += chunk.len();
        }
        buf
    }

    /// The bytes of piece `number` of `bytes`.
    fn piece_bytes<'a>(geometry: &Geometry, bytes: &'a [u8], number: u32) -> &'a [u8] {
        let range = geometry.piece(number).unwrap();
        &bytes[range.offset as usize..(range.offset + range.length) as usize]
    }

    fn expected(bytes: &[u8]) -> ContentDigest {
        let mut hasher = ContentHasher::default();
        hasher.update(bytes);
        hasher.finish()
    }

    #[test]
    fn pieces_arriving_out_of_order_hash_from_their_buffers_in_content_order() {
        let dir = tempfile::tempdir().unwrap();
        let piece = 4usize << 20;
        let (path, bytes) = content(dir.path(), 5 * piece + 123);
        let geometry = Geometry::new(bytes.len() as u64, piece as u64).unwrap();
        let pool = BufferPool::new(4 << 20, 32).unwrap();
        // Piece 0 was held before the transfer; the others arrive 2, 1, 4, 5, 3.
        let hash = InOrderHash::start(geometry, path, [0u32].into_iter());
        for number in [2u32, 1, 4, 5, 3] {
            let slice = piece_bytes(&geometry, &bytes, number);
            hash.written(number, buffer(&pool, slice));
        }
        let (digest, counts) = hash.finish().unwrap();
        assert_eq!(digest, expected(&bytes));
        assert_eq!(
            counts,
            HashCounts {
                from_buffer: 5,
                read_back: 1
            }
        );
        assert_eq!(pool.free_slots(), 32, "every buffer went back to the pool");
    }

    #[test]
    fn transfers_together_keep_no_more_than_the_pools_linger_limit() {
        let dir = tempfile::tempdir().unwrap();
        let piece = 4usize << 20;
        let (path, bytes) = content(dir.path(), 6 * piece);
        let geometry = Geometry::new(bytes.len() as u64, piece as u64).unwrap();
        let pool = BufferPool::new(4 << 20, 32).unwrap();
        let limit = pool.linger_limit();
        // Many transfers, each with its frontier piece still missing: what they keep
        // together stays within the limit, so the frontier pieces can still get buffers.
        let hashes: Vec<_> = (0..8)
            .map(|_| InOrderHash::start(geometry, path.clone(), std::iter::empty()))
            .collect();
        for hash in &hashes {
            for number in 1..6u32 {
                let slice = piece_bytes(&geometry, &bytes, number);
                hash.written(number, buffer(&pool, slice));
                assert!(pool.lingering_slots() <= limit);
            }
        }
        assert_eq!(pool.lingering_slots(), limit);
        assert!(pool.free_slots() >= 32 - limit);
        for hash in hashes {
            let slice = piece_bytes(&geometry, &bytes, 0);
            hash.written(0, buffer(&pool, slice));
            let (digest, _) = hash.finish().unwrap();
            assert_eq!(digest, expected(&bytes));
        }
        assert_eq!(pool.lingering_slots(), 0);
        assert_eq!(pool.free_slots(), 32);
    }

    #[test]
    fn buffers_past_a_quarter_of_the_pool_are_read_back_instead_of_kept() {
        let dir = tempfile::tempdir().unwrap();
        let piece = 4usize << 20;
        let (path, bytes) = content(dir.path(), 12 * piece);
        let geometry = Geometry::new(bytes.len() as u64, piece as u64).unwrap();
        // 16 slots: at most 4 buffers kept for the hasher.
        let pool = BufferPool::new(4 << 20, 16).unwrap();
        let hash = InOrderHash::start(geometry, path, std::iter::empty());
        // Piece 0 comes last: everything else waits ahead of the frontier.
        for number in (1..12u32).chain([0]) {
            let slice = piece_bytes(&geometry, &bytes, number);
            hash.written(number, buffer(&pool, slice));
            assert!(
                pool.free_slots() >= 12,
                "the hasher keeps at most a quarter"
            );
        }
        let (digest, counts) = hash.finish().unwrap();
        assert_eq!(digest, expected(&bytes));
        assert_eq!(counts.from_buffer + counts.read_back, 12);
        assert!(counts.read_back >= 7, "{counts:?}");
    }

    #[test]
    fn a_transfer_that_ends_early_gets_its_buffers_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = content(dir.path(), 8 << 20);
        let geometry = Geometry::new(bytes.len() as u64, 4 << 20).unwrap();
        let pool = BufferPool::new(4 << 20, 8).unwrap();
        let hash = InOrderHash::start(geometry, path, std::iter::empty());
        hash.written(1, buffer(&pool, &bytes[4 << 20..]));
        drop(hash);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pool.free_slots() < 8 {
            assert!(std::time::Instant::now() < deadline, "buffer not returned");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
