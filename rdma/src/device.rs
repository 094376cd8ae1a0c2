//! Device discovery: every device, port and GID, as plain data.

use crate::address::{subnet_prefix, LinkLayer};
use crate::error::RdmaError;
use sideway::ibverbs::address::GidType;
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::{LinkLayer as VerbsLinkLayer, PortAttr, PortState};
use std::net::{IpAddr, Ipv6Addr};

/// What a GID is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidKind {
    InfiniBand,
    RoceV1,
    RoceV2,
}

impl GidKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            GidKind::InfiniBand => "IB",
            GidKind::RoceV1 => "RoCE v1",
            GidKind::RoceV2 => "RoCE v2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidInfo {
    pub index: u32,
    pub gid: Ipv6Addr,
    pub kind: GidKind,
    /// The network device the GID is bound to (RoCE).
    pub netdev: Option<String>,
}

impl GidInfo {
    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`), as RoCE v2 carries it.
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.gid.to_ipv4_mapped()
    }

    pub fn is_link_local(&self) -> bool {
        self.gid.segments()[0] & 0xffc0 == 0xfe80
    }

    pub fn address(&self) -> IpAddr {
        self.ipv4().map(IpAddr::V4).unwrap_or(IpAddr::V6(self.gid))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PortInfo {
    pub number: u8,
    pub active: bool,
    pub state: String,
    /// Ethernet (RoCE) or InfiniBand.
    pub link_layer: LinkLayer,
    /// The port's LID (InfiniBand; 0 on Ethernet).
    pub lid: u16,
    /// The top 64 bits of the port's GID 0 (its subnet on InfiniBand).
    pub subnet_prefix: u64,
    pub active_mtu: u32,
    /// Signalling rate, Gbit/s.
    pub speed_gbps: f64,
    pub gids: Vec<GidInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    pub node_guid: String,
    pub ports: Vec<PortInfo>,
}

/// The link layer of a port; "unspecified" is what old InfiniBand drivers report.
pub(crate) fn link_layer(port: &PortAttr) -> LinkLayer {
    match port.link_layer() {
        VerbsLinkLayer::Ethernet => LinkLayer::Ethernet,
        VerbsLinkLayer::InfiniBand | VerbsLinkLayer::Unspecified => LinkLayer::InfiniBand,
    }
}

fn port_info(number: u8, port: &PortAttr, subnet_prefix: u64, gids: Vec<GidInfo>) -> PortInfo {
    PortInfo {
        number,
        active: port.port_state() == PortState::Active,
        state: format!("{:?}", port.port_state()),
        link_layer: link_layer(port),
        lid: port.lid(),
        subnet_prefix,
        active_mtu: 128 << (port.active_mtu() as u32),
        speed_gbps: port.active_speed().to_signaling_rate() * f64::from(port.active_width() as u8),
        gids,
    }
}

/// Lists every RDMA device with its ports and GID tables. A host without libibverbs or
/// without devices yields [`RdmaError::Unavailable`].
pub fn discover() -> Result<Vec<DeviceInfo>, RdmaError> {
    let list = DeviceList::new().map_err(|e| RdmaError::Unavailable(e.to_string()))?;
    if list.is_empty() {
        return Err(RdmaError::Unavailable("libibverbs lists no device".into()));
    }
    let mut devices = Vec::new();
    for device in list.iter() {
        let name = device.name();
        let context = device
            .open()
            .map_err(|e| RdmaError::verbs("ibv_open_device", e))?;
        let attr = context
            .query_device()
            .map_err(|e| RdmaError::verbs("ibv_query_device", e))?;
        let table = context
            .query_gid_table()
            .map_err(|e| RdmaError::verbs("ibv_query_gid_table", e))?;
        let mut ports = Vec::new();
        for number in 1..=attr.phys_port_cnt() {
            let port = context
                .query_port(number)
                .map_err(|e| RdmaError::verbs("ibv_query_port", e))?;
            let gids: Vec<GidInfo> = table
                .iter()
                .filter(|entry| entry.port_num() == u32::from(number) && !entry.gid().is_zero())
                .map(|entry| GidInfo {
                    index: entry.gid_index(),
                    gid: Ipv6Addr::from(entry.gid().raw),
                    kind: match entry.gid_type() {
                        GidType::InfiniBand => GidKind::InfiniBand,
                        GidType::RoceV1 => GidKind::RoceV1,
                        GidType::RoceV2 => GidKind::RoceV2,
                    },
                    netdev: entry.netdev_name().ok(),
                })
                .collect();
            let prefix = gids
                .iter()
                .find(|g| g.index == 0)
                .map(|g| subnet_prefix(&g.gid))
                .unwrap_or(0);
            ports.push(port_info(number, &port, prefix, gids));
        }
        devices.push(DeviceInfo {
            name,
            node_guid: format!("{:016x}", attr.node_guid().as_u64()),
            ports,
        });
    }
    Ok(devices)
}
