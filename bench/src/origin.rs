//! `ferry-bench origin`: back to source from a loopback HTTP origin (`tests/origin_server.py`,
//! which sends with sendfile from the page cache) into Ferry's store, against `curl -o` and,
//! when installed, `aria2c -x N` of the same URL, taking turns over `rounds`; medians are
//! compared.

use crate::report::{Measured, Report, Row, Stopwatch};
use crate::rig::MIB;
use anyhow::{bail, Context};
use ferry_engine::io::{BufferPool, IoChoice, IoEngine};
use ferry_engine::origin::{OriginRequest, OriginSettings};
use ferry_engine::store::Store;
use ferry_engine::transfer::{Engine, TransferRequest, TransferSettings, TransportChoice};
use ferry_engine::transport::TcpTransport;
use ferry_fallback_tcp::ClientConfig;
use serde_json::json;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct OriginArgs {
    /// Size of the file served, MiB.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Range requests in flight for Ferry, and aria2c's -x/-s.
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Rounds of Ferry, curl and aria2c taking turns.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The origin script [default: tests/origin_server.py of this checkout].
    #[arg(long)]
    script: Option<PathBuf>,
    /// The origin server: nginx (sendfile, 2 workers; Debian's package), or the Python test
    /// origin (one thread per connection, the GIL) [default: nginx when installed].
    #[arg(long, value_enum)]
    origin: Option<OriginServer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OriginServer {
    Nginx,
    Python,
}

struct Origin(Child, u16);

/// nginx on a free loopback port serving `root`, configured in `dir` (no access log,
/// sendfile, two workers: the machine's cores).
fn start_nginx(dir: &Path, root: &Path) -> anyhow::Result<Origin> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let config = prefix.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\nuser root;\npid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000;\n\
             client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n  fastcgi_temp_path {prefix}/fastcgi;\n\
             uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n\
             server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            prefix = prefix.display(),
            root = root.display(),
        ),
    )?;
    let child = Command::new(nginx_binary().context("nginx is not installed")?)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "nginx did not listen on 127.0.0.1:{port} within 10 s: {}",
                std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Origin(child, port))
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Drop for Origin {
    fn drop(&mut self) {
        // SIGTERM: nginx's master stops its workers too (a SIGKILL would leave them serving).
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn start_origin(script: &Path, root: &Path) -> anyhow::Result<Origin> {
    let mut child = Command::new("python3")
        .arg(script)
        .arg("--root")
        .arg(root)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("starting python3 (the origin)")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("the origin printed {line:?}"))?;
    Ok(Origin(child, port))
}

/// Runs a download command to the end, timed by wall clock (its CPU is not ours to see).
fn timed(command: &mut Command, output: &Path, size: u64) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let status = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    let got = std::fs::metadata(output)?.len();
    std::fs::remove_file(output)?;
    if got != size {
        bail!("{command:?} wrote {got} bytes, not {size}");
    }
    Ok(Measured {
        bytes: size,
        seconds,
        cpu_seconds: None,
    })
}

pub async fn bench(dir: &Path, args: &OriginArgs) -> anyhow::Result<Report> {
    let size = args.size_mib * MIB;
    let connections = args.connections.clamp(1, 64);
    let server = args.origin.unwrap_or(if nginx_binary().is_some() {
        OriginServer::Nginx
    } else {
        OriginServer::Python
    });
    let server_name = match server {
        OriginServer::Nginx => "nginx (sendfile, 2 workers)",
        OriginServer::Python => "python3 http.server + sendfile",
    };
    println!(
        "== origin: {} MiB from a loopback HTTP origin ({server_name}), {connections} connections, {} rounds",
        args.size_mib, args.rounds
    );
    let mut report = Report::new(
        "origin",
        json!({ "size_bytes": size, "connections": connections, "rounds": args.rounds, "origin": server_name }),
    );
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    let file = www.join("model.bin");
    {
        use std::io::Read;
        let mut random = std::fs::File::open("/dev/urandom")?.take(size);
        std::io::copy(&mut random, &mut std::fs::File::create(&file)?)?;
    }
    let script = args
        .script
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/origin_server.py"));
    let origin = match server {
        OriginServer::Nginx => start_nginx(dir, &www)?,
        OriginServer::Python => start_origin(&script, &www)?,
    };
    let url = format!("http://127.0.0.1:{}/model.bin", origin.1);
    // Warm the origin's page cache once, as every round reads it from there.
    std::fs::read(&file)?;

    let pool = BufferPool::new(4 * MIB as usize, (4 * connections as usize + 8).max(16))?;
    let io = IoEngine::start(&pool, IoChoice::Auto, 1)?;
    let store = Arc::new(Store::open(&dir.join("store"), pool, io, true)?);
    let engine = Arc::new(
        Engine::new(
            Arc::clone(&store),
            Arc::new(TcpTransport::new(ClientConfig::default())),
            None,
            TransferSettings {
                streams_per_source: 1,
                piece_timeout: Duration::from_secs(120),
                max_attempts: 3,
                source_failure_limit: 3,
                max_task_bytes: ferry_engine::config::DEFAULT_MAX_TASK_BYTES,
            },
            Vec::new(),
        )
        .with_origin_settings(OriginSettings::default()),
    );
    let ferry = |conns: u32| {
        let engine = Arc::clone(&engine);
        let url = url.clone();
        async move {
            let prepared = engine
                .prepare(TransferRequest {
                    task_id: String::new(),
                    content_length: 0,
                    piece_length: 0,
                    pieces: Vec::new(),
                    sources: Vec::new(),
                    output: None,
                    streams_per_source: 0,
                    transport: TransportChoice::Tcp,
                    digest: None,
                    origin: Some(OriginRequest {
                        url,
                        ..Default::default()
                    }),
                    origin_connections: conns,
                    source_weights: Vec::new(),
                })
                .await?;
            let (events, mut drain) = tokio::sync::mpsc::channel(64);
            let drained = tokio::spawn(async move { while drain.recv().await.is_some() {} });
            let watch = Stopwatch::start();
            let summary = engine.run(prepared, events).await?;
            let measured = watch.stop(summary.back_to_source_bytes);
            drained.await?;
            if summary.back_to_source_bytes != size {
                bail!(
                    "ferry fetched {} bytes, not {size}",
                    summary.back_to_source_bytes
                );
            }
            engine.store.delete(&summary.task_id)?;
            anyhow::Ok(measured)
        }
    };
    let aria2 = crate::baseline::installed("aria2c");
    if !aria2 {
        report.note("aria2c is not installed: no aria2c -x row (Debian: apt-get install aria2)");
    }
    let (mut ferry_n, mut ferry_1, mut curl, mut aria) = (vec![], vec![], vec![], vec![]);
    let out = dir.join("download.bin");
    for round in 0..args.rounds.max(1) {
        println!("-- round {} of {}", round + 1, args.rounds.max(1));
        ferry_n.push(Row::new(
            "origin.ferry",
            &format!("ferry back to source, {connections} connections, into store"),
            "ferry",
            "http",
            ferry(connections).await?,
        ));
        ferry_1.push(Row::new(
            "origin.ferry_1",
            "ferry back to source, 1 connection, into store",
            "ferry",
            "http",
            ferry(1).await?,
        ));
        curl.push(Row::new(
            "baseline.curl",
            "curl -o (1 connection, page cache, no fsync)",
            "curl",
            "http",
            timed(
                Command::new("curl")
                    .args(["-s", "-f", "-o"])
                    .arg(&out)
                    .arg(&url),
                &out,
                size,
            )?,
        ));
        if aria2 {
            let name = out.file_name().unwrap().to_str().unwrap().to_owned();
            aria.push(Row::new(
                "baseline.aria2c",
                &format!("aria2c -x {connections} -s {connections} (page cache)"),
                "aria2c",
                "http",
                timed(
                    Command::new("aria2c")
                        .args(["-q", "--allow-overwrite=true", "--file-allocation=none"])
                        .arg(format!("-x{}", connections.min(16)))
                        .arg(format!("-s{}", connections.min(16)))
                        .arg("-k1M")
                        .arg("-d")
                        .arg(dir)
                        .arg("-o")
                        .arg(&name)
                        .arg(&url),
                    &out,
                    size,
                )?,
            ));
        }
    }
    let curl = super::median_row(curl);
    let aria = super::median_row(aria);
    // The goal compares tools at the same number of connections: Ferry at N against
    // aria2c -x N (curl when aria2c is missing), Ferry at 1 against curl.
    let same_connections = aria.as_ref().or(curl.as_ref());
    let described = |mut row: Row, conns: u32| {
        row.parameters["connections"] = json!(conns);
        row.parameters["piece_length"] = json!(4 * MIB);
        row.parameters["durable"] = json!(true);
        row.parameters["sha256_verified"] = json!(true);
        row
    };
    if let Some(row) = super::median_row(ferry_n) {
        report
            .rows
            .push(described(row, connections).against(same_connections, Some(1.0)));
    }
    if let Some(row) = super::median_row(ferry_1) {
        report
            .rows
            .push(described(row, 1).against(curl.as_ref(), Some(1.0)));
    }
    report.rows.extend(curl.clone());
    report.rows.extend(aria.clone());
    report.note("ferry rows: Range requests into the store with O_DIRECT writes, fdatasync and journal per piece, and a SHA-256 of the whole content before it counts; curl and aria2c write into the page cache with no sync and verify nothing");
    report.note(match server {
        OriginServer::Nginx => {
            "the origin is nginx: sendfile from the page cache, 2 worker processes"
        }
        OriginServer::Python => {
            "the origin is Python: it sends with sendfile, one thread per connection"
        }
    });
    drop(origin);
    Ok(report)
}
