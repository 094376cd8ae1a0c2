//! How the registered buffer pool is split by NUMA node, so a piece's buffer sits on the node
//! of the NIC that carries it.
//!
//! Rule: when every rail reports a NUMA node and the rails sit on two or more nodes, the pool
//! has one part per node that has rails, each allocated on its node and registered only on
//! that node's rails; the slots are shared out in proportion to the link rate of each node's
//! rails (largest remainder, at least one slot per part). Otherwise (one node, or a rail the
//! kernel gives no node, as on single-socket hosts, VMs and rxe) the pool is one part on every
//! rail. A piece's buffer comes from the part of the rail picked for it
//! ([`part_of_rail`]).
//!
//! The seam for GPU affinity: [`Affinity`] says which rails a consumer wants; today a NUMA
//! node or any rail. A rule that picks the rails nearest a GPU by PCIe distance (from
//! [`super::Placement::pci_address`]) adds a variant here and needs nothing else to change.

use super::Rail;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolPart {
    /// The node to allocate the part on; None: no NUMA placement.
    pub numa_node: Option<u32>,
    pub slots: usize,
    /// Indices (into the host's rails) to register the part on.
    pub rails: Vec<usize>,
}

/// The pool's parts for `slots` slots over `rails` (see the module rule).
pub fn split_pool(slots: usize, rails: &[Rail]) -> Vec<PoolPart> {
    let nodes: Option<Vec<u32>> = rails.iter().map(|r| r.placement.numa_node).collect();
    let mut distinct = nodes.clone().unwrap_or_default();
    distinct.sort_unstable();
    distinct.dedup();
    if rails.is_empty() || nodes.is_none() || distinct.len() < 2 || slots < distinct.len() {
        return vec![PoolPart {
            numa_node: (distinct.len() == 1).then(|| distinct[0]),
            slots,
            rails: (0..rails.len()).collect(),
        }];
    }
    let nodes = nodes.expect("checked");
    let weight = |node: u32| -> f64 {
        rails
            .iter()
            .zip(&nodes)
            .filter(|(_, &n)| n == node)
            .map(|(r, _)| r.speed_gbps.max(1.0))
            .sum()
    };
    let total: f64 = distinct.iter().map(|&n| weight(n)).sum();
    // One slot each first, then the rest by weight, largest remainder last.
    let spare = slots - distinct.len();
    let exact: Vec<f64> = distinct
        .iter()
        .map(|&n| spare as f64 * weight(n) / total)
        .collect();
    let mut shares: Vec<usize> = exact.iter().map(|e| 1 + e.floor() as usize).collect();
    let mut left = slots - shares.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..distinct.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    distinct
        .iter()
        .zip(shares)
        .map(|(&node, slots)| PoolPart {
            numa_node: Some(node),
            slots,
            rails: nodes
                .iter()
                .enumerate()
                .filter(|(_, &n)| n == node)
                .map(|(i, _)| i)
                .collect(),
        })
        .collect()
}

/// The part whose memory the rail `rail` reads and writes.
pub fn part_of_rail(parts: &[PoolPart], rail: usize) -> Option<usize> {
    parts.iter().position(|p| p.rails.contains(&rail))
}

/// Which rails a consumer of pieces would rather use.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Affinity {
    Any,
    /// The rails on this NUMA node (say, where the consuming process runs); all rails if the
    /// node has none.
    NumaNode(u32),
}

/// The rails `affinity` prefers, in rail order.
pub fn preferred_rails(rails: &[Rail], affinity: &Affinity) -> Vec<usize> {
    let all = || (0..rails.len()).collect::<Vec<_>>();
    match affinity {
        Affinity::Any => all(),
        Affinity::NumaNode(node) => {
            let near: Vec<usize> = rails
                .iter()
                .enumerate()
                .filter(|(_, r)| r.placement.numa_node == Some(*node))
                .map(|(i, _)| i)
                .collect();
            if near.is_empty() {
                all()
            } else {
                near
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rails::tests::{roce_device, FakeFacts};
    use crate::rails::{enumerate, RailRequest};

    fn rails(nodes: &[Option<u32>]) -> Vec<Rail> {
        let devices: Vec<_> = (0..nodes.len())
            .map(|i| roce_device(&format!("mlx5_{i}"), &format!("10.0.{i}.1"), true))
            .collect();
        let facts = FakeFacts {
            nodes: nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.map(|n| (format!("mlx5_{i}"), n)))
                .collect(),
            prefix: Some(24),
        };
        enumerate(&devices, &RailRequest::default(), &facts)
            .unwrap()
            .rails
    }

    #[test]
    fn two_sockets_with_four_rails_each_split_the_pool_in_half() {
        let r = rails(&[
            Some(0),
            Some(0),
            Some(0),
            Some(0),
            Some(1),
            Some(1),
            Some(1),
            Some(1),
        ]);
        let parts = split_pool(64, &r);
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].numa_node, parts[0].slots), (Some(0), 32));
        assert_eq!((parts[1].numa_node, parts[1].slots), (Some(1), 32));
        assert_eq!(parts[1].rails, [4, 5, 6, 7]);
        assert_eq!(part_of_rail(&parts, 5), Some(1));
        assert_eq!(part_of_rail(&parts, 9), None);
    }

    #[test]
    fn slots_follow_the_link_rate_of_each_nodes_rails_and_add_up() {
        let mut r = rails(&[Some(0), Some(1), Some(1)]);
        r[0].speed_gbps = 400.0;
        r[1].speed_gbps = 100.0;
        r[2].speed_gbps = 100.0;
        let parts = split_pool(61, &r);
        assert_eq!(parts.iter().map(|p| p.slots).sum::<usize>(), 61);
        assert_eq!(parts[0].slots, 40);
        assert_eq!(parts[1].slots, 21);
        // Fewer slots than nodes: one part.
        assert_eq!(split_pool(1, &r).len(), 1);
    }

    #[test]
    fn no_numa_information_or_one_node_degrades_to_one_part() {
        let r = rails(&[None, None]);
        assert_eq!(
            split_pool(16, &r),
            [PoolPart {
                numa_node: None,
                slots: 16,
                rails: vec![0, 1]
            }]
        );
        let one = split_pool(16, &rails(&[Some(1), Some(1)]));
        assert_eq!((one.len(), one[0].numa_node), (1, Some(1)));
        let mixed = split_pool(16, &rails(&[Some(0), None]));
        assert_eq!(mixed.len(), 1, "a rail without a node: no split");
    }

    #[test]
    fn affinity_prefers_the_nodes_rails_and_falls_back_to_all() {
        let r = rails(&[Some(0), Some(1), Some(1)]);
        assert_eq!(preferred_rails(&r, &Affinity::NumaNode(1)), [1, 2]);
        assert_eq!(preferred_rails(&r, &Affinity::NumaNode(3)), [0, 1, 2]);
        assert_eq!(preferred_rails(&r, &Affinity::Any), [0, 1, 2]);
    }
}
