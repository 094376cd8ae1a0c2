//! One error type per concern: decoding bytes, and fetching over a connection.

use std::time::Duration;

/// A frame that cannot be decoded. Every variant says exactly what was wrong with the bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("frame of tag {tag} declares a {len}-byte value, more than the {max} allowed")]
    FrameTooLarge { tag: u8, len: u32, max: u32 },
    #[error("unexpected frame tag {tag} ({context})")]
    UnexpectedTag { tag: u8, context: &'static str },
    #[error("frame of tag {tag} has a {len}-byte value, expected {expected}")]
    BadValueLength {
        tag: u8,
        len: usize,
        expected: usize,
    },
    #[error("invalid task id {0:?}: expected 64 lowercase hex characters")]
    InvalidTaskId(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl From<vortex_protocol::error::Error> for CodecError {
    fn from(err: vortex_protocol::error::Error) -> Self {
        CodecError::Malformed(err.to_string())
    }
}

/// Why fetching a piece (or task information) from a peer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {peer} sent nothing for {timeout:?} while {during}")]
    Timeout {
        peer: String,
        during: &'static str,
        timeout: Duration,
    },
    #[error("i/o with peer {peer} failed: {source}")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {peer} closed the connection while {during}")]
    Closed { peer: String, during: &'static str },
    #[error("peer {peer} broke the protocol: {source}")]
    Protocol {
        peer: String,
        #[source]
        source: CodecError,
    },
    #[error("peer {peer} answered {code}: {message}")]
    Remote {
        peer: String,
        code: u8,
        message: String,
    },
    #[error("peer {peer} sent piece {got} (length {length}), asked for piece {wanted}")]
    WrongPiece {
        peer: String,
        wanted: u32,
        got: u32,
        length: u64,
    },
    #[error("peer {peer} sent piece {number} with length {got}, expected {expected}")]
    WrongLength {
        peer: String,
        number: u32,
        got: u64,
        expected: u64,
    },
}

impl ClientError {
    /// Whether the peer said it does not hold what was asked for (the connection stays usable).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Remote { code, .. } if *code == u8::from(vortex_protocol::tlv::error::Code::NotFound))
    }

    /// Whether the connection can carry another request after this error.
    pub fn connection_reusable(&self) -> bool {
        matches!(self, ClientError::Remote { .. })
    }
}
