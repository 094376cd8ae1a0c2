//! Whole models as CNCF ModelPack artifacts in an OCI registry: resolving a reference to its
//! manifest, pulling every layer blob as a task through the transfer engine (back to source
//! from the registry, or from peers), laying the model out as a directory atomically, and
//! building and pushing an artifact from a directory.
//!
//! - [`reference`]: `oci://REGISTRY/REPO:TAG` and `@sha256:` references.
//! - [`registry`]: the OCI distribution client (token flow, manifests, blob uploads).
//! - [`spec`]: ModelPack media types, manifests and what a layer may say.
//! - [`layout`]: the directory a pull places (safe paths, tar unpacking, atomic rename).
//! - [`pull`]: the daemon's side of `PullModel` (and preheat).
//! - [`record`]: the models a daemon holds (`data_dir/models/`).
//! - [`push`]: building and pushing an artifact from a directory (client side).
//! - [`cli`]: the `ferry pull oci://`, `push`, `preheat`, `models` and `import DIR` commands.
//! - [`service`]: the gRPC calls `PullModel`, `StatModel`, `ListModels`.

pub mod cli;
pub mod layout;
pub mod pull;
pub mod push;
pub mod record;
pub mod reference;
pub mod registry;
pub mod service;
pub mod spec;

use std::path::PathBuf;

/// Why a model could not be resolved, pulled, placed or pushed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error("invalid model reference {reference:?}: {why}")]
    InvalidReference { reference: String, why: String },
    #[error("invalid registry credentials: {0}")]
    InvalidCredentials(String),
    #[error("registry {registry}: cannot connect: {why}")]
    Connect { registry: String, why: String },
    #[error("registry {registry}: {why}")]
    Protocol { registry: String, why: String },
    #[error("registry {registry} refused access to {what} ({code}): give credentials with --registry-auth USER:PASS or in ~/.docker/config.json")]
    Unauthorized {
        registry: String,
        what: String,
        code: u16,
    },
    #[error("registry {registry} has no {what}")]
    NotFound { registry: String, what: String },
    #[error("registry {registry} answered {code} to {what}: {body}")]
    Status {
        registry: String,
        what: String,
        code: u16,
        body: String,
    },
    #[error("{what} hashes to {actual}, not the {expected} it was asked by")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("not a model artifact: {0}")]
    NotAModel(String),
    #[error("layer {digest}: {why}")]
    BadLayer { digest: String, why: String },
    #[error("layer {digest}: unsafe path {path:?} in its tar: {why}; nothing was placed")]
    UnsafeTarPath {
        digest: String,
        path: String,
        why: String,
    },
    #[error("output directory {0} exists and is not a model Ferry placed: move it away or pick another --output")]
    OutputExists(PathBuf),
    #[error("placing the model at {path}: {doing}: {source}")]
    Place {
        path: PathBuf,
        doing: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model store {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no model {0} is held by this daemon")]
    UnknownModel(String),
    /// The output path or the engine refused the request.
    #[error(transparent)]
    Transfer(Box<crate::transfer::TransferError>),
    /// A layer's transfer failed (its status is the transfer's).
    #[error("layer {digest} ({filepath}): {source}")]
    Layer {
        digest: String,
        filepath: String,
        #[source]
        source: Box<crate::transfer::TransferError>,
    },
}

impl From<crate::transfer::TransferError> for ModelError {
    fn from(err: crate::transfer::TransferError) -> ModelError {
        ModelError::Transfer(Box::new(err))
    }
}
