//! Sans-I/O encoding and decoding of the frames Ferry exchanges over TCP.
//!
//! Every frame is Vortex's: a 1-byte packet id, a 1-byte tag, a 4-byte big-endian value
//! length, then the value. A piece's content is not inside its frame: it follows the
//! `PieceContent` frame on the connection, `metadata.length` bytes long.
//!
//! Ferry adds one request/response pair in Vortex's reserved tag range (8..=253): a receiver
//! that is told only a task id asks its sources for the task's geometry. A stock Vortex peer
//! does not know these tags, so the exchange fails closed there.

use crate::error::CodecError;
use bytes::{BufMut, BytesMut};
use vortex_protocol::tlv::download_piece::DownloadPiece;
use vortex_protocol::tlv::error::{Code, Error as ErrorMessage};
use vortex_protocol::tlv::piece_content::PieceContent;
use vortex_protocol::tlv::piece_metadata::PieceMetadata;
use vortex_protocol::tlv::Tag;
use vortex_protocol::{Header, Message, HEADER_SIZE};

pub use vortex_protocol::tlv::error::Code as ErrorCode;

/// Length of a task id on the wire: the hex SHA-256 digest.
pub const TASK_ID_LEN: usize = 64;
/// Largest request value a server accepts; real requests are 68 bytes.
pub const MAX_REQUEST_VALUE_LEN: u32 = 4 * 1024;
/// Largest response value (piece metadata, errors, task info) a client accepts.
pub const MAX_RESPONSE_VALUE_LEN: u32 = 64 * 1024;
/// Ferry extension: ask for a task's geometry. Value: the 64-byte task id.
pub const TAG_FERRY_STAT_TASK: u8 = 0xF0;
/// Ferry extension: a task's geometry. Value: content length (u64), piece length (u64),
/// pieces held (u32), complete flag (u8), then, where the source knows it, the SHA-256 of the
/// whole content (32 bytes) that fixes which version of the task it holds. Decoders before
/// the digest was added read the first 21 bytes and ignore the rest.
pub const TAG_FERRY_TASK_INFO: u8 = 0xF1;
/// Ferry extension tags from here up to 0xFD ask to upgrade the connection to another
/// protocol (RDMA's control channel): the server hands the connection to its provider.
pub const FIRST_UPGRADE_TAG: u8 = 0xF2;
pub const LAST_UPGRADE_TAG: u8 = 0xFD;
const TASK_INFO_LEN: usize = 8 + 8 + 4 + 1;
const TASK_INFO_WITH_DIGEST_LEN: usize = TASK_INFO_LEN + 32;

/// The fixed-size part of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub id: u8,
    pub tag: u8,
    pub value_len: u32,
}

/// Decodes a frame header, refusing values larger than `max_value_len` before anything is
/// allocated for them.
pub fn decode_header(
    bytes: &[u8; HEADER_SIZE],
    max_value_len: u32,
) -> Result<FrameHeader, CodecError> {
    let header = Header::decode(bytes)?;
    let frame = FrameHeader {
        id: header.id(),
        tag: u8::from(header.tag()),
        value_len: header.length(),
    };
    if frame.value_len > max_value_len {
        return Err(CodecError::FrameTooLarge {
            tag: frame.tag,
            len: frame.value_len,
            max: max_value_len,
        });
    }
    Ok(frame)
}

fn put_header(out: &mut BytesMut, tag: Tag, value_len: usize) {
    Header::new(tag, value_len as u32).encode(out);
}

/// Checks that a task id is what Dragonfly produces: 64 lowercase hex characters.
pub fn validate_task_id(task_id: &str) -> Result<(), CodecError> {
    let ok = task_id.len() == TASK_ID_LEN
        && task_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CodecError::InvalidTaskId(
            task_id.chars().take(80).collect(),
        ))
    }
}

/// What a client asks a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Vortex `DownloadPiece`: send piece `number` of the task.
    DownloadPiece { task_id: String, number: u32 },
    /// Ferry extension: send the task's geometry.
    StatTask { task_id: String },
    /// Vortex `Close`: the client is done with the connection.
    Close,
    /// Ferry extension: switch this connection to another protocol, opened by `value`.
    Upgrade { tag: u8, value: Vec<u8> },
}

impl Request {
    /// Decodes a request from its header and value.
    pub fn decode(header: FrameHeader, value: &[u8]) -> Result<Request, CodecError> {
        match Tag::from(header.tag) {
            Tag::DownloadPiece => {
                if value.len() != TASK_ID_LEN + 4 {
                    return Err(CodecError::BadValueLength {
                        tag: header.tag,
                        len: value.len(),
                        expected: TASK_ID_LEN + 4,
                    });
                }
                let request = DownloadPiece::decode(value)?;
                validate_task_id(&request.task_id)?;
                Ok(Request::DownloadPiece {
                    task_id: request.task_id,
                    number: request.piece_number,
                })
            }
            Tag::Reserved(TAG_FERRY_STAT_TASK) => {
                if value.len() != TASK_ID_LEN {
                    return Err(CodecError::BadValueLength {
                        tag: header.tag,
                        len: value.len(),
                        expected: TASK_ID_LEN,
                    });
                }
                let task_id = String::from_utf8(value.to_vec()).map_err(|_| {
                    CodecError::InvalidTaskId(String::from_utf8_lossy(value).into_owned())
                })?;
                validate_task_id(&task_id)?;
                Ok(Request::StatTask { task_id })
            }
            Tag::Close => Ok(Request::Close),
            Tag::Reserved(tag @ FIRST_UPGRADE_TAG..=LAST_UPGRADE_TAG) => Ok(Request::Upgrade {
                tag,
                value: value.to_vec(),
            }),
            _ => Err(CodecError::UnexpectedTag {
                tag: header.tag,
                context: "expected a DownloadPiece, StatTask or Close request",
            }),
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Request::DownloadPiece { task_id, number } => {
                DownloadPiece::new(task_id.clone(), *number).encode_packet(out);
            }
            Request::StatTask { task_id } => {
                put_header(out, Tag::Reserved(TAG_FERRY_STAT_TASK), task_id.len());
                out.put_slice(task_id.as_bytes());
            }
            Request::Close => put_header(out, Tag::Close, 0),
            Request::Upgrade { tag, value } => {
                put_header(out, Tag::Reserved(*tag), value.len());
                out.put_slice(value);
            }
        }
    }
}

/// A task's geometry as one Ferry daemon tells another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskInfo {
    pub content_length: u64,
    pub piece_length: u64,
    pub pieces_held: u32,
    pub complete: bool,
    /// SHA-256 of the whole content: the task's manifest digest. `None` from a source that
    /// has none (one that predates manifests, or holds a task it could not verify).
    pub content_sha256: Option<[u8; 32]>,
}

/// What a server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Vortex `PieceContent`; `metadata.length` content bytes follow the frame.
    PieceContent(PieceMetadata),
    /// Ferry extension: the task's geometry.
    TaskInfo(TaskInfo),
    /// Vortex `Error`.
    Error { code: Code, message: String },
}

impl Response {
    /// Decodes a response from its header and value.
    pub fn decode(header: FrameHeader, value: &[u8]) -> Result<Response, CodecError> {
        match Tag::from(header.tag) {
            Tag::PieceContent => Ok(Response::PieceContent(
                PieceContent::decode(value)?.metadata,
            )),
            Tag::Error => {
                let error = ErrorMessage::decode(value)?;
                Ok(Response::Error {
                    code: error.code,
                    message: error.message,
                })
            }
            Tag::Reserved(TAG_FERRY_TASK_INFO) => {
                // Exactly one of the two lengths: one encoding per message.
                let content_sha256 = match value.len() {
                    TASK_INFO_LEN => None,
                    TASK_INFO_WITH_DIGEST_LEN => {
                        Some(value[TASK_INFO_LEN..].try_into().expect("32 bytes"))
                    }
                    len => {
                        return Err(CodecError::BadValueLength {
                            tag: header.tag,
                            len,
                            expected: TASK_INFO_WITH_DIGEST_LEN,
                        })
                    }
                };
                let u64_at =
                    |at: usize| u64::from_be_bytes(value[at..at + 8].try_into().expect("8 bytes"));
                Ok(Response::TaskInfo(TaskInfo {
                    content_length: u64_at(0),
                    piece_length: u64_at(8),
                    pieces_held: u32::from_be_bytes(value[16..20].try_into().expect("4 bytes")),
                    // 0 or 1 only: one encoding per message.
                    complete: match value[20] {
                        0 => false,
                        1 => true,
                        other => {
                            return Err(CodecError::Malformed(format!(
                                "TaskInfo complete flag is {other}, expected 0 or 1"
                            )))
                        }
                    },
                    content_sha256,
                }))
            }
            _ => Err(CodecError::UnexpectedTag {
                tag: header.tag,
                context: "expected PieceContent, TaskInfo or Error",
            }),
        }
    }

    /// Appends the encoded frame to `out` (for `PieceContent`, only the frame: the caller
    /// sends the content after it).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Response::PieceContent(metadata) => PieceContent {
                metadata: metadata.clone(),
            }
            .encode_packet(out),
            Response::TaskInfo(info) => {
                let len = match info.content_sha256 {
                    Some(_) => TASK_INFO_WITH_DIGEST_LEN,
                    None => TASK_INFO_LEN,
                };
                put_header(out, Tag::Reserved(TAG_FERRY_TASK_INFO), len);
                out.put_u64(info.content_length);
                out.put_u64(info.piece_length);
                out.put_u32(info.pieces_held);
                out.put_u8(u8::from(info.complete));
                if let Some(digest) = &info.content_sha256 {
                    out.put_slice(digest);
                }
            }
            Response::Error { code, message } => {
                ErrorMessage::new(*code, message.clone()).encode_packet(out)
            }
        }
    }
}

/// Splits one whole frame off the front of `buf`, for callers that read into a buffer rather
/// than frame by frame (and for fuzzing). `Ok(None)` means more bytes are needed.
pub fn split_frame(
    buf: &mut BytesMut,
    max_value_len: u32,
) -> Result<Option<(FrameHeader, BytesMut)>, CodecError> {
    if buf.len() < HEADER_SIZE {
        return Ok(None);
    }
    let header_bytes: [u8; HEADER_SIZE] = buf[..HEADER_SIZE].try_into().expect("header size");
    let header = decode_header(&header_bytes, max_value_len)?;
    let total = HEADER_SIZE + header.value_len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    Ok(Some((header, frame.split_off(HEADER_SIZE))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use proptest::prelude::*;
    use std::time::Duration;

    const TASK: &str = "5844f27a257287e9b734256bb25603d8005422ced8c0377f15063ec11963b25f";

    fn decode_request(bytes: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        match split_frame(bytes, MAX_REQUEST_VALUE_LEN)? {
            Some((header, value)) => Request::decode(header, &value).map(Some),
            None => Ok(None),
        }
    }

    #[test]
    fn download_piece_matches_the_vortex_wire_layout() {
        let mut out = BytesMut::new();
        Request::DownloadPiece {
            task_id: TASK.into(),
            number: 1,
        }
        .encode(&mut out);
        assert_eq!(out.len(), HEADER_SIZE + 68);
        assert_eq!(out[1], 0, "tag DownloadPiece");
        assert_eq!(&out[2..6], &68u32.to_be_bytes());
        assert_eq!(&out[6..70], TASK.as_bytes());
        assert_eq!(&out[70..74], &[0, 0, 0, 1]);
    }

    #[test]
    fn oversized_length_is_refused_before_reading_the_value() {
        let mut bytes = BytesMut::from(&[7u8, 0, 0xff, 0xff, 0xff, 0xff][..]);
        let err = decode_request(&mut bytes).unwrap_err();
        assert!(
            matches!(err, CodecError::FrameTooLarge { len: u32::MAX, .. }),
            "{err}"
        );
    }

    #[test]
    fn truncated_frame_needs_more_bytes() {
        let mut out = BytesMut::new();
        Request::DownloadPiece {
            task_id: TASK.into(),
            number: 9,
        }
        .encode(&mut out);
        for cut in 0..out.len() {
            let mut partial = BytesMut::from(&out[..cut]);
            assert_eq!(decode_request(&mut partial).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn wrong_tags_and_bad_task_ids_are_errors() {
        let mut bytes = BytesMut::from(&[1u8, 1, 0, 0, 0, 0][..]);
        assert!(matches!(
            decode_request(&mut bytes),
            Err(CodecError::UnexpectedTag { tag: 1, .. })
        ));
        let mut out = BytesMut::new();
        Request::DownloadPiece {
            task_id: TASK.to_uppercase(),
            number: 0,
        }
        .encode(&mut out);
        assert!(matches!(
            decode_request(&mut out),
            Err(CodecError::InvalidTaskId(_))
        ));
        let mut short = BytesMut::from(&[1u8, 0, 0, 0, 0, 3, 1, 2, 3][..]);
        assert!(matches!(
            decode_request(&mut short),
            Err(CodecError::BadValueLength { len: 3, .. })
        ));
    }

    /// The defect `fuzz/`'s rdma_wire target found in the RDMA Failed message was here too: a
    /// complete flag of 7 was taken as true, so the same TaskInfo had 255 encodings.
    #[test]
    fn task_info_flag_must_be_0_or_1() {
        let mut out = BytesMut::new();
        Response::TaskInfo(TaskInfo {
            content_length: 1,
            piece_length: 4 << 20,
            pieces_held: 1,
            complete: true,
            content_sha256: None,
        })
        .encode(&mut out);
        out[HEADER_SIZE + 20] = 7;
        let (header, value) = split_frame(&mut out, MAX_RESPONSE_VALUE_LEN)
            .unwrap()
            .unwrap();
        let err = Response::decode(header, &value).unwrap_err();
        assert!(err.to_string().contains("complete flag is 7"), "{err}");
    }

    /// The content digest is optional, but a TaskInfo is either 21 bytes or 53: a value cut
    /// inside the digest is refused, not read as "no digest".
    #[test]
    fn task_info_carries_an_optional_content_digest() {
        let with = TaskInfo {
            content_length: 9 << 20,
            piece_length: 4 << 20,
            pieces_held: 3,
            complete: true,
            content_sha256: Some([0xAB; 32]),
        };
        for info in [
            with,
            TaskInfo {
                content_sha256: None,
                ..with
            },
        ] {
            let mut out = BytesMut::new();
            Response::TaskInfo(info).encode(&mut out);
            let (header, value) = split_frame(&mut out, MAX_RESPONSE_VALUE_LEN)
                .unwrap()
                .unwrap();
            assert_eq!(
                Response::decode(header, &value).unwrap(),
                Response::TaskInfo(info)
            );
        }
        let mut out = BytesMut::new();
        Response::TaskInfo(with).encode(&mut out);
        let (header, value) = split_frame(&mut out, MAX_RESPONSE_VALUE_LEN)
            .unwrap()
            .unwrap();
        let cut = FrameHeader {
            value_len: 40,
            ..header
        };
        assert!(matches!(
            Response::decode(cut, &value[..40]),
            Err(CodecError::BadValueLength { len: 40, .. })
        ));
    }

    fn metadata(number: u32, length: u64, digest: String) -> PieceMetadata {
        PieceMetadata {
            number,
            offset: u64::from(number) * (4 << 20),
            length,
            digest,
            parent_id: "127.0.0.1-seed".into(),
            traffic_type: 0,
            cost: Duration::from_secs(1),
            created_at: DateTime::from_timestamp(1_700_000_000, 0)
                .unwrap()
                .naive_utc(),
        }
    }

    proptest! {
        #[test]
        fn requests_roundtrip(task in "[0-9a-f]{64}", number in any::<u32>(), stat in any::<bool>()) {
            let request = if stat { Request::StatTask { task_id: task } } else { Request::DownloadPiece { task_id: task, number } };
            let mut out = BytesMut::new();
            request.encode(&mut out);
            prop_assert_eq!(decode_request(&mut out).unwrap(), Some(request));
            prop_assert!(out.is_empty());
        }

        #[test]
        fn responses_roundtrip(number in any::<u32>(), length in any::<u64>(), crc in any::<u32>(),
                               info in (any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>(), proptest::option::of(any::<[u8; 32]>())),
                               message in ".{0,40}", which in 0u8..3) {
            let response = match which {
                0 => Response::PieceContent(metadata(number, length, format!("crc32:{crc}"))),
                1 => Response::TaskInfo(TaskInfo { content_length: info.0, piece_length: info.1, pieces_held: info.2, complete: info.3, content_sha256: info.4 }),
                _ => Response::Error { code: Code::NotFound, message },
            };
            let mut out = BytesMut::new();
            response.encode(&mut out);
            let (header, value) = split_frame(&mut out, MAX_RESPONSE_VALUE_LEN).unwrap().unwrap();
            prop_assert_eq!(Response::decode(header, &value).unwrap(), response);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some((header, value))) = split_frame(&mut buf, MAX_REQUEST_VALUE_LEN) {
                let _ = Request::decode(header, &value);
                let _ = Response::decode(header, &value);
            }
        }
    }
}
