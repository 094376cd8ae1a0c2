//! The host's RDMA side: which devices exist and, when RDMA is enabled and usable, the chosen
//! device opened with the buffer pool registered on it (once, at start-up).

use crate::config::RdmaConfig;
use crate::io::BufferPool;
use crate::proto;
use ferry_rdma::rails::{RailPlan, SkippedPort};
use ferry_rdma::{DeviceInfo, RdmaContext, RegisteredRegion, Selection, SelectionRequest};
use std::sync::Arc;

pub enum RdmaStatus {
    /// Turned off by configuration (`--no-rdma`).
    Disabled,
    /// No library, no device, no usable GID, or opening it failed: the reason.
    Unavailable(String),
    /// The device is open and the pool registered.
    Ready {
        selection: Selection,
        region: Arc<RegisteredRegion>,
        _pool: Arc<BufferPool>,
    },
}

pub struct RdmaHost {
    pub devices: Vec<DeviceInfo>,
    /// The host's rails as configured (`rdma.devices`, `rdma.exclude`), or why there are none.
    pub rails: Result<RailPlan, String>,
    pub status: RdmaStatus,
}

impl RdmaHost {
    /// Discovers devices and, if enabled, opens the chosen one and registers `pool`. Never
    /// fails: whatever goes wrong leaves RDMA unavailable (logged) and TCP carries everything.
    pub fn start(config: &RdmaConfig, pool: &Arc<BufferPool>) -> RdmaHost {
        let devices = match ferry_rdma::discover() {
            Ok(devices) => devices,
            Err(err) => {
                tracing::info!(reason = %err, "RDMA unavailable; pieces move over TCP");
                return RdmaHost {
                    devices: Vec::new(),
                    rails: Err(err.to_string()),
                    status: RdmaStatus::Unavailable(err.to_string()),
                };
            }
        };
        let rails = ferry_rdma::rails::enumerate(
            &devices,
            &config.rail_request(),
            &ferry_rdma::rails::host_facts(),
        )
        .map_err(|e| e.to_string());
        if !config.enabled {
            tracing::info!(devices = devices.len(), "RDMA disabled by configuration");
            return RdmaHost {
                devices,
                rails,
                status: RdmaStatus::Disabled,
            };
        }
        let first = match &rails {
            Ok(plan) => {
                for rail in &plan.rails {
                    tracing::info!(
                        rail = %rail.name(),
                        fabric = %rail.fabric,
                        numa_node = ?rail.placement.numa_node,
                        pci = ?rail.placement.pci_address,
                        "RDMA rail found"
                    );
                }
                &plan.rails[0]
            }
            Err(reason) => {
                tracing::warn!(%reason, "no usable RDMA rail; pieces move over TCP");
                return RdmaHost {
                    devices,
                    status: RdmaStatus::Unavailable(reason.clone()),
                    rails,
                };
            }
        };
        // One rail carries pieces until striping lands: the first of the plan.
        let request = SelectionRequest {
            device: Some(first.device.clone()),
            port: Some(first.port),
            gid_index: Some(first.gid.index),
        };
        let opened = ferry_rdma::choose(&devices, &request).and_then(|selection| {
            let context = RdmaContext::open_with(selection.clone(), config.poll_mode())?;
            let region = pool.register_rdma(&context)?;
            Ok((selection, region))
        });
        let status = match opened {
            Ok((selection, region)) => {
                tracing::info!(
                    device = %selection.device,
                    port = selection.port,
                    gid_index = selection.gid.index,
                    gid = %selection.gid.gid,
                    poll = %config.poll_mode(),
                    seconds_per_gib = region.seconds_per_gib(),
                    "RDMA device ready, buffer pool registered"
                );
                RdmaStatus::Ready {
                    selection,
                    region: Arc::new(region),
                    _pool: Arc::clone(pool),
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "RDMA device unusable; pieces move over TCP");
                RdmaStatus::Unavailable(err.to_string())
            }
        };
        RdmaHost {
            devices,
            rails,
            status,
        }
    }

    /// The `rdma_rails` entry of `GetCapabilities`: every rail, then every port that is not
    /// one, with its reason.
    pub fn rails_message(&self) -> Vec<proto::RdmaRail> {
        let Ok(plan) = &self.rails else {
            return Vec::new();
        };
        let carrying = match &self.status {
            RdmaStatus::Ready { selection, .. } => {
                Some((selection.device.as_str(), selection.port))
            }
            _ => None,
        };
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
            carrying: carrying == Some((rail.device.as_str(), rail.port)),
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

    /// Bytes registered with the device: the whole buffer pool when RDMA is ready, else 0.
    pub fn registered_bytes(&self) -> u64 {
        match &self.status {
            RdmaStatus::Ready { region, .. } => region.len() as u64,
            _ => 0,
        }
    }

    /// The `rdma` entry of `GetCapabilities`.
    pub fn transport_info(&self) -> proto::TransportInfo {
        let (detail, properties) = match &self.status {
            RdmaStatus::Disabled => (
                "disabled by configuration (--no-rdma)".to_owned(),
                Vec::new(),
            ),
            RdmaStatus::Unavailable(reason) => (reason.clone(), Vec::new()),
            RdmaStatus::Ready {
                selection, region, ..
            } => (
                format!(
                    "{} port {} GID {} ({} {})",
                    selection.device,
                    selection.port,
                    selection.gid.index,
                    selection.gid.kind.as_str(),
                    selection.gid.address()
                ),
                vec![
                    ("device", selection.device.clone()),
                    ("port", selection.port.to_string()),
                    ("gid_index", selection.gid.index.to_string()),
                    ("gid", selection.gid.gid.to_string()),
                    ("active_mtu", selection.active_mtu.to_string()),
                    ("link_layer", selection.link_layer.as_str().to_owned()),
                    ("lid", selection.lid.to_string()),
                    ("registered_bytes", region.len().to_string()),
                    (
                        "registration_seconds_per_gib",
                        format!("{:.4}", region.seconds_per_gib()),
                    ),
                ],
            ),
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
