//! The control messages of Ferry's RDMA piece exchange. They travel on the data-plane TCP
//! connection, framed like Vortex packets (id, tag, 4-byte big-endian length, value) with tags
//! in Vortex's reserved range: a receiver opens with [`Message::Connect`], which a stock
//! Vortex peer does not know and refuses, so RDMA discovery fails closed.
//!
//! The codec is pure; [`read_message`] and [`write_message`] are the thin I/O around it.

use crate::credit::SlotCredit;
use crate::error::RdmaError;
use crate::handshake::{self, Endpoint};
use crate::rails::matching::RailAd;
use crate::rails::wire::Features;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TAG_CONNECT: u8 = 0xF2;
pub const TAG_ACCEPT: u8 = 0xF3;
pub const TAG_FETCH: u8 = 0xF4;
pub const TAG_DONE: u8 = 0xF5;
pub const TAG_FAILED: u8 = 0xF6;
/// The set-up exchange of rails: each side's list (see [`crate::rails::wire`]).
pub const TAG_RAILS: u8 = 0xF7;
/// [`TAG_CONNECT`] for a queue pair on one of the source's rails (by its index in the list the
/// source sent).
pub const TAG_CONNECT_RAIL: u8 = 0xF8;
/// [`TAG_FETCH`] for a byte range of the piece (one stripe); sent only to a source whose rail
/// list says it serves ranges.
pub const TAG_FETCH_RANGE: u8 = 0xF9;
/// Vortex's error tag: what a peer answers when it refuses the upgrade.
pub const TAG_VORTEX_ERROR: u8 = 0xFF;
/// Most slots one fetch may grant (a 64 MiB piece in 4 MiB slots).
pub const MAX_CREDITS: usize = 64;
const MAX_VALUE: usize = 16 * 1024;
const TASK_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Receiver → sender: connect my queue pair to yours.
    Connect { endpoint: Endpoint },
    /// Sender → receiver: here is mine.
    Accept { endpoint: Endpoint },
    /// Either way, once per pair of hosts: the rails this side can move pieces on. The
    /// receiver sends its own and the source answers with its own, then closes.
    Rails {
        rails: Vec<RailAd>,
        features: Features,
    },
    /// Receiver → sender: connect my queue pair to one on your rail `rail` (an index from
    /// your [`Message::Rails`]); answered by [`Message::Accept`].
    ConnectRail { rail: u8, endpoint: Endpoint },
    /// Receiver → sender: write piece `number` of `task_id` (or only `range` of it) into
    /// these slots, in chunks of `chunk_size`, naming `request` in every immediate.
    Fetch {
        request: u16,
        task_id: String,
        number: u32,
        chunk_size: u32,
        credits: Vec<SlotCredit>,
        range: Option<ByteRange>,
    },
    /// Sender → receiver: every chunk of `request` was written and acknowledged; `length` is
    /// what was written (the range's, for a range) and `digest` the whole piece's.
    Done {
        request: u16,
        number: u32,
        length: u64,
        digest: String,
    },
    /// Sender → receiver: `request` cannot be served (`not_held`: the piece is not here).
    Failed {
        request: u16,
        not_held: bool,
        message: String,
    },
    /// A Vortex error frame: the peer refused (the upgrade, typically).
    Refused { message: String },
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Bytes `offset..offset + length` of a piece: the stripe one rail pair carries while others
/// carry the rest. Never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

impl ByteRange {
    /// The end, or None where it would overflow.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
}

/// Reads fixed-size fields off the front of a value.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], RdmaError> {
        if self.0.len() < n {
            return Err(RdmaError::Handshake(format!(
                "message truncated: needed {n} more bytes, had {}",
                self.0.len()
            )));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RdmaError> {
        Ok(self.take(1)?[0])
    }
    /// A boolean is 0 or 1; anything else is refused, so every message has one encoding.
    fn flag(&mut self) -> Result<bool, RdmaError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(RdmaError::Handshake(format!(
                "flag byte is {other}, expected 0 or 1"
            ))),
        }
    }
    fn u16(&mut self) -> Result<u16, RdmaError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, RdmaError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, RdmaError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn text(&mut self, n: usize) -> Result<String, RdmaError> {
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| RdmaError::Handshake("text field is not UTF-8".into()))
    }
}

impl Message {
    pub fn tag(&self) -> u8 {
        match self {
            Message::Connect { .. } => TAG_CONNECT,
            Message::Accept { .. } => TAG_ACCEPT,
            Message::Rails { .. } => TAG_RAILS,
            Message::ConnectRail { .. } => TAG_CONNECT_RAIL,
            Message::Fetch { range: None, .. } => TAG_FETCH,
            Message::Fetch { range: Some(_), .. } => TAG_FETCH_RANGE,
            Message::Done { .. } => TAG_DONE,
            Message::Failed { .. } => TAG_FAILED,
            Message::Refused { .. } => TAG_VORTEX_ERROR,
        }
    }

    /// The value (without the frame header).
    ///
    /// # Panics
    /// On a [`Message::Rails`] list that [`crate::rails::wire::encode`] refuses (more than
    /// [`crate::rails::wire::MAX_RAILS`] rails, a name that is not short ASCII): the rails
    /// come from this host's own enumeration, which never makes one.
    pub fn encode_value(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Message::Connect { endpoint } | Message::Accept { endpoint } => {
                out.extend_from_slice(&endpoint.encode())
            }
            Message::Rails { rails, features } => out.extend_from_slice(
                &crate::rails::wire::encode(rails, *features).expect("this host's rails encode"),
            ),
            Message::ConnectRail { rail, endpoint } => {
                out.push(*rail);
                out.extend_from_slice(&endpoint.encode());
            }
            Message::Fetch {
                request,
                task_id,
                number,
                chunk_size,
                credits,
                range,
            } => {
                put_u16(&mut out, *request);
                out.extend_from_slice(task_id.as_bytes());
                put_u32(&mut out, *number);
                put_u32(&mut out, *chunk_size);
                put_u16(&mut out, credits.len() as u16);
                for credit in credits {
                    put_u64(&mut out, credit.addr);
                    put_u32(&mut out, credit.rkey);
                    put_u32(&mut out, credit.len);
                }
                if let Some(range) = range {
                    put_u64(&mut out, range.offset);
                    put_u64(&mut out, range.length);
                }
            }
            Message::Done {
                request,
                number,
                length,
                digest,
            } => {
                put_u16(&mut out, *request);
                put_u32(&mut out, *number);
                put_u64(&mut out, *length);
                put_u16(&mut out, digest.len() as u16);
                out.extend_from_slice(digest.as_bytes());
            }
            Message::Failed {
                request,
                not_held,
                message,
            } => {
                put_u16(&mut out, *request);
                out.push(u8::from(*not_held));
                out.extend_from_slice(message.as_bytes());
            }
            Message::Refused { message } => {
                out.push(0);
                out.extend_from_slice(message.as_bytes());
            }
        }
        out
    }

    /// The whole frame.
    pub fn encode(&self) -> Vec<u8> {
        let value = self.encode_value();
        let mut out = Vec::with_capacity(6 + value.len());
        out.push(0);
        out.push(self.tag());
        put_u32(&mut out, value.len() as u32);
        out.extend_from_slice(&value);
        out
    }

    /// Decodes one whole frame (as [`Message::encode`] makes it): how control messages that
    /// travel over the queue pair itself, one per SEND, are read.
    pub fn decode_frame(frame: &[u8]) -> Result<Message, RdmaError> {
        if frame.len() < 6 {
            return Err(RdmaError::Handshake(format!(
                "control message of {} bytes is shorter than a frame header",
                frame.len()
            )));
        }
        let len = u32::from_be_bytes(frame[2..6].try_into().expect("4")) as usize;
        if len != frame.len() - 6 {
            return Err(RdmaError::Handshake(format!(
                "control message frame says {len} bytes of value, carries {}",
                frame.len() - 6
            )));
        }
        Message::decode(frame[1], &frame[6..])
    }

    pub fn decode(tag: u8, value: &[u8]) -> Result<Message, RdmaError> {
        let mut r = Reader(value);
        let message = match tag {
            TAG_CONNECT => Message::Connect {
                endpoint: Endpoint::decode(r.take(handshake::ENCODED_LEN)?)?,
            },
            TAG_ACCEPT => Message::Accept {
                endpoint: Endpoint::decode(r.take(handshake::ENCODED_LEN)?)?,
            },
            TAG_RAILS => {
                let (rails, features) = crate::rails::wire::decode(r.0)
                    .map_err(|e| RdmaError::Handshake(format!("rail list: {e}")))?;
                r.0 = &[];
                Message::Rails { rails, features }
            }
            TAG_CONNECT_RAIL => Message::ConnectRail {
                rail: r.u8()?,
                endpoint: Endpoint::decode(r.take(handshake::ENCODED_LEN)?)?,
            },
            TAG_FETCH | TAG_FETCH_RANGE => {
                let request = r.u16()?;
                let task_id = r.text(TASK_ID_LEN)?;
                if !task_id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(RdmaError::Handshake(
                        "task id is not 64 lowercase hex characters".into(),
                    ));
                }
                let number = r.u32()?;
                let chunk_size = r.u32()?;
                let count = r.u16()? as usize;
                if count == 0 || count > MAX_CREDITS {
                    return Err(RdmaError::Handshake(format!(
                        "{count} credits granted; 1 to {MAX_CREDITS} allowed"
                    )));
                }
                let mut credits = Vec::with_capacity(count);
                for _ in 0..count {
                    credits.push(SlotCredit {
                        addr: r.u64()?,
                        rkey: r.u32()?,
                        len: r.u32()?,
                    });
                }
                let range = if tag == TAG_FETCH_RANGE {
                    let range = ByteRange {
                        offset: r.u64()?,
                        length: r.u64()?,
                    };
                    if range.length == 0 || range.end().is_none() {
                        return Err(RdmaError::Handshake(format!(
                            "byte range of {} bytes at {} is empty or overflows",
                            range.length, range.offset
                        )));
                    }
                    Some(range)
                } else {
                    None
                };
                Message::Fetch {
                    request,
                    task_id,
                    number,
                    chunk_size,
                    credits,
                    range,
                }
            }
            TAG_DONE => {
                let (request, number, length) = (r.u16()?, r.u32()?, r.u64()?);
                let digest_len = r.u16()? as usize;
                Message::Done {
                    request,
                    number,
                    length,
                    digest: r.text(digest_len)?,
                }
            }
            TAG_FAILED => {
                let request = r.u16()?;
                let not_held = r.flag()?;
                let rest = r.0.len();
                Message::Failed {
                    request,
                    not_held,
                    message: r.text(rest)?,
                }
            }
            TAG_VORTEX_ERROR => {
                let _code = r.u8()?;
                Message::Refused {
                    message: String::from_utf8_lossy(r.0).into_owned(),
                }
            }
            other => {
                return Err(RdmaError::Handshake(format!(
                    "unexpected frame tag {other:#04x} on the RDMA control channel"
                )))
            }
        };
        if !r.0.is_empty() && !matches!(message, Message::Refused { .. }) {
            return Err(RdmaError::Handshake(format!(
                "{} trailing bytes after a {tag:#04x} message",
                r.0.len()
            )));
        }
        Ok(message)
    }
}

/// Reads one message, waiting at most `limit` for it.
pub async fn read_message<R: AsyncReadExt + Unpin>(
    stream: &mut R,
    limit: Duration,
) -> Result<Message, RdmaError> {
    let read = async {
        let mut header = [0u8; 6];
        stream.read_exact(&mut header).await?;
        let len = u32::from_be_bytes(header[2..6].try_into().expect("4")) as usize;
        if len > MAX_VALUE {
            return Err(RdmaError::Handshake(format!(
                "frame of {len} bytes exceeds {MAX_VALUE}"
            )));
        }
        let mut value = vec![0u8; len];
        stream.read_exact(&mut value).await?;
        Message::decode(header[1], &value)
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| RdmaError::Handshake(format!("peer sent nothing for {limit:?}")))?
}

pub async fn write_message<W: AsyncWriteExt + Unpin>(
    stream: &mut W,
    message: &Message,
    limit: Duration,
) -> Result<(), RdmaError> {
    let bytes = message.encode();
    tokio::time::timeout(limit, stream.write_all(&bytes))
        .await
        .map_err(|_| RdmaError::Handshake(format!("peer stopped reading for {limit:?}")))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn endpoint() -> Endpoint {
        Endpoint {
            qp_number: 0x11,
            packet_sequence: 0x22,
            gid: "::ffff:10.77.0.1".parse().unwrap(),
            lid: 0,
            mtu: 1024,
            link_layer: crate::address::LinkLayer::Ethernet,
            subnet_prefix: 0xfe80 << 48,
        }
    }

    fn roundtrip(message: Message) {
        let frame = message.encode();
        assert_eq!(frame[1], message.tag());
        assert_eq!(
            u32::from_be_bytes(frame[2..6].try_into().unwrap()) as usize,
            frame.len() - 6
        );
        assert_eq!(Message::decode(frame[1], &frame[6..]).unwrap(), message);
        assert_eq!(Message::decode_frame(&frame).unwrap(), message);
        // A frame cut short or padded (a SEND of the wrong length) is refused.
        assert!(Message::decode_frame(&frame[..frame.len() - 1]).is_err());
        let mut padded = frame.clone();
        padded.push(0);
        assert!(Message::decode_frame(&padded).is_err());
        assert!(Message::decode_frame(&frame[..5]).is_err());
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Message::Connect {
            endpoint: endpoint(),
        });
        roundtrip(Message::Accept {
            endpoint: endpoint(),
        });
        roundtrip(Message::ConnectRail {
            rail: 3,
            endpoint: endpoint(),
        });
        roundtrip(Message::Rails {
            rails: vec![RailAd {
                index: 1,
                name: "mlx5_1:1".into(),
                link_layer: crate::address::LinkLayer::Ethernet,
                fabric: crate::rails::Fabric::Ipv4 {
                    network: 0x0a4d_0100,
                    prefix_len: 24,
                },
                lid: 0,
                gid: "::ffff:10.77.1.2".parse().unwrap(),
                speed_mbps: 400_000,
            }],
            features: Features::ALL,
        });
        roundtrip(Message::Rails {
            rails: vec![],
            features: Features::default(),
        });
        roundtrip(Message::Fetch {
            request: 7,
            task_id: "a".repeat(64),
            number: 3,
            chunk_size: 1 << 20,
            credits: vec![
                SlotCredit {
                    addr: 0x1000,
                    rkey: 9,
                    len: 4 << 20,
                },
                SlotCredit {
                    addr: 0x9000,
                    rkey: 10,
                    len: 100,
                },
            ],
            range: None,
        });
        roundtrip(Message::Fetch {
            request: 8,
            task_id: "b".repeat(64),
            number: 4,
            chunk_size: 1 << 20,
            credits: vec![SlotCredit {
                addr: 0x1000,
                rkey: 9,
                len: 8 << 20,
            }],
            range: Some(ByteRange {
                offset: 8 << 20,
                length: 8 << 20,
            }),
        });
        roundtrip(Message::Done {
            request: 7,
            number: 3,
            length: 4 << 20,
            digest: "crc32:12345".into(),
        });
        roundtrip(Message::Failed {
            request: 7,
            not_held: true,
            message: "piece 3 is not held".into(),
        });
    }

    #[test]
    fn malformed_values_are_refused() {
        let fetch = Message::Fetch {
            request: 1,
            task_id: "Z".repeat(64),
            number: 0,
            chunk_size: 1,
            credits: vec![SlotCredit {
                addr: 0,
                rkey: 0,
                len: 1,
            }],
            range: None,
        };
        assert!(
            Message::decode(TAG_FETCH, &fetch.encode_value()).is_err(),
            "bad task id"
        );
        let mut no_credits = Message::Fetch {
            request: 1,
            task_id: "a".repeat(64),
            number: 0,
            chunk_size: 1,
            credits: vec![],
            range: None,
        }
        .encode_value();
        assert!(Message::decode(TAG_FETCH, &no_credits)
            .unwrap_err()
            .to_string()
            .contains("credits"));
        no_credits.truncate(10);
        assert!(Message::decode(TAG_FETCH, &no_credits)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(Message::decode(0x01, &[]).is_err());
        // A range that is empty or runs past u64 is refused; a whole-piece fetch with a
        // range's tail is refused as trailing bytes.
        for (offset, length) in [(0, 0), (u64::MAX, 2)] {
            let ranged = Message::Fetch {
                request: 1,
                task_id: "a".repeat(64),
                number: 0,
                chunk_size: 4096,
                credits: vec![SlotCredit {
                    addr: 0,
                    rkey: 0,
                    len: 1,
                }],
                range: Some(ByteRange { offset, length }),
            };
            assert!(Message::decode(TAG_FETCH_RANGE, &ranged.encode_value())
                .unwrap_err()
                .to_string()
                .contains("empty or overflows"));
            assert!(Message::decode(TAG_FETCH, &ranged.encode_value())
                .unwrap_err()
                .to_string()
                .contains("trailing"));
        }
        let mut done = Message::Done {
            request: 1,
            number: 1,
            length: 1,
            digest: "x".into(),
        }
        .encode_value();
        done.push(0);
        assert!(Message::decode(TAG_DONE, &done)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
    }

    /// Found by `fuzz/` (rdma_wire): a Failed with not_held = 7 decoded as true and encoded
    /// back as 1, so one message had many encodings.
    #[test]
    fn flags_other_than_0_or_1_are_refused() {
        let mut failed = Message::Failed {
            request: 1,
            not_held: true,
            message: "gone".into(),
        }
        .encode_value();
        failed[2] = 7;
        assert!(Message::decode(TAG_FAILED, &failed)
            .unwrap_err()
            .to_string()
            .contains("flag byte is 7"));
    }

    proptest! {
        #[test]
        fn arbitrary_values_never_panic(tag in any::<u8>(), value in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Message::decode(tag, &value);
        }
    }
}
