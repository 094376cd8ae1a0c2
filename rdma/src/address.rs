//! How a queue pair addresses its peer: the address vector of RTR, chosen from what the local
//! port is and what the peer said in the handshake. Pure (no verbs), so every fabric is tested
//! without one: InfiniBand (LID routed within a subnet, GRH across subnets) and RoCE (always a
//! GRH: the GID is the peer's address, the LID means nothing on Ethernet).

use crate::device::GidKind;
use crate::handshake::Endpoint;
use std::net::{IpAddr, Ipv6Addr};

/// A port's link layer, as `ibv_query_port` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkLayer {
    InfiniBand,
    /// RoCE (and iWARP, which Ferry does not use).
    Ethernet,
}

impl LinkLayer {
    pub fn as_str(&self) -> &'static str {
        match self {
            LinkLayer::InfiniBand => "InfiniBand",
            LinkLayer::Ethernet => "Ethernet",
        }
    }

    /// The byte the handshake carries.
    pub fn code(&self) -> u8 {
        match self {
            LinkLayer::InfiniBand => 1,
            LinkLayer::Ethernet => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<LinkLayer> {
        match code {
            1 => Some(LinkLayer::InfiniBand),
            2 => Some(LinkLayer::Ethernet),
            _ => None,
        }
    }
}

impl std::fmt::Display for LinkLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the address choice needs to know about the local port and GID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPort {
    pub port: u8,
    pub link_layer: LinkLayer,
    pub lid: u16,
    /// The port's subnet prefix (the top 64 bits of GID 0).
    pub subnet_prefix: u64,
    pub gid_index: u32,
    pub gid: Ipv6Addr,
    pub gid_kind: GidKind,
}

/// The global route header of an address vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalRoute {
    pub dest_gid: Ipv6Addr,
    pub src_gid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
    pub flow_label: u32,
}

/// The address vector RTR is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressVector {
    pub port: u8,
    pub dest_lid: u16,
    pub service_level: u8,
    /// `None`: LID routed, no GRH (InfiniBand within one subnet).
    pub grh: Option<GlobalRoute>,
}

/// Hop limit of a GRH: the IP TTL on RoCE v2, the router budget across IB subnets.
pub const HOP_LIMIT: u8 = 64;

/// Why two ends cannot be connected, or a peer's handshake is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    #[error("link layers differ: this port is {local}, the peer's is {remote} (an InfiniBand port cannot reach a RoCE one)")]
    LinkLayerMismatch { local: LinkLayer, remote: LinkLayer },
    #[error("InfiniBand port without a LID ({side} LID is 0): is a subnet manager running?")]
    NoLid { side: &'static str },
    #[error("GID index {index} does not fit the 8-bit source GID index of a GRH")]
    GidIndexTooLarge { index: u32 },
    #[error("RoCE v2 GIDs of different IP families: this side {local}, the peer {remote}")]
    IpFamilyMismatch { local: Ipv6Addr, remote: Ipv6Addr },
    #[error("the peer's GID {gid} names {gid_address}, but its TCP connection comes from {peer}: refused (a peer must not aim RDMA traffic at another host)")]
    GidNotPeerAddress {
        gid: Ipv6Addr,
        gid_address: IpAddr,
        peer: IpAddr,
    },
}

/// The subnet prefix of a GID (its top 64 bits).
pub fn subnet_prefix(gid: &Ipv6Addr) -> u64 {
    u64::from_be_bytes(gid.octets()[..8].try_into().expect("8 bytes"))
}

/// Chooses the address vector towards `remote`:
/// - InfiniBand, same subnet prefix: LID routed, no GRH, `dest_lid` the peer's LID;
/// - InfiniBand, different subnets: a GRH to the peer's GID, `dest_lid` the LID it gave (the
///   router's, on a routed fabric);
/// - Ethernet (RoCE v1 and v2): always a GRH (the GID is the address), `dest_lid` 0.
///
/// Refuses a link-layer mismatch, an IB end without a LID, a GID index a GRH cannot carry,
/// and RoCE v2 GIDs of different IP families (IPv4-mapped against IPv6: no route joins them).
pub fn address_vector(local: &LocalPort, remote: &Endpoint) -> Result<AddressVector, AddressError> {
    if local.link_layer != remote.link_layer {
        return Err(AddressError::LinkLayerMismatch {
            local: local.link_layer,
            remote: remote.link_layer,
        });
    }
    let src_gid_index =
        u8::try_from(local.gid_index).map_err(|_| AddressError::GidIndexTooLarge {
            index: local.gid_index,
        })?;
    let grh = GlobalRoute {
        dest_gid: remote.gid,
        src_gid_index,
        hop_limit: HOP_LIMIT,
        traffic_class: 0,
        flow_label: 0,
    };
    match local.link_layer {
        LinkLayer::InfiniBand => {
            if local.lid == 0 {
                return Err(AddressError::NoLid {
                    side: "this port's",
                });
            }
            if remote.lid == 0 {
                return Err(AddressError::NoLid { side: "the peer's" });
            }
            let same_subnet = remote.subnet_prefix == local.subnet_prefix;
            Ok(AddressVector {
                port: local.port,
                dest_lid: remote.lid,
                service_level: 0,
                grh: (!same_subnet).then_some(grh),
            })
        }
        LinkLayer::Ethernet => {
            if local.gid_kind == GidKind::RoceV2
                && local.gid.to_ipv4_mapped().is_some() != remote.gid.to_ipv4_mapped().is_some()
            {
                return Err(AddressError::IpFamilyMismatch {
                    local: local.gid,
                    remote: remote.gid,
                });
            }
            Ok(AddressVector {
                port: local.port,
                dest_lid: 0,
                service_level: 0,
                grh: Some(grh),
            })
        }
    }
}

/// The peer check of connection set-up: on Ethernet, a GID carrying an IPv4 address (RoCE v2's
/// `::ffff:a.b.c.d`) must be the address the peer's TCP connection comes from (or goes to),
/// so a peer cannot point RDMA traffic (writes, acknowledgements) at a third host. Other GIDs
/// (IPv6, InfiniBand) are not IP-checked.
pub fn check_peer_gid(remote: &Endpoint, peer: IpAddr) -> Result<(), AddressError> {
    if remote.link_layer != LinkLayer::Ethernet {
        return Ok(());
    }
    let Some(v4) = remote.gid.to_ipv4_mapped() else {
        return Ok(());
    };
    let peer = match peer {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    if peer == IpAddr::V4(v4) {
        Ok(())
    } else {
        Err(AddressError::GidNotPeerAddress {
            gid: remote.gid,
            gid_address: IpAddr::V4(v4),
            peer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IB_PREFIX: u64 = 0xfe80_0000_0000_0000;

    fn ib_port(lid: u16, prefix: u64) -> LocalPort {
        let mut gid = [0u8; 16];
        gid[..8].copy_from_slice(&prefix.to_be_bytes());
        gid[8..].copy_from_slice(&0x0002_c903_0001_0203u64.to_be_bytes());
        LocalPort {
            port: 1,
            link_layer: LinkLayer::InfiniBand,
            lid,
            subnet_prefix: prefix,
            gid_index: 0,
            gid: Ipv6Addr::from(gid),
            gid_kind: GidKind::InfiniBand,
        }
    }

    fn roce_port(gid: &str, kind: GidKind, index: u32) -> LocalPort {
        LocalPort {
            port: 2,
            link_layer: LinkLayer::Ethernet,
            lid: 0,
            subnet_prefix: IB_PREFIX,
            gid_index: index,
            gid: gid.parse().unwrap(),
            gid_kind: kind,
        }
    }

    fn remote(link_layer: LinkLayer, gid: &str, lid: u16, prefix: u64) -> Endpoint {
        Endpoint {
            qp_number: 0x42,
            packet_sequence: 0x1234,
            gid: gid.parse().unwrap(),
            lid,
            mtu: 4096,
            link_layer,
            subnet_prefix: prefix,
        }
    }

    #[test]
    fn infiniband_in_one_subnet_is_lid_routed_without_a_grh() {
        let local = ib_port(0x11, IB_PREFIX);
        let peer = remote(LinkLayer::InfiniBand, "fe80::2:c903:1:999", 0x2a, IB_PREFIX);
        let av = address_vector(&local, &peer).unwrap();
        assert_eq!(
            av,
            AddressVector {
                port: 1,
                dest_lid: 0x2a,
                service_level: 0,
                grh: None,
            }
        );
    }

    #[test]
    fn infiniband_across_subnets_takes_a_grh_and_the_given_lid() {
        let local = ib_port(0x11, IB_PREFIX);
        let other = 0xfec0_0000_0000_0001;
        let peer = remote(LinkLayer::InfiniBand, "fec0::1:2:c903:1:999", 0x0777, other);
        let av = address_vector(&local, &peer).unwrap();
        assert_eq!(av.dest_lid, 0x0777, "the LID the peer (router) gave");
        let grh = av.grh.expect("a GRH across subnets");
        assert_eq!(grh.dest_gid, peer.gid);
        assert_eq!(grh.src_gid_index, 0);
        assert_eq!(grh.hop_limit, HOP_LIMIT);
    }

    #[test]
    fn infiniband_without_a_lid_is_refused() {
        let peer = remote(LinkLayer::InfiniBand, "fe80::2", 0, IB_PREFIX);
        assert_eq!(
            address_vector(&ib_port(5, IB_PREFIX), &peer),
            Err(AddressError::NoLid { side: "the peer's" })
        );
        let peer = remote(LinkLayer::InfiniBand, "fe80::2", 9, IB_PREFIX);
        let err = address_vector(&ib_port(0, IB_PREFIX), &peer).unwrap_err();
        assert_eq!(
            err,
            AddressError::NoLid {
                side: "this port's"
            }
        );
        assert!(err.to_string().contains("subnet manager"), "{err}");
    }

    #[test]
    fn roce_v1_always_has_a_grh() {
        let local = roce_port("fe80::268a:7ff:fe55:4410", GidKind::RoceV1, 0);
        let peer = remote(
            LinkLayer::Ethernet,
            "fe80::268a:7ff:fe55:4411",
            0,
            IB_PREFIX,
        );
        let av = address_vector(&local, &peer).unwrap();
        assert_eq!((av.port, av.dest_lid), (2, 0));
        let grh = av.grh.expect("RoCE is always global");
        assert_eq!(grh.dest_gid, peer.gid);
        assert_eq!(grh.src_gid_index, 0);
    }

    #[test]
    fn roce_v2_ipv4_mapped_gids_route_with_a_grh_from_the_chosen_gid() {
        let local = roce_port("::ffff:10.77.0.2", GidKind::RoceV2, 3);
        let peer = remote(LinkLayer::Ethernet, "::ffff:10.77.0.1", 0, 0);
        let av = address_vector(&local, &peer).unwrap();
        assert_eq!(av.dest_lid, 0);
        assert_eq!(
            av.grh,
            Some(GlobalRoute {
                dest_gid: "::ffff:10.77.0.1".parse().unwrap(),
                src_gid_index: 3,
                hop_limit: 64,
                traffic_class: 0,
                flow_label: 0,
            })
        );
        // Even a (meaningless) LID the peer sends is not used on Ethernet.
        let peer = remote(LinkLayer::Ethernet, "::ffff:10.77.0.1", 7, 0);
        assert_eq!(address_vector(&local, &peer).unwrap().dest_lid, 0);
    }

    #[test]
    fn roce_v2_ipv6_gids_route_with_a_grh() {
        let local = roce_port("fd00:77::2", GidKind::RoceV2, 5);
        let peer = remote(LinkLayer::Ethernet, "fd00:77::1", 0, 0);
        let grh = address_vector(&local, &peer).unwrap().grh.unwrap();
        assert_eq!(
            (grh.dest_gid, grh.src_gid_index, grh.hop_limit),
            ("fd00:77::1".parse().unwrap(), 5, 64)
        );
        // IPv4 against IPv6 on RoCE v2 has no route: refused before RTR.
        let v4 = remote(LinkLayer::Ethernet, "::ffff:10.0.0.1", 0, 0);
        assert!(matches!(
            address_vector(&local, &v4),
            Err(AddressError::IpFamilyMismatch { .. })
        ));
    }

    #[test]
    fn a_link_layer_mismatch_is_a_typed_error() {
        let local = ib_port(3, IB_PREFIX);
        let peer = remote(LinkLayer::Ethernet, "::ffff:10.0.0.1", 0, 0);
        let err = address_vector(&local, &peer).unwrap_err();
        assert_eq!(
            err,
            AddressError::LinkLayerMismatch {
                local: LinkLayer::InfiniBand,
                remote: LinkLayer::Ethernet,
            }
        );
        assert!(
            err.to_string()
                .contains("this port is InfiniBand, the peer's is Ethernet"),
            "{err}"
        );
        let local = roce_port("::ffff:10.0.0.2", GidKind::RoceV2, 1);
        let peer = remote(LinkLayer::InfiniBand, "fe80::1", 4, IB_PREFIX);
        assert!(matches!(
            address_vector(&local, &peer),
            Err(AddressError::LinkLayerMismatch {
                local: LinkLayer::Ethernet,
                remote: LinkLayer::InfiniBand
            })
        ));
    }

    #[test]
    fn a_gid_index_above_255_is_refused() {
        let local = roce_port("::ffff:10.0.0.2", GidKind::RoceV2, 256);
        let peer = remote(LinkLayer::Ethernet, "::ffff:10.0.0.1", 0, 0);
        assert!(matches!(
            address_vector(&local, &peer),
            Err(AddressError::GidIndexTooLarge { index: 256 })
        ));
    }

    #[test]
    fn an_ipv4_gid_must_be_the_tcp_peers_address() {
        let peer = remote(LinkLayer::Ethernet, "::ffff:10.77.0.2", 0, 0);
        check_peer_gid(&peer, "10.77.0.2".parse().unwrap()).unwrap();
        // A v4-mapped socket address (a dual-stack listener) is the same peer.
        check_peer_gid(&peer, "::ffff:10.77.0.2".parse().unwrap()).unwrap();
        let err = check_peer_gid(&peer, "10.77.0.9".parse().unwrap()).unwrap_err();
        assert_eq!(
            err,
            AddressError::GidNotPeerAddress {
                gid: peer.gid,
                gid_address: "10.77.0.2".parse().unwrap(),
                peer: "10.77.0.9".parse().unwrap(),
            }
        );
        assert!(
            err.to_string()
                .contains("names 10.77.0.2, but its TCP connection comes from 10.77.0.9"),
            "{err}"
        );
        // IPv6 RoCE GIDs and InfiniBand GIDs carry no IPv4 address to check.
        let v6 = remote(LinkLayer::Ethernet, "fd00::2", 0, 0);
        check_peer_gid(&v6, "10.77.0.9".parse().unwrap()).unwrap();
        let ib = remote(LinkLayer::InfiniBand, "::ffff:10.77.0.2", 3, 0);
        check_peer_gid(&ib, "10.77.0.9".parse().unwrap()).unwrap();
    }

    #[test]
    fn the_subnet_prefix_is_the_top_half_of_a_gid() {
        assert_eq!(
            subnet_prefix(&"fe80::2:c903:1:999".parse().unwrap()),
            IB_PREFIX
        );
        assert_eq!(subnet_prefix(&"::ffff:10.0.0.1".parse().unwrap()), 0);
    }
}
