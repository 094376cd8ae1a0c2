//! The buffer pool's default size, from the bandwidth-delay product of the host's NICs.
//!
//! By Little's law a daemon moving `rate` bytes per second, each buffer held `hold` seconds
//! per piece, needs `rate x hold` bytes of buffers; 256 MiB caps one host well below a
//! 400 Gbit/s NIC. The rule (`pool.size_mib = 0`, the default):
//!
//! ```text
//! pool = sum of NIC rates x HOLD (4 ms: wire, digest, disk write and its fdatasync)
//!        x DEPTH (2: the next pieces in flight while the last ones are written or read)
//!        x 2 (a peer in a mesh receives and serves at line rate at once, from separate budgets)
//! ```
//!
//! rounded up to whole slots and kept within [256 MiB, 1/8 of physical memory]. The NICs are
//! the active ports of the RDMA device configured (`rdma.device`, else every RDMA device),
//! else the fastest Ethernet NIC's `/sys/class/net/*/speed`, else 10 Gbit/s.

use crate::config::Config;
use std::path::Path;

/// How long a buffer is held per piece, in microseconds (see the module docs).
pub const HOLD_US: u64 = 4_000;
/// Pieces in flight per stage of the pipeline.
pub const DEPTH: u64 = 2;
/// Receiving and serving at once.
pub const DIRECTIONS: u64 = 2;
/// The smallest derived pool: four of the largest (64 MiB) pieces.
pub const MIN_POOL_MIB: u64 = 256;
/// The largest derived pool, as a share of physical memory: 1/8.
pub const MEMORY_DIVISOR: u64 = 8;
/// Assumed when no NIC states a speed (as Dragonfly's announcements assume).
pub const FALLBACK_GBPS: f64 = 10.0;

const MIB: u64 = 1 << 20;

/// A link the daemon may move pieces over.
#[derive(Debug, Clone, PartialEq)]
pub struct Nic {
    /// e.g. "mlx5_0 port 1" or "eth0".
    pub name: String,
    pub gbps: f64,
}

/// The pool size the daemon runs with, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSizing {
    pub size_mib: u64,
    /// Derived by the rule (`pool.size_mib = 0`), not configured.
    pub derived: bool,
    pub why: String,
}

/// The pool size for `config`: `pool.size_mib` when set, else derived from this host.
pub fn pool_sizing(config: &Config) -> PoolSizing {
    if config.pool.size_mib != 0 {
        return PoolSizing {
            size_mib: config.pool.size_mib,
            derived: false,
            why: "pool.size_mib".into(),
        };
    }
    let mut nics = Vec::new();
    if config.rdma.enabled {
        nics = rdma_ports(
            Path::new("/sys/class/infiniband"),
            config.rdma.device.as_deref(),
            config.rdma.port,
        );
    }
    if nics.is_empty() {
        nics = fastest_nic(Path::new("/sys/class/net"));
    }
    let memory = memory_bytes(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default());
    derive(&nics, config.pool.slot_mib, memory)
}

/// The rule itself (pure): `nics` empty means none stated a speed.
pub fn derive(nics: &[Nic], slot_mib: u64, memory: Option<u64>) -> PoolSizing {
    let slot_mib = slot_mib.max(1);
    let (gbps, links) = if nics.is_empty() {
        (
            FALLBACK_GBPS,
            format!("no NIC states a speed, {FALLBACK_GBPS} Gbit/s assumed"),
        )
    } else {
        let listed: Vec<String> = nics
            .iter()
            .map(|n| format!("{} {} Gbit/s", n.name, n.gbps))
            .collect();
        (nics.iter().map(|n| n.gbps).sum(), listed.join(", "))
    };
    let bytes_per_sec = gbps * 1e9 / 8.0;
    let product = bytes_per_sec * (HOLD_US as f64 / 1e6) * (DEPTH * DIRECTIONS) as f64;
    let wanted_mib = (product / MIB as f64).ceil() as u64;
    let ceiling_mib = memory.map(|m| m / MEMORY_DIVISOR / MIB);
    let mut size = wanted_mib.max(MIN_POOL_MIB);
    let mut bound = format!("at least {MIN_POOL_MIB} MiB");
    if let Some(ceiling) = ceiling_mib {
        bound = format!(
            "{bound}, at most 1/{MEMORY_DIVISOR} of {} MiB of memory = {ceiling} MiB",
            memory.unwrap_or(0) / MIB
        );
        // On a small machine the floor wins: below it the largest pieces cannot move.
        size = size.min(ceiling.max(MIN_POOL_MIB));
    }
    size = size.div_ceil(slot_mib) * slot_mib;
    let why = format!(
        "{links}: {gbps} Gbit/s x {} ms held x {DEPTH} deep x {DIRECTIONS} (receive and serve) = {wanted_mib} MiB; kept {bound}, in whole {slot_mib} MiB slots",
        HOLD_US as f64 / 1000.0
    );
    PoolSizing {
        size_mib: size,
        derived: true,
        why,
    }
}

/// Active ports of the RDMA devices under `sys_class_infiniband` (of `device` only, and
/// `port` only, when given), with their rate (`ports/N/rate`: "400 Gb/sec (4X NDR)").
pub fn rdma_ports(sys_class_infiniband: &Path, device: Option<&str>, port: Option<u8>) -> Vec<Nic> {
    let mut nics = Vec::new();
    let Ok(devices) = std::fs::read_dir(sys_class_infiniband) else {
        return nics;
    };
    let mut devices: Vec<_> = devices.flatten().map(|e| e.path()).collect();
    devices.sort();
    for dev in devices {
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if device.is_some_and(|d| d != name) {
            continue;
        }
        let Ok(ports) = std::fs::read_dir(dev.join("ports")) else {
            continue;
        };
        let mut ports: Vec<_> = ports.flatten().map(|e| e.path()).collect();
        ports.sort();
        for path in ports {
            let number = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u8>().ok());
            let Some(number) = number else { continue };
            if port.is_some_and(|p| p != number) {
                continue;
            }
            let active = std::fs::read_to_string(path.join("state"))
                .is_ok_and(|s| s.to_ascii_uppercase().contains("ACTIVE"));
            let gbps = std::fs::read_to_string(path.join("rate"))
                .ok()
                .and_then(|rate| rate.split_whitespace().next()?.parse::<f64>().ok())
                .filter(|&g| g > 0.0);
            if let (true, Some(gbps)) = (active, gbps) {
                nics.push(Nic {
                    name: format!("{name} port {number}"),
                    gbps,
                });
            }
        }
    }
    nics
}

/// The fastest NIC under `sys_class_net` that states a speed (`speed`, Mbit/s; loopback
/// and links without one skipped); the TCP path uses one.
pub fn fastest_nic(sys_class_net: &Path) -> Vec<Nic> {
    let mut best: Option<Nic> = None;
    let Ok(entries) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "lo" {
            continue;
        }
        let mbps = std::fs::read_to_string(entry.path().join("speed"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|&m| m > 0);
        if let Some(mbps) = mbps {
            let gbps = mbps as f64 / 1000.0;
            if best.as_ref().is_none_or(|b| gbps > b.gbps) {
                best = Some(Nic { name, gbps });
            }
        }
    }
    best.into_iter().collect()
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn memory_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, gbps: f64) -> Nic {
        Nic {
            name: name.into(),
            gbps,
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_pool_follows_the_bandwidth_delay_product_within_its_bounds() {
        // One 400 Gbit/s NIC: 50 GB/s x 4 ms x 2 x 2 = 800 MB = 763 MiB, in 4 MiB slots.
        let one = derive(&[nic("mlx5_0 port 1", 400.0)], 4, Some(512 * GIB));
        assert_eq!(one.size_mib, 764);
        assert!(one.derived);
        assert!(
            one.why.contains("mlx5_0 port 1 400 Gbit/s") && one.why.contains("= 763 MiB"),
            "{}",
            one.why
        );
        // Eight of them: 6104 MiB.
        let eight: Vec<Nic> = (0..8)
            .map(|i| nic(&format!("mlx5_{i} port 1"), 400.0))
            .collect();
        assert_eq!(derive(&eight, 4, Some(2048 * GIB)).size_mib, 6104);
        // ... but never more than an eighth of memory (64 GiB: 8192 MiB).
        let capped = derive(&eight, 4, Some(32 * GIB));
        assert_eq!(capped.size_mib, 4096);
        assert!(capped.why.contains("at most 1/8"), "{}", capped.why);
        // A 10 Gbit/s NIC, or none: the 256 MiB floor (four 64 MiB pieces).
        assert_eq!(
            derive(&[nic("eth0", 10.0)], 4, Some(16 * GIB)).size_mib,
            256
        );
        let none = derive(&[], 4, None);
        assert_eq!(none.size_mib, 256);
        assert!(none.why.contains("assumed"), "{}", none.why);
        // Whole slots.
        assert_eq!(derive(&[nic("ib0", 400.0)], 64, None).size_mib, 768);
        // A small machine: the floor wins over the memory share.
        assert_eq!(derive(&[nic("ib0", 400.0)], 4, Some(GIB)).size_mib, 256);
    }

    #[test]
    fn rdma_ports_and_nics_are_read_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let port = |dev: &str, n: u8, state: &str, rate: &str| {
            let path = dir
                .path()
                .join("ib")
                .join(dev)
                .join("ports")
                .join(n.to_string());
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(path.join("state"), state).unwrap();
            std::fs::write(path.join("rate"), rate).unwrap();
        };
        port("mlx5_0", 1, "4: ACTIVE\n", "400 Gb/sec (4X NDR)\n");
        port("mlx5_1", 1, "4: ACTIVE\n", "200 Gb/sec (4X HDR)\n");
        port("mlx5_1", 2, "1: DOWN\n", "400 Gb/sec (4X NDR)\n");
        let ib = dir.path().join("ib");
        assert_eq!(
            rdma_ports(&ib, None, None),
            vec![nic("mlx5_0 port 1", 400.0), nic("mlx5_1 port 1", 200.0)]
        );
        assert_eq!(
            rdma_ports(&ib, Some("mlx5_1"), None),
            vec![nic("mlx5_1 port 1", 200.0)]
        );
        assert!(rdma_ports(&ib, Some("mlx5_1"), Some(2)).is_empty(), "down");
        assert!(rdma_ports(&dir.path().join("none"), None, None).is_empty());
        for (name, speed) in [
            ("lo", "0"),
            ("eth0", "25000"),
            ("eth1", "100000"),
            ("veth", "-1"),
        ] {
            let path = dir.path().join("net").join(name);
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(path.join("speed"), speed).unwrap();
        }
        assert_eq!(
            fastest_nic(&dir.path().join("net")),
            vec![nic("eth1", 100.0)]
        );
        assert_eq!(
            memory_bytes("MemTotal:       24683652 kB\nMemFree: 1 kB\n"),
            Some(24683652 * 1024)
        );
        assert_eq!(memory_bytes("nothing"), None);
    }
}
