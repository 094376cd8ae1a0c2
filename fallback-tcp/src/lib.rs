//! Ferry's TCP piece transport: Dragonfly's Vortex protocol, so a stock Dragonfly peer can
//! fetch pieces from a Ferry daemon, plus two Ferry extension frames in Vortex's reserved tag
//! range.
//!
//! The crate is split the way quinn splits a protocol: [`codec`] is pure (bytes in, values or
//! precise errors out, no I/O), while [`server`] and [`client`] are thin tokio layers that move
//! bytes and enforce timeouts. It knows nothing of the daemon or of RDMA.
#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod error;
pub mod server;

pub use client::{ClientConfig, Connection, FetchedPiece};
pub use codec::{Request, Response, TaskInfo};
pub use error::{ClientError, CodecError};
pub use server::{
    PieceProvider, ProviderError, ServedPiece, Server, ServerConfig, ServerStats,
    ServerStatsSnapshot, UpgradeFuture,
};
pub use vortex_protocol::tlv::piece_metadata::PieceMetadata;
