//! A pull the Dragonfly scheduler places: which transfer a plan asks for, and one summary
//! for a pull that took several transfers (every parent failed, the scheduler was asked
//! again, and a next transfer took the pieces still missing).

use super::scheduler::Plan;
use crate::transfer::{
    FailedAttempt, PieceOutcome, SourceTotals, TransferRequest, TransferSummary,
};
use std::time::Instant;

/// The transfer a plan asks for. From parents: their Vortex addresses, each piece assigned
/// to one of them in proportion to its `SyncHost` weight, and no origin, so that a transfer
/// whose parents all failed ends and the scheduler decides what comes next (as dfdaemon
/// does: back to source only when the scheduler says so). Back to source: the origin alone.
/// `template` carries everything else (task, output, transport, digest, the origin).
pub fn request_for(template: &TransferRequest, plan: &Plan) -> TransferRequest {
    let mut request = template.clone();
    match plan {
        Plan::Parents { parents, geometry } => {
            request.sources = parents.iter().map(|p| p.vortex.clone()).collect();
            request.source_weights = parents.iter().map(|p| p.weight).collect();
            request.content_length = geometry.content_length();
            request.piece_length = geometry.piece_length();
            request.origin = None;
        }
        Plan::BackToSource { .. } => {
            request.sources.clear();
            request.source_weights.clear();
        }
    }
    request
}

/// What the transfers of a pull that ended early did, for the last transfer's summary.
#[derive(Debug, Default)]
pub struct Tally {
    /// Per source name, in first-seen order.
    sources: Vec<(String, SourceTotals)>,
    /// Per transport: bytes, pieces.
    transports: Vec<(String, u64, u32)>,
    /// Per RDMA rail pair: bytes, pieces.
    rails: Vec<(String, u64, u32)>,
    pieces: u32,
    bytes: u64,
    failed_attempts: u32,
    rdma_fallbacks: u32,
    back_to_source_bytes: u64,
    started: Option<Instant>,
}

fn add_source(sources: &mut Vec<(String, SourceTotals)>, name: &str, add: &SourceTotals) {
    match sources.iter_mut().find(|(n, _)| n == name) {
        Some((_, totals)) => {
            totals.bytes += add.bytes;
            totals.pieces += add.pieces;
            totals.failures += add.failures;
        }
        None => sources.push((name.to_owned(), add.clone())),
    }
}

fn add_transport(transports: &mut Vec<(String, u64, u32)>, name: &str, bytes: u64, pieces: u32) {
    match transports.iter_mut().find(|t| t.0 == name) {
        Some(t) => {
            t.1 += bytes;
            t.2 += pieces;
        }
        None => transports.push((name.to_owned(), bytes, pieces)),
    }
}

impl Tally {
    /// A tally of a transfer starting now.
    pub fn new() -> Tally {
        Tally {
            started: Some(Instant::now()),
            ..Tally::default()
        }
    }

    pub fn piece(&mut self, outcome: &PieceOutcome) {
        let length = outcome.piece.length;
        let one = SourceTotals {
            bytes: length,
            pieces: 1,
            failures: 0,
        };
        add_source(&mut self.sources, &outcome.source, &one);
        add_transport(&mut self.transports, outcome.transport, length, 1);
        for share in &outcome.rails {
            add_transport(&mut self.rails, &share.rail, share.bytes, 1);
        }
        self.pieces += 1;
        self.bytes += length;
        self.rdma_fallbacks += u32::from(outcome.fell_back);
        if outcome.transport == "origin" {
            self.back_to_source_bytes += length;
        }
    }

    pub fn failed(&mut self, attempt: &FailedAttempt) {
        let one = SourceTotals {
            failures: 1,
            ..SourceTotals::default()
        };
        add_source(&mut self.sources, &attempt.source, &one);
        self.failed_attempts += 1;
    }

    /// Adds a later transfer's tally to this one (the earlier transfers of a pull).
    pub fn absorb(&mut self, later: Tally) {
        for (name, totals) in &later.sources {
            add_source(&mut self.sources, name, totals);
        }
        for (name, bytes, pieces) in &later.transports {
            add_transport(&mut self.transports, name, *bytes, *pieces);
        }
        for (name, bytes, pieces) in &later.rails {
            add_transport(&mut self.rails, name, *bytes, *pieces);
        }
        self.pieces += later.pieces;
        self.bytes += later.bytes;
        self.failed_attempts += later.failed_attempts;
        self.rdma_fallbacks += later.rdma_fallbacks;
        self.back_to_source_bytes += later.back_to_source_bytes;
        self.started = match (self.started, later.started) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Folds the earlier transfers of a pull (this tally) into the last one's summary: their
    /// pieces count as fetched (the last transfer found them held already), their sources,
    /// transports and failed attempts are added, and the elapsed time is the whole pull's.
    pub fn merge_into(self, mut summary: TransferSummary) -> TransferSummary {
        summary.pieces_fetched += self.pieces;
        summary.pieces_reused = summary.pieces_reused.saturating_sub(self.pieces);
        summary.bytes_fetched += self.bytes;
        summary.retries += self.failed_attempts;
        summary.rdma_fallbacks += self.rdma_fallbacks;
        summary.back_to_source_bytes += self.back_to_source_bytes;
        let mut sources = self.sources;
        for (name, totals) in &summary.sources {
            add_source(&mut sources, name, totals);
        }
        summary.sources = sources;
        let mut transports = self.transports;
        for (name, bytes, pieces) in &summary.transports {
            add_transport(&mut transports, name, *bytes, *pieces);
        }
        summary.transports = transports;
        let mut rails = self.rails;
        for (name, bytes, pieces) in &summary.rails {
            add_transport(&mut rails, name, *bytes, *pieces);
        }
        summary.rails = rails;
        if let Some(started) = self.started {
            summary.elapsed = summary.elapsed.max(started.elapsed());
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dragonfly::scheduler::Parent;
    use crate::geometry::{Geometry, PieceRange};
    use crate::origin::OriginRequest;
    use crate::transfer::TransportChoice;
    use std::time::Duration;

    fn template() -> TransferRequest {
        TransferRequest {
            task_id: "t".repeat(64),
            content_length: 0,
            piece_length: 0,
            pieces: Vec::new(),
            sources: Vec::new(),
            output: None,
            streams_per_source: 0,
            transport: TransportChoice::Auto,
            digest: None,
            origin: Some(OriginRequest {
                url: "http://origin.test/m".into(),
                ..Default::default()
            }),
            origin_connections: 0,
            source_weights: Vec::new(),
        }
    }

    #[test]
    fn parents_replace_the_origin_and_carry_their_weights() {
        let parents = vec![
            Parent {
                peer_id: "a".into(),
                host_id: "ha".into(),
                vortex: "10.0.0.1:4001".into(),
                weight: 900,
            },
            Parent {
                peer_id: "b".into(),
                host_id: "hb".into(),
                vortex: "10.0.0.2:4001".into(),
                weight: 100,
            },
        ];
        let plan = Plan::Parents {
            parents,
            geometry: Geometry::new(10 << 20, 4 << 20).unwrap(),
        };
        let request = request_for(&template(), &plan);
        assert_eq!(request.sources, ["10.0.0.1:4001", "10.0.0.2:4001"]);
        assert_eq!(request.source_weights, [900, 100]);
        assert_eq!(
            (request.content_length, request.piece_length),
            (10 << 20, 4 << 20)
        );
        assert!(
            request.origin.is_none(),
            "the scheduler decides on back to source"
        );
        let back = request_for(
            &request,
            &Plan::BackToSource {
                reason: "told so".into(),
            },
        );
        assert!(back.sources.is_empty() && back.source_weights.is_empty());
        let back = request_for(&template(), &Plan::BackToSource { reason: "x".into() });
        assert!(back.origin.is_some());
    }

    fn outcome(number: u32, source: &str, transport: &'static str) -> PieceOutcome {
        PieceOutcome {
            piece: PieceRange {
                number,
                offset: u64::from(number) << 22,
                length: 4 << 20,
            },
            digest: "crc32:1".into(),
            source: source.into(),
            transport,
            rails: if transport == "rdma" {
                vec![crate::transport::RailShare {
                    rail: "rxe0:1>rxe1:1".to_owned(),
                    bytes: 4 << 20,
                }]
            } else {
                Vec::new()
            },
            fell_back: false,
            fetch_time: Duration::ZERO,
            write_time: Duration::ZERO,
            attempt: 1,
        }
    }

    #[test]
    fn earlier_transfers_are_counted_in_the_last_summary() {
        let mut first = Tally::new();
        first.piece(&outcome(0, "bad", "tcp"));
        first.failed(&FailedAttempt {
            piece: 1,
            source: "bad".into(),
        });
        let mut earlier = Tally::default();
        earlier.absorb(first);
        let last = TransferSummary {
            task_id: "t".repeat(64),
            geometry: Geometry::new(12 << 20, 4 << 20).unwrap(),
            pieces_requested: 3,
            pieces_fetched: 2,
            // The last transfer found the earlier transfer's piece held.
            pieces_reused: 1,
            retries: 0,
            bytes_fetched: 8 << 20,
            elapsed: Duration::from_millis(1),
            sources: vec![(
                "good".into(),
                SourceTotals {
                    bytes: 8 << 20,
                    pieces: 2,
                    failures: 0,
                },
            )],
            transports: vec![("tcp".into(), 8 << 20, 2)],
            rails: Vec::new(),
            rdma_fallbacks: 0,
            output: None,
            content_digest: None,
            refused_sources: Vec::new(),
            placement: None,
            back_to_source_bytes: 0,
            origin_retries: 0,
        };
        let merged = earlier.merge_into(last);
        assert_eq!(merged.pieces_fetched, 3);
        assert_eq!(merged.pieces_reused, 0);
        assert_eq!(merged.bytes_fetched, 12 << 20);
        assert_eq!(merged.retries, 1);
        assert_eq!(merged.transports, [("tcp".to_owned(), 12 << 20, 3)]);
        let bad = &merged.sources.iter().find(|s| s.0 == "bad").unwrap().1;
        assert_eq!((bad.pieces, bad.failures), (1, 1));
        let good = &merged.sources.iter().find(|s| s.0 == "good").unwrap().1;
        assert_eq!(good.pieces, 2);
    }
}
