//! The queue-pair handshake: what each side tells the other to connect an RC queue pair.
//! Pure encode/decode; the bytes travel over the data-plane TCP connection after Ferry's
//! prefix, so a peer that is not Ferry never gets this far.

use crate::address::LinkLayer;
use crate::error::RdmaError;
use std::net::Ipv6Addr;

/// Magic that opens Ferry's RDMA handshake (and its version). Version 2 added the link layer
/// and the subnet prefix; a version-1 peer refuses it (bad magic), so the two fall back to TCP.
pub const MAGIC: &[u8; 8] = b"FERRYRC2";
/// magic, QPN, PSN, GID, LID, MTU, link layer, subnet prefix.
pub const ENCODED_LEN: usize = 8 + 4 + 4 + 16 + 2 + 4 + 1 + 8;

/// One side of an RC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub qp_number: u32,
    pub packet_sequence: u32,
    pub gid: Ipv6Addr,
    /// The port's LID (InfiniBand; 0 on Ethernet, where it means nothing).
    pub lid: u16,
    /// Path MTU in bytes the side can use (the smaller of the two is taken).
    pub mtu: u32,
    /// The port's link layer: both ends must have the same.
    pub link_layer: LinkLayer,
    /// The port's subnet prefix (top 64 bits of its GID 0): on InfiniBand, a different prefix
    /// means another subnet, reached through a router with a GRH.
    pub subnet_prefix: u64,
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
        out[38] = self.link_layer.code();
        out[39..47].copy_from_slice(&self.subnet_prefix.to_be_bytes());
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
            link_layer: LinkLayer::from_code(bytes[38]).ok_or_else(|| {
                RdmaError::Handshake(format!(
                    "invalid link layer {} (1: InfiniBand, 2: Ethernet)",
                    bytes[38]
                ))
            })?,
            subnet_prefix: u64::from_be_bytes(bytes[39..47].try_into().expect("8 bytes")),
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
                               mtu in prop::sample::select(vec![256u32, 512, 1024, 2048, 4096]),
                               ib in any::<bool>(), subnet_prefix in any::<u64>()) {
            let link_layer = if ib { LinkLayer::InfiniBand } else { LinkLayer::Ethernet };
            let endpoint = Endpoint { qp_number: qpn, packet_sequence: psn, gid: Ipv6Addr::from(gid), lid, mtu, link_layer, subnet_prefix };
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
            link_layer: LinkLayer::Ethernet,
            subnet_prefix: 0xfe80 << 48,
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
        let mut bytes = good.encode();
        for bad in [0u8, 3, 0xff] {
            bytes[38] = bad;
            let err = Endpoint::decode(&bytes).unwrap_err().to_string();
            assert!(err.contains(&format!("invalid link layer {bad}")), "{err}");
        }
        // A version-1 endpoint (no link layer, no prefix) is refused, not misread.
        let mut v1 = good.encode()[..38].to_vec();
        v1[..8].copy_from_slice(b"FERRYRC1");
        assert!(Endpoint::decode(&v1).is_err());
    }

    #[test]
    fn the_layout_is_fixed() {
        let endpoint = Endpoint {
            qp_number: 0x01_0203,
            packet_sequence: 0x04_0506,
            gid: "fe80::1".parse().unwrap(),
            lid: 0x0708,
            mtu: 4096,
            link_layer: LinkLayer::InfiniBand,
            subnet_prefix: 0xfe80_0000_0000_0000,
        };
        let bytes = endpoint.encode();
        assert_eq!(bytes.len(), 47);
        assert_eq!(&bytes[..8], b"FERRYRC2");
        assert_eq!(&bytes[32..34], &[7, 8], "LID");
        assert_eq!(bytes[38], 1, "link layer");
        assert_eq!(&bytes[39..47], &[0xfe, 0x80, 0, 0, 0, 0, 0, 0], "prefix");
    }
}
