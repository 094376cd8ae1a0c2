//! Ferry as a peer of a Dragonfly cluster (`[dragonfly]`): the `dfdaemon.v2.DfdaemonUpload`
//! service stock children sync pieces from ([`upload`]), and the `scheduler.v2` client that
//! announces this host and its tasks and schedules `ferry pull --url` ([`scheduler`]).
//! Every message is `dragonfly-api`'s.

pub mod held;
pub mod pull;
pub mod scheduler;
pub mod session;
pub mod upload;

use crate::config::DragonflyConfig;
use crate::metrics::Metrics;
use crate::store::Store;
use dragonfly_api::common::v2::{Build, Disk, Host, Network};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Announced `max_tx_bandwidth`/`max_rx_bandwidth` when neither the RDMA ports nor any NIC
/// state a speed: 10 Gbit/s. Never 0: the scheduler scores a host announcing 0 as a poor
/// parent.
pub const DEFAULT_MAX_BANDWIDTH_BPS: u64 = 10_000_000_000;

/// How often the tx/rx rates are sampled from the daemon's byte counters.
const RATE_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// What this host tells Dragonfly about itself.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// `<ip>-<hostname>`, as dfdaemon names hosts.
    pub id: String,
    pub hostname: String,
    /// The IP children reach this host's upload and data ports on.
    pub ip: String,
    /// The DfdaemonUpload port (announced as the host's `port`).
    pub upload_port: u16,
    /// The Vortex TCP port: Ferry's data port.
    pub data_port: u16,
    pub data_dir: std::path::PathBuf,
}

/// Where the announced maximum bandwidth came from, for `ferry devices`.
#[derive(Debug, Clone)]
pub struct MaxBandwidth {
    pub bps: u64,
    pub from: String,
}

/// The maximum bandwidth to announce: the configured one, else the RDMA ports' speed (the
/// fastest active port, Gbit/s), else the fastest NIC's `/sys/class/net/*/speed` (Mbit/s;
/// loopback and virtual links without a speed are skipped), else
/// [`DEFAULT_MAX_BANDWIDTH_BPS`].
pub fn max_bandwidth(configured: u64, rdma_speed_gbps: f64, sys_class_net: &Path) -> MaxBandwidth {
    if configured > 0 {
        return MaxBandwidth {
            bps: configured,
            from: "dragonfly.max_bandwidth_bps".into(),
        };
    }
    if rdma_speed_gbps > 0.0 {
        return MaxBandwidth {
            bps: (rdma_speed_gbps * 1e9) as u64,
            from: "RDMA port speed".into(),
        };
    }
    let mut best: Option<(u64, String)> = None;
    if let Ok(entries) = std::fs::read_dir(sys_class_net) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "lo" {
                continue;
            }
            let speed = std::fs::read_to_string(entry.path().join("speed"))
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|&mbps| mbps > 0);
            if let Some(mbps) = speed {
                let bps = mbps as u64 * 1_000_000;
                if best.as_ref().is_none_or(|(b, _)| bps > *b) {
                    best = Some((bps, name));
                }
            }
        }
    }
    match best {
        Some((bps, name)) => MaxBandwidth {
            bps,
            from: format!("{}/{name}/speed", sys_class_net.display()),
        },
        None => MaxBandwidth {
            bps: DEFAULT_MAX_BANDWIDTH_BPS,
            from: "default (no RDMA port or NIC states a speed)".into(),
        },
    }
}

/// The daemon's tx/rx rates, bits per second, sampled from its byte counters.
#[derive(Debug, Default)]
pub struct Rates {
    tx_bps: AtomicU64,
    rx_bps: AtomicU64,
}

impl Rates {
    pub fn tx(&self) -> u64 {
        self.tx_bps.load(Ordering::Relaxed)
    }

    pub fn rx(&self) -> u64 {
        self.rx_bps.load(Ordering::Relaxed)
    }

    /// Samples `metrics` every second until the process ends.
    pub fn spawn_sampler(self: &Arc<Self>, metrics: Arc<Metrics>) {
        let rates = Arc::clone(self);
        tokio::spawn(async move {
            let mut last = (metrics.bytes_moved(), Instant::now());
            let mut tick = tokio::time::interval(RATE_SAMPLE_INTERVAL);
            loop {
                tick.tick().await;
                let now = (metrics.bytes_moved(), Instant::now());
                let secs = now.1.duration_since(last.1).as_secs_f64().max(1e-3);
                let rate = |a: u64, b: u64| ((b.saturating_sub(a)) as f64 * 8.0 / secs) as u64;
                rates
                    .tx_bps
                    .store(rate(last.0 .0, now.0 .0), Ordering::Relaxed);
                rates
                    .rx_bps
                    .store(rate(last.0 .1, now.0 .1), Ordering::Relaxed);
                last = now;
            }
        });
    }
}

/// This daemon as a Dragonfly peer: its facts, figures and settings.
pub struct Peer {
    pub config: DragonflyConfig,
    pub host: HostFacts,
    pub max_bandwidth: MaxBandwidth,
    pub rates: Arc<Rates>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Whether this host serves pieces over RDMA too (announced in the build's platform
    /// string; Ferry children find it on the Vortex port either way).
    pub rdma: bool,
}

impl Peer {
    /// The `Host` message of AnnounceHost and SyncHost: addresses, network figures, disk.
    pub fn host_message(&self) -> Host {
        let (disk_total, disk_free) = nix::sys::statvfs::statvfs(&self.host.data_dir)
            .map(|fs| {
                let unit = fs.fragment_size();
                (
                    fs.blocks().saturating_mul(unit),
                    fs.blocks_available().saturating_mul(unit),
                )
            })
            .unwrap_or((0, 0));
        let used = disk_total.saturating_sub(disk_free);
        Host {
            id: self.host.id.clone(),
            r#type: 0, // HostType::Normal: a peer, not a seed peer
            hostname: self.host.hostname.clone(),
            ip: self.host.ip.clone(),
            port: i32::from(self.host.upload_port),
            download_port: i32::from(self.host.data_port),
            os: std::env::consts::OS.into(),
            platform: format!("ferry{}", if self.rdma { "+rdma" } else { "" }),
            network: Some(self.network()),
            disk: Some(Disk {
                total: disk_total,
                free: disk_free,
                used,
                used_percent: if disk_total > 0 {
                    used as f64 * 100.0 / disk_total as f64
                } else {
                    0.0
                },
                ..Default::default()
            }),
            build: Some(Build {
                git_version: format!("ferry-{}", env!("CARGO_PKG_VERSION")),
                rust_version: Some("stable".into()),
                platform: Some(format!(
                    "{}-{}",
                    std::env::consts::ARCH,
                    std::env::consts::OS
                )),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The network figures the scheduler (and SyncHost's callers) weigh parents by.
    pub fn network(&self) -> Network {
        Network {
            location: self.config.location.clone(),
            idc: self.config.idc.clone(),
            max_rx_bandwidth: self.max_bandwidth.bps,
            rx_bandwidth: Some(self.rates.rx()),
            max_tx_bandwidth: self.max_bandwidth.bps,
            tx_bandwidth: Some(self.rates.tx()),
            ..Default::default()
        }
    }

    /// For `ferry devices`: a "dragonfly" entry among the transports.
    pub fn info(&self) -> Vec<(String, String)> {
        vec![
            ("schedulers".into(), self.config.scheduler.join(",")),
            (
                "upload".into(),
                format!("{}:{}", self.host.ip, self.host.upload_port),
            ),
            (
                "vortex_tcp".into(),
                format!("{}:{}", self.host.ip, self.host.data_port),
            ),
            ("host_id".into(), self.host.id.clone()),
            ("idc".into(), self.config.idc.clone().unwrap_or_default()),
            (
                "location".into(),
                self.config.location.clone().unwrap_or_default(),
            ),
            (
                "announce_interval_secs".into(),
                self.config.announce_interval().as_secs().to_string(),
            ),
            (
                "max_tx_bandwidth_bps".into(),
                self.max_bandwidth.bps.to_string(),
            ),
            ("max_bandwidth_from".into(), self.max_bandwidth.from.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_bandwidth_is_never_zero_and_says_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let none = max_bandwidth(0, 0.0, &dir.path().join("missing"));
        assert_eq!(none.bps, DEFAULT_MAX_BANDWIDTH_BPS);
        for (name, speed) in [("lo", "100000"), ("eth0", "25000"), ("veth1", "-1")] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("speed"), speed).unwrap();
        }
        let nic = max_bandwidth(0, 0.0, dir.path());
        assert_eq!(nic.bps, 25_000_000_000);
        assert!(nic.from.ends_with("eth0/speed"), "{}", nic.from);
        assert_eq!(max_bandwidth(0, 200.0, dir.path()).bps, 200_000_000_000);
        assert_eq!(max_bandwidth(7, 200.0, dir.path()).bps, 7);
    }
}
