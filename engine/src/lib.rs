//! Ferry's engine: the piece store, the transports composed into transfers, the gRPC control
//! API, the daemon and the `ferry` CLI.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dragonfly;
pub mod geometry;
pub mod import;
pub mod io;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod origin;
pub mod rdma;
pub mod sd_notify;
pub mod serve;
pub mod sizing;
pub mod store;
pub mod transfer;
pub mod transport;

/// The generated gRPC types and stubs of `ferry.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ferry.v1");
}
