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

    /// Pieces counted so far.
    pub fn pieces(&self) -> u32 {
        self.pieces
    }

    /// Adds a later transfer's tally to this one (the earlier transfers of a pull).
    pub fn absorb(&mut self, later: Tally) {
        for (name, totals) in &later.sources {
            add_source(&mut self.sources, name, totals);
        }
        for (name, bytes, pieces) in &later.transports {
            add_transport(&mut self.transports, name, *bytes, *pieces);
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
        if let Some(started) = self.started {
            summary.elapsed = summary.elapsed.max(started.elapsed());
        }
        summary
    }
}
