//! The daemon's configuration: a TOML file, then command-line flags on top.

use crate::geometry::MAX_PIECE_LENGTH;
use crate::io::IoChoice;
use crate::rdma::MAX_WRITES_PER_PIECE;
use ferry_rdma::verbs::{CONTROL_RECEIVES, SEND_QUEUE_DEPTH};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONTROL: &str = "/run/ferry/control.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ferry";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4100";
/// Longest allowed drain: systemd's stop timeout must exceed it.
pub const MAX_DRAIN_TIMEOUT_SECS: u64 = 3600;
/// Upper bounds that keep derived values in range: the pool's byte size fits any 64-bit
/// size arithmetic, and `Instant::now() + timeout` cannot overflow (it panics if it does).
const MAX_POOL_MIB: u64 = 1 << 20;
/// The smallest pool set by hand: each budget (receive, serve, import) then holds one
/// 64 MiB piece.
const MIN_POOL_MIB: u64 = 128;
const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
const MAX_OPEN_TASKS: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where tasks are stored.
    pub data_dir: PathBuf,
    /// Data-plane (piece) listener, host:port.
    pub listen: String,
    /// Address peers should use to reach the data plane; derived from `listen` when empty.
    pub advertise: Option<String>,
    /// Control endpoint: a unix socket path, or tcp://host:port.
    pub control: String,
    /// The only directories transfer outputs and exports may be placed in (their real path,
    /// symlinks resolved); empty places no output anywhere: transfers fill the store only.
    pub output_dirs: Vec<PathBuf>,
    /// Mode and ownership of placed outputs.
    pub output: OutputConfig,
    /// Log lines as text or as JSON objects (one per line).
    pub log_format: LogFormat,
    /// The only directories `ImportTask` may read from (symlinks resolved); empty refuses
    /// every import.
    pub import_dirs: Vec<PathBuf>,
    /// TLS and authentication of a `tcp://` control endpoint (required there).
    pub control_tcp: ControlTcpConfig,
    /// On SIGTERM, how long pieces in flight may take to finish before the transfers still
    /// running are cancelled; 0 cancels them at once.
    pub drain_timeout_secs: u64,
    pub pool: PoolConfig,
    pub io: IoConfig,
    pub store: StoreConfig,
    pub transfer: TransferConfig,
    pub server: ServerConfig,
    pub rdma: RdmaConfig,
    pub metrics: MetricsConfig,
    /// How `http(s)://` origins are downloaded from (back to source, `ferry pull --url`).
    pub origin: OriginConfig,
    /// Being a Dragonfly peer: the schedulers to announce to, the DfdaemonUpload port.
    pub dragonfly: DragonflyConfig,
}

/// `[dragonfly]`: Ferry as a peer of a Dragonfly cluster (engine/src/dragonfly/). Off while
/// `scheduler` is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DragonflyConfig {
    /// The Dragonfly schedulers, host:port (their gRPC port, 8002 by default); empty: not a
    /// Dragonfly peer.
    pub scheduler: Vec<String>,
    /// Where `dfdaemon.v2.DfdaemonUpload` (SyncPieces, SyncHost) is served, IP:PORT; the port
    /// is announced as the host's `port` (dfdaemon's default is 4000).
    pub upload_listen: String,
    /// Announced in the host's network figures (the scheduler scores parents in the same
    /// IDC and location higher).
    pub idc: Option<String>,
    pub location: Option<String>,
    /// The hostname announced (and in the host id, `<ip>-<hostname>`) [default: the
    /// system's]; like dfdaemon's `host.hostname`, for several peers on one machine.
    pub hostname: Option<String>,
    /// Seconds between AnnounceHost calls [default: 300 when 0, dfdaemon's default].
    pub announce_interval_secs: u64,
    /// The host's `max_tx_bandwidth`/`max_rx_bandwidth`, bits per second; 0: from the RDMA
    /// ports' speed, else the fastest NIC's /sys/class/net/*/speed, else 10 Gbit/s.
    pub max_bandwidth_bps: u64,
}

impl Default for DragonflyConfig {
    fn default() -> Self {
        DragonflyConfig {
            scheduler: Vec::new(),
            upload_listen: DEFAULT_UPLOAD_LISTEN.into(),
            idc: None,
            location: None,
            hostname: None,
            announce_interval_secs: 0,
            max_bandwidth_bps: 0,
        }
    }
}

/// dfdaemon's upload port.
pub const DEFAULT_UPLOAD_LISTEN: &str = "0.0.0.0:4000";

/// AnnounceHost interval when `announce_interval_secs` is 0.
pub const DEFAULT_ANNOUNCE_INTERVAL_SECS: u64 = 300;

impl DragonflyConfig {
    pub fn enabled(&self) -> bool {
        !self.scheduler.is_empty()
    }

    pub fn announce_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(match self.announce_interval_secs {
            0 => DEFAULT_ANNOUNCE_INTERVAL_SECS,
            secs => secs,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OriginConfig {
    /// Range requests in flight per transfer (one connection each).
    pub connections: u32,
    /// Retries of one request after a connect error, 5xx, 408, 429, stall or short body.
    pub retries: u32,
    /// First back-off before a retry, doubled each time up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub connect_timeout_secs: u64,
    /// Longest wait for a response head or the next body bytes (a stall).
    pub io_timeout_secs: u64,
    pub max_redirects: u32,
    /// Extra CA certificates (PEM) for https origins, besides the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for OriginConfig {
    fn default() -> Self {
        OriginConfig {
            connections: 8,
            retries: 3,
            retry_base_ms: 250,
            retry_max_ms: 8000,
            connect_timeout_secs: 10,
            io_timeout_secs: 30,
            max_redirects: 5,
            ca_file: None,
        }
    }
}

impl OriginConfig {
    pub fn settings(&self) -> crate::origin::OriginSettings {
        use std::time::Duration;
        crate::origin::OriginSettings {
            connections: self.connections,
            retries: self.retries,
            retry_base: Duration::from_millis(self.retry_base_ms),
            retry_max: Duration::from_millis(self.retry_max_ms),
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            io_timeout: Duration::from_secs(self.io_timeout_secs),
            max_redirects: self.max_redirects,
            ca_file: self.ca_file.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What a placed output file looks like: the daemon (root under the unit, with `UMask=0077`)
/// would otherwise leave it 0600 root:root, unreadable by the jobs it is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Octal permission bits, e.g. "0644" or "0640"; never writable by others.
    pub mode: String,
    /// User name or numeric uid the output is given; unset: unchanged (the daemon's).
    pub owner: Option<String>,
    /// Group name or numeric gid; unset: unchanged (the daemon's).
    pub group: Option<String>,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            mode: DEFAULT_OUTPUT_MODE.into(),
            owner: None,
            group: None,
        }
    }
}

pub const DEFAULT_OUTPUT_MODE: &str = "0644";

impl OutputConfig {
    /// The permission bits of `mode`: octal, 0 to 0777 (no setuid, setgid or sticky bit:
    /// an output is data), and not writable by others.
    pub fn mode_bits(&self) -> Result<u32, ConfigError> {
        let text = self.mode.trim();
        let invalid = |allowed| ConfigError::Invalid {
            key: "output.mode",
            value: format!("{:?}", self.mode),
            allowed,
        };
        let digits = text.strip_prefix("0o").unwrap_or(text);
        if digits.is_empty()
            || digits.len() > 4
            || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
        {
            return Err(invalid(
                "an octal mode string such as \"0644\" or \"0640\" (permission bits only)",
            ));
        }
        let bits = u32::from_str_radix(digits, 8).expect("octal digits checked");
        if bits > 0o777 {
            return Err(invalid(
                "permission bits only (at most 0777): no setuid, setgid or sticky bit",
            ));
        }
        if bits & 0o002 != 0 {
            return Err(invalid(
                "a mode not writable by others (clear 0002), such as \"0644\" or \"0640\"",
            ));
        }
        Ok(bits)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus endpoint (`GET /metrics`), ip:port; empty: off.
    pub listen: String,
}

/// A TCP control listener is only started with TLS, and with a bearer token or client
/// certificates (mutual TLS) or both.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlTcpConfig {
    /// The server certificate chain, PEM.
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key, PEM.
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to: mutual TLS.
    pub tls_client_ca: Option<PathBuf>,
    /// A file holding the token clients send as `authorization: Bearer <token>`.
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RdmaConfig {
    /// Use RDMA when the host has it (`--no-rdma` turns it off).
    pub enabled: bool,
    /// The rails (NICs) to use: "DEVICE" (every port) or "DEVICE:PORT", e.g.
    /// ["mlx5_0", "mlx5_1:1"]; empty: every active port of every device.
    pub devices: Vec<String>,
    /// Rails never to use (front-end or management NICs), in the same form.
    pub exclude: Vec<String>,
    /// One device, the older spelling of `devices = ["DEVICE"]`; not with `devices`.
    pub device: Option<String>,
    /// The port for entries of `device`/`devices` that name none; unset: every active one.
    pub port: Option<u8>,
    /// GID index; unset: a RoCE v2 GID carrying an IPv4 address (never link-local).
    pub gid_index: Option<u32>,
    /// Bytes per RDMA WRITE, in KiB: a power of two, at most the pool slot.
    pub chunk_kib: u32,
    /// Pieces in flight on one queue pair (the credit window).
    pub window: u32,
    /// Queue pairs per rail pair to a source peer.
    pub queue_pairs: u32,
    /// Stripe each piece larger than one pool slot over the rail pairs to its source that
    /// have room for it (a byte range each, at once), so one piece in flight keeps every
    /// rail busy; off: a piece goes whole on one rail pair.
    pub stripe_pieces: bool,
    /// How long a rail pair that failed is first paused (then probed with one piece); each
    /// pause in a row doubles it, up to `rail_max_pause_secs`.
    pub rail_pause_secs: u64,
    pub rail_max_pause_secs: u64,
    /// The NUMA node of a device, where the kernel reports none or a wrong one (firmware that
    /// leaves `numa_node` at -1; VMs), e.g. { mlx5_0 = 0, mlx5_4 = 1 }. A rail's node decides
    /// which part of the buffer pool is allocated near it and registered on it.
    pub numa_nodes: std::collections::BTreeMap<String, u32>,
    /// How each device's completion thread waits: "event" (sleeps on the completion channel)
    /// or "busy" (polls its completion queues in a loop: lower latency, a core per device).
    pub poll: RdmaPoll,
}

/// `rdma.poll`: how a device's completion thread waits for completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RdmaPoll {
    /// Sleep on the completion channels between completions (no CPU while idle).
    #[default]
    Event,
    /// Poll the completion queues in a loop while connections exist.
    Busy,
}

impl From<RdmaPoll> for ferry_rdma::PollMode {
    fn from(poll: RdmaPoll) -> ferry_rdma::PollMode {
        match poll {
            RdmaPoll::Event => ferry_rdma::PollMode::Event,
            RdmaPoll::Busy => ferry_rdma::PollMode::Busy,
        }
    }
}

impl RdmaConfig {
    /// When a failing rail pair is paused, as the rail health machine takes it.
    pub fn rail_health(&self) -> ferry_rdma::rails::health::HealthSettings {
        ferry_rdma::rails::health::HealthSettings {
            first_pause: std::time::Duration::from_secs(self.rail_pause_secs),
            max_pause: std::time::Duration::from_secs(self.rail_max_pause_secs),
            ..Default::default()
        }
    }

    /// `rdma.poll` as the verbs layer takes it.
    pub fn poll_mode(&self) -> ferry_rdma::PollMode {
        self.poll.into()
    }

    /// The rails asked for, as [`ferry_rdma::rails::enumerate`] takes them (the entries were
    /// checked by [`Config::validate`]; one that does not parse is left out).
    pub fn rail_request(&self) -> ferry_rdma::rails::RailRequest {
        use ferry_rdma::rails::RailSpec;
        let specs = |list: &mut dyn Iterator<Item = &String>| -> Vec<RailSpec> {
            list.filter_map(|s| RailSpec::parse(s).ok())
                .map(|mut spec| {
                    spec.port = spec.port.or(self.port);
                    spec
                })
                .collect()
        };
        ferry_rdma::rails::RailRequest {
            include: specs(&mut self.devices.iter().chain(&self.device)),
            port: self.port,
            exclude: self
                .exclude
                .iter()
                .filter_map(|s| RailSpec::parse(s).ok())
                .collect(),
            gid_index: self.gid_index,
        }
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            enabled: true,
            devices: Vec::new(),
            exclude: Vec::new(),
            device: None,
            port: None,
            gid_index: None,
            chunk_kib: 1024,
            window: 2,
            queue_pairs: 2,
            stripe_pieces: true,
            rail_pause_secs: 30,
            rail_max_pause_secs: 300,
            numa_nodes: Default::default(),
            poll: RdmaPoll::Event,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Size of one buffer slot in MiB; a piece takes ceil(piece / slot) slots.
    pub slot_mib: u64,
    /// Total pool size in MiB (pinned at start-up); 0: sized from the bandwidth-delay
    /// product of the host's NICs (`crate::sizing`; `ferry config` shows the value and why).
    pub size_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoConfig {
    pub backend: IoChoice,
    /// io_uring threads (each owns a ring).
    pub threads: usize,
    /// O_DIRECT writes where the filesystem supports them.
    pub direct: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Longest a piece's disk write, or its fdatasync and journal record, may take; past it
    /// the piece fails and so does its task (its state on disk is unknown). Also bounds the
    /// wait for pool buffers.
    pub io_timeout_secs: u64,
    /// Tasks whose descriptors stay open at once (least recently used closed first); 0:
    /// derived from the descriptor limit (RLIMIT_NOFILE less 256, 3 per task).
    pub max_open_tasks: usize,
    /// Largest task a transfer may create, in bytes: a source's word about a task's size
    /// is checked against this (and the data dir's free space) before anything is allocated.
    pub max_task_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// Pieces in flight per source peer; 0 (the default): [`TransferConfig::auto_streams`],
    /// which follows the host's RDMA rails.
    pub streams_per_source: u32,
    pub piece_timeout_secs: u64,
    pub io_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub max_attempts: u32,
    pub source_failure_limit: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub idle_timeout_secs: u64,
    pub write_timeout_secs: u64,
    pub max_connections: usize,
    /// Open data connections allowed from one IP address.
    pub max_connections_per_peer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: DEFAULT_DATA_DIR.into(),
            listen: DEFAULT_LISTEN.into(),
            advertise: None,
            control: DEFAULT_CONTROL.into(),
            output_dirs: Vec::new(),
            output: OutputConfig::default(),
            log_format: LogFormat::default(),
            import_dirs: Vec::new(),
            control_tcp: ControlTcpConfig::default(),
            drain_timeout_secs: 30,
            pool: PoolConfig::default(),
            io: IoConfig::default(),
            store: StoreConfig::default(),
            transfer: TransferConfig::default(),
            server: ServerConfig::default(),
            rdma: RdmaConfig::default(),
            metrics: MetricsConfig::default(),
            origin: OriginConfig::default(),
            dragonfly: DragonflyConfig::default(),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            slot_mib: 4,
            size_mib: 0,
        }
    }
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig {
            backend: IoChoice::Auto,
            threads: 1,
            direct: true,
        }
    }
}

/// 16 TiB: larger than any model shard, far below what 2^32 pieces could describe.
pub const DEFAULT_MAX_TASK_BYTES: u64 = 16 << 40;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            io_timeout_secs: 60,
            max_open_tasks: 0,
            max_task_bytes: DEFAULT_MAX_TASK_BYTES,
        }
    }
}

impl TransferConfig {
    /// Streams per source when none is set: 4 (TCP, or one or two rails), or one queue
    /// pair's window on every RDMA rail, so pieces of one pool slot (which are not striped)
    /// from one source keep every rail busy too: 16 for 8 rails with `rdma.window` 2.
    pub fn auto_streams(rails: usize, window: u32) -> u32 {
        let per_rails = u32::try_from(rails)
            .unwrap_or(u32::MAX)
            .saturating_mul(window);
        per_rails.clamp(4, 128)
    }

    /// `streams_per_source`, or [`TransferConfig::auto_streams`] when it is 0.
    pub fn streams_per_source(&self, rails: usize, window: u32) -> u32 {
        match self.streams_per_source {
            0 => Self::auto_streams(rails, window),
            n => n,
        }
    }
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            streams_per_source: 0,
            piece_timeout_secs: 60,
            io_timeout_secs: 10,
            connect_timeout_secs: 5,
            max_attempts: 4,
            source_failure_limit: 3,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            idle_timeout_secs: 60,
            write_timeout_secs: 30,
            max_connections: 1024,
            max_connections_per_peer: 128,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config value {key} = {value}: {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: &'static str,
    },
    /// A value in range on its own that cannot work with the others (a queue-depth limit).
    #[error("invalid config value {key} = {value}: {why}")]
    Unworkable {
        key: &'static str,
        value: String,
        why: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses a configuration file's text; `path` only names it in errors. The one TOML
    /// parser of the daemon's config (also what `fuzz/` drives).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// Refuses values the daemon cannot run with, naming the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(
            key: &'static str,
            value: impl ToString,
            allowed: &'static str,
        ) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                value: value.to_string(),
                allowed,
            })
        }
        if !self.data_dir.is_absolute() {
            return invalid("data_dir", self.data_dir.display(), "an absolute path");
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid("listen", &self.listen, "an ip:port address");
        }
        if let Some(advertise) = &self.advertise {
            if !is_host_port(advertise) {
                return invalid("advertise", advertise, "a host:port address");
            }
        }
        match ControlEndpoint::parse(&self.control) {
            ControlEndpoint::Tcp(addr) if !is_host_port(&addr) => {
                return invalid(
                    "control",
                    &self.control,
                    "an absolute unix socket path or tcp://host:port",
                )
            }
            ControlEndpoint::Unix(path) if !path.is_absolute() || path.file_name().is_none() => {
                return invalid(
                    "control",
                    &self.control,
                    "an absolute unix socket path or tcp://host:port",
                )
            }
            _ => {}
        }
        if let Some(dir) = self.output_dirs.iter().find(|d| !d.is_absolute()) {
            return invalid("output_dirs", dir.display(), "absolute paths");
        }
        if let Some(dir) = self.import_dirs.iter().find(|d| !d.is_absolute()) {
            return invalid("import_dirs", dir.display(), "absolute paths");
        }
        self.output.mode_bits()?;
        // Names are looked up by `serve` at start-up and by `ferry config` (OutputPolicy).
        for (key, value) in [
            ("output.owner", &self.output.owner),
            ("output.group", &self.output.group),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return invalid(key, "\"\"", "a name or numeric id, or unset (unchanged)");
            }
        }
        self.validate_control_tcp()?;
        if self.drain_timeout_secs > MAX_DRAIN_TIMEOUT_SECS {
            return invalid(
                "drain_timeout_secs",
                self.drain_timeout_secs,
                "0 to 3600 seconds",
            );
        }
        if !(1..=64).contains(&self.pool.slot_mib) {
            return invalid("pool.slot_mib", self.pool.slot_mib, "1 to 64");
        }
        if self.pool.size_mib != 0
            && (!(MIN_POOL_MIB..=MAX_POOL_MIB).contains(&self.pool.size_mib)
                || !self.pool.size_mib.is_multiple_of(self.pool.slot_mib))
        {
            return invalid(
                "pool.size_mib",
                self.pool.size_mib,
                "0 (sized from the NICs) or 128 (each budget holds one 64 MiB piece) to 1048576 (1 TiB), a multiple of pool.slot_mib",
            );
        }
        self.validate_pool_budgets()?;
        if !(1..=16).contains(&self.io.threads) {
            return invalid("io.threads", self.io.threads, "1 to 16");
        }
        // As many as one queue pair's window can carry at once.
        if self.transfer.streams_per_source > 128 {
            return invalid(
                "transfer.streams_per_source",
                self.transfer.streams_per_source,
                "0 (follow the rails) or 1 to 128",
            );
        }
        if self.store.max_task_bytes == 0 {
            return invalid("store.max_task_bytes", 0, "at least 1 byte");
        }
        if self.transfer.max_attempts == 0 {
            return invalid("transfer.max_attempts", 0, "at least 1");
        }
        if self.transfer.source_failure_limit == 0 {
            return invalid("transfer.source_failure_limit", 0, "at least 1");
        }
        for (key, value) in [
            (
                "transfer.piece_timeout_secs",
                self.transfer.piece_timeout_secs,
            ),
            ("transfer.io_timeout_secs", self.transfer.io_timeout_secs),
            (
                "transfer.connect_timeout_secs",
                self.transfer.connect_timeout_secs,
            ),
            ("server.idle_timeout_secs", self.server.idle_timeout_secs),
            (
                "origin.connect_timeout_secs",
                self.origin.connect_timeout_secs,
            ),
            ("origin.io_timeout_secs", self.origin.io_timeout_secs),
            ("server.write_timeout_secs", self.server.write_timeout_secs),
            ("store.io_timeout_secs", self.store.io_timeout_secs),
        ] {
            if !(1..=MAX_TIMEOUT_SECS).contains(&value) {
                return invalid(key, value, "1 to 86400 seconds (one day)");
            }
        }
        let chunk = u64::from(self.rdma.chunk_kib);
        if !chunk.is_power_of_two() || !(4..=self.pool.slot_mib * 1024).contains(&chunk) {
            return invalid(
                "rdma.chunk_kib",
                chunk,
                "a power of two from 4 to the pool slot size (pool.slot_mib * 1024)",
            );
        }
        for scheduler in &self.dragonfly.scheduler {
            if !is_host_port(scheduler) {
                return invalid(
                    "dragonfly.scheduler",
                    scheduler,
                    "host:port entries (a Dragonfly scheduler's gRPC address)",
                );
            }
        }
        if self.dragonfly.enabled()
            && self
                .dragonfly
                .upload_listen
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return invalid(
                "dragonfly.upload_listen",
                format!("{:?}", self.dragonfly.upload_listen),
                "an IP:PORT to serve DfdaemonUpload on",
            );
        }
        if self.dragonfly.announce_interval_secs > MAX_TIMEOUT_SECS {
            return invalid(
                "dragonfly.announce_interval_secs",
                self.dragonfly.announce_interval_secs,
                "0 (300) to 86400 seconds",
            );
        }
        if !(1..=64).contains(&self.origin.connections) {
            return invalid("origin.connections", self.origin.connections, "1 to 64");
        }
        if self.origin.retries > 20 {
            return invalid("origin.retries", self.origin.retries, "0 to 20");
        }
        if self.origin.max_redirects > 20 {
            return invalid("origin.max_redirects", self.origin.max_redirects, "0 to 20");
        }
        if !(1..=60_000).contains(&self.origin.retry_base_ms) {
            return invalid(
                "origin.retry_base_ms",
                self.origin.retry_base_ms,
                "1 to 60000 milliseconds",
            );
        }
        if !(self.origin.retry_base_ms..=600_000).contains(&self.origin.retry_max_ms) {
            return invalid(
                "origin.retry_max_ms",
                self.origin.retry_max_ms,
                "origin.retry_base_ms to 600000 milliseconds",
            );
        }
        const _: () = assert!(CONTROL_RECEIVES == 128, "the message below names it");
        if !(1..=CONTROL_RECEIVES).contains(&self.rdma.window) {
            return invalid(
                "rdma.window",
                self.rdma.window,
                "1 to 128 (the control receives a queue pair posts)",
            );
        }
        if !(1..=16).contains(&self.rdma.queue_pairs) {
            return invalid("rdma.queue_pairs", self.rdma.queue_pairs, "1 to 16");
        }
        if !(1..=3600).contains(&self.rdma.rail_pause_secs) {
            return invalid(
                "rdma.rail_pause_secs",
                self.rdma.rail_pause_secs,
                "1 to 3600",
            );
        }
        if !(self.rdma.rail_pause_secs..=86_400).contains(&self.rdma.rail_max_pause_secs) {
            return invalid(
                "rdma.rail_max_pause_secs",
                self.rdma.rail_max_pause_secs,
                "rdma.rail_pause_secs to 86400",
            );
        }
        if let Some((device, &node)) = self.rdma.numa_nodes.iter().find(|(_, &n)| n >= 1024) {
            return invalid(
                "rdma.numa_nodes",
                format!("{device} = {node}"),
                "NUMA nodes below 1024",
            );
        }
        if self.store.max_open_tasks > MAX_OPEN_TASKS {
            return invalid(
                "store.max_open_tasks",
                self.store.max_open_tasks,
                "0 (derived from the descriptor limit) to 1048576",
            );
        }
        self.validate_rdma_queues()?;
        if self.server.max_connections == 0 {
            return invalid("server.max_connections", 0, "at least 1");
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return invalid(
                "metrics.listen",
                &self.metrics.listen,
                "empty (no metrics endpoint) or an ip:port address",
            );
        }
        if self.rdma.device.as_deref().is_some_and(str::is_empty) {
            return invalid(
                "rdma.device",
                "\"\"",
                "a device name such as mlx5_0, or unset",
            );
        }
        if self.rdma.device.is_some() && !self.rdma.devices.is_empty() {
            return invalid(
                "rdma.device",
                self.rdma.device.as_deref().unwrap_or_default(),
                "unset when rdma.devices is set (list every rail in rdma.devices)",
            );
        }
        for (key, list) in [
            ("rdma.devices", &self.rdma.devices),
            ("rdma.exclude", &self.rdma.exclude),
        ] {
            if let Some(bad) = list
                .iter()
                .find(|s| ferry_rdma::rails::RailSpec::parse(s).is_err())
            {
                return invalid(
                    key,
                    bad,
                    "entries DEVICE or DEVICE:PORT, such as mlx5_0 or mlx5_1:1",
                );
            }
        }
        if self.rdma.port == Some(0) {
            return invalid(
                "rdma.port",
                0,
                "1 to 255 (ports are numbered from 1), or unset",
            );
        }
        if self.server.max_connections_per_peer == 0 {
            return invalid("server.max_connections_per_peer", 0, "at least 1");
        }
        Ok(())
    }

    /// What the RDMA queue pairs can hold, for the largest piece ([`MAX_PIECE_LENGTH`]) in
    /// `pool.slot_mib` slots and `rdma.chunk_kib` chunks: the source posts every chunk write of
    /// a piece and its completing message at once (at most [`MAX_WRITES_PER_PIECE`] writes);
    /// the receiver posts a piece's window binds, its request and, at worst, as many
    /// invalidations as binds, which must fit its send queue ([`SEND_QUEUE_DEPTH`]; pieces
    /// beyond what fits wait for room, so the window itself is bounded only by the control
    /// receives). A setting past these would validate and then fail every large piece.
    fn validate_rdma_queues(&self) -> Result<(), ConfigError> {
        let q = rdma_queue_use(
            MAX_PIECE_LENGTH,
            self.pool.slot_mib << 20,
            u64::from(self.rdma.chunk_kib) << 10,
        );
        let piece_mib = MAX_PIECE_LENGTH >> 20;
        if q.writes_per_piece > u64::from(MAX_WRITES_PER_PIECE) {
            return Err(ConfigError::Unworkable {
                key: "rdma.chunk_kib",
                value: self.rdma.chunk_kib.to_string(),
                why: format!(
                    "a {piece_mib} MiB piece would take {} chunk writes, more than the {MAX_WRITES_PER_PIECE} a source accepts per piece (its send queue): use at least {} KiB",
                    q.writes_per_piece,
                    (MAX_PIECE_LENGTH / u64::from(MAX_WRITES_PER_PIECE)).next_power_of_two() >> 10
                ),
            });
        }
        if q.receiver_entries_per_piece > u64::from(SEND_QUEUE_DEPTH) {
            return Err(ConfigError::Unworkable {
                key: "pool.slot_mib",
                value: self.pool.slot_mib.to_string(),
                why: format!(
                    "a {piece_mib} MiB piece in {} MiB slots needs {} send-queue entries at the receiver (a bind and an invalidation per slot, and the request), more than the send queue's {SEND_QUEUE_DEPTH}: raise pool.slot_mib",
                    self.pool.slot_mib, q.receiver_entries_per_piece
                ),
            });
        }
        Ok(())
    }

    /// The pool size the daemon runs with (`pool.size_mib`, or derived from the NICs when
    /// 0), and why.
    pub fn pool_sizing(&self) -> crate::sizing::PoolSizing {
        crate::sizing::pool_sizing(self)
    }

    /// Receiving, serving and importing each draw from their own budget of the pool (a
    /// reserve, and the common part: `crate::io::Shares::default_for`); a budget that cannot
    /// hold one piece of [`MAX_PIECE_LENGTH`] would fail every such piece.
    fn validate_pool_budgets(&self) -> Result<(), ConfigError> {
        if self.pool.size_mib == 0 {
            return Ok(()); // derived: at least 256 MiB, in whole slots
        }
        let slots = (self.pool.size_mib / self.pool.slot_mib) as usize;
        let shares = crate::io::Shares::default_for(slots);
        let reserved = shares.receive + shares.serve + shares.import;
        let common = slots - reserved;
        let piece_mib = MAX_PIECE_LENGTH >> 20;
        for (budget, reserve) in [
            ("receive", shares.receive),
            ("serve", shares.serve),
            ("import", shares.import),
        ] {
            let limit_mib = (reserve + common) as u64 * self.pool.slot_mib;
            if limit_mib < piece_mib {
                return Err(ConfigError::Unworkable {
                    key: "pool.size_mib",
                    value: self.pool.size_mib.to_string(),
                    why: format!(
                        "the {budget} budget ({reserve} reserved + {common} common slots of {} MiB = {limit_mib} MiB) cannot hold one {piece_mib} MiB piece: use at least {MIN_POOL_MIB} MiB, or 0 to size the pool from the NICs",
                        self.pool.slot_mib
                    ),
                });
            }
        }
        Ok(())
    }

    /// A TCP control endpoint must have TLS and some client authentication; anyone who can
    /// reach it could otherwise drive the daemon (read files through imports, write outputs).
    fn validate_control_tcp(&self) -> Result<(), ConfigError> {
        let tcp = &self.control_tcp;
        for (key, path) in [
            ("control_tcp.tls_cert", &tcp.tls_cert),
            ("control_tcp.tls_key", &tcp.tls_key),
            ("control_tcp.tls_client_ca", &tcp.tls_client_ca),
            ("control_tcp.token_file", &tcp.token_file),
        ] {
            if let Some(path) = path.as_ref().filter(|p| !p.is_absolute()) {
                return Err(ConfigError::Invalid {
                    key,
                    value: path.display().to_string(),
                    allowed: "an absolute path",
                });
            }
        }
        let ControlEndpoint::Tcp(addr) = ControlEndpoint::parse(&self.control) else {
            return Ok(());
        };
        let missing = |key: &'static str, allowed: &'static str| ConfigError::Invalid {
            key,
            value: "(unset)".into(),
            allowed,
        };
        if tcp.tls_cert.is_none() {
            return Err(missing(
                "control_tcp.tls_cert",
                "a PEM certificate file: a tcp:// control endpoint is served only over TLS",
            ));
        }
        if tcp.tls_key.is_none() {
            return Err(missing(
                "control_tcp.tls_key",
                "the PEM private key of control_tcp.tls_cert",
            ));
        }
        if tcp.token_file.is_none() && tcp.tls_client_ca.is_none() {
            return Err(missing(
                "control_tcp.token_file",
                "a token file, or control_tcp.tls_client_ca for client certificates: a tcp:// control endpoint needs client authentication",
            ));
        }
        if addr.is_empty() {
            return Err(ConfigError::Invalid {
                key: "control",
                value: self.control.clone(),
                allowed: "a unix socket path or tcp://HOST:PORT",
            });
        }
        Ok(())
    }
}

/// What one piece of `piece` bytes, in `slot`-byte pool slots and `chunk`-byte writes, takes
/// of the RDMA queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaQueueUse {
    /// Chunk writes the source posts for the piece (one more entry carries its answer).
    pub writes_per_piece: u64,
    /// The receiver's send-queue entries at worst: a bind and an invalidation per slot, and
    /// the request.
    pub receiver_entries_per_piece: u64,
}

pub fn rdma_queue_use(piece: u64, slot: u64, chunk: u64) -> RdmaQueueUse {
    let slots = piece.div_ceil(slot.max(1)).max(1);
    let lens: Vec<u32> = (0..slots)
        .map(|i| slot.min(piece - i * slot).min(u64::from(u32::MAX)) as u32)
        .collect();
    let chunk = u32::try_from(chunk.max(1)).unwrap_or(u32::MAX);
    let writes_per_piece = ferry_rdma::credit::chunk_count(piece, chunk, &lens);
    RdmaQueueUse {
        writes_per_piece,
        receiver_entries_per_piece: 2 * slots + 1,
    }
}

/// `host:port` with a numeric port (the host is resolved when used).
fn is_host_port(text: &str) -> bool {
    text.rsplit_once(':').is_some_and(|(host, port)| {
        !host.trim_matches(['[', ']']).is_empty() && port.parse::<u16>().is_ok()
    })
}

/// Where the control API is: a unix socket or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEndpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl ControlEndpoint {
    pub fn parse(text: &str) -> ControlEndpoint {
        if let Some(addr) = text.strip_prefix("tcp://") {
            ControlEndpoint::Tcp(addr.to_owned())
        } else {
            ControlEndpoint::Unix(text.strip_prefix("unix://").unwrap_or(text).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        Config::default().validate().unwrap();
        let mut config = Config::default();
        config.pool.slot_mib = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("pool.slot_mib"), "{err}");
        let mut config = Config::default();
        config.metrics.listen = "localhost:9100".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("metrics.listen"), "{err}");
        config.metrics.listen = "127.0.0.1:9100".into();
        config.validate().unwrap();
        let json: Config = toml::from_str("log_format = \"json\"").unwrap();
        assert_eq!(json.log_format, LogFormat::Json);
        let err = toml::from_str::<Config>("log_format = \"xml\"").unwrap_err();
        assert!(err.to_string().contains("log_format"), "{err}");
        let parsed: Result<Config, _> = toml::from_str("listen = \"127.0.0.1:1\"\nbogus = 1\n");
        assert!(parsed.unwrap_err().to_string().contains("bogus"));
        assert_eq!(
            ControlEndpoint::parse("tcp://127.0.0.1:5"),
            ControlEndpoint::Tcp("127.0.0.1:5".into())
        );
        assert_eq!(
            ControlEndpoint::parse("/run/x.sock"),
            ControlEndpoint::Unix("/run/x.sock".into())
        );
    }

    /// Found in review while writing fuzz/'s engine_config target (whose checks assert it):
    /// these validated, then overflowed `slot * slots` in the pool or panicked adding the
    /// timeout to an Instant.
    #[test]
    fn values_the_daemon_cannot_use_are_refused() {
        let config: Config =
            Config::parse("[pool]\nsize_mib = 17592186044416\n", Path::new("t")).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("pool.size_mib"), "{err}");
        let config = Config::parse(
            "[transfer]\nio_timeout_secs = 9223372036854775807\n",
            Path::new("t"),
        )
        .unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("transfer.io_timeout_secs"), "{err}");
    }

    #[test]
    fn a_tcp_control_endpoint_needs_tls_and_client_authentication() {
        let mut config = Config {
            control: "tcp://127.0.0.1:4101".into(),
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("control_tcp.tls_cert"), "{err}");
        config.control_tcp.tls_cert = Some("/etc/ferry/c.pem".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("control_tcp.tls_key"), "{err}");
        config.control_tcp.tls_key = Some("/etc/ferry/c.key".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("control_tcp.token_file"), "{err}");
        config.control_tcp.token_file = Some("/etc/ferry/token".into());
        config.validate().unwrap();
        config.control_tcp.token_file = None;
        config.control_tcp.tls_client_ca = Some("/etc/ferry/ca.pem".into());
        config.validate().unwrap();
        config.control_tcp.tls_client_ca = Some("ca.pem".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("control_tcp.tls_client_ca") && err.contains("absolute"),
            "{err}"
        );
        // The unix socket needs none of it.
        Config::default().validate().unwrap();
        let mut config = Config {
            import_dirs: vec!["relative".into()],
            ..Config::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("import_dirs"));
        config.import_dirs = vec![];
        config.server.max_connections_per_peer = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server.max_connections_per_peer"), "{err}");
    }

    #[test]
    fn every_added_key_is_checked() {
        let refused = |change: fn(&mut Config), key: &str| {
            let mut config = Config::default();
            change(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("value {key} = ")), "{err}");
        };
        refused(|c| c.drain_timeout_secs = 3601, "drain_timeout_secs");
        refused(|c| c.control = "control.sock".into(), "control");
        refused(|c| c.control = "tcp://127.0.0.1".into(), "control");
        refused(|c| c.advertise = Some("10.0.0.5".into()), "advertise");
        refused(|c| c.advertise = Some(":4100".into()), "advertise");
        refused(|c| c.rdma.port = Some(0), "rdma.port");
        refused(|c| c.rdma.device = Some(String::new()), "rdma.device");
        refused(
            |c| {
                c.rdma.device = Some("mlx5_0".into());
                c.rdma.devices = vec!["mlx5_1".into()];
            },
            "rdma.device",
        );
        refused(|c| c.rdma.devices = vec!["mlx5_0:0".into()], "rdma.devices");
        refused(|c| c.rdma.exclude = vec!["a b".into()], "rdma.exclude");
        refused(|c| c.store.io_timeout_secs = 0, "store.io_timeout_secs");
        refused(
            |c| c.store.io_timeout_secs = 86_401,
            "store.io_timeout_secs",
        );
        let mut config = Config {
            drain_timeout_secs: 0,
            control: "tcp://localhost:4101".into(),
            advertise: Some("[fd00::5]:4100".into()),
            ..Config::default()
        };
        config.control_tcp.tls_cert = Some("/etc/ferry/c.pem".into());
        config.control_tcp.tls_key = Some("/etc/ferry/c.key".into());
        config.control_tcp.token_file = Some("/etc/ferry/token".into());
        config.validate().unwrap();
        config.control = "unix:///run/ferry/other.sock".into();
        config.validate().unwrap();
    }

    #[test]
    fn rail_pauses_are_bounded_and_reach_the_health_machine() {
        let mut config = Config::default();
        let health = config.rdma.rail_health();
        assert_eq!(health.first_pause, std::time::Duration::from_secs(30));
        assert_eq!(health.max_pause, std::time::Duration::from_secs(300));
        assert_eq!(health.errors_to_pause, 3);
        config.rdma.rail_pause_secs = 0;
        let text = config.validate().unwrap_err().to_string();
        assert!(text.contains("rdma.rail_pause_secs"), "{text}");
        config.rdma.rail_pause_secs = 60;
        config.rdma.rail_max_pause_secs = 59;
        let text = config.validate().unwrap_err().to_string();
        assert!(text.contains("rdma.rail_max_pause_secs"), "{text}");
        config.rdma.rail_max_pause_secs = 60;
        config.validate().unwrap();
        let parsed: Config =
            toml::from_str("[rdma]\nrail_pause_secs = 2\nrail_max_pause_secs = 4\n").unwrap();
        assert_eq!(
            parsed.rdma.rail_health().max_pause,
            std::time::Duration::from_secs(4)
        );
    }

    #[test]
    fn rdma_settings_past_the_queue_depths_are_refused() {
        let refused = |change: fn(&mut Config), key: &str, says: &str| {
            let mut config = Config::default();
            change(&mut config);
            let err = config.validate().unwrap_err();
            assert!(matches!(err, ConfigError::Unworkable { .. }), "{err:?}");
            let text = err.to_string();
            assert!(text.contains(&format!("value {key} = ")), "{text}");
            assert!(text.contains(says), "{text}");
        };
        // 64 MiB in 64 KiB chunks: 1024 writes, the source takes 511.
        refused(
            |c| c.rdma.chunk_kib = 64,
            "rdma.chunk_kib",
            "1024 chunk writes, more than the 511 a source accepts per piece (its send queue): use at least 256 KiB",
        );
        // 128 KiB chunks: 512 writes per piece; 256 KiB: 256, which fits with any window.
        refused(
            |c| c.rdma.chunk_kib = 128,
            "rdma.chunk_kib",
            "512 chunk writes",
        );
        let mut config = Config::default();
        config.rdma.chunk_kib = 256;
        config.rdma.window = 128;
        config.validate().unwrap();
        // The window is bounded by the control receives a queue pair posts.
        let mut config = Config::default();
        config.rdma.window = 129;
        let text = config.validate().unwrap_err().to_string();
        assert!(text.contains("1 to 128 (the control receives"), "{text}");
        // 1 MiB slots: 64 binds, 64 invalidations and the request; fits a 512-entry queue.
        let mut config = Config::default();
        config.pool.slot_mib = 1;
        config.validate().unwrap();
        assert_eq!(
            rdma_queue_use(MAX_PIECE_LENGTH, 4 << 20, 1 << 20),
            RdmaQueueUse {
                writes_per_piece: 64,
                receiver_entries_per_piece: 33,
            }
        );
        // Slots that do not divide the piece: chunks never straddle two slots.
        assert_eq!(
            rdma_queue_use(MAX_PIECE_LENGTH, 3 << 20, 2 << 20).writes_per_piece,
            22 * 2 - 1
        );
    }

    #[test]
    fn pool_sizes_whose_budgets_cannot_hold_a_piece_are_refused() {
        let mut config = Config::default();
        assert_eq!(config.pool.size_mib, 0, "derived by default");
        config.validate().unwrap();
        let sizing = config.pool_sizing();
        assert!(sizing.derived && sizing.size_mib >= 256, "{sizing:?}");
        assert!(sizing.size_mib.is_multiple_of(config.pool.slot_mib));
        config.pool.size_mib = 128;
        config.validate().unwrap();
        assert_eq!(config.pool_sizing().size_mib, 128);
        assert!(!config.pool_sizing().derived);
        config.pool.size_mib = 64;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("value pool.size_mib = 64"), "{err}");
        // 64 MiB slots, 128 MiB: two common slots, every budget holds a piece.
        config.pool.slot_mib = 64;
        config.pool.size_mib = 128;
        config.validate().unwrap();
        config.pool.size_mib = 192;
        config.validate().unwrap();
        // 8 MiB slots, 136 MiB (17 slots): reserves 4+4+2, 7 common: import gets 72 MiB.
        config.pool.slot_mib = 8;
        config.pool.size_mib = 136;
        config.validate().unwrap();
    }

    #[test]
    fn output_mode_is_octal_permission_bits_never_writable_by_others() {
        let mode = |text: &str| {
            OutputConfig {
                mode: text.into(),
                ..OutputConfig::default()
            }
            .mode_bits()
        };
        assert_eq!(mode("0644").unwrap(), 0o644);
        assert_eq!(mode("640").unwrap(), 0o640);
        assert_eq!(mode("0o600").unwrap(), 0o600);
        assert_eq!(mode("0664").unwrap(), 0o664);
        for bad in [
            "0666",
            "0777",
            "0642",
            "4755",
            "0899",
            "rw-r--r--",
            "",
            "01644",
        ] {
            let err = mode(bad).unwrap_err().to_string();
            assert!(err.contains("output.mode"), "{bad}: {err}");
        }
        let config = Config::parse("[output]\nmode = \"0646\"\n", Path::new("t")).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("output.mode") && err.contains("others"),
            "{err}"
        );
        let config = Config::parse("[output]\nowner = \"\"\n", Path::new("t")).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("output.owner"), "{err}");
        let config = Config::parse(
            "[output]\nmode = \"0640\"\nowner = \"1000\"\ngroup = \"video\"\n",
            Path::new("t"),
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(Config::default().output.mode_bits().unwrap(), 0o644);
    }

    #[test]
    fn dragonfly_keys_are_checked() {
        let config = Config::parse(
            "[dragonfly]\nscheduler = [\"10.0.0.2:8002\", \"sched:8002\"]\nupload_listen = \"0.0.0.0:4000\"\nidc = \"a\"\nlocation = \"r|z\"\nannounce_interval_secs = 30\n",
            Path::new("t"),
        )
        .unwrap();
        config.validate().unwrap();
        assert!(config.dragonfly.enabled());
        assert_eq!(config.dragonfly.announce_interval().as_secs(), 30);
        assert_eq!(
            Config::default().dragonfly.announce_interval().as_secs(),
            300
        );
        assert!(!Config::default().dragonfly.enabled());
        let refused = |text: &str, key: &str| {
            let config = Config::parse(text, Path::new("t")).unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("value {key} = ")), "{err}");
        };
        refused(
            "[dragonfly]\nscheduler = [\"nope\"]\n",
            "dragonfly.scheduler",
        );
        refused(
            "[dragonfly]\nscheduler = [\"s:1\"]\nupload_listen = \"host:4000\"\n",
            "dragonfly.upload_listen",
        );
        refused(
            "[dragonfly]\nannounce_interval_secs = 86401\n",
            "dragonfly.announce_interval_secs",
        );
    }

    #[test]
    fn streams_per_source_follows_the_rails_unless_set() {
        let auto = TransferConfig::default();
        assert_eq!(auto.streams_per_source, 0);
        assert_eq!(auto.streams_per_source(0, 2), 4, "TCP only");
        assert_eq!(auto.streams_per_source(1, 2), 4);
        assert_eq!(auto.streams_per_source(2, 2), 4);
        assert_eq!(auto.streams_per_source(8, 2), 16);
        assert_eq!(auto.streams_per_source(16, 128), 128, "at most 128");
        let set = TransferConfig {
            streams_per_source: 2,
            ..Default::default()
        };
        assert_eq!(set.streams_per_source(8, 2), 2, "a value set is kept");
        let mut config = Config::default();
        config.transfer.streams_per_source = 129;
        assert!(config.validate().is_err());
    }

    #[test]
    fn the_example_config_is_the_defaults() {
        let example: Config = toml::from_str(include_str!("../ferry.example.toml")).unwrap();
        example.validate().unwrap();
        assert_eq!(
            toml::to_string(&example).unwrap(),
            toml::to_string(&Config::default()).unwrap()
        );
    }
}
