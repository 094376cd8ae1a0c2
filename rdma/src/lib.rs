//! RDMA for Ferry, on `sideway` (and `rdma-mummy-sys` for the raw calls it lacks). libibverbs
//! is loaded at run time, so a binary using this crate starts on a host with no RDMA library
//! or device: [`device::discover`] then reports none and the caller falls back to TCP.
//!
//! Pure parts (device selection, the queue-pair handshake codec) are plain data and tested
//! without a device; [`verbs`] and [`poller`] (the per-device completion thread) hold every
//! `unsafe` call, behind safe types.

pub mod address;
pub mod credit;
pub mod device;
pub mod error;
pub mod handshake;
pub mod poller;
pub mod rails;
pub mod select;
pub mod sendq;
pub mod verbs;
pub mod wire;

pub use address::{AddressError, AddressVector, LinkLayer, LocalPort};
pub use device::{discover, DeviceInfo, GidInfo, GidKind, PortInfo};
pub use error::RdmaError;
pub use handshake::Endpoint;
pub use poller::PollMode;
pub use select::{choose, Selection, SelectionRequest};
pub use verbs::{
    Completion, Connection, ConnectionConfig, ConnectionCore, MemoryWindow, RdmaContext,
    RegisteredRegion, WcOpcode, WcStatus, WorkCounts,
};
