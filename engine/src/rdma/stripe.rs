//! One piece striped over several rail pairs to its source: the buffer split at the stripes'
//! bounds (one owned buffer per stripe, each leased and quarantined on its own), every stripe
//! fetched at once with a range fetch on its pair, the parts joined again for the one digest
//! pass. Which pairs get which stripes is the pure balancer's (`Lanes::pick_stripes`).

use super::rails::{PeerRails, Pick};
use super::session::Wanted;
use super::transport::{digested, RdmaTransport};
use crate::geometry::PieceRange;
use crate::io::PieceBuffer;
use crate::transport::{Fetched, RailShare, TransportError};
use ferry_rdma::wire::ByteRange;

impl RdmaTransport {
    /// A piece striped over several lanes: the buffer split at the stripes' bounds, each part
    /// fetched on its lane at once (a range fetch each), then joined again. A stripe that
    /// fails is fetched again once on another lane; the piece fails if it fails again (after
    /// every stripe has ended, so no part is still with a device). Its buffer comes back only
    /// if every part did.
    pub(super) async fn fetch_striped(
        &self,
        peer: &PeerRails,
        task_id: &str,
        piece: PieceRange,
        mut buf: PieceBuffer,
        stripes: Vec<Pick>,
    ) -> Fetched {
        let mut ranges = Vec::with_capacity(stripes.len());
        let mut offset = 0;
        for pick in &stripes {
            ranges.push(ByteRange {
                offset,
                length: pick.bytes(),
            });
            offset += pick.bytes();
        }
        debug_assert_eq!(offset, piece.length, "the stripes cover the piece");
        // Split from the end, so each split keeps the stripes before it.
        let mut parts: Vec<PieceBuffer> = Vec::with_capacity(ranges.len());
        for range in ranges.iter().skip(1).rev() {
            parts.push(buf.split_off(range.offset as usize));
        }
        parts.push(buf);
        parts.reverse();
        self.metrics.rdma_piece_striped(stripes.len());
        let lengths: Vec<u64> = ranges.iter().map(|r| r.length).collect();
        let wanted: Vec<Wanted> = (ranges.iter())
            .map(|&range| Wanted {
                piece,
                range: Some(range),
            })
            .collect();
        let fetches =
            (stripes.into_iter().zip(&wanted).zip(parts)).map(|((pick, &wanted), part)| {
                self.fetch_on_lanes(peer, task_id, wanted, part, Some(pick))
            });
        let mut ended = futures_util::future::join_all(fetches).await;
        // A stripe whose rail pair failed (its buffer back: no device holds it) is fetched
        // again once, at once, on a pair that is up, while the other stripes' bytes are kept;
        // not when the source said it does not hold the piece.
        let not_held = (ended.iter()).any(|(_, r)| matches!(r, Err(TransportError::NotHeld(_))));
        let again: Vec<usize> = (0..ended.len())
            .filter(|&i| {
                let (back, result) = &ended[i];
                back.is_some()
                    && matches!(
                        result,
                        Err(TransportError::Failed(_) | TransportError::Unreachable(_))
                    )
            })
            .collect();
        if !again.is_empty() && !not_held && peer.usable(std::time::Instant::now()) {
            self.metrics.rdma_stripes_reissued(again.len());
            let retries = again.iter().map(|&i| {
                let part = ended[i].0.take().expect("a buffer that came back");
                self.fetch_on_lanes(peer, task_id, wanted[i], part, None)
            });
            let retried = futures_util::future::join_all(retries).await;
            for (i, outcome) in again.into_iter().zip(retried) {
                ended[i] = outcome;
            }
        }
        let mut whole: Option<PieceBuffer> = None;
        let mut lost_a_part = false;
        let mut failure = None;
        let mut digest: Option<String> = None;
        let mut shares: Vec<RailShare> = Vec::new();
        for ((back, carried), bytes) in ended.into_iter().zip(lengths) {
            match back {
                Some(part) if !lost_a_part => match whole.as_mut() {
                    Some(joined) => joined.join(part),
                    None => whole = Some(part),
                },
                // Dropped: back to the pool, or to quarantine while a device may hold it.
                Some(_) => {}
                None => {
                    lost_a_part = true;
                    whole = None;
                }
            }
            match carried {
                Ok(carried) if failure.is_none() => {
                    if digest.as_ref().is_some_and(|d| *d != carried.digest) {
                        failure = Some(TransportError::Failed(format!(
                            "rdma: {} advertised two digests for piece {} ({} and {})",
                            peer.source,
                            piece.number,
                            digest.as_deref().unwrap_or_default(),
                            carried.digest
                        )));
                        continue;
                    }
                    shares.push(RailShare {
                        rail: peer.lanes[carried.lane].label(),
                        bytes,
                    });
                    digest = Some(carried.digest);
                }
                Ok(_) => {}
                Err(err) => {
                    failure.get_or_insert(err);
                }
            }
        }
        let result = match failure {
            Some(err) => Err(err),
            None => Ok((digest.expect("at least two stripes"), shares)),
        };
        match whole {
            Some(buf) => digested(Some(buf), result).await,
            None => Fetched {
                buf: None,
                result: result.and_then(|_| {
                    Err(TransportError::Failed(
                        "rdma: a stripe's buffer was not released by its device".into(),
                    ))
                }),
            },
        }
    }
}
