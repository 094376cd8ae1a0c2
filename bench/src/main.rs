//! `ferry-bench`: Ferry's data paths measured next to the standard tool for each, in the same
//! run, with the ratio printed. Only same-run ratios mean anything across machines.
#![forbid(unsafe_code)]

mod baseline;
mod figures;
mod model;
mod origin;
mod plot;
mod report;
mod rig;
mod scale;
mod serve_reads;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_engine::geometry::Geometry;
use ferry_engine::transfer::TransportChoice;
use ferry_engine::transport::{PieceTransport, TcpTransport};
use ferry_fallback_tcp::ClientConfig;
use report::{Report, Row};
use rig::{PlanRequest, RdmaPlan, Rig, MIB};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-bench",
    version,
    about = "Ferry's benchmarks, each beside its standard tool (iperf3, fio, ib_write_bw) in the same run",
    after_help = "Every benchmark prints a table and writes JSON (stable field names, see \
                  bench/README.md). RDMA rows need two RDMA devices that reach each other: \
                  inside scripts/rxe-vm.sh they are found through FERRY_RXE_DEV0/DEV1/ADDR0."
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
    /// the same devices with the same message size, and memory registration time per GiB.
    /// Locally it uses two devices that reach each other (inside `scripts/rxe-vm.sh`: rxe0
    /// and rxe1); with `--rails N`, N rail pairs striped at once, ib_write_bw running on every
    /// pair at once, and each rail's share of the bytes; Ferry and ib_write_bw take turns
    /// over `--repeat` rounds and medians are compared. Across two hosts, run `--serve` on one
    /// and `--connect` on the other.
    Rdma(RdmaArgs),
    /// Network into the store, per transport (TCP always, RDMA when devices are there),
    /// beside each path alone (Ferry's network path into memory, Ferry's store path) and the
    /// standard tools.
    E2e(E2eArgs),
    /// Everything in one run and one table: TCP, store, end to end, and RDMA when devices are
    /// there, each beside its standard tool.
    Compare(E2eArgs),
    /// Throughput and CPU per GB over piece sizes, pieces in flight and (RDMA) queue pairs per
    /// peer, each point beside its tool with the same streams or queue pairs.
    Sweep(SweepArgs),
    /// SVG plots from sweep results: throughput and ratio against piece size, CPU s/GB.
    Plot(PlotArgs),
    /// Back to source: a file from a loopback HTTP origin into the store with concurrent
    /// Range requests, beside `curl -o` and (when installed) `aria2c -x <connections>` of the
    /// same URL, taking turns; medians compared.
    Origin(origin::OriginArgs),
    /// A multi-layer ModelPack artifact from docker-registry on loopback into a directory
    /// (`ferry pull oci://... --output DIR`), beside `oras pull` (oras Python SDK) and, when
    /// installed, `skopeo copy` of the same artifact, taking turns; medians compared.
    Model(model::ModelArgs),
    /// A model of distributing one large file from one seed to many hosts over RDMA and
    /// TCP, from the per-host figures measured here (see bench/SCALE.md).
    Scale(scale::ScaleArgs),
}

#[derive(Debug, Args)]
struct RdmaDevices {
    /// Serving side's device, once per rail [default: $FERRY_RXE_DEV0, or with --rails N the
    /// first N of $FERRY_RXE_A_DEVS].
    #[arg(long)]
    server_device: Vec<String>,
    /// Serving device's address, once per rail, in the same order; the first is the seed's
    /// data port [default: $FERRY_RXE_ADDR0, or the first N of $FERRY_RXE_A_ADDRS].
    #[arg(long)]
    server_addr: Vec<String>,
    /// Receiving side's device, once per rail, paired in order with --server-device
    /// [default: $FERRY_RXE_DEV1, or the first N of $FERRY_RXE_B_DEVS].
    #[arg(long)]
    client_device: Vec<String>,
    /// Rail pairs to stripe over (inside scripts/rxe-vm.sh --rails N: up to N) [default: 1,
    /// or as many as the device flags name].
    #[arg(long)]
    rails: Option<usize>,
    /// Bytes per RDMA WRITE, KiB (also ib_write_bw's message size).
    #[arg(long, default_value_t = 1024)]
    chunk_kib: u32,
    /// Fetch every piece whole on one rail pair (the daemon's `rdma.stripe_pieces = false`);
    /// by default a piece of several pool slots is striped over the rail pairs.
    #[arg(long)]
    whole_pieces: bool,
    /// How each device's completion thread waits (the daemon's `rdma.poll`): event sleeps on
    /// the completion channel, busy polls its completion queues (as ib_write_bw does).
    #[arg(long, value_enum, default_value_t = PollArg::Event)]
    poll: PollArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PollArg {
    Event,
    Busy,
}

impl RdmaDevices {
    /// The rail pairs to use; None when no device is named and none is in the environment.
    fn plan(&self) -> anyhow::Result<Option<RdmaPlan>> {
        RdmaPlan::new(&PlanRequest {
            server_devices: self.server_device.clone(),
            client_devices: self.client_device.clone(),
            server_addrs: self.server_addr.clone(),
            rails: self.rails,
            chunk_kib: self.chunk_kib,
            stripe_pieces: !self.whole_pieces,
            poll: match self.poll {
                PollArg::Event => ferry_engine::config::RdmaPoll::Event,
                PollArg::Busy => ferry_engine::config::RdmaPoll::Busy,
            },
        })
    }
}

#[derive(Debug, Args)]
struct RdmaArgs {
    /// Size of the task served, MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Piece length, MiB (4 to 64).
    #[arg(long, default_value_t = 4)]
    piece_mib: u64,
    /// Pieces in flight per queue pair.
    #[arg(long, default_value_t = 2)]
    window: usize,
    /// Queue pairs to the source on each rail pair (ib_write_bw gets as many on each pair,
    /// each with a window of pieces' worth of messages in flight: the same in flight).
    #[arg(long, default_value_t = 2)]
    queue_pairs: usize,
    /// Times the whole task is fetched for the into-memory figure.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Pieces Ferry keeps in flight [default: a window on each queue pair of each rail pair,
    /// window x queue pairs x rails]; fewer than the rail pairs shows what striping one
    /// piece over them gives.
    #[arg(long)]
    in_flight: Option<u64>,
    /// Rounds of Ferry and ib_write_bw taking turns; medians are compared.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Pool sizes, MiB, whose registration is timed (seconds per GiB).
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    register_mib: Vec<u64>,
    #[command(flatten)]
    devices: RdmaDevices,
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
    /// Rounds of Ferry and fio taking turns; medians are compared.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
}

#[derive(Debug, Args)]
struct E2eArgs {
    /// Size of the task, MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Piece length, MiB (4 to 64).
    #[arg(long, default_value_t = 4)]
    piece_mib: u64,
    /// Pieces in flight (TCP streams; for RDMA window x queue pairs, see below), and the
    /// store's write depth, iperf3's -P and fio's iodepth.
    #[arg(long, default_value_t = 8)]
    streams: u32,
    /// RDMA pieces in flight per queue pair.
    #[arg(long, default_value_t = 2)]
    window: usize,
    /// RDMA queue pairs per peer.
    #[arg(long, default_value_t = 2)]
    queue_pairs: usize,
    /// Times the task is fetched into memory for the network-alone figure.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Seconds iperf3 runs.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// The seed serves from disk (its content dropped from the page cache) instead of from
    /// memory.
    #[arg(long)]
    cold: bool,
    /// Leave RDMA out even where devices are there.
    #[arg(long)]
    no_rdma: bool,
    /// With RDMA: pool sizes, MiB, whose registration is timed (seconds per GiB).
    #[arg(long, value_delimiter = ',', default_value = "1024")]
    register_mib: Vec<u64>,
    #[command(flatten)]
    devices: RdmaDevices,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SweepTransport {
    Tcp,
    Rdma,
}

#[derive(Debug, Args)]
struct SweepArgs {
    /// Which piece path.
    #[arg(long, value_enum, default_value = "tcp")]
    transport: SweepTransport,
    /// Piece lengths, MiB.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16,32,64")]
    piece_mib: Vec<u64>,
    /// TCP: streams (pieces in flight). RDMA: pieces in flight per queue pair (the window).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    in_flight: Vec<u32>,
    /// RDMA: queue pairs per peer.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    queue_pairs: Vec<u32>,
    /// Size of each task, MiB.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Times each task is fetched per point.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Seconds each iperf3 run lasts.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
    #[command(flatten)]
    devices: RdmaDevices,
}

#[derive(Debug, Args)]
struct PlotArgs {
    /// Sweep results (JSON written by `ferry-bench sweep`), any number, TCP and RDMA.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Directory the SVG files go to.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The engine's warnings (a rail pair paused, a piece fetched again) go to stderr;
    // FERRY_BENCH_LOG=debug (an env-filter) says more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Bench::Plot(args) = &cli.command {
        return plot::plot(&args.inputs, &args.out_dir);
    }
    if let Bench::Scale(args) = &cli.command {
        return scale::run(args, cli.json_out.as_deref());
    }
    let scratch = tempfile::Builder::new()
        .prefix("ferry-bench-")
        .tempdir_in(cli.dir.as_deref().unwrap_or(Path::new("/var/tmp")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = scratch.path();
    let report = match &cli.command {
        Bench::Tcp(args) => runtime.block_on(bench_tcp(dir, args))?,
        Bench::Disk(args) => runtime.block_on(bench_disk(dir, args))?,
        Bench::Rdma(args) => runtime.block_on(bench_rdma(dir, args))?,
        Bench::E2e(args) => runtime.block_on(bench_e2e(dir, args, false))?,
        Bench::Compare(args) => runtime.block_on(bench_e2e(dir, args, true))?,
        Bench::Sweep(args) => runtime.block_on(bench_sweep(dir, args))?,
        Bench::Origin(args) => runtime.block_on(origin::bench(dir, args))?,
        Bench::Model(args) => runtime.block_on(model::bench(dir, args))?,
        Bench::Plot(_) => unreachable!("handled above"),
        Bench::Scale(_) => unreachable!("handled above"),
    };
    report.print();
    let out = cli
        .json_out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench/out/{}.json", report.benchmark)));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("results written to {}", out.display());
    Ok(())
}

fn pool_mib(in_flight: u64, piece_mib: u64) -> u64 {
    (in_flight * piece_mib * 2).max(64)
}

async fn bench_tcp(dir: &Path, args: &TcpArgs) -> anyhow::Result<Report> {
    println!(
        "== tcp: {} MiB task, {} MiB pieces, {} streams on loopback",
        args.size_mib, args.piece_mib, args.streams
    );
    let mut report = Report::new(
        "tcp",
        json!({ "size_bytes": args.size_mib * MIB, "piece_length": args.piece_mib * MIB, "streams": args.streams, "rounds": args.rounds }),
    );
    let rig = Rig::start(dir, pool_mib(args.streams.into(), args.piece_mib), None).await?;
    let (task, geometry) = rig
        .seed_task(dir, args.size_mib * MIB, args.piece_mib * MIB, true)
        .await?;
    let memory = rig
        .fetch_into_memory(rig.tcp(), &task, geometry, args.rounds, args.streams)
        .await?;
    let store = rig
        .transfer_into_store(None, &task, geometry, args.streams, TransportChoice::Tcp)
        .await?;
    drop(rig);
    let iperf = baseline::iperf3(args.streams, args.seconds)?;
    let best = iperf.as_ref().map(|(best, _)| best);
    report.rows.push(
        Row::new(
            "tcp.into_memory",
            "ferry tcp into memory (verified)",
            "ferry",
            "tcp",
            memory,
        )
        .against(best, Some(0.9)),
    );
    report.rows.push(
        Row::new(
            "tcp.into_store",
            "ferry tcp into store (durable)",
            "ferry",
            "tcp",
            store,
        )
        .against(best, None),
    );
    if let Some((best, other)) = iperf {
        report.rows.extend([best, other]);
    }
    Ok(report)
}

async fn bench_disk(dir: &Path, args: &DiskArgs) -> anyhow::Result<Report> {
    let block = args.block_mib * MIB;
    let size = args.size_mib * MIB / block * block;
    println!(
        "== disk: {} MiB in {} MiB blocks, {} in flight, under {}",
        size / MIB,
        args.block_mib,
        args.depth,
        dir.display()
    );
    let mut report = Report::new(
        "disk",
        json!({ "size_bytes": size, "block_bytes": block, "depth": args.depth }),
    );
    let (rows, direct) = disk_rows(dir, size, block, args.depth, args.repeat).await?;
    report.rows.extend(rows);
    report.extra = json!({ "direct_io": direct });
    Ok(report)
}

/// The engine's raw writes beside fio, and durable store pieces beside fio --fdatasync=1.
async fn disk_rows(
    dir: &Path,
    size: u64,
    block: u64,
    depth: usize,
    repeat: usize,
) -> anyhow::Result<(Vec<Row>, bool)> {
    // A virtual disk's speed drifts from minute to minute: Ferry and fio take turns, `repeat`
    // times, and the median of each is compared (every sample is kept in the JSON).
    let (mut raw, mut durable, mut fio, mut fio_synced) = (vec![], vec![], vec![], vec![]);
    let (mut served, mut preads, mut fio_read) = (vec![], vec![], vec![]);
    let mut direct = true;
    let mut copies_per_piece = 0.0f64;
    let seeded = serve_reads::Seeded::new(dir, size, block, depth).await?;
    for round in 0..repeat.max(1) {
        if repeat > 1 {
            println!("-- round {} of {repeat}", round + 1);
        }
        raw.push(rig::engine_writes(dir, size, block, depth).await?);
        fio.extend(baseline::fio(dir, size, block, depth, false)?);
        let (pieces, piece_direct) = rig::store_pieces(dir, size, block, depth).await?;
        durable.push(pieces);
        direct &= piece_direct;
        fio_synced.extend(baseline::fio(dir, size, block, depth, true)?);
        let pass = seeded.engine_reads().await?;
        copies_per_piece = copies_per_piece.max(pass.copies_per_piece);
        direct &= pass.direct;
        served.push(pass.measured);
        preads.push(seeded.pread_reads().await?.measured);
        fio_read.extend(baseline::fio_read(dir, size, block, depth)?);
    }
    seeded.remove()?;
    let fio_read = median_row(fio_read);
    let fio = median_row(fio);
    let fio_synced = median_row(fio_synced);
    let ferry = |id: &str, label: &str, samples: Vec<report::Measured>| {
        let mut row = median_row(
            samples
                .into_iter()
                .map(|m| Row::new(id, label, "ferry", "disk", m))
                .collect(),
        )
        .expect("at least one round");
        row.parameters = json!({ "block_bytes": block, "depth": depth, "samples_bytes_per_second": row.parameters["samples_bytes_per_second"] });
        row
    };
    let mut rows = vec![
        ferry(
            "disk.engine_writes",
            "ferry io_uring writes (fixed bufs, O_DIRECT)",
            raw,
        )
        .against(fio.as_ref(), Some(0.9)),
        ferry(
            "disk.store_pieces",
            "ferry store pieces (digest, fdatasync, journal)",
            durable,
        )
        .against(fio_synced.as_ref(), Some(0.9)),
        ferry(
            "disk.serve_reads",
            "ferry serving reads, cold (Store::read_piece: io_uring ReadFixed, O_DIRECT)",
            served,
        )
        .against(fio_read.as_ref(), Some(0.9)),
        ferry(
            "disk.serve_preads",
            "the serving reads before: pread via the page cache, cold (1 CPU copy)",
            preads,
        )
        .against(fio_read.as_ref(), None),
    ];
    // Counted, not timed: the serving read's CPU copies of payload per piece.
    rows[2].parameters["payload_copies_per_piece"] = json!(copies_per_piece);
    rows[3].parameters["payload_copies_per_piece"] = json!(1.0);
    rows.extend(fio);
    rows.extend(fio_synced);
    rows.extend(fio_read);
    Ok((rows, direct))
}

/// The sample with the median throughput, with every sample's throughput in its parameters.
fn median_row(mut samples: Vec<Row>) -> Option<Row> {
    samples.sort_by(|a, b| a.bytes_per_second.total_cmp(&b.bytes_per_second));
    let all: Vec<f64> = samples.iter().map(|r| r.bytes_per_second).collect();
    let mut median = samples.get(samples.len().checked_sub(1)? / 2)?.clone();
    if !median.parameters.is_object() {
        median.parameters = json!({});
    }
    median.parameters["samples_bytes_per_second"] = json!(all);
    Some(median)
}

async fn bench_e2e(dir: &Path, args: &E2eArgs, everything: bool) -> anyhow::Result<Report> {
    let plan = if args.no_rdma {
        None
    } else {
        args.devices.plan()?
    };
    let name = if everything { "compare" } else { "e2e" };
    println!(
        "== {name}: {} MiB task, {} MiB pieces, {} in flight, seed {}, RDMA {}",
        args.size_mib,
        args.piece_mib,
        args.streams,
        if args.cold {
            "cold (disk)"
        } else {
            "warm (page cache)"
        },
        match &plan {
            Some(p) => p.describe(),
            None => "not measured (no devices)".into(),
        }
    );
    let size = args.size_mib * MIB;
    let piece = args.piece_mib * MIB;
    // RDMA: a window on each queue pair of each rail pair.
    let rdma_in_flight =
        (args.window * args.queue_pairs * plan.as_ref().map_or(1, |p| p.rails.len())) as u32;
    let in_flight = args.streams.max(rdma_in_flight);
    let mut report = Report::new(
        name,
        json!({
            "size_bytes": size, "piece_length": piece, "streams": args.streams,
            "rdma_window": args.window, "rdma_queue_pairs": args.queue_pairs,
            "rounds": args.rounds, "seed_cache": if args.cold { "cold" } else { "warm" },
        }),
    );
    let rig = Rig::start(
        dir,
        pool_mib(in_flight.into(), args.piece_mib),
        plan.as_ref(),
    )
    .await?;
    let (task, geometry) = rig.seed_task(dir, size, piece, !args.cold).await?;
    let cool = |task: &str| -> anyhow::Result<()> {
        if args.cold {
            drop_cache(&rig.seed.get(task).context("seeded task")?.content_path())?;
        }
        Ok(())
    };

    // Each path alone, then both together.
    let tcp_memory = rig
        .fetch_into_memory(rig.tcp(), &task, geometry, args.rounds, args.streams)
        .await?;
    cool(&task)?;
    let tcp_e2e = rig
        .transfer_into_store(None, &task, geometry, args.streams, TransportChoice::Tcp)
        .await?;
    cool(&task)?;
    let (store_alone, direct) = rig::store_pieces(dir, size, piece, args.streams as usize).await?;
    let rdma = match &plan {
        Some(plan) => {
            let transport = rig
                .rdma(plan, args.window, args.queue_pairs)
                .context("RDMA transport")?;
            let memory = rig
                .fetch_into_memory(
                    Arc::clone(&transport) as Arc<dyn PieceTransport>,
                    &task,
                    geometry,
                    args.rounds,
                    rdma_in_flight,
                )
                .await?;
            cool(&task)?;
            let e2e = rig
                .transfer_into_store(
                    Some(transport),
                    &task,
                    geometry,
                    rdma_in_flight,
                    TransportChoice::Rdma,
                )
                .await?;
            Some((memory, e2e))
        }
        None => None,
    };
    let mut registrations = rig.registrations.clone();
    drop(rig);
    if let (Some(plan), Some(_)) = (&plan, &rdma) {
        for mib in &args.register_mib {
            registrations.extend(rig::time_registration(plan.client_device(), *mib)?);
        }
        print_registrations(&registrations);
    }
    report.extra = json!({ "direct_io": direct, "registrations": registrations });

    let iperf = baseline::iperf3(args.streams, args.seconds)?;
    let fio_synced = baseline::fio(dir, size, piece, args.streams as usize, true)?;
    let ib = match (&plan, &rdma) {
        // The same messages in flight: a window of pieces of chunks on each queue pair.
        (Some(plan), Some(_)) => baseline::ib_write_bw(
            &plan.ib_pairs(),
            plan.chunk_bytes(),
            args.queue_pairs as u32,
            plan.ib_depth(args.window, piece),
            size,
        )?,
        _ => None,
    };

    let iperf_best = iperf.as_ref().map(|(best, _)| best.clone());
    let tcp_memory = Row::new(
        "tcp.into_memory",
        &format!("ferry tcp into memory, {} streams", args.streams),
        "ferry",
        "tcp",
        tcp_memory,
    )
    .against(iperf_best.as_ref(), Some(0.9));
    let store_alone = Row::new(
        "disk.store_pieces",
        &format!("ferry store pieces alone, depth {}", args.streams),
        "ferry",
        "disk",
        store_alone,
    )
    .against(fio_synced.as_ref(), Some(0.9));
    let slower = |a: &Row, b: &Row| {
        if a.bytes_per_second <= b.bytes_per_second {
            a.clone()
        } else {
            b.clone()
        }
    };
    let tcp_slower = slower(&tcp_memory, &store_alone);
    let e2e_tcp = Row::new(
        "e2e.tcp",
        "ferry e2e tcp into store (vs slower path alone)",
        "ferry",
        "tcp",
        tcp_e2e,
    )
    .against(Some(&tcp_slower), Some(0.85));
    let tools_tcp = match (&iperf_best, &fio_synced) {
        (Some(i), Some(f)) => Some(slower(i, f)),
        _ => None,
    };
    report.extra["e2e_tcp_vs_slower_tool"] = json!(tools_tcp.map(|t| json!({
        "tool_row": t.id,
        "ratio": e2e_tcp.bytes_per_second / t.bytes_per_second,
    })));
    report.rows.extend([tcp_memory, store_alone, e2e_tcp]);

    if let Some((memory, e2e)) = rdma {
        let memory = Row::new(
            "rdma.into_memory",
            &format!(
                "ferry rdma into memory, {} x {} in flight",
                args.window, args.queue_pairs
            ),
            "ferry",
            "rdma",
            memory,
        )
        .against(ib.as_ref(), Some(0.95));
        let store = report
            .row("disk.store_pieces")
            .expect("pushed above")
            .clone();
        let rdma_slower = slower(&memory, &store);
        let e2e = Row::new(
            "e2e.rdma",
            "ferry e2e rdma into store (vs slower path alone)",
            "ferry",
            "rdma",
            e2e,
        )
        .against(Some(&rdma_slower), Some(0.85));
        report.rows.extend([memory, e2e]);
    }
    if everything {
        let block = piece;
        let raw = rig::engine_writes(dir, size, block, args.streams as usize).await?;
        let fio = baseline::fio(dir, size, block, args.streams as usize, false)?;
        report.rows.push(
            Row::new(
                "disk.engine_writes",
                &format!("ferry io_uring writes alone, depth {}", args.streams),
                "ferry",
                "disk",
                raw,
            )
            .against(fio.as_ref(), Some(0.9)),
        );
        report.rows.extend(fio);
    }
    if let Some((best, other)) = iperf {
        report.rows.extend([best, other]);
    }
    report.rows.extend(fio_synced);
    report.rows.extend(ib);
    if plan.is_none() {
        report.note("RDMA not measured: no devices (run inside scripts/rxe-vm.sh, or give --server-device/--client-device/--server-addr)");
    }
    Ok(report)
}

/// Drops a file's pages from the page cache so the next read comes from the disk.
fn drop_cache(path: &Path) -> anyhow::Result<()> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let file = std::fs::File::open(path)?;
    file.sync_all()?;
    posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)?;
    Ok(())
}

async fn bench_rdma(dir: &Path, args: &RdmaArgs) -> anyhow::Result<Report> {
    let plan = args
        .devices
        .plan()?
        .context("give --server-device, --client-device and --server-addr (or run inside scripts/rxe-vm.sh, which sets FERRY_RXE_DEV0/DEV1/ADDR0, and with --rails N the rail lists)")?;
    let rails = plan.rails.len();
    // A window on each queue pair of each rail pair, unless asked for.
    let in_flight = (args.in_flight)
        .unwrap_or((args.window * args.queue_pairs * rails) as u64)
        .max(1);
    let mut report = Report::new(
        "rdma",
        json!({
            "size_bytes": args.size_mib * MIB, "piece_length": args.piece_mib * MIB,
            "chunk_bytes": plan.chunk_bytes(), "window": args.window,
            "queue_pairs": args.queue_pairs, "rounds": args.rounds, "repeat": args.repeat,
            "rails": rails, "stripe_pieces": plan.stripe_pieces, "in_flight": in_flight,
            "poll": format!("{:?}", plan.poll),
            "server_device": plan.rails[0].server_device,
            "client_device": plan.rails[0].client_device,
            "server_devices": plan.server_devices(), "client_devices": plan.client_devices(),
        }),
    );
    if args.serve || args.connect.is_some() {
        return two_hosts(dir, args, &plan, report).await;
    }
    println!(
        "== rdma: {} MiB task, {} MiB pieces, {} KiB writes, window {} x {} queue pairs x {rails} rail pair(s), {in_flight} piece(s) in flight, {}: {}",
        args.size_mib,
        args.piece_mib,
        plan.chunk_kib,
        args.window,
        args.queue_pairs,
        if plan.stripe_pieces { "pieces striped over the rail pairs" } else { "whole pieces" },
        plan.describe()
    );
    let rig = Rig::start(dir, pool_mib(in_flight, args.piece_mib), Some(&plan)).await?;
    let (task, geometry) = rig
        .seed_task(dir, args.size_mib * MIB, args.piece_mib * MIB, true)
        .await?;
    let transport = rig
        .rdma(&plan, args.window, args.queue_pairs)
        .context("RDMA transport")?;
    // Ferry and ib_write_bw take turns; the medians are compared. ib_write_bw runs on every
    // rail pair at once with the same messages in flight per rail: a window of pieces of
    // chunks on each queue pair.
    let ib_depth = plan.ib_depth(args.window, args.piece_mib * MIB);
    let (mut ferry_rounds, mut ib_rounds) = (Vec::new(), Vec::new());
    for round in 0..args.repeat.max(1) {
        let memory = rig
            .fetch_into_memory(
                Arc::clone(&transport) as Arc<dyn PieceTransport>,
                &task,
                geometry,
                args.rounds,
                in_flight as u32,
            )
            .await?;
        println!(
            "  round {}: ferry {:.1} MB/s",
            round + 1,
            memory.bytes_per_second() / 1e6
        );
        ferry_rounds.push(Row::new(
            "rdma.into_memory",
            &format!("ferry rdma into memory (verified), {rails} rail pair(s)"),
            "ferry",
            "rdma",
            memory,
        ));
        // A round where ib_write_bw gives no figure (its clock calibration can fail under
        // emulation) leaves no sample; the median is over the rounds that have one.
        match baseline::ib_write_bw(
            &plan.ib_pairs(),
            plan.chunk_bytes(),
            args.queue_pairs as u32,
            ib_depth,
            args.size_mib * MIB,
        ) {
            Ok(Some(ib)) => {
                println!(
                    "  round {}: ib_write_bw {:.1} MB/s",
                    round + 1,
                    ib.bytes_per_second / 1e6
                );
                ib_rounds.push(ib);
            }
            Ok(None) => {}
            Err(e) => println!("  round {}: no ib_write_bw figure: {e:#}", round + 1),
        }
    }
    let text = rig.metrics.render();
    let fetched =
        u64::from(geometry.piece_count()) * u64::from(args.rounds) * ferry_rounds.len() as u64;
    let counted = figures::per_piece(&text, fetched);
    // The receiving side's rails (the seed's share the metrics; they only send).
    let clients = plan.client_devices();
    let received: Vec<(String, f64)> = figures::rail_bytes(&text, "in")
        .into_iter()
        .filter(|(rail, _)| clients.iter().any(|d| rail.starts_with(&format!("{d}:"))))
        .collect();
    let split = rail_split(&received);
    let store = rig
        .transfer_into_store(
            Some(transport),
            &task,
            geometry,
            in_flight as u32,
            TransportChoice::Rdma,
        )
        .await?;
    let mut registrations = rig.registrations.clone();
    drop(rig);
    for mib in &args.register_mib {
        registrations.extend(rig::time_registration(plan.client_device(), *mib)?);
    }
    print_registrations(&registrations);
    let ib = median_row(ib_rounds);
    let memory = median_row(ferry_rounds)
        .context("no round ran")?
        .against(ib.as_ref(), Some(0.95));
    println!();
    println!("bytes by rail (ferry into memory, every round):");
    for rail in &split {
        println!(
            "  {:<8} {:>6} MiB  {:>5.1}%",
            rail["rail"].as_str().unwrap_or("?"),
            rail["bytes"].as_f64().unwrap_or(0.0) / MIB as f64,
            rail["share"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    if let Some(ib) = &ib {
        let empty = Vec::new();
        let ib_rails = ib.parameters["rails"].as_array().unwrap_or(&empty);
        if ib_rails.len() > 1 {
            println!("ib_write_bw by rail pair (median round, all pairs at once):");
            for rail in ib_rails {
                println!(
                    "  {} -> {}  {:.1} MB/s  {:>5.1}%",
                    rail["server_device"].as_str().unwrap_or("?"),
                    rail["client_device"].as_str().unwrap_or("?"),
                    rail["bytes_per_second"].as_f64().unwrap_or(0.0) / 1e6,
                    rail["share"].as_f64().unwrap_or(0.0) * 100.0
                );
            }
        }
    }
    report.rows.push(memory);
    report.rows.push(
        Row::new(
            "rdma.into_store",
            "ferry rdma into store (durable)",
            "ferry",
            "rdma",
            store,
        )
        .against(ib.as_ref(), None),
    );
    report.rows.extend(ib);
    figures::print(&counted);
    report.extra = json!({
        "registrations": registrations, "work_per_piece": counted, "rail_split": split,
    });
    Ok(report)
}

/// Each rail's bytes and share of the total, from `figures::rail_bytes`.
fn rail_split(bytes: &[(String, f64)]) -> Vec<serde_json::Value> {
    let total: f64 = bytes.iter().map(|(_, b)| b).sum();
    bytes
        .iter()
        .map(|(rail, b)| json!({ "rail": rail, "bytes": b, "share": if total > 0.0 { b / total } else { 0.0 } }))
        .collect()
}

/// `--serve` / `--connect`: the two halves on two hosts with real NICs.
async fn two_hosts(
    dir: &Path,
    args: &RdmaArgs,
    plan: &RdmaPlan,
    mut report: Report,
) -> anyhow::Result<Report> {
    let in_flight = (args.window * args.queue_pairs) as u64;
    let rig = Rig::start(dir, pool_mib(in_flight, args.piece_mib), Some(plan)).await?;
    if args.serve {
        let (task, _) = rig
            .seed_task(dir, args.size_mib * MIB, args.piece_mib * MIB, true)
            .await?;
        println!(
            "serving task {task} ({} MiB) on {}; on the other host:",
            args.size_mib, rig.addr
        );
        println!(
            "  ferry-bench rdma --connect {} --task {task} --client-device DEV --server-device DEV --server-addr {}",
            rig.addr,
            plan.server_addr()
        );
        tokio::signal::ctrl_c().await?;
        report.extra = json!({ "mode": "serve", "task_id": task, "address": rig.addr.to_string() });
        return Ok(report);
    }
    let source: std::net::SocketAddr = args.connect.as_deref().expect("checked").parse()?;
    let task_id = args.task.clone().expect("required by clap");
    let info = TcpTransport::new(ClientConfig::default())
        .stat_task(source, &task_id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let geometry = Geometry::new(info.content_length, info.piece_length)?;
    let transport = rig
        .rdma(plan, args.window, args.queue_pairs)
        .context("RDMA transport")?;
    let memory = rig
        .fetch_into_memory_from(
            transport,
            source,
            &task_id,
            geometry,
            args.rounds,
            in_flight as u32,
        )
        .await?;
    report.rows.push(Row::new(
        "rdma.into_memory",
        &format!("ferry rdma into memory from {source}"),
        "ferry",
        "rdma",
        memory,
    ));
    report.extra = json!({ "mode": "connect", "registrations": rig.registrations });
    Ok(report)
}

async fn bench_sweep(dir: &Path, args: &SweepArgs) -> anyhow::Result<Report> {
    let plan = match args.transport {
        SweepTransport::Tcp => None,
        SweepTransport::Rdma => Some(args.devices.plan()?.context(
            "an RDMA sweep needs two devices (run inside scripts/rxe-vm.sh, or give --server-device/--client-device/--server-addr)",
        )?),
    };
    let transport = match args.transport {
        SweepTransport::Tcp => "tcp",
        SweepTransport::Rdma => "rdma",
    };
    let queue_pairs: Vec<u32> = match args.transport {
        SweepTransport::Tcp => vec![1],
        SweepTransport::Rdma => args.queue_pairs.clone(),
    };
    let max_piece = *args.piece_mib.iter().max().context("no piece sizes")?;
    let max_in_flight = u64::from(*args.in_flight.iter().max().context("no in-flight values")?)
        * u64::from(*queue_pairs.iter().max().expect("non-empty"))
        * plan.as_ref().map_or(1, |p| p.rails.len() as u64);
    let mut report = Report::new(
        &format!("sweep-{transport}"),
        json!({
            "transport": transport, "size_bytes": args.size_mib * MIB, "rounds": args.rounds,
            "piece_mib": args.piece_mib, "in_flight": args.in_flight, "queue_pairs": queue_pairs,
            "chunk_bytes": plan.as_ref().map(|p| p.chunk_bytes()),
        }),
    );
    println!(
        "== sweep {transport}: pieces {:?} MiB x in flight {:?} x queue pairs {:?}, {} MiB x {} rounds per point",
        args.piece_mib, args.in_flight, queue_pairs, args.size_mib, args.rounds
    );
    // Into memory only: one buffer per piece in flight is all a point needs.
    let rig = Rig::start(dir, (max_in_flight * max_piece).max(64), plan.as_ref()).await?;
    let mut points = Vec::new();
    for &piece_mib in &args.piece_mib {
        let (task, geometry) = rig
            .seed_task(dir, args.size_mib * MIB, piece_mib * MIB, true)
            .await?;
        for &in_flight in &args.in_flight {
            for &qps in &queue_pairs {
                let (fetcher, total_in_flight): (Arc<dyn PieceTransport>, u32) = match &plan {
                    None => (rig.tcp(), in_flight),
                    Some(plan) => (
                        rig.rdma(plan, in_flight as usize, qps as usize)
                            .context("RDMA transport")?,
                        in_flight * qps * plan.rails.len() as u32,
                    ),
                };
                let measured = rig
                    .fetch_into_memory(fetcher, &task, geometry, args.rounds, total_in_flight)
                    .await?;
                println!(
                    "  piece {piece_mib:>2} MiB, {in_flight} in flight x {qps} qp: {:.3} Gbit/s, {:.3} CPU s/GB",
                    measured.bytes_per_second() * 8.0 / 1e9,
                    measured.cpu_seconds.unwrap_or(0.0) / (measured.bytes as f64 / 1e9)
                );
                points.push((piece_mib, in_flight, qps, total_in_flight, measured));
            }
        }
        rig.seed.delete(&task)?;
    }
    drop(rig);
    // One baseline per number of streams / queue pairs in flight (piece size means nothing
    // to the tools).
    let mut baselines: Vec<(u32, Row)> = Vec::new();
    let mut totals: Vec<u32> = points.iter().map(|p| p.3).collect();
    totals.sort_unstable();
    totals.dedup();
    for total in totals {
        let row = match &plan {
            None => baseline::iperf3(total, args.seconds)?.map(|(best, _)| best),
            Some(plan) => baseline::ib_write_bw(
                &plan.ib_pairs(),
                plan.chunk_bytes(),
                // The queue pairs in flight, spread over the rail pairs.
                (total / plan.rails.len() as u32).max(1),
                // perftest's default depth, as this sweep has always run it.
                128,
                (args.size_mib * MIB).min(256 * MIB),
            )?,
        };
        if let Some(mut row) = row {
            row.id = format!("{}.{total}", row.id);
            row.label = format!("{} ({total} in flight)", row.label);
            baselines.push((total, row));
        }
    }
    for (piece_mib, in_flight, qps, total, measured) in points {
        let baseline = baselines.iter().find(|(t, _)| *t == total).map(|(_, r)| r);
        report.rows.push(
            Row::new(
                &format!("sweep.{transport}.piece{piece_mib}.inflight{in_flight}.qp{qps}"),
                &format!(
                    "ferry {transport}, {piece_mib} MiB pieces, {in_flight} in flight x {qps} qp"
                ),
                "ferry",
                transport,
                measured,
            )
            .with_parameters(json!({
                "piece_length": piece_mib * MIB, "in_flight": in_flight,
                "queue_pairs": qps, "total_in_flight": total,
            }))
            .against(baseline, None),
        );
    }
    report
        .rows
        .extend(baselines.into_iter().map(|(total, mut row)| {
            row.parameters["total_in_flight"] = json!(total);
            row
        }));
    Ok(report)
}

fn print_registrations(registrations: &[rig::Registration]) {
    println!();
    println!("memory registration (local write + memory-window bind, the whole pool once):");
    for r in registrations {
        println!(
            "  {:<9} {:<8} {:>6} MiB  {:.4} s/GiB",
            r.side,
            r.device,
            r.bytes / MIB,
            r.seconds_per_gib
        );
    }
}
