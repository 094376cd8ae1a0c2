//! Choosing the device, port and GID to use: pure, so it is tested without a device.

use crate::address::{LinkLayer, LocalPort};
use crate::device::{DeviceInfo, GidInfo, GidKind};
use crate::error::RdmaError;

/// What the operator pinned, if anything.
#[derive(Debug, Clone, Default)]
pub struct SelectionRequest {
    pub device: Option<String>,
    pub port: Option<u8>,
    pub gid_index: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub device: String,
    pub port: u8,
    pub gid: GidInfo,
    pub active_mtu: u32,
    pub link_layer: LinkLayer,
    /// The port's LID when it was discovered (a queue pair queries it again when it is made).
    pub lid: u16,
    pub subnet_prefix: u64,
    /// Signalling rate, Gbit/s.
    pub speed_gbps: f64,
}

impl Selection {
    /// What the address choice needs, with `lid` as the port reports it now.
    pub fn local_port(&self, lid: u16) -> LocalPort {
        LocalPort {
            port: self.port,
            link_layer: self.link_layer,
            lid,
            subnet_prefix: self.subnet_prefix,
            gid_index: self.gid.index,
            gid: self.gid.gid,
            gid_kind: self.gid.kind,
        }
    }
}

/// The GID a port is used with: the one at `gid_index` when pinned; else on Ethernet the
/// first RoCE v2 GID carrying an IPv4 address (never link-local), on InfiniBand the first
/// non-link-local GID, else index 0.
pub fn port_gid(port: &crate::device::PortInfo, gid_index: Option<u32>) -> Option<&GidInfo> {
    match gid_index {
        Some(index) => port.gids.iter().find(|g| g.index == index),
        None if port.link_layer == LinkLayer::Ethernet => port
            .gids
            .iter()
            .find(|g| g.kind == GidKind::RoceV2 && g.ipv4().is_some()),
        None => port
            .gids
            .iter()
            .find(|g| !g.is_link_local())
            .or(port.gids.first()),
    }
}

/// By default: the first active port with a RoCE v2 GID carrying an IPv4 address (never a
/// link-local `fe80::` GID); on InfiniBand ports, the first non-link-local GID, else index 0.
/// Whatever the operator pinned narrows the search and must exist.
pub fn choose(devices: &[DeviceInfo], request: &SelectionRequest) -> Result<Selection, RdmaError> {
    let names = || {
        devices
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let candidates: Vec<&DeviceInfo> = match &request.device {
        Some(name) => {
            let device = devices
                .iter()
                .find(|d| &d.name == name)
                .ok_or_else(|| RdmaError::NoSuchDevice(name.clone(), names()))?;
            vec![device]
        }
        None => devices.iter().collect(),
    };
    let mut reasons = Vec::new();
    for device in candidates {
        for port in device
            .ports
            .iter()
            .filter(|p| request.port.is_none_or(|n| n == p.number))
        {
            if !port.active {
                reasons.push(format!(
                    "{} port {} is {}",
                    device.name, port.number, port.state
                ));
                continue;
            }
            match port_gid(port, request.gid_index) {
                Some(gid) => {
                    return Ok(Selection {
                        device: device.name.clone(),
                        port: port.number,
                        gid: gid.clone(),
                        active_mtu: port.active_mtu,
                        link_layer: port.link_layer,
                        lid: port.lid,
                        subnet_prefix: port.subnet_prefix,
                        speed_gbps: port.speed_gbps,
                    });
                }
                None => reasons.push(format!(
                    "{} port {} has no {}",
                    device.name,
                    port.number,
                    match request.gid_index {
                        Some(index) => format!("GID at index {index}"),
                        None => "RoCE v2 GID with an IPv4 address".into(),
                    }
                )),
            }
        }
    }
    if reasons.is_empty() {
        reasons.push(format!("no port matches (devices: {})", names()));
    }
    Err(RdmaError::NoUsableGid(reasons.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::PortInfo;

    fn gid(index: u32, text: &str, kind: GidKind) -> GidInfo {
        GidInfo {
            index,
            gid: text.parse().unwrap(),
            kind,
            netdev: Some("eth0".into()),
        }
    }

    fn roce(name: &str, active: bool) -> DeviceInfo {
        DeviceInfo {
            name: name.into(),
            node_guid: "0".into(),
            ports: vec![PortInfo {
                number: 1,
                active,
                state: if active {
                    "Active".into()
                } else {
                    "Down".into()
                },
                link_layer: LinkLayer::Ethernet,
                lid: 0,
                subnet_prefix: 0xfe80 << 48,
                active_mtu: 1024,
                speed_gbps: 2.5,
                gids: vec![
                    gid(0, "fe80::1", GidKind::RoceV1),
                    gid(1, "fe80::1", GidKind::RoceV2),
                    gid(2, "::ffff:10.0.0.1", GidKind::RoceV1),
                    gid(3, "::ffff:10.0.0.1", GidKind::RoceV2),
                ],
            }],
        }
    }

    #[test]
    fn default_is_a_roce_v2_ipv4_gid_on_an_active_port() {
        let devices = [roce("rxe0", false), roce("rxe1", true)];
        let chosen = choose(&devices, &SelectionRequest::default()).unwrap();
        assert_eq!(
            (chosen.device.as_str(), chosen.port, chosen.gid.index),
            ("rxe1", 1, 3)
        );
        assert_eq!(chosen.gid.ipv4(), Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn pinned_values_must_exist() {
        let devices = [roce("rxe0", true)];
        let pinned = SelectionRequest {
            device: Some("rxe0".into()),
            gid_index: Some(2),
            ..Default::default()
        };
        assert_eq!(choose(&devices, &pinned).unwrap().gid.index, 2);
        let missing = SelectionRequest {
            device: Some("mlx5_0".into()),
            ..Default::default()
        };
        assert!(matches!(
            choose(&devices, &missing),
            Err(RdmaError::NoSuchDevice(..))
        ));
        let bad_gid = SelectionRequest {
            gid_index: Some(9),
            ..Default::default()
        };
        let err = choose(&devices, &bad_gid).unwrap_err().to_string();
        assert!(err.contains("index 9"), "{err}");
    }

    #[test]
    fn only_link_local_gids_means_no_default() {
        let mut device = roce("rxe0", true);
        device.ports[0].gids.retain(|g| g.is_link_local());
        let err = choose(&[device], &SelectionRequest::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("RoCE v2 GID with an IPv4 address"), "{err}");
    }

    #[test]
    fn an_infiniband_port_carries_its_lid_and_subnet_into_the_selection() {
        let device = DeviceInfo {
            name: "mlx5_0".into(),
            node_guid: "0".into(),
            ports: vec![PortInfo {
                number: 1,
                active: true,
                state: "Active".into(),
                link_layer: LinkLayer::InfiniBand,
                lid: 0x2a,
                subnet_prefix: 0xfe80 << 48,
                active_mtu: 4096,
                speed_gbps: 400.0,
                gids: vec![GidInfo {
                    index: 0,
                    gid: "fe80::2:c903:1:203".parse().unwrap(),
                    kind: GidKind::InfiniBand,
                    netdev: None,
                }],
            }],
        };
        let chosen = choose(&[device], &SelectionRequest::default()).unwrap();
        assert_eq!(chosen.gid.index, 0, "only a link-local GID: index 0");
        assert_eq!(
            (chosen.link_layer, chosen.lid, chosen.subnet_prefix),
            (LinkLayer::InfiniBand, 0x2a, 0xfe80 << 48)
        );
        let port = chosen.local_port(0x2b);
        assert_eq!((port.lid, port.gid_index, port.port), (0x2b, 0, 1));
    }
}
