//! Which local rail talks to which of a peer's rails, from the rail lists both sides send in
//! the set-up exchange.
//!
//! Rule: only rails on one fabric can talk (same InfiniBand subnet, or same RoCE IP network;
//! a rail-optimised fabric gives each rail its own). Within one fabric, every local rail and
//! every remote rail gets at least one pair: with `l` local and `r` remote rails there are
//! `max(l, r)` pairs, rail `i` of the larger side paired with rail `i mod n` of the smaller,
//! so a 2-rail host talking to a 1-rail host uses both of its own rails into the one remote
//! rail (when they share a fabric) and 8 rails to 8 rails are 8 disjoint pairs. Rails on a
//! fabric the peer does not have are left out; no pair at all means the peer is TCP-only.

use super::{Fabric, Rail};
use crate::address::LinkLayer;
use std::collections::BTreeMap;
use std::net::Ipv6Addr;

/// What one side tells the other about a rail (see [`super::wire`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailAd {
    /// The rail's index in its host's list: what pairs and the data port's set-up name.
    pub index: u8,
    pub name: String,
    pub link_layer: LinkLayer,
    pub fabric: Fabric,
    pub lid: u16,
    pub gid: Ipv6Addr,
    /// Link rate, Mbit/s (for weighting before anything was measured).
    pub speed_mbps: u32,
}

impl RailAd {
    pub fn of(index: u8, rail: &Rail) -> RailAd {
        RailAd {
            index,
            name: rail.name(),
            link_layer: rail.link_layer,
            fabric: rail.fabric,
            lid: rail.lid,
            gid: rail.gid.gid,
            speed_mbps: (rail.speed_gbps * 1000.0).clamp(0.0, f64::from(u32::MAX)) as u32,
        }
    }
}

/// One local rail joined to one remote rail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RailPair {
    pub local: u8,
    pub remote: u8,
}

/// The rail pairs between two hosts (see the module rule), in a stable order.
pub fn match_rails(local: &[RailAd], remote: &[RailAd]) -> Vec<RailPair> {
    let mut by_fabric: BTreeMap<(u8, Fabric), (Vec<u8>, Vec<u8>)> = BTreeMap::new();
    let layer = |l: LinkLayer| match l {
        LinkLayer::InfiniBand => 0u8,
        LinkLayer::Ethernet => 1,
    };
    for ad in local {
        by_fabric
            .entry((layer(ad.link_layer), ad.fabric))
            .or_default()
            .0
            .push(ad.index);
    }
    for ad in remote {
        by_fabric
            .entry((layer(ad.link_layer), ad.fabric))
            .or_default()
            .1
            .push(ad.index);
    }
    let mut pairs = Vec::new();
    for (ours, theirs) in by_fabric.values() {
        if ours.is_empty() || theirs.is_empty() {
            continue;
        }
        for i in 0..ours.len().max(theirs.len()) {
            pairs.push(RailPair {
                local: ours[i % ours.len()],
                remote: theirs[i % theirs.len()],
            });
        }
    }
    pairs.sort();
    pairs.dedup();
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(index: u8, fabric: Fabric) -> RailAd {
        RailAd {
            index,
            name: format!("mlx5_{index}:1"),
            link_layer: match fabric {
                Fabric::InfiniBand { .. } => LinkLayer::InfiniBand,
                _ => LinkLayer::Ethernet,
            },
            fabric,
            lid: 0,
            gid: Ipv6Addr::UNSPECIFIED,
            speed_mbps: 400_000,
        }
    }

    fn subnet(n: u8) -> Fabric {
        Fabric::Ipv4 {
            network: u32::from(std::net::Ipv4Addr::new(10, 77, n, 0)),
            prefix_len: 24,
        }
    }

    fn pair(local: u8, remote: u8) -> RailPair {
        RailPair { local, remote }
    }

    #[test]
    fn rail_optimised_subnets_pair_rail_to_rail() {
        let local: Vec<_> = (0..8).map(|i| ad(i, subnet(i))).collect();
        // The peer lists its rails in another order: pairs follow the subnet, not the index.
        let remote: Vec<_> = (0..8).map(|i| ad(i, subnet(7 - i))).collect();
        let pairs = match_rails(&local, &remote);
        assert_eq!(pairs.len(), 8);
        for p in &pairs {
            assert_eq!(p.local, 7 - p.remote);
        }
    }

    #[test]
    fn two_rails_to_one_use_the_pair_that_exists() {
        let local = [ad(0, subnet(0)), ad(1, subnet(1))];
        let remote = [ad(0, subnet(0))];
        assert_eq!(match_rails(&local, &remote), [pair(0, 0)]);
        assert_eq!(match_rails(&remote, &local), [pair(0, 0)]);
    }

    #[test]
    fn one_shared_fabric_spreads_the_larger_side_over_the_smaller() {
        let ib = Fabric::InfiniBand {
            subnet_prefix: 0xfe80 << 48,
        };
        let local: Vec<_> = (0..4).map(|i| ad(i, ib)).collect();
        let remote: Vec<_> = (0..2).map(|i| ad(i, ib)).collect();
        assert_eq!(
            match_rails(&local, &remote),
            [pair(0, 0), pair(1, 1), pair(2, 0), pair(3, 1)]
        );
    }

    #[test]
    fn different_link_layers_or_fabrics_never_pair() {
        let local = [ad(0, subnet(0)), ad(1, Fabric::Unknown)];
        let remote = [
            ad(
                0,
                Fabric::InfiniBand {
                    subnet_prefix: 0xfe80 << 48,
                },
            ),
            ad(1, subnet(5)),
        ];
        assert!(match_rails(&local, &remote).is_empty());
        // Unknown matches Unknown: two hosts that could learn no netmask still pair up.
        let remote = [ad(3, Fabric::Unknown)];
        assert_eq!(match_rails(&local, &remote), [pair(1, 3)]);
    }
}
