//! Rails: every active (device, port, GID) a host can move pieces on, as plain data.
//!
//! A GPU host carries several RDMA NICs, each close to some GPUs and one NUMA node, and each on
//! its own rail subnet of a rail-optimised fabric. This module decides which ports are rails
//! ([`enumerate`]), which local rail talks to which of a peer's ([`matching`]), how pieces are
//! spread over rail pairs ([`balance`]) and how the buffer pool is split by NUMA node
//! ([`topology`]). All of it is pure (sysfs and `getifaddrs` are read by [`host_facts`] only),
//! so every rule is tested without a device.

pub mod balance;
pub mod health;
pub mod lanes;
pub mod matching;
pub mod topology;
pub mod wire;

use crate::address::LinkLayer;
use crate::device::{DeviceInfo, GidInfo};
use std::net::{IpAddr, Ipv6Addr};

/// `mlx5_0` (every port of the device) or `mlx5_0:1` (one port), as `rdma.devices`,
/// `rdma.exclude` and `--rdma-device` spell them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailSpec {
    pub device: String,
    pub port: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RailError {
    #[error("rail {0:?}: expected DEVICE or DEVICE:PORT (for example mlx5_0 or mlx5_1:1)")]
    BadSpec(String),
    #[error("rail {spec:?} names no RDMA device on this host (have: {have})")]
    NoSuchDevice { spec: String, have: String },
    #[error("rail {spec:?}: the device has no port {port}")]
    NoSuchPort { spec: String, port: u8 },
    #[error("no usable rail: {0}")]
    NoUsableRail(String),
    #[error("rail list from peer: {0}")]
    Wire(#[from] wire::RailWireError),
}

impl RailSpec {
    pub fn parse(text: &str) -> Result<RailSpec, RailError> {
        let bad = || RailError::BadSpec(text.to_string());
        let (device, port) = match text.split_once(':') {
            Some((device, port)) => (device, Some(port.parse::<u8>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.';
        if device.is_empty() || device.len() > 64 || !device.chars().all(valid) || port == Some(0) {
            return Err(bad());
        }
        Ok(RailSpec {
            device: device.to_string(),
            port,
        })
    }

    fn matches(&self, device: &str, port: u8) -> bool {
        self.device == device && self.port.is_none_or(|p| p == port)
    }
}

impl std::fmt::Display for RailSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.device),
            None => f.write_str(&self.device),
        }
    }
}

/// Which network a rail is on: two rails can talk only within one fabric. InfiniBand rails
/// share a subnet prefix; RoCE rails share their netdev's IP network (rail-optimised RoCE
/// fabrics give each rail its own subnet). `Unknown` (no netmask found) matches only itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fabric {
    InfiniBand { subnet_prefix: u64 },
    Ipv4 { network: u32, prefix_len: u8 },
    Ipv6 { network: u128, prefix_len: u8 },
    Unknown,
}

impl Fabric {
    /// The fabric of a GID: IB by subnet prefix; RoCE by the IP network, given the prefix
    /// length of the address on its netdev.
    pub fn of(link_layer: LinkLayer, gid: &GidInfo, prefix_len: Option<u8>) -> Fabric {
        if link_layer == LinkLayer::InfiniBand {
            return Fabric::InfiniBand {
                subnet_prefix: crate::address::subnet_prefix(&gid.gid),
            };
        }
        match (gid.address(), prefix_len) {
            (IpAddr::V4(v4), Some(len @ 0..=32)) => Fabric::Ipv4 {
                network: u32::from(v4) & mask32(len),
                prefix_len: len,
            },
            (IpAddr::V6(v6), Some(len @ 0..=128)) => Fabric::Ipv6 {
                network: u128::from(v6) & mask128(len),
                prefix_len: len,
            },
            _ => Fabric::Unknown,
        }
    }
}

impl std::fmt::Display for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Fabric::InfiniBand { subnet_prefix } => write!(f, "ib:{subnet_prefix:016x}"),
            Fabric::Ipv4 {
                network,
                prefix_len,
            } => write!(f, "{}/{prefix_len}", std::net::Ipv4Addr::from(network)),
            Fabric::Ipv6 {
                network,
                prefix_len,
            } => write!(f, "{}/{prefix_len}", Ipv6Addr::from(network)),
            Fabric::Unknown => f.write_str("unknown"),
        }
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// Where a device sits on the host, from sysfs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// None: the kernel reports no NUMA node (-1) or the host has one.
    pub numa_node: Option<u32>,
    /// The PCI address (`0000:17:00.0`), for the GPU-affinity rule a later change adds.
    pub pci_address: Option<String>,
}

/// One rail: an active port with the GID Ferry uses on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rail {
    pub device: String,
    pub port: u8,
    pub link_layer: LinkLayer,
    pub lid: u16,
    pub gid: GidInfo,
    pub fabric: Fabric,
    pub speed_gbps: f64,
    pub active_mtu: u32,
    pub placement: Placement,
}

impl Rail {
    pub fn name(&self) -> String {
        format!("{}:{}", self.device, self.port)
    }
}

/// A port that is not a rail, and why: shown by `ferry devices` beside the rails in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPort {
    pub device: String,
    pub port: u8,
    pub reason: String,
}

/// What the operator asked for: `include` empty means every active port.
#[derive(Debug, Clone, Default)]
pub struct RailRequest {
    pub include: Vec<RailSpec>,
    pub exclude: Vec<RailSpec>,
    /// Only this port number on every device (`rdma.port`).
    pub port: Option<u8>,
    /// A GID index to use on every rail (default: each port's RoCE v2 IPv4 GID, or on IB the
    /// first non-link-local GID, else index 0).
    pub gid_index: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RailPlan {
    pub rails: Vec<Rail>,
    pub skipped: Vec<SkippedPort>,
}

/// What [`enumerate`] needs to know about the host besides the verbs view.
pub trait HostFacts {
    fn placement(&self, device: &str) -> Placement;
    /// The prefix length of `addr` on the interface that holds it.
    fn prefix_len(&self, addr: IpAddr) -> Option<u8>;
}

/// The rails of a host: every active port (or those `include` names) minus `exclude`, each
/// with its GID. A named device or port that does not exist is an error (a typo must not
/// silently drop a NIC); a named port that is down is skipped with its reason.
pub fn enumerate(
    devices: &[DeviceInfo],
    request: &RailRequest,
    facts: &dyn HostFacts,
) -> Result<RailPlan, RailError> {
    let have = || {
        devices
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for spec in request.include.iter().chain(&request.exclude) {
        let Some(device) = devices.iter().find(|d| d.name == spec.device) else {
            return Err(RailError::NoSuchDevice {
                spec: spec.to_string(),
                have: have(),
            });
        };
        if let Some(port) = spec.port {
            if !device.ports.iter().any(|p| p.number == port) {
                return Err(RailError::NoSuchPort {
                    spec: spec.to_string(),
                    port,
                });
            }
        }
    }
    let mut plan = RailPlan::default();
    for device in devices {
        let placement = facts.placement(&device.name);
        for port in &device.ports {
            let skip = |reason: String| SkippedPort {
                device: device.name.clone(),
                port: port.number,
                reason,
            };
            if !request.include.is_empty()
                && !request
                    .include
                    .iter()
                    .any(|s| s.matches(&device.name, port.number))
            {
                plan.skipped.push(skip("not in rdma.devices".into()));
                continue;
            }
            if request.port.is_some_and(|p| p != port.number) {
                plan.skipped.push(skip(format!(
                    "not rdma.port {}",
                    request.port.unwrap_or_default()
                )));
                continue;
            }
            if let Some(spec) = request
                .exclude
                .iter()
                .find(|s| s.matches(&device.name, port.number))
            {
                plan.skipped
                    .push(skip(format!("excluded by rdma.exclude {spec}")));
                continue;
            }
            if !port.active {
                plan.skipped.push(skip(format!("port is {}", port.state)));
                continue;
            }
            let Some(gid) = crate::select::port_gid(port, request.gid_index) else {
                plan.skipped.push(skip(match request.gid_index {
                    Some(index) => format!("no GID at index {index}"),
                    None => "no RoCE v2 GID with an IPv4 address".into(),
                }));
                continue;
            };
            plan.rails.push(Rail {
                device: device.name.clone(),
                port: port.number,
                link_layer: port.link_layer,
                lid: port.lid,
                fabric: Fabric::of(port.link_layer, gid, facts.prefix_len(gid.address())),
                gid: gid.clone(),
                speed_gbps: port.speed_gbps,
                active_mtu: port.active_mtu,
                placement: placement.clone(),
            });
        }
    }
    if plan.rails.is_empty() {
        let reasons: Vec<String> = plan
            .skipped
            .iter()
            .map(|s| format!("{}:{} {}", s.device, s.port, s.reason))
            .collect();
        return Err(RailError::NoUsableRail(if reasons.is_empty() {
            format!("no port on any device (devices: {})", have())
        } else {
            reasons.join("; ")
        }));
    }
    Ok(plan)
}

/// The real host: sysfs for placement, `getifaddrs` for prefix lengths.
pub struct SystemFacts;

/// The host's facts as [`enumerate`] needs them.
pub fn host_facts() -> SystemFacts {
    SystemFacts
}

impl HostFacts for SystemFacts {
    fn placement(&self, device: &str) -> Placement {
        let base = std::path::Path::new("/sys/class/infiniband")
            .join(device)
            .join("device");
        let numa_node = std::fs::read_to_string(base.join("numa_node"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .and_then(|n| u32::try_from(n).ok());
        // `device` links to the PCI function (…/0000:17:00.0); rxe has no PCI device.
        let pci_address = std::fs::canonicalize(&base)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| is_pci_address(n));
        Placement {
            numa_node,
            pci_address,
        }
    }

    fn prefix_len(&self, addr: IpAddr) -> Option<u8> {
        interface_prefix_len(addr)
    }
}

fn is_pci_address(name: &str) -> bool {
    // dddd:bb:dd.f
    let b = name.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && name
            .chars()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// The prefix length of the interface address equal to `addr`, from `getifaddrs(3)`.
fn interface_prefix_len(addr: IpAddr) -> Option<u8> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `list` on success; we free it below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cursor = list;
    while !cursor.is_null() && found.is_none() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: both pointers are non-null sockaddrs of the family the address says; the
        // netmask has the address's family; each is read as that family's sockaddr.
        unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(entry.ifa_addr as *const libc::sockaddr_in);
                    let m = &*(entry.ifa_netmask as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                    if IpAddr::V4(ip) == addr {
                        found = Some(u32::from_be(m.sin_addr.s_addr).count_ones() as u8);
                    }
                }
                libc::AF_INET6 => {
                    let a = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                    let m = &*(entry.ifa_netmask as *const libc::sockaddr_in6);
                    if IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)) == addr {
                        found = Some(u128::from_be_bytes(m.sin6_addr.s6_addr).count_ones() as u8);
                    }
                }
                _ => {}
            }
        }
    }
    // SAFETY: `list` came from a successful getifaddrs and is freed once; no reference into
    // it outlives this call (found is a plain u8).
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::{GidKind, PortInfo};
    use std::collections::HashMap;

    #[derive(Default)]
    pub struct FakeFacts {
        pub nodes: HashMap<String, u32>,
        pub prefix: Option<u8>,
    }

    impl HostFacts for FakeFacts {
        fn placement(&self, device: &str) -> Placement {
            Placement {
                numa_node: self.nodes.get(device).copied(),
                pci_address: None,
            }
        }
        fn prefix_len(&self, _: IpAddr) -> Option<u8> {
            self.prefix
        }
    }

    pub fn roce_device(name: &str, ip: &str, active: bool) -> DeviceInfo {
        let gid = |index, text: &str, kind| GidInfo {
            index,
            gid: text.parse().unwrap(),
            kind,
            netdev: Some(format!("eth-{name}")),
        };
        DeviceInfo {
            name: name.into(),
            node_guid: "0".into(),
            ports: vec![PortInfo {
                number: 1,
                active,
                state: if active { "Active" } else { "Down" }.into(),
                link_layer: LinkLayer::Ethernet,
                lid: 0,
                subnet_prefix: 0xfe80 << 48,
                active_mtu: 4096,
                speed_gbps: 400.0,
                gids: vec![
                    gid(0, "fe80::1", GidKind::RoceV1),
                    gid(1, "fe80::1", GidKind::RoceV2),
                    gid(3, &format!("::ffff:{ip}"), GidKind::RoceV2),
                ],
            }],
        }
    }

    #[test]
    fn specs_parse_device_and_optional_port() {
        assert_eq!(
            RailSpec::parse("mlx5_1:1").unwrap(),
            RailSpec {
                device: "mlx5_1".into(),
                port: Some(1)
            }
        );
        assert_eq!(RailSpec::parse("rxe0").unwrap().port, None);
        for bad in [
            "",
            ":1",
            "mlx5_0:",
            "mlx5_0:0",
            "mlx5_0:x",
            "a b",
            "mlx5_0:1:2",
        ] {
            assert!(
                matches!(RailSpec::parse(bad), Err(RailError::BadSpec(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_active_port_is_a_rail_by_default_and_exclusions_say_why() {
        let devices = [
            roce_device("mlx5_0", "10.0.0.1", true),
            roce_device("mlx5_1", "10.0.1.1", true),
            roce_device("mlx5_2", "10.0.2.1", false),
            roce_device("mlx5_bond", "192.168.1.5", true),
        ];
        let facts = FakeFacts {
            prefix: Some(24),
            ..Default::default()
        };
        let request = RailRequest {
            exclude: vec![RailSpec::parse("mlx5_bond").unwrap()],
            ..Default::default()
        };
        let plan = enumerate(&devices, &request, &facts).unwrap();
        let names: Vec<String> = plan.rails.iter().map(Rail::name).collect();
        assert_eq!(names, ["mlx5_0:1", "mlx5_1:1"]);
        assert_eq!(plan.rails[0].gid.index, 3);
        assert_eq!(
            plan.rails[1].fabric,
            Fabric::Ipv4 {
                network: u32::from(std::net::Ipv4Addr::new(10, 0, 1, 0)),
                prefix_len: 24
            }
        );
        let reasons: Vec<&str> = plan.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(
            reasons,
            ["port is Down", "excluded by rdma.exclude mlx5_bond"]
        );
    }

    #[test]
    fn an_include_list_narrows_and_a_typo_is_an_error() {
        let devices = [
            roce_device("rxe0", "10.77.0.1", true),
            roce_device("rxe2", "10.77.1.1", true),
        ];
        let facts = FakeFacts::default();
        let request = RailRequest {
            include: vec![RailSpec::parse("rxe2:1").unwrap()],
            ..Default::default()
        };
        let plan = enumerate(&devices, &request, &facts).unwrap();
        assert_eq!(plan.rails.len(), 1);
        assert_eq!(plan.rails[0].device, "rxe2");
        assert_eq!(plan.rails[0].fabric, Fabric::Unknown, "no netmask known");
        let typo = RailRequest {
            include: vec![RailSpec::parse("rxe9").unwrap()],
            ..Default::default()
        };
        assert!(matches!(
            enumerate(&devices, &typo, &facts),
            Err(RailError::NoSuchDevice { .. })
        ));
        let no_port = RailRequest {
            exclude: vec![RailSpec::parse("rxe0:2").unwrap()],
            ..Default::default()
        };
        assert!(matches!(
            enumerate(&devices, &no_port, &facts),
            Err(RailError::NoSuchPort { port: 2, .. })
        ));
        let none = RailRequest {
            exclude: vec![
                RailSpec::parse("rxe0").unwrap(),
                RailSpec::parse("rxe2").unwrap(),
            ],
            ..Default::default()
        };
        let err = enumerate(&devices, &none, &facts).unwrap_err().to_string();
        assert!(err.contains("rxe0:1 excluded"), "{err}");
    }

    #[test]
    fn infiniband_fabric_is_the_subnet_prefix() {
        let gid = GidInfo {
            index: 0,
            gid: "fe80::2:c903:1:203".parse().unwrap(),
            kind: GidKind::InfiniBand,
            netdev: None,
        };
        assert_eq!(
            Fabric::of(LinkLayer::InfiniBand, &gid, None),
            Fabric::InfiniBand {
                subnet_prefix: 0xfe80 << 48
            }
        );
        let v6 = GidInfo {
            gid: "2001:db8:0:7::5".parse().unwrap(),
            kind: GidKind::RoceV2,
            ..gid
        };
        assert_eq!(
            Fabric::of(LinkLayer::Ethernet, &v6, Some(64)).to_string(),
            "2001:db8:0:7::/64"
        );
    }

    #[test]
    fn pci_addresses_are_recognised() {
        assert!(is_pci_address("0000:17:00.0"));
        assert!(!is_pci_address("rxe0"));
        assert!(!is_pci_address("virtio0"));
    }

    #[test]
    fn the_loopback_address_has_a_prefix_length() {
        assert_eq!(interface_prefix_len("127.0.0.1".parse().unwrap()), Some(8));
        assert_eq!(interface_prefix_len("203.0.113.77".parse().unwrap()), None);
    }
}
