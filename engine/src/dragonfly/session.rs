//! One AnnouncePeer stream ([`Conversation`]) and a scheduled pull's reports on it
//! ([`Session`]): pieces finished and failed, the plan begun, the peer finished or failed.

use super::scheduler::{duration, now, Plan, CLOSE_TIMEOUT};
use super::Peer;
use crate::geometry;
use crate::transfer::{FailedAttempt, PieceOutcome, TransferSummary};
use dragonfly_api::common::v2::{Piece, TrafficType};
use dragonfly_api::scheduler::v2::announce_peer_request::Request as PeerRequest;
use dragonfly_api::scheduler::v2::{
    AnnouncePeerRequest, AnnouncePeerResponse, DownloadPeerBackToSourceFailedRequest,
    DownloadPeerBackToSourceFinishedRequest, DownloadPeerBackToSourceStartedRequest,
    DownloadPeerFailedRequest, DownloadPeerFinishedRequest, DownloadPeerStartedRequest,
    DownloadPieceBackToSourceFinishedRequest, DownloadPieceFailedRequest,
    DownloadPieceFinishedRequest,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

pub(super) fn piece(
    range: geometry::PieceRange,
    digest: String,
    parent_id: Option<String>,
    traffic: TrafficType,
    cost: Duration,
) -> Piece {
    Piece {
        number: range.number,
        parent_id,
        offset: range.offset,
        length: range.length,
        digest,
        content: None,
        traffic_type: Some(traffic as i32),
        cost: Some(duration(cost)),
        created_at: Some(now()),
    }
}

/// One AnnouncePeer stream.
pub(super) struct Conversation {
    pub(super) scheduler: String,
    pub(super) host_id: String,
    pub(super) task_id: String,
    pub(super) peer_id: String,
    pub(super) tx: mpsc::Sender<AnnouncePeerRequest>,
    pub(super) rx: Option<Streaming<AnnouncePeerResponse>>,
    /// Set once a report waited [`SEND_TIMEOUT`] for room: the scheduler does not read, and
    /// later reports are dropped when the stream is full instead of holding up the pull.
    pub(super) stalled: std::sync::atomic::AtomicBool,
}

/// Longest a report waits for room on the AnnouncePeer stream (a scheduler that stopped
/// reading must not stall the transfer whose pieces are reported).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

impl Conversation {
    pub(super) async fn send(&self, request: PeerRequest) {
        let message = AnnouncePeerRequest {
            host_id: self.host_id.clone(),
            task_id: self.task_id.clone(),
            peer_id: self.peer_id.clone(),
            request: Some(request),
        };
        use std::sync::atomic::Ordering;
        use tokio::sync::mpsc::error::{SendTimeoutError, TrySendError};
        let closed = if self.stalled.load(Ordering::Relaxed) {
            match self.tx.try_send(message) {
                Ok(()) => false,
                Err(TrySendError::Full(_)) => {
                    tracing::debug!(scheduler = %self.scheduler, task_id = %self.task_id, "report dropped: the scheduler does not read the AnnouncePeer stream");
                    false
                }
                Err(TrySendError::Closed(_)) => true,
            }
        } else {
            match self.tx.send_timeout(message, SEND_TIMEOUT).await {
                Ok(()) => false,
                Err(SendTimeoutError::Timeout(_)) => {
                    self.stalled.store(true, Ordering::Relaxed);
                    tracing::warn!(scheduler = %self.scheduler, task_id = %self.task_id, "the scheduler read no report for {SEND_TIMEOUT:?}; reports that find the stream full are dropped from now on");
                    false
                }
                Err(SendTimeoutError::Closed(_)) => true,
            }
        };
        if closed {
            tracing::debug!(scheduler = %self.scheduler, task_id = %self.task_id, "AnnouncePeer stream already closed");
        }
    }

    pub(super) async fn next(&mut self, limit: Duration) -> Result<AnnouncePeerResponse, Status> {
        let rx = self
            .rx
            .as_mut()
            .ok_or_else(|| Status::internal("no response stream"))?;
        tokio::time::timeout(limit, rx.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no answer within {limit:?}")))??
            .ok_or_else(|| Status::unavailable("the scheduler closed the stream"))
    }

    /// Ends the requests and waits (bounded) for the scheduler to close its side, so the
    /// last reports are read before the connection goes.
    pub(super) async fn close(self) {
        let Conversation { tx, rx, .. } = self;
        drop(tx);
        if let Some(mut rx) = rx {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while let Ok(Some(_)) = rx.message().await {}
            })
            .await;
        }
    }
}

/// A scheduled pull's reports to the scheduler.
pub struct Session {
    pub(super) conversation: Conversation,
    /// Vortex address → parent peer id, for the parents of the current plan.
    pub(super) parents: HashMap<String, String>,
    pub(super) back_to_source: bool,
    /// DownloadPeerStartedRequest sent (once per pull, however often it is rescheduled).
    pub(super) started: bool,
    pub(super) reschedules: u32,
    pub(super) peer: Arc<Peer>,
}

impl Session {
    /// Reports a plan begun: DownloadPeerBackToSourceStartedRequest, or (once per pull)
    /// DownloadPeerStartedRequest; the plan's parents become the ones pieces are reported
    /// against.
    pub(super) async fn begin(&mut self, plan: &Plan) {
        match plan {
            Plan::BackToSource { reason } => {
                if !self.back_to_source {
                    self.back_to_source = true;
                    self.conversation
                        .send(PeerRequest::DownloadPeerBackToSourceStartedRequest(
                            DownloadPeerBackToSourceStartedRequest {
                                description: Some(reason.clone()),
                            },
                        ))
                        .await;
                }
            }
            Plan::Parents { parents, .. } => {
                self.parents = parents
                    .iter()
                    .map(|p| (p.vortex.clone(), p.peer_id.clone()))
                    .collect();
                if !self.started {
                    self.started = true;
                    self.conversation
                        .send(PeerRequest::DownloadPeerStartedRequest(
                            DownloadPeerStartedRequest {},
                        ))
                        .await;
                }
            }
        }
    }

    /// Reschedules asked for so far in this pull.
    pub fn reschedules(&self) -> u32 {
        self.reschedules
    }

    /// DownloadPieceFinishedRequest (from a parent, naming it) or
    /// DownloadPieceBackToSourceFinishedRequest (from the origin), digest `crc32:N`.
    pub async fn piece(&self, outcome: &PieceOutcome) {
        let request = if outcome.transport == "origin" {
            PeerRequest::DownloadPieceBackToSourceFinishedRequest(
                DownloadPieceBackToSourceFinishedRequest {
                    piece: Some(piece(
                        outcome.piece,
                        outcome.digest.clone(),
                        None,
                        TrafficType::BackToSource,
                        outcome.fetch_time,
                    )),
                },
            )
        } else {
            let parent = self.parents.get(&outcome.source).cloned();
            PeerRequest::DownloadPieceFinishedRequest(DownloadPieceFinishedRequest {
                piece: Some(piece(
                    outcome.piece,
                    outcome.digest.clone(),
                    parent,
                    TrafficType::RemotePeer,
                    outcome.fetch_time,
                )),
            })
        };
        self.conversation.send(request).await;
        self.peer.metrics.dragonfly_piece_reported();
    }

    /// DownloadPieceFailedRequest for one failed attempt from a parent, naming it and the
    /// piece; `temporary`, since the piece is tried again elsewhere (the stock scheduler
    /// then blocks that parent for this peer). Origin attempts are not reported: the
    /// origin's own retries stand behind them.
    pub async fn piece_failed(&self, attempt: &FailedAttempt) {
        let Some(parent_id) = self.parents.get(&attempt.source) else {
            return;
        };
        self.conversation
            .send(PeerRequest::DownloadPieceFailedRequest(
                DownloadPieceFailedRequest {
                    piece_number: Some(attempt.piece),
                    parent_id: parent_id.clone(),
                    temporary: true,
                },
            ))
            .await;
        self.peer.metrics.dragonfly_piece_failure_reported();
    }

    /// The peer finished (or failed).
    pub async fn finish(self, result: Result<&TransferSummary, String>) {
        let request = match (result, self.back_to_source) {
            (Ok(_), true) => PeerRequest::DownloadPeerBackToSourceFinishedRequest(
                DownloadPeerBackToSourceFinishedRequest {},
            ),
            (Ok(_), false) => {
                PeerRequest::DownloadPeerFinishedRequest(DownloadPeerFinishedRequest {})
            }
            (Err(description), true) => PeerRequest::DownloadPeerBackToSourceFailedRequest(
                DownloadPeerBackToSourceFailedRequest {
                    description: Some(description),
                },
            ),
            (Err(description), false) => {
                PeerRequest::DownloadPeerFailedRequest(DownloadPeerFailedRequest {
                    description: Some(description),
                })
            }
        };
        self.conversation.send(request).await;
        self.conversation.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dragonfly_api::scheduler::v2::DownloadPeerStartedRequest;
    use std::time::Instant;

    #[tokio::test]
    async fn a_scheduler_that_reads_nothing_holds_a_report_at_most_the_send_timeout() {
        let (tx, _unread) = mpsc::channel(1);
        let conversation = Conversation {
            scheduler: "127.0.0.1:1".into(),
            host_id: "h".into(),
            task_id: "t".into(),
            peer_id: "p".into(),
            tx,
            rx: None,
            stalled: Default::default(),
        };
        let report = || PeerRequest::DownloadPeerStartedRequest(DownloadPeerStartedRequest {});
        conversation.send(report()).await; // fills the stream
        let waited = Instant::now();
        conversation.send(report()).await;
        let first = waited.elapsed();
        assert!(
            first >= SEND_TIMEOUT && first < SEND_TIMEOUT + Duration::from_secs(2),
            "{first:?}"
        );
        let waited = Instant::now();
        conversation.send(report()).await;
        assert!(
            waited.elapsed() < Duration::from_millis(100),
            "once stalled, a full stream drops the report at once"
        );
    }
}
