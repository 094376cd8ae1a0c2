//! The serving side: a queue pair for each peer that upgrades its data connection.
//!
//! Requests and answers travel over the queue pair itself (one SEND each); the TCP connection
//! only sets the queue pair up and, by closing, ends it. Many pieces are in flight on one queue
//! pair: each request's piece is read from the store (io_uring, straight into the registered
//! pool) while earlier pieces are on the wire, and a piece's writes are posted as soon as its
//! read completes and the send queue has room, never after waiting for another piece.

use super::host::LocalRail;
use super::served::{Piece, Served};
use super::RdmaSettings;
use crate::geometry::format_digest;
use crate::io::PieceBuffer;
use crate::metrics::Metrics;
use crate::store::{Store, StoredTask};
use ferry_rdma::credit::{self, ChunkWrite, SlotCredit};
use ferry_rdma::rails::wire::Features;
use ferry_rdma::wire::{self, ByteRange, Message};
use ferry_rdma::{Connection, ConnectionConfig, RdmaError};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// The most chunk writes the source posts for one piece: all of them and the message that
/// completes the piece are on its send queue at once. `Config::validate` refuses an
/// `rdma.chunk_kib` that would need more.
pub const MAX_WRITES_PER_PIECE: u32 = ferry_rdma::verbs::SEND_QUEUE_DEPTH - 1;

/// Longest failure text put in an answer (a control slot holds 2 KiB).
const MAX_ANSWER_TEXT: usize = 1024;

/// The serving side: runs a queue pair for each peer that upgrades its connection.
pub struct RdmaService {
    pub(super) store: Arc<Store>,
    /// This host's open rails, by their index in the rail list it sends.
    pub(super) rails: Vec<Arc<LocalRail>>,
    pub(super) settings: RdmaSettings,
    pub(super) idle_timeout: Duration,
    pub(super) metrics: Arc<Metrics>,
}

/// A request the source will serve: its piece, the writes that carry it, what the answer says.
struct Granted {
    request: u16,
    task: Arc<StoredTask>,
    /// What is read and written: the piece, or the range of it asked for (its number, its
    /// offset in the content, its length).
    piece: crate::geometry::PieceRange,
    /// The piece counts as served once, with its first byte (a stripe from 0 or the whole).
    first: bool,
    /// The whole piece's CRC-32, which the answer carries for the receiver to check the
    /// piece against once every stripe is in.
    crc: u32,
    writes: Vec<ChunkWrite>,
    /// The window the completing SEND invalidates at the receiver.
    invalidate: u32,
}

impl Piece for Granted {
    fn writes(&self) -> usize {
        self.writes.len()
    }
}

/// What a request comes to before its piece is read: a refusal to answer at once, or a read.
enum Admitted {
    Answer(Message),
    Read(Granted),
}

fn failed(request: u16, not_held: bool, message: impl Into<String>) -> Message {
    let mut message = message.into();
    if message.len() > MAX_ANSWER_TEXT {
        let mut end = MAX_ANSWER_TEXT;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    Message::Failed {
        request,
        not_held,
        message,
    }
}

impl RdmaService {
    /// Runs one peer's upgrade of its data connection: the rail exchange (answered, then
    /// closed), or a queue pair until the peer closes its TCP connection.
    pub async fn serve(self: Arc<Self>, mut stream: TcpStream, tag: u8, value: Vec<u8>) {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let served = match Message::decode(tag, &value) {
            Ok(Message::Rails { rails, features }) => {
                self.exchange_rails(&mut stream, &rails, features).await
            }
            Ok(Message::Connect { endpoint }) => {
                // A receiver that sends no rail list: the first rail.
                self.serve_connection(&mut stream, &self.rails[0], endpoint)
                    .await
            }
            Ok(Message::ConnectRail { rail, endpoint }) => {
                match self.rails.get(usize::from(rail)) {
                    Some(local) => {
                        let local = Arc::clone(local);
                        self.serve_connection(&mut stream, &local, endpoint).await
                    }
                    None => {
                        let err = RdmaError::Handshake(format!(
                            "no rail {rail} here (this host has {})",
                            self.rails.len()
                        ));
                        let refused = failed(0, false, err.to_string());
                        let _ =
                            wire::write_message(&mut stream, &refused, self.settings.io_timeout)
                                .await;
                        Err(err)
                    }
                }
            }
            Ok(other) => Err(RdmaError::Handshake(format!(
                "expected Rails or ConnectRail, got {:#04x}",
                other.tag()
            ))),
            Err(err) => Err(err),
        };
        match served {
            Ok(()) => tracing::debug!(%peer, "RDMA control channel closed"),
            Err(err) => tracing::warn!(%peer, error = %err, "RDMA connection closed on error"),
        }
    }

    /// Answers a receiver's rail list with this host's; the receiver matches them. A
    /// receiver that named no features may speak only version 1 of the list: it is answered
    /// in version 1, without this host's features.
    async fn exchange_rails(
        &self,
        stream: &mut TcpStream,
        theirs: &[ferry_rdma::rails::matching::RailAd],
        their_features: Features,
    ) -> Result<(), RdmaError> {
        let names: Vec<&str> = theirs.iter().map(|r| r.name.as_str()).collect();
        tracing::debug!(peer_rails = %names.join(", "), "RDMA rail exchange");
        let ours = Message::Rails {
            rails: self.rails.iter().map(|r| r.ad()).collect(),
            features: if their_features.is_none() {
                Features::default()
            } else {
                Features::ALL
            },
        };
        wire::write_message(stream, &ours, self.settings.io_timeout).await
    }

    async fn serve_connection(
        &self,
        stream: &mut TcpStream,
        rail: &LocalRail,
        endpoint: ferry_rdma::Endpoint,
    ) -> Result<(), RdmaError> {
        let peer = stream.peer_addr()?;
        let set_up = ferry_rdma::address::check_peer_gid(&endpoint, peer.ip())
            .map_err(RdmaError::from)
            .and_then(|()| Connection::new(&rail.context, ConnectionConfig::default()))
            .and_then(|connection| connection.connect(&endpoint).map(|()| connection));
        let connection = match set_up {
            Ok(connection) => connection,
            Err(err) => {
                // Say why before hanging up: the receiver logs it and its breaker counts it.
                let refused = failed(0, false, err.to_string());
                let _ = wire::write_message(stream, &refused, self.settings.io_timeout).await;
                return Err(err);
            }
        };
        let _counted = self.metrics.rdma_session(true);
        wire::write_message(
            stream,
            &Message::Accept {
                endpoint: connection.local_endpoint(),
            },
            self.settings.io_timeout,
        )
        .await?;
        let mut pieces = Pieces::default();
        let result = self
            .serve_pieces(stream, rail, &connection, &mut pieces)
            .await;
        self.tear_down(rail, &connection, pieces).await;
        result
    }

    /// The queue pair's loop: requests in, reads started, pieces posted as their reads finish
    /// and the send queue has room, buffers released by their completions.
    async fn serve_pieces(
        &self,
        stream: &mut TcpStream,
        rail: &LocalRail,
        connection: &Connection,
        pieces: &mut Pieces,
    ) -> Result<(), RdmaError> {
        loop {
            self.post_ready(rail, connection, pieces)?;
            let idle = pieces.served.is_idle();
            tokio::select! {
                batch = connection.completions() => {
                    let mut first_error = None;
                    for completion in batch? {
                        // A piece's completing SEND completed (or was flushed): RC completes
                        // in order, so the NIC is done with every chunk before it.
                        if let Some((granted, buf)) = pieces.served.completed(completion.wr_id) {
                            self.count_answered(rail, &granted, completion.is_error());
                            drop(buf);
                        }
                        // The rest of the batch is still looked at: it may free buffers.
                        if first_error.is_some() {
                            continue;
                        }
                        if completion.is_error() {
                            if completion.status != ferry_rdma::WcStatus::Flushed {
                                self.metrics.rdma_rail_completion_error(&rail.name());
                            }
                            first_error = completion.ok().err();
                        } else if let Some(frame) = &completion.message {
                            first_error = self.on_request(rail, connection, pieces, frame).err();
                        }
                    }
                    let now = connection.work_counts();
                    self.metrics.rdma_work(true, &pieces.counted_work, &now);
                    pieces.counted_work = now;
                    if let Some(err) = first_error {
                        return Err(err);
                    }
                }
                Some(joined) = pieces.reads.join_next(), if !pieces.reads.is_empty() => {
                    match joined {
                        Ok(Ok((granted, buf))) => pieces.served.read(granted, buf),
                        Ok(Err(answer)) => {
                            pieces.served.read_failed();
                            self.answer(connection, pieces, &answer)?;
                        }
                        Err(err) => return Err(RdmaError::verbs("reading a piece to serve", err)),
                    }
                }
                closed = peer_closed(stream) => return closed,
                _ = tokio::time::sleep(self.idle_timeout), if idle => return Ok(()),
            }
        }
    }

    fn answer(
        &self,
        connection: &Connection,
        pieces: &mut Pieces,
        answer: &Message,
    ) -> Result<(), RdmaError> {
        let wr = pieces.served.answer_wr();
        connection.post_message(wr, &answer.encode(), None)
    }

    /// A piece's answer completed (the piece served) or was flushed (its buffer free again).
    fn count_answered(&self, rail: &LocalRail, granted: &Granted, flushed: bool) {
        if flushed {
            self.metrics.rdma_buffers_released_on_flush(true, 1);
        } else {
            if granted.first {
                granted.task.count_served();
            }
            self.metrics
                .rdma_piece_served(granted.first, granted.piece.length);
            self.metrics
                .rdma_rail_piece(&rail.name(), true, granted.piece.length);
        }
    }

    fn on_request(
        &self,
        rail: &LocalRail,
        connection: &Connection,
        pieces: &mut Pieces,
        frame: &[u8],
    ) -> Result<(), RdmaError> {
        let message = Message::decode_frame(frame)?;
        let Message::Fetch {
            request,
            task_id,
            number,
            chunk_size,
            credits,
            range,
        } = message
        else {
            return Err(RdmaError::Handshake(format!(
                "expected a Fetch on the queue pair, got {:#04x}",
                message.tag()
            )));
        };
        match self.admit(request, &task_id, number, chunk_size, &credits, range) {
            Admitted::Answer(answer) => self.answer(connection, pieces, &answer),
            Admitted::Read(granted) => {
                let store = Arc::clone(&self.store);
                let from = rail.buffers();
                pieces.served.read_started();
                self.metrics.rdma_in_flight(true, pieces.served.in_flight());
                pieces.reads.spawn(async move {
                    // From disk straight into the registered pool (O_DIRECT where possible),
                    // in a buffer of the serving budget, in the part this rail can send from.
                    match store
                        .read_piece_near(&granted.task, granted.piece, from)
                        .await
                    {
                        Ok(buf) => Ok((granted, buf)),
                        Err(err) => Err(failed(
                            granted.request,
                            false,
                            format!("reading the piece: {err}"),
                        )),
                    }
                });
                Ok(())
            }
        }
    }

    fn admit(
        &self,
        request: u16,
        task_id: &str,
        number: u32,
        chunk_size: u32,
        credits: &[SlotCredit],
        range: Option<ByteRange>,
    ) -> Admitted {
        let refuse =
            |not_held: bool, message: String| Admitted::Answer(failed(request, not_held, message));
        let Some(task) = self.store.get(task_id) else {
            return refuse(true, format!("task {task_id} is not held here"));
        };
        let Ok(whole) = task.geometry().piece(number) else {
            return refuse(true, format!("piece {number} is out of range"));
        };
        let piece = match range {
            None => whole,
            Some(range) => match stripe_of(whole, range) {
                Ok(stripe) => stripe,
                Err(why) => return refuse(false, why),
            },
        };
        let Some(crc) = task.held(number) else {
            return refuse(
                true,
                format!("piece {number} of task {task_id} is not held here"),
            );
        };
        let slot_size = self.store.pool().info().slot_size;
        if !chunk_size.is_power_of_two() || chunk_size < 4096 || chunk_size as usize > slot_size {
            return refuse(
                false,
                format!("chunk size {chunk_size} must be a power of two from 4096 to {slot_size}"),
            );
        }
        let writes = match credit::plan_writes(request, piece.length, chunk_size, credits) {
            Ok(writes) if writes.len() <= MAX_WRITES_PER_PIECE as usize => writes,
            Ok(writes) => {
                return refuse(
                    false,
                    format!(
                        "{} chunks exceed the {MAX_WRITES_PER_PIECE} writes a piece may take (the send queue)",
                        writes.len()
                    ),
                )
            }
            Err(err) => return refuse(false, err.to_string()),
        };
        Admitted::Read(Granted {
            request,
            task,
            piece,
            first: piece.offset == whole.offset,
            crc,
            writes,
            invalidate: credits[0].rkey,
        })
    }

    /// Posts every read piece the send queue has room for: its chunks as unsignalled WRITEs,
    /// then one signalled SEND_WITH_INVALIDATE carrying the digest, which the receiver sees
    /// only after every chunk is placed.
    fn post_ready(
        &self,
        rail: &LocalRail,
        connection: &Connection,
        pieces: &mut Pieces,
    ) -> Result<(), RdmaError> {
        let room = || {
            (
                connection.send_queue_free(),
                connection.message_slots_free(),
            )
        };
        loop {
            let (send_queue_free, message_slots_free) = room();
            // On the wire from here: should a post fail half way, tear-down still waits for
            // (or never returns) its buffer.
            let Some(posting) = pieces.served.post_next(send_queue_free, message_slots_free) else {
                return Ok(());
            };
            let granted = posting.piece;
            for (write, &wr) in granted.writes.iter().zip(&posting.write_wrs) {
                connection.post_write(
                    wr,
                    &rail.region,
                    posting.buf.address_of(write.piece_offset as usize),
                    write.len,
                    write.rkey,
                    write.remote_addr,
                    false,
                )?;
            }
            let done = Message::Done {
                request: granted.request,
                number: granted.piece.number,
                length: granted.piece.length,
                digest: format_digest(granted.crc),
            };
            connection.post_message(posting.answer_wr, &done.encode(), Some(granted.invalidate))?;
        }
    }

    /// Ends the queue pair so that no buffer returns to the pool while the NIC may still read
    /// it: the queue pair goes to the error state and every piece on the wire waits for its
    /// completing SEND's completion (a flush, now). One that never comes (a broken device)
    /// leaves its buffer out of the pool for good rather than risk it.
    async fn tear_down(&self, rail: &LocalRail, connection: &Connection, mut pieces: Pieces) {
        pieces.reads.abort_all();
        pieces.served.drop_unposted();
        if pieces.served.on_wire() == 0 {
            return;
        }
        let _ = connection.fail();
        let deadline = tokio::time::Instant::now() + self.settings.io_timeout;
        while pieces.served.on_wire() > 0 {
            match tokio::time::timeout_at(deadline, connection.completions()).await {
                Ok(Ok(batch)) => {
                    for completion in batch {
                        if let Some((granted, _buf)) = pieces.served.completed(completion.wr_id) {
                            // Completed before the queue pair left the ready state, or flushed.
                            self.count_answered(rail, &granted, completion.is_error());
                        }
                    }
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let never = pieces.served.take_on_wire();
        if !never.is_empty() {
            tracing::error!(
                pieces = never.len(),
                "RDMA writes never flushed; their buffers are kept out of the pool"
            );
            self.metrics
                .rdma_buffers_never_released(true, never.len() as u64);
            for (_, buf) in never {
                std::mem::forget(buf);
            }
        }
    }
}

/// Range `range` of piece `whole`, as the content range to read; refused unless it lies in
/// the piece and starts on a block boundary, so an O_DIRECT read of it stays aligned.
fn stripe_of(
    whole: crate::geometry::PieceRange,
    range: ByteRange,
) -> Result<crate::geometry::PieceRange, String> {
    let align = crate::io::DIRECT_IO_ALIGN as u64;
    match range.end() {
        Some(end) if end <= whole.length && range.offset.is_multiple_of(align) => {
            Ok(crate::geometry::PieceRange {
                number: whole.number,
                offset: whole.offset + range.offset,
                length: range.length,
            })
        }
        _ => Err(format!(
            "bytes {}+{} are not a range of piece {} ({} bytes) starting on a {align}-byte boundary",
            range.offset, range.length, whole.number, whole.length
        )),
    }
}

/// The pieces of one serving queue pair: the reads in flight, and the rest in the machine.
#[derive(Default)]
struct Pieces {
    reads: JoinSet<Result<(Granted, PieceBuffer), Message>>,
    served: Served<Granted, PieceBuffer>,
    /// The connection's work counts already added to the metrics.
    counted_work: ferry_rdma::WorkCounts,
}

/// Resolves when the peer closes the TCP connection (the end of the queue pair). After set-up
/// nothing travels on it: a byte from the peer is a protocol error.
async fn peer_closed(stream: &TcpStream) -> Result<(), RdmaError> {
    loop {
        stream.readable().await?;
        let mut byte = [0u8; 1];
        match stream.try_read(&mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                return Err(RdmaError::Handshake(
                    "the peer sent bytes on the RDMA set-up connection after set-up".into(),
                ))
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::PieceRange;

    #[test]
    fn a_stripe_is_read_from_its_offset_in_the_content_and_a_bad_range_is_refused() {
        let whole = PieceRange {
            number: 3,
            offset: 3 * (16 << 20),
            length: 16 << 20,
        };
        let stripe = stripe_of(
            whole,
            ByteRange {
                offset: 8 << 20,
                length: 8 << 20,
            },
        )
        .unwrap();
        assert_eq!(
            stripe,
            PieceRange {
                number: 3,
                offset: 3 * (16 << 20) + (8 << 20),
                length: 8 << 20,
            }
        );
        // Past the piece's end, or off a block boundary (an O_DIRECT read must be aligned).
        for (offset, length) in [(8 << 20, (8 << 20) + 1), (16 << 20, 1), (100, 4096)] {
            let err = stripe_of(whole, ByteRange { offset, length }).unwrap_err();
            assert!(err.contains("not a range of piece 3"), "{err}");
        }
    }
}
