//! The RDMA connection handshake: a queue pair's endpoint (QPN, PSN, GID, LID, MTU). The
//! encoding is fixed-size and canonical, so whatever decodes must encode to the same bytes.
#![no_main]

use ferry_rdma::Endpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(endpoint) = Endpoint::decode(data) {
        assert_eq!(&endpoint.encode()[..], data, "encoding is not canonical");
    }
});
