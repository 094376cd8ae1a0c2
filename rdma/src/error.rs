/// Everything that can go wrong with RDMA, each variant saying which step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    #[error("no RDMA library or device on this host: {0}")]
    Unavailable(String),
    #[error("RDMA device {0:?} not found (have: {1})")]
    NoSuchDevice(String, String),
    #[error("no usable port/GID: {0}")]
    NoUsableGid(String),
    #[error("{step} failed: {message}")]
    Verbs { step: &'static str, message: String },
    #[error("queue pair handshake: {0}")]
    Handshake(String),
    #[error("queue pair address: {0}")]
    Address(#[from] crate::address::AddressError),
    #[error("work request {wr_id:#x} completed with {status}")]
    Completion {
        wr_id: u64,
        status: crate::verbs::WcStatus,
    },
    #[error("completion channel: {0}")]
    Channel(#[from] std::io::Error),
}

impl RdmaError {
    pub fn verbs(step: &'static str, err: impl std::fmt::Display) -> RdmaError {
        RdmaError::Verbs {
            step,
            message: err.to_string(),
        }
    }
}
