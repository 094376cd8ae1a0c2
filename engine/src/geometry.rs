//! Dragonfly's task and piece geometry: task ids, piece lengths, piece ranges and digests.

use sha2::{Digest as _, Sha256};

pub const MIB: u64 = 1024 * 1024;
/// Smallest piece length Ferry (and Dragonfly) use.
pub const MIN_PIECE_LENGTH: u64 = 4 * MIB;
/// Largest piece length.
pub const MAX_PIECE_LENGTH: u64 = 64 * MIB;
/// Dragonfly aims at about this many pieces per task.
const TARGET_PIECE_COUNT: u64 = 500;

/// A geometry that cannot describe a task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GeometryError {
    #[error(
        "piece length {0} is outside [{MIN_PIECE_LENGTH}, {MAX_PIECE_LENGTH}] (4 MiB to 64 MiB)"
    )]
    PieceLengthOutOfRange(u64),
    #[error("piece {number} is out of range: the task has {count} pieces")]
    PieceOutOfRange { number: u32, count: u32 },
    #[error("content length {0} needs more than 2^32 pieces")]
    TooManyPieces(u64),
    #[error("invalid task id {0:?}: expected 64 lowercase hex characters")]
    InvalidTaskId(String),
}

/// Dragonfly's default: the next power of two of `content_length / 500`, within
/// [4 MiB, 64 MiB].
pub fn default_piece_length(content_length: u64) -> u64 {
    (content_length / TARGET_PIECE_COUNT)
        .checked_next_power_of_two()
        .unwrap_or(MAX_PIECE_LENGTH)
        .clamp(MIN_PIECE_LENGTH, MAX_PIECE_LENGTH)
}

/// Refuses a user-set piece length outside [4 MiB, 64 MiB].
pub fn validate_piece_length(piece_length: u64) -> Result<u64, GeometryError> {
    if (MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&piece_length) {
        Ok(piece_length)
    } else {
        Err(GeometryError::PieceLengthOutOfRange(piece_length))
    }
}

/// One piece: its number, where it starts in the content and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceRange {
    pub number: u32,
    pub offset: u64,
    pub length: u64,
}

/// A task's content length and piece length; pieces are numbered from 0 at
/// `number * piece_length`, and only the last may be short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    content_length: u64,
    piece_length: u64,
    piece_count: u32,
}

impl Geometry {
    pub fn new(content_length: u64, piece_length: u64) -> Result<Geometry, GeometryError> {
        validate_piece_length(piece_length)?;
        let count = content_length.div_ceil(piece_length);
        let piece_count =
            u32::try_from(count).map_err(|_| GeometryError::TooManyPieces(content_length))?;
        Ok(Geometry {
            content_length,
            piece_length,
            piece_count,
        })
    }

    pub fn content_length(&self) -> u64 {
        self.content_length
    }

    pub fn piece_length(&self) -> u64 {
        self.piece_length
    }

    pub fn piece_count(&self) -> u32 {
        self.piece_count
    }

    pub fn piece(&self, number: u32) -> Result<PieceRange, GeometryError> {
        if number >= self.piece_count {
            return Err(GeometryError::PieceOutOfRange {
                number,
                count: self.piece_count,
            });
        }
        let offset = u64::from(number) * self.piece_length;
        Ok(PieceRange {
            number,
            offset,
            length: self.piece_length.min(self.content_length - offset),
        })
    }

    pub fn pieces(&self) -> impl Iterator<Item = PieceRange> + '_ {
        (0..self.piece_count).map(|n| self.piece(n).expect("in range"))
    }
}

/// The inputs Dragonfly hashes into a task id.
#[derive(Debug, Clone, Default)]
pub struct TaskIdInputs<'a> {
    pub url: &'a str,
    pub tag: Option<&'a str>,
    pub application: Option<&'a str>,
    pub revision: Option<&'a str>,
    pub piece_length: Option<u64>,
}

/// Dragonfly's task id: hex SHA-256 over the url, tag, application, revision, the piece
/// length (decimal) when set, and "STANDARD".
pub fn task_id(inputs: &TaskIdInputs<'_>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(inputs.url);
    for part in [inputs.tag, inputs.application, inputs.revision]
        .into_iter()
        .flatten()
    {
        hasher.update(part);
    }
    if let Some(piece_length) = inputs.piece_length {
        hasher.update(piece_length.to_string());
    }
    hasher.update("STANDARD");
    hex::encode(hasher.finalize())
}

/// Checks the form of a task id.
pub fn validate_task_id(task_id: &str) -> Result<(), GeometryError> {
    ferry_fallback_tcp::codec::validate_task_id(task_id)
        .map_err(|_| GeometryError::InvalidTaskId(task_id.chars().take(80).collect()))
}

/// A piece digest as Dragonfly writes it: `crc32:<decimal>` (CRC-32/IEEE).
pub fn format_digest(crc: u32) -> String {
    format!("crc32:{crc}")
}

/// Parses `crc32:<decimal>`; anything else is not a digest Ferry can verify.
pub fn parse_digest(digest: &str) -> Option<u32> {
    digest.strip_prefix("crc32:")?.parse().ok()
}

pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn task_ids_match_dragonfly() {
        // Vectors from Dragonfly's id generator tests.
        let cases = [
            (
                TaskIdInputs {
                    url: "https://example.com",
                    tag: Some("foo"),
                    application: Some("bar"),
                    revision: Some("v1.0"),
                    piece_length: Some(1024),
                },
                "5844f27a257287e9b734256bb25603d8005422ced8c0377f15063ec11963b25f",
            ),
            (
                TaskIdInputs {
                    url: "https://example.com",
                    tag: Some("foo"),
                    application: Some("bar"),
                    ..Default::default()
                },
                "06408fbf247ddaca478f8cb9565fe5591c28efd0994b8fea80a6a87d3203c5ca",
            ),
            (
                TaskIdInputs {
                    url: "https://example.com",
                    tag: Some("foo"),
                    ..Default::default()
                },
                "3c3f230ef9f191dd2821510346a7bc138e4894bee9aee184ba250a3040701d2a",
            ),
            (
                TaskIdInputs {
                    url: "https://example.com",
                    application: Some("bar"),
                    ..Default::default()
                },
                "c9f9261b7305c24371244f9f149f5d4589ed601348fdf22d7f6f4b10658fdba2",
            ),
            (
                TaskIdInputs {
                    url: "https://example.com",
                    piece_length: Some(1024),
                    ..Default::default()
                },
                "9f7c9aafbc6f30f8f41a96ca77eeae80c5b60964b3034b0ee43ccf7b2f9e52b8",
            ),
        ];
        for (inputs, expected) in cases {
            assert_eq!(task_id(&inputs), expected, "{inputs:?}");
        }
    }

    #[test]
    fn piece_length_defaults_follow_dragonfly() {
        assert_eq!(default_piece_length(0), MIN_PIECE_LENGTH);
        assert_eq!(default_piece_length(1 << 30), MIN_PIECE_LENGTH);
        assert_eq!(default_piece_length(5 * (1 << 30)), 16 * MIB);
        assert_eq!(default_piece_length(100 * (1 << 30)), 64 * MIB);
        assert_eq!(default_piece_length(u64::MAX), MAX_PIECE_LENGTH);
        assert!(validate_piece_length(MIB).is_err());
        assert!(validate_piece_length(128 * MIB).is_err());
    }

    #[test]
    fn digests_are_crc32_decimal() {
        assert_eq!(format_digest(crc32(b"123456789")), "crc32:3421780262");
        assert_eq!(parse_digest("crc32:3421780262"), Some(0xCBF4_3926));
        assert_eq!(parse_digest("sha256:00"), None);
        assert_eq!(parse_digest("crc32:x"), None);
    }

    proptest! {
        #[test]
        fn default_is_a_valid_power_of_two(len in any::<u64>()) {
            let piece = default_piece_length(len);
            prop_assert!(piece.is_power_of_two());
            prop_assert!(validate_piece_length(piece).is_ok());
        }

        #[test]
        fn pieces_tile_the_content(len in 0u64..(1 << 40), shift in 22u32..=26) {
            let geometry = Geometry::new(len, 1 << shift).unwrap();
            let mut next = 0;
            for piece in geometry.pieces() {
                prop_assert_eq!(piece.offset, next);
                prop_assert!(piece.length > 0 && piece.length <= geometry.piece_length());
                if piece.number + 1 < geometry.piece_count() {
                    prop_assert_eq!(piece.length, geometry.piece_length());
                }
                next += piece.length;
            }
            prop_assert_eq!(next, len);
            prop_assert!(geometry.piece(geometry.piece_count()).is_err());
        }

        #[test]
        fn digest_roundtrips(crc in any::<u32>()) {
            prop_assert_eq!(parse_digest(&format_digest(crc)), Some(crc));
        }

        #[test]
        fn task_ids_are_valid(url in ".{0,64}", tag in proptest::option::of("[a-z]{0,8}")) {
            let id = task_id(&TaskIdInputs { url: &url, tag: tag.as_deref(), ..Default::default() });
            prop_assert!(validate_task_id(&id).is_ok());
        }
    }
}
