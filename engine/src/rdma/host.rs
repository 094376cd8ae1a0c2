//! The host's RDMA side: which devices exist and, when RDMA is enabled and usable, the chosen
//! device opened with the buffer pool registered on it (once, at start-up).

use crate::config::RdmaConfig;
use crate::io::{BufferPool, PartChoice, PartLayout};
use crate::proto;
use ferry_rdma::rails::matching::RailAd;
use ferry_rdma::rails::{Rail, RailPlan, SkippedPort};
use ferry_rdma::{
    DeviceInfo, LinkLayer, RdmaContext, RdmaError, RegisteredRegion, Selection, SelectionRequest,
};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Opens one rail's device (the GID the plan chose) and registers the pool on it: the whole
/// pool, or when it is split by NUMA node only the part on the rail's node.
fn open_rail(
    index: u8,
    rail: &Rail,
    devices: &[DeviceInfo],
    config: &RdmaConfig,
    pool: &Arc<BufferPool>,
) -> Result<LocalRail, RdmaError> {
    let request = SelectionRequest {
        device: Some(rail.device.clone()),
        port: Some(rail.port),
        gid_index: Some(rail.gid.index),
    };
    let selection = ferry_rdma::choose(devices, &request)?;
    let context = RdmaContext::open_with(selection.clone(), config.poll_mode())?;
    let part = part_for(pool, rail);
    let region = match part {
        Some(part) => pool.register_rdma_part(&context, part)?,
        None => pool.register_rdma(&context)?,
    };
    Ok(LocalRail {
        index,
        rail: rail.clone(),
        selection,
        context,
        region: Arc::new(region),
        part,
    })
}

/// The pool part a rail reads and writes: the one on its NUMA node when the pool is split
/// (None: the pool is one part, or none is on the rail's node, so the rail gets all of it).
fn part_for(pool: &BufferPool, rail: &Rail) -> Option<usize> {
    let parts = pool.parts();
    if parts.len() < 2 {
        return None;
    }
    let node = rail.placement.numa_node?;
    parts.iter().position(|p| p.numa_node == Some(node))
}

/// The pool's layout for `slots` slots over the rails of `plan`
/// (`ferry_rdma::rails::topology::split_pool`: one part per NUMA node that has rails, or one
/// part).
pub fn pool_layout(plan: Option<&RailPlan>, slots: usize) -> Vec<PartLayout> {
    let rails = plan.map_or(&[][..], |p| &p.rails[..]);
    ferry_rdma::rails::topology::split_pool(slots, rails)
        .into_iter()
        .map(|part| PartLayout {
            // One part on one node (every rail there): placed there too.
            numa_node: part.numa_node,
            slots: part.slots,
        })
        .collect()
}

pub enum RdmaStatus {
    /// Turned off by configuration (`--no-rdma`).
    Disabled,
    /// No library, no device, no usable GID, or opening it failed: the reason.
    Unavailable(String),
    /// At least one rail is open with the pool registered on it.
    Ready {
        /// The rails that opened, in the plan's order; a rail's place here is its index in
        /// the rail list this host sends peers.
        rails: Vec<Arc<LocalRail>>,
        _pool: Arc<BufferPool>,
    },
}

/// One rail this host moves pieces on: its device opened (with a completion thread) and the
/// buffer pool registered on it, once, at start-up.
pub struct LocalRail {
    /// What peers name it by ([`RailAd::index`], `ConnectRail`).
    pub index: u8,
    pub rail: Rail,
    pub selection: Selection,
    pub context: Arc<RdmaContext>,
    pub region: Arc<RegisteredRegion>,
    /// The pool part registered on this rail (None: the whole pool).
    pub part: Option<usize>,
}

impl LocalRail {
    /// The pool parts this rail can carry a buffer from.
    pub fn buffers(&self) -> PartChoice {
        self.part.map_or(PartChoice::Any, PartChoice::Only)
    }

    /// Whether this rail can carry a buffer of pool part `part`.
    pub fn reaches(&self, part: usize) -> bool {
        self.part.is_none_or(|p| p == part)
    }

    pub fn name(&self) -> String {
        self.rail.name()
    }

    /// What the set-up exchange tells a peer about this rail.
    pub fn ad(&self) -> RailAd {
        RailAd::of(self.index, &self.rail)
    }

    /// The IPv4 address of a RoCE rail's GID: where its queue pairs' set-up connections leave
    /// from and arrive at (None on InfiniBand, or for an IPv6 GID).
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        (self.selection.link_layer == LinkLayer::Ethernet)
            .then(|| self.selection.gid.ipv4())
            .flatten()
    }
}

/// What [`RdmaHost::discover`] found.
pub struct Discovered {
    pub devices: Vec<DeviceInfo>,
    pub rails: Result<RailPlan, String>,
    /// Why RDMA cannot be used at all (no library, no device).
    unavailable: Option<String>,
}

impl Discovered {
    /// The rails that would carry pieces, when RDMA is enabled and there are any.
    pub fn plan(&self, config: &RdmaConfig) -> Option<&RailPlan> {
        (config.enabled && self.unavailable.is_none())
            .then_some(())
            .and(self.rails.as_ref().ok())
    }
}

pub struct RdmaHost {
    pub devices: Vec<DeviceInfo>,
    /// The host's rails as configured (`rdma.devices`, `rdma.exclude`), or why there are none.
    pub rails: Result<RailPlan, String>,
    pub status: RdmaStatus,
}

impl RdmaHost {
    /// Discovers devices and, if enabled, opens every rail and registers `pool` on each.
    /// Never fails: a rail that cannot be opened is left out (logged); with none left RDMA is
    /// unavailable and TCP carries everything.
    pub fn start(config: &RdmaConfig, pool: &Arc<BufferPool>) -> RdmaHost {
        RdmaHost::open(RdmaHost::discover(config), config, pool)
    }

    /// The host's devices and rails, nothing opened yet (the daemon lays out its pool by the
    /// rails' NUMA nodes before opening them).
    pub fn discover(config: &RdmaConfig) -> Discovered {
        let devices = match ferry_rdma::discover() {
            Ok(devices) => devices,
            Err(err) => {
                return Discovered {
                    devices: Vec::new(),
                    rails: Err(err.to_string()),
                    unavailable: Some(err.to_string()),
                }
            }
        };
        let rails = ferry_rdma::rails::enumerate(
            &devices,
            &config.rail_request(),
            &ferry_rdma::rails::host_facts(),
        )
        .map(|mut plan| {
            // The operator's word over the kernel's (which says -1 on some firmware and VMs).
            for rail in &mut plan.rails {
                if let Some(&node) = config.numa_nodes.get(&rail.device) {
                    rail.placement.numa_node = Some(node);
                }
            }
            plan
        })
        .map_err(|e| e.to_string());
        Discovered {
            devices,
            rails,
            unavailable: None,
        }
    }

    /// Opens every rail `found` planned (if RDMA is enabled) and registers `pool` on each.
    pub fn open(found: Discovered, config: &RdmaConfig, pool: &Arc<BufferPool>) -> RdmaHost {
        let Discovered {
            devices,
            rails,
            unavailable,
        } = found;
        if let Some(reason) = unavailable {
            tracing::info!(%reason, "RDMA unavailable; pieces move over TCP");
            return RdmaHost {
                devices,
                rails,
                status: RdmaStatus::Unavailable(reason),
            };
        }
        if !config.enabled {
            tracing::info!(devices = devices.len(), "RDMA disabled by configuration");
            return RdmaHost {
                devices,
                rails,
                status: RdmaStatus::Disabled,
            };
        }
        let plan = match &rails {
            Ok(plan) => plan,
            Err(reason) => {
                tracing::warn!(%reason, "no usable RDMA rail; pieces move over TCP");
                return RdmaHost {
                    devices,
                    status: RdmaStatus::Unavailable(reason.clone()),
                    rails,
                };
            }
        };
        let mut opened = Vec::new();
        let mut failures = Vec::new();
        for rail in &plan.rails {
            let index = u8::try_from(opened.len()).expect("at most MAX_RAILS rails");
            if usize::from(index) == ferry_rdma::rails::wire::MAX_RAILS {
                tracing::warn!(rail = %rail.name(), max = ferry_rdma::rails::wire::MAX_RAILS, "more rails than Ferry uses; this one is left out");
                continue;
            }
            match open_rail(index, rail, &devices, config, pool) {
                Ok(local) => {
                    tracing::info!(
                        rail = %rail.name(),
                        index,
                        fabric = %rail.fabric,
                        gid_index = local.selection.gid.index,
                        gid = %local.selection.gid.gid,
                        speed_gbps = rail.speed_gbps,
                        numa_node = ?rail.placement.numa_node,
                        pci = ?rail.placement.pci_address,
                        poll = %config.poll_mode(),
                        pool_part = ?local.part,
                        registered_bytes = local.region.len(),
                        seconds_per_gib = local.region.seconds_per_gib(),
                        "RDMA rail ready, buffer pool registered on it"
                    );
                    opened.push(Arc::new(local));
                }
                Err(err) => {
                    tracing::warn!(rail = %rail.name(), error = %err, "RDMA rail unusable; left out");
                    failures.push(format!("{}: {err}", rail.name()));
                }
            }
        }
        let status = if opened.is_empty() {
            let reason = failures.join("; ");
            tracing::warn!(%reason, "no RDMA rail could be opened; pieces move over TCP");
            RdmaStatus::Unavailable(reason)
        } else {
            RdmaStatus::Ready {
                rails: opened,
                _pool: Arc::clone(pool),
            }
        };
        RdmaHost {
            devices,
            rails,
            status,
        }
    }

    /// The data port on each RoCE rail's address too, when `listen` names one address: a
    /// receiver sets up each queue pair from its rail's address to the source's rail address (so
    /// both sides can check the GIDs against the TCP addresses). A rail whose address cannot be
    /// bound is left to fail its set-ups (and be paused) on the receivers; logged.
    pub async fn rail_listeners(&self, bound: SocketAddr) -> Vec<TcpListener> {
        if bound.ip().is_unspecified() {
            return Vec::new();
        }
        let mut listeners = Vec::new();
        let mut addresses: Vec<IpAddr> = Vec::new();
        for rail in self.open_rails() {
            let Some(ip) = rail.ipv4().map(IpAddr::V4) else {
                continue;
            };
            if ip == bound.ip() || addresses.contains(&ip) {
                continue;
            }
            addresses.push(ip);
            let address = SocketAddr::new(ip, bound.port());
            match TcpListener::bind(address).await {
                Ok(listener) => {
                    tracing::info!(rail = %rail.name(), %address, "data port listening on the rail's address too");
                    listeners.push(listener);
                }
                Err(err) => {
                    tracing::warn!(rail = %rail.name(), %address, error = %err, "cannot listen on the rail's address; receivers cannot set up queue pairs on this rail");
                }
            }
        }
        listeners
    }

    /// The rails that carry pieces (none unless RDMA is ready).
    pub fn open_rails(&self) -> &[Arc<LocalRail>] {
        match &self.status {
            RdmaStatus::Ready { rails, .. } => rails,
            _ => &[],
        }
    }

    /// The `rdma_rails` entry of `GetCapabilities`: every rail, then every port that is not
    /// one, with its reason.
    pub fn rails_message(&self) -> Vec<proto::RdmaRail> {
        let Ok(plan) = &self.rails else {
            return Vec::new();
        };
        let open = self.open_rails();
        let rails = plan.rails.iter().map(|rail| proto::RdmaRail {
            name: rail.name(),
            used: true,
            reason: String::new(),
            link_layer: rail.link_layer.as_str().into(),
            lid: u32::from(rail.lid),
            gid_index: rail.gid.index,
            gid: rail.gid.gid.to_string(),
            fabric: rail.fabric.to_string(),
            speed_gbps: rail.speed_gbps,
            numa_node: rail.placement.numa_node.map_or(-1, |n| n as i32),
            pci_address: rail.placement.pci_address.clone().unwrap_or_default(),
            carrying: open
                .iter()
                .any(|o| o.rail.device == rail.device && o.rail.port == rail.port),
        });
        let skipped = plan.skipped.iter().map(|s: &SkippedPort| proto::RdmaRail {
            name: format!("{}:{}", s.device, s.port),
            used: false,
            reason: s.reason.clone(),
            numa_node: -1,
            ..Default::default()
        });
        rails.chain(skipped).collect()
    }

    /// Bytes registered with the devices, over every rail (the pool once per rail), else 0.
    pub fn registered_bytes(&self) -> u64 {
        self.open_rails()
            .iter()
            .map(|r| r.region.len() as u64)
            .sum()
    }

    /// The `rdma` entry of `GetCapabilities`.
    pub fn transport_info(&self) -> proto::TransportInfo {
        let (detail, properties) = match &self.status {
            RdmaStatus::Disabled => (
                "disabled by configuration (--no-rdma)".to_owned(),
                Vec::new(),
            ),
            RdmaStatus::Unavailable(reason) => (reason.clone(), Vec::new()),
            RdmaStatus::Ready { rails, .. } => {
                // The first rail's details, as before several rails were used; then the list.
                let first = &rails[0];
                let (selection, region) = (&first.selection, &first.region);
                let names: Vec<String> = rails.iter().map(|r| r.name()).collect();
                (
                    format!(
                        "{} port {} GID {} ({} {}){}",
                        selection.device,
                        selection.port,
                        selection.gid.index,
                        selection.gid.kind.as_str(),
                        selection.gid.address(),
                        if rails.len() > 1 {
                            format!(" and {} more rails", rails.len() - 1)
                        } else {
                            String::new()
                        }
                    ),
                    vec![
                        ("device", selection.device.clone()),
                        ("port", selection.port.to_string()),
                        ("gid_index", selection.gid.index.to_string()),
                        ("gid", selection.gid.gid.to_string()),
                        ("active_mtu", selection.active_mtu.to_string()),
                        ("link_layer", selection.link_layer.as_str().to_owned()),
                        ("lid", selection.lid.to_string()),
                        ("rails", names.join(",")),
                        ("registered_bytes", self.registered_bytes().to_string()),
                        (
                            "registration_seconds_per_gib",
                            format!("{:.4}", region.seconds_per_gib()),
                        ),
                    ],
                )
            }
        };
        proto::TransportInfo {
            name: "rdma".into(),
            available: matches!(self.status, RdmaStatus::Ready { .. }),
            detail,
            properties: properties
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }

    pub fn devices_message(&self) -> Vec<proto::RdmaDevice> {
        self.devices
            .iter()
            .map(|device| proto::RdmaDevice {
                name: device.name.clone(),
                node_guid: device.node_guid.clone(),
                ports: device
                    .ports
                    .iter()
                    .map(|port| proto::RdmaPort {
                        number: u32::from(port.number),
                        state: port.state.clone(),
                        link_layer: port.link_layer.as_str().into(),
                        lid: u32::from(port.lid),
                        subnet_prefix: format!("{:016x}", port.subnet_prefix),
                        active_mtu: port.active_mtu,
                        speed_gbps: port.speed_gbps,
                        gids: port
                            .gids
                            .iter()
                            .map(|gid| proto::RdmaGid {
                                index: gid.index,
                                gid: gid.gid.to_string(),
                                r#type: gid.kind.as_str().into(),
                                netdev: gid.netdev.clone().unwrap_or_default(),
                                ipv4: gid.ipv4().map(|ip| ip.to_string()).unwrap_or_default(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }
}
