//! Dragonfly's stock dfdaemon (the `dragonfly-client` crate, [`VERSION`]) as a real peer beside
//! Ferry: its binaries are built once by `scripts/dfdaemon.sh` into a cache directory; a test
//! starts `dfdaemon` as a child process on its own loopback ports, with a dynconfig naming the
//! scheduler test double (no manager), and drives it with the stock `dfget` over the daemon's
//! unix socket.

use crate::free_port;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The dragonfly-client version `scripts/dfdaemon.sh` builds.
pub const VERSION: &str = "1.5.10";

/// How long a dfdaemon gets to come up (bind its servers, pass the scheduler health check,
/// announce its host).
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn has_binaries(dir: &Path) -> bool {
    dir.join("dfdaemon").is_file() && dir.join("dfget").is_file()
}

/// The directory holding `dfdaemon` and `dfget`:
/// - `$FERRY_DFDAEMON_BIN` when set (scripts/test.sh exports what scripts/dfdaemon.sh printed);
///   it must hold the binaries;
/// - else the finished build in scripts/dfdaemon.sh's cache
///   (`${FERRY_DFDAEMON_CACHE:-/var/tmp/ferry-dfdaemon}/dragonfly-client-VERSION`, marked
///   complete by its stamp file);
/// - else, under CI (`CI=true`), what scripts/dfdaemon.sh prints after building it (about
///   28 minutes on 2 cores). Outside CI a plain `cargo test` does not start that build.
///
/// Err says why there is none.
pub fn bin_dir() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND.get_or_init(find_bin_dir).clone()
}

fn find_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("FERRY_DFDAEMON_BIN") {
        let dir = PathBuf::from(dir);
        return if has_binaries(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "FERRY_DFDAEMON_BIN={} holds no dfdaemon and dfget",
                dir.display()
            ))
        };
    }
    let cache = std::env::var_os("FERRY_DFDAEMON_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/ferry-dfdaemon"));
    let root = cache.join(format!("dragonfly-client-{VERSION}"));
    if root.join(".complete").is_file() && has_binaries(&root.join("bin")) {
        return Ok(root.join("bin"));
    }
    if !is_ci() {
        return Err(format!(
            "no stock dfdaemon: set FERRY_DFDAEMON_BIN or run scripts/dfdaemon.sh (it builds \
             dragonfly-client {VERSION} into {} once, about 28 minutes on 2 cores)",
            root.display()
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dfdaemon.sh");
    let ran = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|err| format!("running {}: {err}", script.display()))?;
    if !ran.status.success() {
        return Err(format!("{} failed: {}", script.display(), ran.status));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&ran.stdout).trim());
    if has_binaries(&dir) {
        Ok(dir)
    } else {
        Err(format!(
            "{} printed {}, which holds no dfdaemon and dfget",
            script.display(),
            dir.display()
        ))
    }
}

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The bin dir for a test, or None when the test should be skipped: outside CI without the
/// binaries (says so on stderr). Under CI a missing binary fails the test.
pub fn bin_dir_or_skip(test: &str) -> Option<PathBuf> {
    match bin_dir() {
        Ok(dir) => Some(dir),
        Err(why) if !is_ci() => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
        Err(why) => panic!("{test}: CI=true and {why}"),
    }
}

/// A stock `dfdaemon` process. Killed when dropped.
pub struct StockDfdaemon {
    child: Option<Child>,
    bin: PathBuf,
    pub name: String,
    pub dir: PathBuf,
    /// The download service's unix socket, which dfget talks to.
    pub socket: PathBuf,
    /// stdout and stderr of the daemon (it logs to the console).
    pub log: PathBuf,
    /// DfdaemonUpload gRPC port (announced to the scheduler as the host's `port`).
    pub upload_port: u16,
    /// Vortex TCP port (storage server; announced as `download_port` and in SyncPieces).
    pub tcp_port: u16,
    /// The host id it announces: `127.0.0.1-<name>`.
    pub host_id: String,
    pub storage_dir: PathBuf,
    /// Its Prometheus endpoint (`GET /metrics`).
    pub metrics_port: u16,
}

impl StockDfdaemon {
    /// Writes a config and a dynconfig under `root/name` and starts `dfdaemon`, scheduled by
    /// `scheduler` (no manager). Returns once its download socket and upload port answer.
    pub async fn start(bin: &Path, root: &Path, name: &str, scheduler: SocketAddr) -> Self {
        Self::start_with(bin, root, name, scheduler, None).await
    }

    /// As [`Self::start`], with `upload.bandwidthLimit` set to `upload_limit` bytes per second
    /// (stock default 50 GB/s). On loopback, where it cannot read a link speed, the stock
    /// dfdaemon also announces this limit as its `max_tx_bandwidth` (in bits per second), the
    /// figure children weigh parents by.
    pub async fn start_with(
        bin: &Path,
        root: &Path,
        name: &str,
        scheduler: SocketAddr,
        upload_limit: Option<u64>,
    ) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("dfdaemon.sock");
        let storage_dir = dir.join("storage");
        let (upload_port, tcp_port, quic_port, metrics_port) =
            (free_port(), free_port(), free_port(), free_port());
        let config = format!(
            r#"# Written by tests/src/stock.rs: a stock dfdaemon on loopback for Ferry's interop tests.
host:
  hostname: {name}
  ip: 127.0.0.1
server:
  pluginDir: {dir}/plugins
  cacheDir: {dir}/cache
  # The BBR limiter sheds gRPC requests when the machine's CPU is busy (a build beside the tests).
  adaptiveRateLimit: null
download:
  server:
    socketPath: {socket}
  protocol: tcp
  pieceTimeout: 30s
  collectedPieceTimeout: 30s
upload:
  server:
    ip: 127.0.0.1
    port: {upload_port}
{upload_limit}scheduler:
  announceInterval: 1s
  scheduleTimeout: 60s
dynconfig:
  refreshInterval: 30s
seedPeer:
  enable: false
storage:
  server:
    ip: 127.0.0.1
    tcpPort: {tcp_port}
    quicPort: {quic_port}
  dir: {storage}
health:
  server:
    ip: 127.0.0.1
    port: 0
metrics:
  server:
    ip: 127.0.0.1
    port: {metrics_port}
stats:
  server:
    ip: 127.0.0.1
    port: 0
proxy:
  server:
    ip: 127.0.0.1
    port: 0
"#,
            dir = dir.display(),
            socket = socket.display(),
            storage = storage_dir.display(),
            upload_limit = upload_limit
                .map(|bytes| format!("  bandwidthLimit: {bytes}\n"))
                .unwrap_or_default(),
        );
        let config_path = dir.join("dfdaemon.yaml");
        std::fs::write(&config_path, config).unwrap();
        let dynconfig_path = dir.join("dynconfig.yaml");
        std::fs::write(
            &dynconfig_path,
            format!("scheduler:\n  addrs:\n    - \"{scheduler}\"\n"),
        )
        .unwrap();
        let log = dir.join("dfdaemon.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin.join("dfdaemon"))
            .arg("--config")
            .arg(&config_path)
            .arg("--dynconfig")
            .arg(&dynconfig_path)
            .arg("--log-dir")
            .arg(dir.join("logs"))
            .arg("--log-level")
            .arg("info")
            .arg("--console")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {}: {err}", bin.join("dfdaemon").display()));
        let mut daemon = StockDfdaemon {
            child: Some(child),
            bin: bin.to_owned(),
            name: name.to_owned(),
            dir,
            socket,
            log,
            upload_port,
            tcp_port,
            host_id: format!("127.0.0.1-{name}"),
            storage_dir,
            metrics_port,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "dfdaemon {name} exited at start-up ({status}):\n{}",
                    daemon.log_tail(60)
                );
            }
            let upload_up = tokio::net::TcpStream::connect(("127.0.0.1", daemon.upload_port))
                .await
                .is_ok();
            let download_up = tokio::net::UnixStream::connect(&daemon.socket)
                .await
                .is_ok();
            let vortex_up = tokio::net::TcpStream::connect(("127.0.0.1", daemon.tcp_port))
                .await
                .is_ok();
            if upload_up && download_up && vortex_up {
                return daemon;
            }
            assert!(
                Instant::now() < deadline,
                "dfdaemon {name} did not come up within {START_TIMEOUT:?} (upload {upload_up}, \
                 download socket {download_up}, vortex {vortex_up}):\n{}",
                daemon.log_tail(60)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` lines of the daemon's log, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        format!(
            "--- last {} lines of {} ---\n{}",
            all.len() - from,
            self.log.display(),
            all[from..].join("\n")
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs stock `dfget URL -O output` against this daemon (bounded by `limit`, which is
    /// also passed as dfget's own `--timeout`). Panics with dfget's output and the daemon's log
    /// tail unless it succeeds.
    pub async fn dfget(&self, url: &str, output: &Path, limit: Duration) {
        let mut command = tokio::process::Command::new(self.bin.join("dfget"));
        command
            .arg(url)
            .arg("--output")
            .arg(output)
            .arg("--endpoint")
            .arg(&self.socket)
            .arg("--timeout")
            .arg(format!("{}s", limit.as_secs()))
            .arg("--no-progress")
            .arg("--console")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let ran = tokio::time::timeout(limit + Duration::from_secs(10), command.output())
            .await
            .unwrap_or_else(|_| panic!("dfget {url} ran over {limit:?}\n{}", self.log_tail(80)))
            .expect("running dfget");
        assert!(
            ran.status.success(),
            "dfget {url} failed ({}):\n{}\n{}\n{}",
            ran.status,
            String::from_utf8_lossy(&ran.stdout),
            String::from_utf8_lossy(&ran.stderr),
            self.log_tail(80)
        );
    }

    /// Its `/metrics` exposition.
    pub async fn scrape(&self) -> String {
        let (status, body) =
            crate::http_get(&format!("127.0.0.1:{}", self.metrics_port), "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// One series of its `/metrics` (`name` or `name{labels}`, as the exposition writes it);
    /// None when absent.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        self.scrape().await.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?;
            let value = rest.strip_prefix("{}").unwrap_or(rest).strip_prefix(' ')?;
            value.trim().parse().ok()
        })
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for StockDfdaemon {
    fn drop(&mut self) {
        self.kill();
        // The test's scratch dir goes with the test: `FERRY_STOCK_LOG_DIR=DIR` keeps the log.
        if let Some(dir) = std::env::var_os("FERRY_STOCK_LOG_DIR") {
            let dir = PathBuf::from(dir);
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::copy(&self.log, dir.join(format!("{}.log", self.name)));
        }
    }
}
