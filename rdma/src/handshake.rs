//! The queue-pair handshake: what each side tells the other to connect an RC queue pair.
//! Pure encode/decode; the bytes travel over the data-plane TCP connection after Ferry's
//! prefix, so a peer that is not Ferry never gets this far.

use crate::error::RdmaError;
use std::net::Ipv6Addr;

/// Magic that opens Ferry's RDMA handshake (and its version).
pub const MAGIC: &[u8; 8] = b"FERRYRC1";
pub const ENCODED_LEN: usize = 8 + 4 + 4 + 16 + 2 + 4;

/// One side of an RC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub qp_number: u32,
    pub packet_sequence: u32,
    pub gid: Ipv6Addr,
    pub lid: u16,
    /// Path MTU in bytes the side can use (the smaller of the two is taken).
    pub mtu: u32,
}

impl Endpoint {
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut out = [0u8; ENCODED_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&self.qp_number.to_be_bytes());
        out[12..16].copy_from_slice(&self.packet_sequence.to_be_bytes());
        out[16..32].copy_from_slice(&self.gid.octets());
        out[32..34].copy_from_slice(&self.lid.to_be_bytes());
        out[34..38].copy_from_slice(&self.mtu.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Endpoint, RdmaError> {
        if bytes.len() != ENCODED_LEN {
            return Err(RdmaError::Handshake(format!(
                "endpoint is {} bytes, expected {ENCODED_LEN}",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(RdmaError::Handshake(
                "not a Ferry RC endpoint (bad magic or version)".into(),
            ));
        }
        let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let endpoint = Endpoint {
            qp_number: u32_at(8),
            packet_sequence: u32_at(12),
            gid: Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[16..32]).expect("16 bytes")),
            lid: u16::from_be_bytes([bytes[32], bytes[33]]),
            mtu: u32_at(34),
        };
        if endpoint.qp_number == 0 || endpoint.qp_number > 0xff_ffff {
            return Err(RdmaError::Handshake(format!(
                "invalid queue pair number {}",
                endpoint.qp_number
            )));
        }
        if endpoint.packet_sequence > 0xff_ffff {
            return Err(RdmaError::Handshake(format!(
                "invalid packet sequence number {}",
                endpoint.packet_sequence
            )));
        }
        if ![256, 512, 1024, 2048, 4096].contains(&endpoint.mtu) {
            return Err(RdmaError::Handshake(format!(
                "invalid path MTU {}",
                endpoint.mtu
            )));
        }
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn endpoints_roundtrip(qpn in 1u32..0xff_ffff, psn in 0u32..0xff_ffff, gid in any::<[u8; 16]>(), lid in any::<u16>(),
                               mtu in prop::sample::select(vec![256u32, 512, 1024, 2048, 4096])) {
            let endpoint = Endpoint { qp_number: qpn, packet_sequence: psn, gid: Ipv6Addr::from(gid), lid, mtu };
            prop_assert_eq!(Endpoint::decode(&endpoint.encode()).unwrap(), endpoint);
        }

        #[test]
        fn garbage_is_refused_not_panicked_on(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Endpoint::decode(&bytes);
        }
    }

    #[test]
    fn wrong_magic_and_bad_fields_are_refused() {
        let good = Endpoint {
            qp_number: 17,
            packet_sequence: 5,
            gid: "::ffff:10.0.0.1".parse().unwrap(),
            lid: 0,
            mtu: 1024,
        };
        let mut bytes = good.encode();
        bytes[0] = b'X';
        assert!(Endpoint::decode(&bytes)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let bad_mtu = Endpoint { mtu: 1000, ..good };
        assert!(Endpoint::decode(&bad_mtu.encode())
            .unwrap_err()
            .to_string()
            .contains("MTU"));
        assert!(Endpoint::decode(&good.encode()[..10]).is_err());
    }
}
