//! `ferry-bench`: Ferry's data paths measured next to the standard tool for each, in the same
//! run, with the ratio printed. Only same-run ratios mean anything across machines.
#![forbid(unsafe_code)]

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ferry_engine::geometry::{self, Geometry};
use ferry_engine::import::{import_file, ImportOptions};
use ferry_engine::io::{BufferPool, IoChoice, IoEngine, TaskFile, WriteRequest};
use ferry_engine::store::{Store, StoreProvider};
use ferry_engine::transfer::{Engine, TransferRequest, TransferSettings, TransportChoice};
use ferry_engine::transport::{PieceTransport, TcpTransport};
use ferry_fallback_tcp::{ClientConfig, Server, ServerConfig};
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-bench",
    version,
    about = "Ferry's benchmarks, each beside its standard tool (iperf3, fio) in the same run"
)]
struct Cli {
    /// Write the results as JSON here [default: bench/out/<benchmark>.json].
    #[arg(long, global = true)]
    json_out: Option<PathBuf>,
    /// Scratch directory (its filesystem is the one measured) [default: a temp dir under /var/tmp].
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The TCP piece path on loopback, into memory and into the store, beside iperf3 with the
    /// same number of streams.
    Tcp(TcpArgs),
    /// The store's writes (io_uring, O_DIRECT) beside fio with the same block size and depth.
    Disk(DiskArgs),
    /// The RDMA piece path (into memory and into the store) beside perftest's ib_write_bw on
    /// the same devices with the same message size. Locally it uses two devices that reach
    /// each other (inside `scripts/rxe-vm.sh`: rxe0 and rxe1); across two hosts, run
    /// `--serve` on one and `--connect` on the other.
    Rdma(RdmaArgs),
}

#[derive(Debug, Args)]
struct RdmaArgs {
    /// Size of the task served, MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Queue pairs (pieces in flight) towards the source.
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// Bytes per RDMA WRITE, KiB (also ib_write_bw's message size).
    #[arg(long, default_value_t = 1024)]
    chunk_kib: u32,
    /// Pieces in flight per queue pair.
    #[arg(long, default_value_t = 2)]
    window: usize,
    /// Queue pairs to the source (ib_write_bw gets --streams queue pairs: the same number of
    /// messages in flight).
    #[arg(long, default_value_t = 2)]
    queue_pairs: usize,
    /// Times the whole task is fetched for the into-memory figure.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Serving side's device and address [default: $FERRY_RXE_DEV0, $FERRY_RXE_ADDR0].
    #[arg(long)]
    server_device: Option<String>,
    #[arg(long)]
    server_addr: Option<String>,
    /// Receiving side's device [default: $FERRY_RXE_DEV1].
    #[arg(long)]
    client_device: Option<String>,
    /// Two hosts: serve a generated task on --server-addr until interrupted.
    #[arg(long, conflicts_with = "connect")]
    serve: bool,
    /// Two hosts: fetch task TASK_ID from the Ferry data port at this address (into memory).
    #[arg(long, requires = "task")]
    connect: Option<String>,
    #[arg(long)]
    task: Option<String>,
}

#[derive(Debug, Args)]
struct TcpArgs {
    /// Size of the task served, MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Parallel streams (pieces in flight), for Ferry and for iperf3 -P.
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// Piece length, MiB (4 to 64).
    #[arg(long, default_value_t = 4)]
    piece_mib: u64,
    /// Times the whole task is fetched for the into-memory figure.
    #[arg(long, default_value_t = 4)]
    rounds: u32,
    /// Seconds iperf3 runs.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
}

#[derive(Debug, Args)]
struct DiskArgs {
    /// Bytes written per run, MiB.
    #[arg(long, default_value_t = 2048)]
    size_mib: u64,
    /// Block (piece) size, MiB.
    #[arg(long, default_value_t = 4)]
    block_mib: u64,
    /// Writes in flight.
    #[arg(long, default_value_t = 8)]
    depth: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let scratch = match &cli.dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("ferry-bench-")
            .tempdir_in(dir)?,
        None => tempfile::Builder::new()
            .prefix("ferry-bench-")
            .tempdir_in("/var/tmp")?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (name, results) = match &cli.command {
        Bench::Tcp(args) => ("tcp", runtime.block_on(bench_tcp(scratch.path(), args))?),
        Bench::Disk(args) => ("disk", runtime.block_on(bench_disk(scratch.path(), args))?),
        Bench::Rdma(args) => ("rdma", runtime.block_on(bench_rdma(scratch.path(), args))?),
    };
    let out = cli
        .json_out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench/out/{name}.json")));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("results written to {}", out.display());
    Ok(())
}

/// Process CPU time (user + system) so far.
fn cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(usage.user_time()) + tv(usage.system_time())
}

struct Measured {
    bytes: u64,
    elapsed: Duration,
    cpu: Duration,
}

impl Measured {
    fn bits_per_second(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64()
    }
    fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }
    fn cpu_seconds_per_gb(&self) -> f64 {
        self.cpu.as_secs_f64() / (self.bytes as f64 / 1e9)
    }
    fn json(&self) -> Value {
        json!({
            "bytes": self.bytes,
            "seconds": self.elapsed.as_secs_f64(),
            "bits_per_second": self.bits_per_second(),
            "bytes_per_second": self.bytes_per_second(),
            "cpu_seconds_per_gb": self.cpu_seconds_per_gb(),
        })
    }
}

fn measure_start() -> (Instant, Duration) {
    (Instant::now(), cpu_time())
}

fn measure_end(start: (Instant, Duration), bytes: u64) -> Measured {
    Measured {
        bytes,
        elapsed: start.0.elapsed(),
        cpu: cpu_time() - start.1,
    }
}

fn random_file(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut source = std::fs::File::open("/dev/urandom")?.take(size);
    let mut target = std::fs::File::create(path)?;
    std::io::copy(&mut source, &mut target)?;
    Ok(())
}

fn open_store(dir: &Path, pool_mib: u64) -> anyhow::Result<Arc<Store>> {
    let pool = BufferPool::new((4 * MIB) as usize, (pool_mib / 4) as usize)?;
    let io = IoEngine::start(&pool, IoChoice::Auto, 1)?;
    Ok(Arc::new(Store::open(dir, pool, io, true)?))
}

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

async fn bench_tcp(dir: &Path, args: &TcpArgs) -> anyhow::Result<Value> {
    let piece_length = geometry::validate_piece_length(args.piece_mib * MIB)?;
    let pool_mib = (u64::from(args.streams) * args.piece_mib * 2).max(64);
    println!(
        "== tcp: {} MiB task, {} MiB pieces, {} streams on loopback",
        args.size_mib, args.piece_mib, args.streams
    );
    let seed_store = open_store(&dir.join("seed"), pool_mib)?;
    let source = dir.join("source.bin");
    random_file(&source, args.size_mib * MIB)?;
    let task = import_file(
        &seed_store,
        &source,
        &ImportOptions {
            piece_length,
            ..Default::default()
        },
    )
    .await?;
    std::fs::remove_file(&source)?;
    // Serve from the page cache, as iperf3 sends from memory.
    std::io::copy(
        &mut std::fs::File::open(task.content_path())?,
        &mut std::io::sink(),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let provider = Arc::new(StoreProvider {
        store: Arc::clone(&seed_store),
        host_id: "bench".into(),
        rdma: None,
    });
    let server = tokio::spawn(Server::new(listener, provider, ServerConfig::default()).run());
    let geometry = task.geometry();

    // Into memory: verified pieces into pool buffers, nothing written.
    let client_pool = BufferPool::new((4 * MIB) as usize, (pool_mib / 4) as usize)?;
    let tcp: Arc<dyn PieceTransport> = Arc::new(TcpTransport::new(ClientConfig::default()));
    let start = measure_start();
    let bytes = fetch_into_memory(
        tcp,
        client_pool,
        addr,
        task.id(),
        geometry,
        args.rounds,
        args.streams,
    )
    .await?;
    let memory = measure_end(start, bytes);

    // Into the store: the daemon's whole transfer path (verify, io_uring write, journal).
    let receiver = open_store(&dir.join("receiver"), pool_mib)?;
    let store = transfer_into_store(
        &receiver,
        None,
        task.id(),
        geometry,
        addr,
        args.streams,
        TransportChoice::Tcp,
    )
    .await?;
    server.abort();

    // iperf3 twice: copying from user memory (its default) and with -Z (sendfile, zero-copy
    // like Ferry's sender); ratios are taken against the faster of the two.
    let iperf_runs = if tool("iperf3") {
        Some((
            run_iperf3(args.streams, args.seconds, false)?,
            run_iperf3(args.streams, args.seconds, true)?,
        ))
    } else {
        None
    };
    let iperf = iperf_runs.map(|(copy, zero)| if zero.0 > copy.0 { zero } else { copy });
    println!();
    println!(
        "{:<34} {:>12} {:>14} {:>10}",
        "path", "Gbit/s", "CPU s/GB", "vs best iperf3"
    );
    let ratio = |m: &Measured| iperf.as_ref().map(|i| m.bits_per_second() / i.0);
    let row = |name: &str, m: &Measured| {
        let r = ratio(m)
            .map(|r| format!("{r:.2}x"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{name:<34} {:>12.2} {:>14.3} {r:>10}",
            m.bits_per_second() / 1e9,
            m.cpu_seconds_per_gb()
        );
    };
    row("ferry tcp into memory", &memory);
    row("ferry tcp into store", &store);
    match &iperf_runs {
        Some((copy, zero)) => {
            let baseline = iperf.expect("set with the runs").0;
            for (name, run) in [
                (format!("iperf3 -P {}", args.streams), copy),
                (format!("iperf3 -P {} -Z", args.streams), zero),
            ] {
                println!(
                    "{name:<34} {:>12.2} {:>14.3} {:>9.2}x",
                    run.0 / 1e9,
                    run.1,
                    run.0 / baseline
                );
            }
        }
        None => println!("iperf3 is not installed: EXTRA_PACKAGES=iperf3 ./scripts/setup.sh"),
    }
    Ok(json!({
        "benchmark": "tcp",
        "parameters": { "size_bytes": args.size_mib * MIB, "piece_length": piece_length, "streams": args.streams, "rounds": args.rounds },
        "ferry": { "into_memory": memory.json(), "into_store": store.json(), "store_io_backend": receiver.io_backend() },
        "baseline": iperf_runs.map(|(copy, zero)| json!({
            "tool": "iperf3",
            "streams": args.streams,
            "copy": { "bits_per_second": copy.0, "cpu_seconds_per_gb": copy.1 },
            "zerocopy": { "bits_per_second": zero.0, "cpu_seconds_per_gb": zero.1 },
        })),
        "ratios": { "into_memory_vs_iperf3": ratio(&memory), "into_store_vs_iperf3": ratio(&store) },
    }))
}

/// Runs iperf3 on loopback (`-Z`: sendfile); returns (bits per second received, CPU seconds
/// per GB of both ends).
fn run_iperf3(streams: u32, seconds: u32, zerocopy: bool) -> anyhow::Result<(f64, f64)> {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let mut client = Command::new("iperf3");
    client.args([
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-P",
        &streams.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ]);
    if zerocopy {
        client.arg("-Z");
    }
    let output = client.output().context("running iperf3 -c")?;
    let _ = server.wait();
    let report: Value =
        serde_json::from_slice(&output.stdout).context("parsing iperf3 -J output")?;
    let end = &report["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no throughput")?;
    let bytes = end["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let secs = end["sum_received"]["seconds"]
        .as_f64()
        .unwrap_or(f64::from(seconds));
    let cpu = &end["cpu_utilization_percent"];
    let cpu_seconds = (cpu["host_total"].as_f64().unwrap_or(0.0)
        + cpu["remote_total"].as_f64().unwrap_or(0.0))
        / 100.0
        * secs;
    Ok((bps, cpu_seconds / (bytes / 1e9)))
}

async fn bench_disk(dir: &Path, args: &DiskArgs) -> anyhow::Result<Value> {
    let block = args.block_mib * MIB;
    let size = args.size_mib * MIB / block * block;
    println!(
        "== disk: {} MiB in {} MiB blocks, {} in flight, under {}",
        size / MIB,
        args.block_mib,
        args.depth,
        dir.display()
    );
    let pool = BufferPool::new(block as usize, args.depth)?;
    let io = IoEngine::start(&pool, IoChoice::Auto, 1)?;

    // Raw engine writes: what fio does (O_DIRECT, no per-write sync, one sync at the end).
    let path = dir.join("engine.dat");
    let file = Arc::new(TaskFile::open(&path, true)?);
    let start = measure_start();
    write_blocks(&io, &pool, &file, size, block, args.depth, false).await?;
    file.file().sync_all()?;
    let raw = measure_end(start, size);
    io.release_file(&file);
    drop(file);
    std::fs::remove_file(&path)?;

    // The store's piece path: each piece durable (write + fdatasync) and journaled.
    let store = Arc::new(Store::open(
        &dir.join("store"),
        Arc::clone(&pool),
        io,
        true,
    )?);
    let task = store.create_or_get(&"b".repeat(64), Geometry::new(size, block)?)?;
    let start = measure_start();
    let mut running = tokio::task::JoinSet::new();
    for piece in task.geometry().pieces() {
        if running.len() >= args.depth {
            running.join_next().await.expect("non-empty")??;
        }
        let mut buf = pool.acquire(piece.length).await?;
        fill(&mut buf, piece.number);
        let (store, task) = (Arc::clone(&store), Arc::clone(&task));
        running.spawn(async move {
            let crc = buf.crc32();
            let (_, written) = store.write_piece(&task, piece, buf, crc).await;
            anyhow::Ok(written?)
        });
    }
    while let Some(done) = running.join_next().await {
        done??;
    }
    let durable = measure_end(start, size);
    let direct = store.direct_io() && task.is_complete();
    store.delete(task.id())?;

    let fio = if tool("fio") {
        let plain = run_fio(dir, size, block, args.depth, false)?;
        let synced = run_fio(dir, size, block, args.depth, true)?;
        Some((plain, synced))
    } else {
        None
    };
    println!();
    println!(
        "{:<44} {:>10} {:>10} {:>9}",
        "path", "MiB/s", "CPU s/GB", "vs fio"
    );
    let mib = |bps: f64| bps / MIB as f64;
    let print = |name: &str, m: &Measured, base: Option<f64>| {
        let r = base
            .map(|b| format!("{:.2}x", m.bytes_per_second() / b))
            .unwrap_or_else(|| "-".into());
        println!(
            "{name:<44} {:>10.0} {:>10.3} {r:>9}",
            mib(m.bytes_per_second()),
            m.cpu_seconds_per_gb()
        );
    };
    print(
        "ferry io_uring writes (fixed bufs, O_DIRECT)",
        &raw,
        fio.map(|f| f.0),
    );
    print(
        "ferry store pieces (+fdatasync, journal)",
        &durable,
        fio.map(|f| f.1),
    );
    match fio {
        Some((plain, synced)) => {
            println!(
                "{:<44} {:>10.0} {:>10} {:>9}",
                "fio io_uring direct",
                mib(plain),
                "-",
                "1.00x"
            );
            println!(
                "{:<44} {:>10.0} {:>10} {:>9}",
                "fio io_uring direct --fdatasync=1",
                mib(synced),
                "-",
                "1.00x"
            );
        }
        None => println!("fio is not installed: EXTRA_PACKAGES=fio ./scripts/setup.sh"),
    }
    Ok(json!({
        "benchmark": "disk",
        "parameters": { "size_bytes": size, "block_bytes": block, "depth": args.depth, "direct_io": direct },
        "ferry": { "engine_writes": raw.json(), "store_pieces_durable": durable.json() },
        "baseline": fio.map(|(plain, synced)| json!({ "tool": "fio", "ioengine": "io_uring", "direct": true, "bytes_per_second": plain, "fdatasync_each_bytes_per_second": synced })),
        "ratios": {
            "engine_writes_vs_fio": fio.map(|f| raw.bytes_per_second() / f.0),
            "store_pieces_vs_fio_fdatasync": fio.map(|f| durable.bytes_per_second() / f.1),
        },
    }))
}

fn fill(buf: &mut ferry_engine::io::PieceBuffer, seed: u32) {
    for (i, chunk) in buf.chunks_mut().into_iter().enumerate() {
        let word = (u64::from(seed) << 32 | i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .to_le_bytes();
        for bytes in chunk.chunks_exact_mut(8) {
            bytes.copy_from_slice(&word);
        }
    }
}

async fn write_blocks(
    io: &IoEngine,
    pool: &Arc<BufferPool>,
    file: &Arc<TaskFile>,
    size: u64,
    block: u64,
    depth: usize,
    sync: bool,
) -> anyhow::Result<()> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut in_flight = FuturesUnordered::new();
    let mut offset = 0;
    while offset < size {
        if in_flight.len() >= depth {
            in_flight.next().await.expect("non-empty")?;
        }
        let mut buf = pool.acquire(block).await?;
        fill(&mut buf, (offset / block) as u32);
        let request = WriteRequest {
            file: Arc::clone(file),
            offset,
            buf,
            len: block as usize,
            sync,
        };
        in_flight.push(async move {
            let (_, result) = io.write(request).await;
            result
        });
        offset += block;
    }
    while let Some(done) = in_flight.next().await {
        done?;
    }
    Ok(())
}

/// Runs fio's io_uring engine with O_DIRECT; returns bytes per second written.
fn run_fio(
    dir: &Path,
    size: u64,
    block: u64,
    depth: usize,
    fdatasync_each: bool,
) -> anyhow::Result<f64> {
    let path = dir.join("fio.dat");
    let mut command = Command::new("fio");
    command.args([
        "--name=ferry-baseline",
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=write",
        "--end_fsync=1",
        "--fixedbufs=1",
        "--output-format=json",
    ]);
    command.arg(format!("--filename={}", path.display()));
    command.arg(format!("--size={size}"));
    command.arg(format!("--bs={block}"));
    command.arg(format!("--iodepth={depth}"));
    if fdatasync_each {
        command.arg("--fdatasync=1");
    }
    let output = command.output().context("running fio")?;
    let _ = std::fs::remove_file(&path);
    let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "parsing fio output: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    report["jobs"][0]["write"]["bw_bytes"]
        .as_f64()
        .context("fio reported no bandwidth")
}

/// The daemon's whole transfer path into `receiver` (verify, io_uring write, journal), timed.
async fn transfer_into_store(
    receiver: &Arc<Store>,
    rdma: Option<Arc<ferry_engine::rdma::RdmaTransport>>,
    task_id: &str,
    geometry: Geometry,
    source: std::net::SocketAddr,
    streams: u32,
    transport: TransportChoice,
) -> anyhow::Result<Measured> {
    let engine = Arc::new(Engine::new(
        Arc::clone(receiver),
        Arc::new(TcpTransport::new(ClientConfig::default())),
        rdma,
        TransferSettings {
            streams_per_source: streams,
            piece_timeout: Duration::from_secs(120),
            max_attempts: 3,
            source_failure_limit: 3,
        },
        Vec::new(),
    ));
    let prepared = engine
        .prepare(TransferRequest {
            task_id: task_id.to_owned(),
            content_length: geometry.content_length(),
            piece_length: geometry.piece_length(),
            pieces: Vec::new(),
            sources: vec![source.to_string()],
            output: None,
            streams_per_source: streams,
            transport,
        })
        .await?;
    let (events, mut drain) = tokio::sync::mpsc::channel(64);
    let drained = tokio::spawn(async move { while drain.recv().await.is_some() {} });
    let start = measure_start();
    let summary = engine.run(prepared, events).await?;
    let measured = measure_end(start, summary.bytes_fetched);
    drained.await?;
    Ok(measured)
}

fn env_or(value: &Option<String>, var: &str, what: &str) -> anyhow::Result<String> {
    match value {
        Some(v) => Ok(v.clone()),
        None => std::env::var(var).with_context(|| {
            format!("give --{what} (or run inside scripts/rxe-vm.sh, which sets {var})")
        }),
    }
}

/// A store with its pool registered on `device`; returns the RDMA side too.
fn rdma_store(
    dir: &Path,
    device: &str,
    pool_mib: u64,
    args: &RdmaArgs,
) -> anyhow::Result<(
    Arc<Store>,
    Arc<ferry_engine::rdma::RdmaHost>,
    ferry_engine::rdma::RdmaSettings,
)> {
    let pool = BufferPool::new((4 * MIB) as usize, (pool_mib / 4) as usize)?;
    let config = ferry_engine::config::RdmaConfig {
        device: Some(device.to_owned()),
        chunk_kib: args.chunk_kib,
        ..Default::default()
    };
    let host = Arc::new(ferry_engine::rdma::RdmaHost::start(&config, &pool));
    if let ferry_engine::rdma::RdmaStatus::Unavailable(reason) = &host.status {
        bail!("RDMA device {device} unusable: {reason}");
    }
    let io = IoEngine::start(&pool, IoChoice::Auto, 1)?;
    let store = Arc::new(Store::open(dir, pool, io, true)?);
    let settings = ferry_engine::rdma::RdmaSettings {
        chunk_size: args.chunk_kib * 1024,
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(30),
        window: args.window,
        queue_pairs: args.queue_pairs,
    };
    Ok((store, host, settings))
}

/// Starts a Ferry data port (TCP, with the RDMA upgrade) for `store` on `addr`.
async fn serve_store(
    store: &Arc<Store>,
    host: &ferry_engine::rdma::RdmaHost,
    settings: &ferry_engine::rdma::RdmaSettings,
    addr: &str,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let (_, service) = host
        .exchange(store, settings.clone(), Duration::from_secs(60))
        .context("RDMA not ready on the serving side")?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let provider = Arc::new(StoreProvider {
        store: Arc::clone(store),
        host_id: "bench".into(),
        rdma: Some(service),
    });
    Ok((
        bound,
        tokio::spawn(Server::new(listener, provider, ServerConfig::default()).run()),
    ))
}

/// Fetches every piece `rounds` times through `transport` with `streams` pieces in flight,
/// verifying each digest; returns the bytes moved.
async fn fetch_into_memory(
    transport: Arc<dyn PieceTransport>,
    pool: Arc<BufferPool>,
    source: std::net::SocketAddr,
    task_id: &str,
    geometry: Geometry,
    rounds: u32,
    streams: u32,
) -> anyhow::Result<u64> {
    let total = u64::from(geometry.piece_count()) * u64::from(rounds);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (transport, pool, next, task_id) = (
            Arc::clone(&transport),
            Arc::clone(&pool),
            Arc::clone(&next),
            task_id.to_owned(),
        );
        tasks.spawn(async move {
            let mut bytes = 0u64;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return anyhow::Ok(bytes);
                }
                let piece = geometry.piece((n % u64::from(geometry.piece_count())) as u32)?;
                let mut buf = pool.acquire(piece.length).await?;
                let fetched = transport
                    .fetch(source, &task_id, piece, &mut buf)
                    .await
                    .map_err(|e| anyhow::anyhow!("piece {}: {e}", piece.number))?;
                if geometry::parse_digest(&fetched.advertised_digest) != Some(fetched.crc32) {
                    bail!("digest mismatch on piece {}", piece.number);
                }
                bytes += piece.length;
            }
        });
    }
    let mut bytes = 0;
    while let Some(done) = tasks.join_next().await {
        bytes += done??;
    }
    Ok(bytes)
}

async fn bench_rdma(dir: &Path, args: &RdmaArgs) -> anyhow::Result<Value> {
    let pool_mib = (u64::from(args.streams) * 8).max(64);
    if args.serve {
        let device = env_or(&args.server_device, "FERRY_RXE_DEV0", "server-device")?;
        let addr = env_or(&args.server_addr, "FERRY_RXE_ADDR0", "server-addr")?;
        let (store, host, settings) = rdma_store(&dir.join("seed"), &device, pool_mib, args)?;
        let source = dir.join("source.bin");
        random_file(&source, args.size_mib * MIB)?;
        let task = import_file(&store, &source, &ImportOptions::default()).await?;
        let bind = if addr.contains(':') {
            addr.clone()
        } else {
            format!("{addr}:0")
        };
        let (bound, server) = serve_store(&store, &host, &settings, &bind).await?;
        println!(
            "serving task {} ({} MiB) on {bound}; on the other host:",
            task.id(),
            args.size_mib
        );
        println!(
            "  ferry-bench rdma --connect {bound} --task {} --client-device DEV",
            task.id()
        );
        tokio::signal::ctrl_c().await?;
        server.abort();
        return Ok(
            json!({ "benchmark": "rdma", "mode": "serve", "task_id": task.id(), "address": bound.to_string() }),
        );
    }
    let client_device = env_or(&args.client_device, "FERRY_RXE_DEV1", "client-device")?;
    let (receiver, client_host, settings) =
        rdma_store(&dir.join("receiver"), &client_device, pool_mib, args)?;
    let (transport, _) = client_host
        .exchange(&receiver, settings.clone(), Duration::from_secs(60))
        .context("RDMA not ready on the receiving side")?;
    if let Some(address) = &args.connect {
        let source: std::net::SocketAddr = address.parse()?;
        let task_id = args.task.clone().expect("required by clap");
        let info = TcpTransport::new(ClientConfig::default())
            .stat_task(source, &task_id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let geometry = Geometry::new(info.content_length, info.piece_length)?;
        let start = measure_start();
        let bytes = fetch_into_memory(
            transport,
            Arc::clone(receiver.pool()),
            source,
            &task_id,
            geometry,
            args.rounds,
            args.streams,
        )
        .await?;
        let memory = measure_end(start, bytes);
        println!(
            "ferry rdma into memory from {source}: {:.3} Gbit/s ({:.1} MB/s), {:.3} CPU s/GB",
            memory.bits_per_second() / 1e9,
            memory.bytes_per_second() / 1e6,
            memory.cpu_seconds_per_gb()
        );
        return Ok(
            json!({ "benchmark": "rdma", "mode": "connect", "ferry": { "into_memory": memory.json() } }),
        );
    }

    // Both sides in this process, on two devices that reach each other.
    let server_device = env_or(&args.server_device, "FERRY_RXE_DEV0", "server-device")?;
    let server_addr = env_or(&args.server_addr, "FERRY_RXE_ADDR0", "server-addr")?;
    println!(
        "== rdma: {} MiB task, {} KiB chunks, {} queue pairs, {server_device} -> {client_device}",
        args.size_mib, args.chunk_kib, args.streams
    );
    let (seed, seed_host, _) = rdma_store(&dir.join("seed"), &server_device, pool_mib, args)?;
    let source = dir.join("source.bin");
    random_file(&source, args.size_mib * MIB)?;
    let task = import_file(&seed, &source, &ImportOptions::default()).await?;
    std::fs::remove_file(&source)?;
    let (addr, server) =
        serve_store(&seed, &seed_host, &settings, &format!("{server_addr}:0")).await?;
    let geometry = task.geometry();

    let start = measure_start();
    let bytes = fetch_into_memory(
        Arc::clone(&transport) as Arc<dyn PieceTransport>,
        Arc::clone(receiver.pool()),
        addr,
        task.id(),
        geometry,
        args.rounds,
        args.streams,
    )
    .await?;
    let memory = measure_end(start, bytes);

    let store = transfer_into_store(
        &receiver,
        Some(transport),
        task.id(),
        geometry,
        addr,
        args.streams,
        TransportChoice::Rdma,
    )
    .await?;
    server.abort();
    drop(seed_host);

    let baseline = if tool("ib_write_bw") {
        Some(run_ib_write_bw(
            &server_device,
            &client_device,
            &server_addr,
            args.chunk_kib * 1024,
            args.streams,
            args.size_mib * MIB,
        )?)
    } else {
        None
    };
    println!();
    println!(
        "{:<40} {:>10} {:>12} {:>14}",
        "path", "MB/s", "CPU s/GB", "vs ib_write_bw"
    );
    let ratio = |m: &Measured| baseline.map(|b| m.bytes_per_second() / b);
    for (name, m) in [
        ("ferry rdma into memory (verified)", &memory),
        ("ferry rdma into store (durable)", &store),
    ] {
        let r = ratio(m)
            .map(|r| format!("{r:.2}x"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{name:<40} {:>10.1} {:>12.3} {r:>14}",
            m.bytes_per_second() / 1e6,
            m.cpu_seconds_per_gb()
        );
    }
    match baseline {
        Some(b) => println!(
            "{:<40} {:>10.1} {:>12} {:>14}",
            format!(
                "ib_write_bw -s {} -q {}",
                args.chunk_kib * 1024,
                args.streams
            ),
            b / 1e6,
            "-",
            "1.00x"
        ),
        None => println!("ib_write_bw (perftest) is not installed"),
    }
    Ok(json!({
        "benchmark": "rdma",
        "parameters": { "size_bytes": args.size_mib * MIB, "chunk_bytes": args.chunk_kib * 1024, "queue_pairs": args.streams, "rounds": args.rounds, "server_device": server_device, "client_device": client_device },
        "ferry": { "into_memory": memory.json(), "into_store": store.json() },
        "baseline": baseline.map(|b| json!({ "tool": "ib_write_bw", "bytes_per_second": b, "message_size": args.chunk_kib * 1024, "queue_pairs": args.streams })),
        "ratios": { "into_memory_vs_ib_write_bw": ratio(&memory), "into_store_vs_ib_write_bw": ratio(&store) },
    }))
}

/// Runs perftest's ib_write_bw between the two devices, moving `total` bytes in messages of
/// `size` over `qps` queue pairs; returns average bytes per second.
fn run_ib_write_bw(
    server_device: &str,
    client_device: &str,
    server_addr: &str,
    size: u32,
    qps: u32,
    total: u64,
) -> anyhow::Result<f64> {
    let iterations = (total / u64::from(size) / u64::from(qps)).max(5);
    let gid = std::env::var("FERRY_RXE_GID_INDEX").unwrap_or_else(|_| "1".into());
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port().to_string()
    };
    let common = [
        "-s",
        &size.to_string(),
        "-q",
        &qps.to_string(),
        "-x",
        &gid,
        "-F",
        "-n",
        &iterations.to_string(),
        "-p",
        &port,
    ]
    .map(str::to_owned);
    let mut server = Command::new("ib_write_bw")
        .arg("-d")
        .arg(server_device)
        .args(&common)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting ib_write_bw")?;
    std::thread::sleep(Duration::from_secs(2));
    let output = Command::new("ib_write_bw")
        .arg("-d")
        .arg(client_device)
        .args(&common)
        .arg(server_addr)
        .output()
        .context("running ib_write_bw")?;
    let _ = server.wait();
    let text = String::from_utf8_lossy(&output.stdout);
    // The result row: bytes, iterations, peak MB/s, average MB/s, Mpps (MB = 2^20 bytes).
    let row = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 5 && fields[0] == size.to_string())
                .then(|| fields[3].parse::<f64>().ok())
                .flatten()
        })
        .next_back()
        .with_context(|| {
            format!(
                "no result row in ib_write_bw output:\n{text}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    Ok(row * MIB as f64)
}
