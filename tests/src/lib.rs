//! Harness for the end-to-end tests: starts real `ferry serve` processes on loopback and
//! talks to them over their real control sockets.

pub use ferry_engine::cli::{ClientAuth, ControlClient};
pub mod dragonfly;
pub mod registry;
pub mod stock;

use ferry_engine::proto::{self, transfer_event::Event};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1024 * 1024;

/// The `ferry` binary built next to this test executable (`target/<profile>/ferry`), or
/// `$FERRY_BIN`.
pub fn ferry_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("FERRY_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("ferry");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

/// A free loopback TCP port: bound, then released for a child process to take (another
/// process could take it in between; the tests accept that small window).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `size` pseudo-random bytes (a fixed function of `seed`) to `path`.
pub fn random_file(path: &Path, size: u64, seed: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let take = left.min(block.len() as u64) as usize;
        file.write_all(&block[..take]).unwrap();
        left -= take as u64;
    }
    file.flush().unwrap();
}

pub fn same_contents(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

static STARTS: AtomicUsize = AtomicUsize::new(0);

/// How to start a daemon.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// The buffer pool, MiB [default: 128].
    pub pool_mib: Option<u64>,
    /// Reuse this data dir (a restart); otherwise a fresh one under the daemon's dir.
    pub data_dir: Option<PathBuf>,
    /// Data-plane listen address [default: 127.0.0.1:0].
    pub listen: Option<String>,
    pub extra_args: Vec<String>,
    /// Directories the daemon may import from [default: the test's root directory, where
    /// the tests write their source files].
    pub import_dirs: Option<Vec<PathBuf>>,
    /// Directories transfers may place outputs in [default: the test's root directory].
    pub output_dirs: Option<Vec<PathBuf>>,
    /// Control endpoint [default: a unix socket in the daemon's dir]; with `tcp://`, the
    /// daemon's `[control_tcp]` must come through `--config` in `extra_args`.
    pub control: Option<String>,
    /// What the harness presents to a `tcp://` control endpoint.
    pub auth: ClientAuth,
    /// The daemon's umask, e.g. "0077" as the systemd unit sets [default: the test's].
    pub umask: Option<String>,
    /// RLIMIT_NOFILE of the daemon (through `prlimit`, which execs it: the pid is the
    /// daemon's); unset: inherited.
    pub max_open_files: Option<u64>,
    /// Extra environment for the daemon (e.g. `FERRY_TEST_POISON_POOL=1`).
    pub env: Vec<(String, String)>,
}

/// A `ferry serve` process. Killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub name: String,
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    pub data_address: String,
    pub auth: ClientAuth,
}

impl Daemon {
    /// Starts a daemon under `root/name` and waits until its control API answers.
    pub async fn start(root: &Path, name: &str, options: DaemonOptions) -> Daemon {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let data_dir = options.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        let control = options
            .control
            .clone()
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join("control.sock"));
        // One log per start, so a restarted daemon's earlier log stays readable.
        let log = dir.join(format!(
            "daemon-{}.log",
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        let import_args: Vec<std::ffi::OsString> = options
            .import_dirs
            .clone()
            .unwrap_or_else(|| vec![root.to_owned()])
            .into_iter()
            .flat_map(|dir| ["--import-dir".into(), dir.into_os_string()])
            .chain(
                options
                    .output_dirs
                    .clone()
                    .unwrap_or_else(|| vec![root.to_owned()])
                    .into_iter()
                    .flat_map(|dir| ["--output-dir".into(), dir.into_os_string()]),
            )
            .collect();
        // A descriptor limit (prlimit) and a umask (a shell) are set by programs that then
        // exec the daemon, so its pid is the child's (the tests stay free of unsafe pre_exec).
        let mut program: Vec<std::ffi::OsString> = Vec::new();
        if let Some(limit) = options.max_open_files {
            program.extend([
                "prlimit".into(),
                format!("--nofile={limit}:{limit}").into(),
                "--".into(),
            ]);
        }
        if let Some(umask) = &options.umask {
            program.extend([
                "sh".into(),
                "-c".into(),
                "umask \"$0\" && exec \"$@\"".into(),
                umask.into(),
            ]);
        }
        program.push(ferry_bin().into_os_string());
        let mut command = Command::new(&program[0]);
        command.args(&program[1..]);
        let child = command
            .arg("--control")
            .arg(&control)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--listen",
                options.listen.as_deref().unwrap_or("127.0.0.1:0"),
                "--pool-mib",
                &options.pool_mib.unwrap_or(128).to_string(),
            ])
            .args(import_args)
            .args(&options.extra_args)
            .env("FERRY_LOG", "info,ferry_fallback_tcp=debug")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning ferry serve");
        let mut daemon = Daemon {
            child: Some(child),
            name: name.into(),
            dir,
            data_dir,
            control,
            log,
            data_address: String::new(),
            auth: options.auth.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon {name} exited with {status} during start-up:\n{}",
                    daemon.log_text()
                );
            }
            if let Ok(mut client) =
                ferry_engine::cli::connect_with(daemon.control.to_str().unwrap(), &daemon.auth)
                    .await
            {
                if let Ok(caps) = client
                    .get_capabilities(proto::GetCapabilitiesRequest {})
                    .await
                {
                    daemon.data_address = caps.into_inner().data_address;
                    return daemon;
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon {name} did not come up:\n{}",
                daemon.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn client(&self) -> ControlClient {
        ferry_engine::cli::connect_with(self.control.to_str().unwrap(), &self.auth)
            .await
            .expect("control socket")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, ...) through the `kill` command (keeps the tests
    /// free of unsafe code).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// Waits up to `within` for the process to exit; its status, or None if still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `ferry --json pull ARGS` against this daemon and returns what it printed; a
    /// failed pull panics with its stderr, this daemon's log and `context()`.
    pub fn pull_json(&self, args: &[&str], context: impl Fn() -> String) -> serde_json::Value {
        let ran = Command::new(ferry_bin())
            .args([
                "--control",
                self.control.to_str().unwrap(),
                "--json",
                "pull",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            ran.status.success(),
            "ferry pull {args:?} failed:\n{}\n{}\n{}",
            String::from_utf8_lossy(&ran.stderr),
            self.log_text(),
            context()
        );
        serde_json::from_slice(&ran.stdout).unwrap()
    }

    /// Imports a file and returns the task.
    pub async fn import(&self, path: &Path) -> proto::Task {
        self.import_as(path, "").await
    }

    /// Imports a file cut into pieces of `piece_length` bytes and returns the task.
    pub async fn import_in_pieces(&self, path: &Path, piece_length: u64) -> proto::Task {
        self.client()
            .await
            .import_task(proto::ImportTaskRequest {
                path: path.display().to_string(),
                piece_length,
                ..Default::default()
            })
            .await
            .expect("import")
            .into_inner()
    }

    /// Imports a file under `url` (the task id is Dragonfly's for it; a Dragonfly peer
    /// announces it as a candidate parent) and returns the task.
    pub async fn import_as(&self, path: &Path, url: &str) -> proto::Task {
        self.client()
            .await
            .import_task(proto::ImportTaskRequest {
                path: path.display().to_string(),
                url: url.into(),
                ..Default::default()
            })
            .await
            .expect("import")
            .into_inner()
    }

    pub async fn stat(&self, task_id: &str) -> proto::Task {
        self.client()
            .await
            .stat_task(proto::StatTaskRequest {
                task_id: task_id.into(),
            })
            .await
            .expect("stat")
            .into_inner()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a whole transfer stream said.
#[derive(Debug, Default)]
pub struct Transfer {
    pub started: Option<proto::TransferStarted>,
    pub pieces: Vec<proto::PieceResult>,
    pub summary: Option<proto::TransferSummary>,
}

/// Pulls `task_id` from `sources` into `output` on `receiver`, waiting for the transfer to
/// end; panics if it fails.
pub async fn pull(receiver: &Daemon, task_id: &str, sources: &[&str], output: &Path) -> Transfer {
    transfer(
        &mut receiver.client().await,
        pull_request(task_id, sources, output),
        |_| {},
    )
    .await
    .unwrap()
}

/// A transfer request for every piece of `task_id` into `output`.
pub fn pull_request(
    task_id: &str,
    sources: &[&str],
    output: &Path,
) -> proto::TransferPiecesRequest {
    proto::TransferPiecesRequest {
        task_id: task_id.into(),
        sources: sources.iter().map(|s| s.to_string()).collect(),
        output_path: output.display().to_string(),
        ..Default::default()
    }
}

/// Starts `request` on `daemon` in a task of its own; the receiver resolves when its first
/// piece is in (so a test can act while the rest are in flight).
pub async fn spawn_transfer_noting_first_piece(
    daemon: &Daemon,
    request: proto::TransferPiecesRequest,
) -> (
    tokio::task::JoinHandle<Result<Transfer, tonic::Status>>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (first_piece, got_first_piece) = tokio::sync::oneshot::channel();
    let mut client = daemon.client().await;
    let running = tokio::spawn(async move {
        let mut first_piece = Some(first_piece);
        transfer(&mut client, request, |_| {
            if let Some(tx) = first_piece.take() {
                let _ = tx.send(());
            }
        })
        .await
    });
    (running, got_first_piece)
}

/// Runs a transfer to the end; `on_piece` sees each piece result as it arrives.
pub async fn transfer(
    client: &mut ControlClient,
    request: proto::TransferPiecesRequest,
    mut on_piece: impl FnMut(&proto::PieceResult),
) -> Result<Transfer, tonic::Status> {
    let mut stream = client.transfer_pieces(request).await?.into_inner();
    let mut transfer = Transfer::default();
    while let Some(event) = stream.message().await? {
        match event.event.expect("event set") {
            Event::Started(started) => transfer.started = Some(started),
            Event::Piece(piece) => {
                on_piece(&piece);
                transfer.pieces.push(piece);
            }
            Event::Summary(summary) => transfer.summary = Some(summary),
        }
    }
    Ok(transfer)
}

/// A scratch directory for one test, removed afterwards (kept if `FERRY_KEEP_TEST_DIRS` is set).
pub fn scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("ferry-{name}-"))
        .tempdir()
        .unwrap();
    if std::env::var_os("FERRY_KEEP_TEST_DIRS").is_some() {
        eprintln!("{name}: {}", dir.path().display());
    }
    dir
}

impl Daemon {
    /// The address of the metrics endpoint, as the daemon logged it when it bound it (so a
    /// test can ask for port 0). Text and JSON logs both carry it as `metrics_address`.
    pub fn metrics_address(&self) -> String {
        let log = self.log_text();
        let at = log
            .find("metrics_address")
            .unwrap_or_else(|| panic!("{} logged no metrics_address:\n{log}", self.name));
        let rest = log[at + "metrics_address".len()..].trim_start_matches(['=', '"', ':']);
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || ".:[]".contains(c)))
            .unwrap_or(rest.len());
        rest[..end].to_owned()
    }

    /// `GET /metrics` over HTTP; panics unless the answer is 200.
    pub async fn scrape(&self) -> String {
        let (status, body) = http_get(&self.metrics_address(), "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// One HTTP/1.1 GET with `Connection: close`: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let response = http_exchange(addr, request.as_bytes()).await;
    let text = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// Writes `request` to `addr` and reads until the server closes (at most 30 s).
pub async fn http_exchange(addr: &str, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("HTTP exchange took over 30 s")
        .unwrap_or_else(|err| panic!("HTTP exchange with {addr}: {err}"))
}

/// The value of one series in a metrics exposition, e.g.
/// `ferry_transport_bytes_total{transport="tcp",direction="in"}`; None if it is absent.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.parse().expect("a sample value"))
    })
}

/// The loopback HTTP origin of the back-to-source tests: `tests/origin_server.py` (Python 3,
/// stdlib only) serving the files under `root`, with the fault modes its docstring lists.
/// Killed when dropped.
pub struct OriginServer {
    child: Child,
    pub port: u16,
}

/// Where the origin script lives: next to this crate's manifest, so a clean checkout finds it.
pub fn origin_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("origin_server.py")
}

impl OriginServer {
    pub fn start(root: &Path) -> OriginServer {
        use std::io::BufRead;
        let mut child =
            Command::new(std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into()))
                .arg(origin_script())
                .arg("--root")
                .arg(root)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("python3 must be installed to run the origin tests");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("reading the origin's port");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the origin printed {line:?}, not its port"));
        OriginServer { child, port }
    }

    /// `http://127.0.0.1:PORT/<path_and_query>`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path_and_query.trim_start_matches('/')
        )
    }

    /// Per URL (path and query): `requests`, `ranged` and `status` counts.
    pub async fn stats(&self) -> serde_json::Value {
        let (status, body) = http_get(&format!("127.0.0.1:{}", self.port), "/_stats").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("stats JSON")
    }
}

impl Drop for OriginServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A transfer request for `url` alone (no peers), task id left to the daemon.
pub fn url_request(url: &str, output: Option<&Path>) -> proto::TransferPiecesRequest {
    proto::TransferPiecesRequest {
        url: url.into(),
        output_path: output.map(|p| p.display().to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

/// A process's resident set size (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}
