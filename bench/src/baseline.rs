//! The standard tools, run in the same invocation as Ferry's paths: iperf3 for TCP, fio for
//! the store, perftest's ib_write_bw for RDMA. Each returns a report row, or None (with the
//! reason printed) when the tool is not installed.

use crate::report::{Measured, Row};
use anyhow::Context;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

pub fn installed(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn free_port() -> anyhow::Result<u16> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?.port())
}

/// iperf3 on loopback with `streams` streams, both copying from user memory (its default)
/// and with `-Z` (sendfile, zero-copy like Ferry's sender); returns the faster as
/// `baseline.iperf3` and the other as a second row, both with CPU seconds per GB of both ends.
pub fn iperf3(streams: u32, seconds: u32) -> anyhow::Result<Option<(Row, Row)>> {
    if !installed("iperf3") {
        println!("iperf3 is not installed: EXTRA_PACKAGES=iperf3 ./scripts/setup.sh");
        return Ok(None);
    }
    let copy = iperf3_run(streams, seconds, false)?;
    let zero = iperf3_run(streams, seconds, true)?;
    let (best, other, best_label, other_label) =
        if zero.bytes_per_second() > copy.bytes_per_second() {
            (zero, copy, "-Z", "")
        } else {
            (copy, zero, "", "-Z")
        };
    let row = |id: &str, m: Measured, flag: &str| {
        Row::new(
            id,
            &format!("iperf3 -P {streams} {flag}"),
            "iperf3",
            "tcp",
            m,
        )
        .with_parameters(json!({ "streams": streams, "zerocopy": flag == "-Z" }))
    };
    Ok(Some((
        row("baseline.iperf3", best, best_label),
        row("baseline.iperf3_other", other, other_label),
    )))
}

fn iperf3_run(streams: u32, seconds: u32, zerocopy: bool) -> anyhow::Result<Measured> {
    let port = free_port()?.to_string();
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let mut client = Command::new("iperf3");
    client.args(["-c", "127.0.0.1", "-p", &port, "-J"]);
    client.args(["-P", &streams.to_string(), "-t", &seconds.to_string()]);
    if zerocopy {
        client.arg("-Z");
    }
    let output = client.output().context("running iperf3 -c")?;
    let _ = server.wait();
    let report: Value =
        serde_json::from_slice(&output.stdout).context("parsing iperf3 -J output")?;
    let end = &report["end"]["sum_received"];
    let bytes = end["bytes"].as_f64().context("iperf3 reported no bytes")?;
    let secs = end["seconds"].as_f64().unwrap_or(f64::from(seconds));
    let cpu = &report["end"]["cpu_utilization_percent"];
    let cpu_seconds = (cpu["host_total"].as_f64().unwrap_or(0.0)
        + cpu["remote_total"].as_f64().unwrap_or(0.0))
        / 100.0
        * secs;
    Ok(Measured {
        bytes: bytes as u64,
        seconds: secs,
        cpu_seconds: Some(cpu_seconds),
    })
}

/// fio's io_uring engine with O_DIRECT and fixed buffers writing `size` bytes in `block`
/// blocks at `depth`; `fdatasync_each` adds an fdatasync after every block (what a durable
/// piece costs). Returns `baseline.fio` or `baseline.fio_fdatasync`.
pub fn fio(
    dir: &Path,
    size: u64,
    block: u64,
    depth: usize,
    fdatasync_each: bool,
) -> anyhow::Result<Option<Row>> {
    fio_job(dir, size, block, depth, fdatasync_each, false)
}

/// fio's io_uring engine with O_DIRECT and fixed buffers reading `size` bytes in `block`
/// blocks at `depth` (the file laid out by fio first; direct reads are cold by design):
/// `baseline.fio_read`, what serving a piece from disk into registered memory costs.
pub fn fio_read(dir: &Path, size: u64, block: u64, depth: usize) -> anyhow::Result<Option<Row>> {
    fio_job(dir, size, block, depth, false, true)
}

fn fio_job(
    dir: &Path,
    size: u64,
    block: u64,
    depth: usize,
    fdatasync_each: bool,
    read: bool,
) -> anyhow::Result<Option<Row>> {
    if !installed("fio") {
        println!("fio is not installed: EXTRA_PACKAGES=fio ./scripts/setup.sh");
        return Ok(None);
    }
    let path = dir.join("fio.dat");
    let mut command = Command::new("fio");
    command.args([
        "--name=ferry-baseline",
        "--ioengine=io_uring",
        "--direct=1",
        if read { "--rw=read" } else { "--rw=write" },
        if read {
            "--end_fsync=0"
        } else {
            "--end_fsync=1"
        },
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
    if !output.status.success() {
        // tmpfs and 9p (inside the RDMA VM) have no O_DIRECT: no baseline there.
        println!(
            "fio failed under {}, no store baseline: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        return Ok(None);
    }
    let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "parsing fio output: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let job = &report["jobs"][0];
    let bytes_per_second = job[if read { "read" } else { "write" }]["bw_bytes"]
        .as_f64()
        .context("fio reported no bandwidth")?;
    // fio's usr_cpu/sys_cpu are percentages of one CPU over the job's run time.
    let runtime = job["job_runtime"].as_f64().unwrap_or(0.0) / 1000.0;
    let cpu_percent =
        job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    let seconds = size as f64 / bytes_per_second;
    let measured = Measured {
        bytes: size,
        seconds,
        cpu_seconds: (runtime > 0.0).then(|| cpu_percent / 100.0 * runtime),
    };
    let (id, label) = if read {
        (
            "baseline.fio_read",
            format!(
                "fio io_uring direct reads bs={}M depth={depth}",
                block / MIB
            ),
        )
    } else if fdatasync_each {
        (
            "baseline.fio_fdatasync",
            format!(
                "fio io_uring direct bs={}M depth={depth} --fdatasync=1",
                block / MIB
            ),
        )
    } else {
        (
            "baseline.fio",
            format!("fio io_uring direct bs={}M depth={depth}", block / MIB),
        )
    };
    Ok(Some(
        Row::new(id, &label, "fio", "disk", measured).with_parameters(
            json!({ "block_bytes": block, "depth": depth, "fdatasync_each": fdatasync_each, "read": read }),
        ),
    ))
}

/// The devices and address ib_write_bw runs between.
pub struct IbPair<'a> {
    pub server_device: &'a str,
    pub client_device: &'a str,
    pub server_addr: &'a str,
}

/// The GID index ib_write_bw uses on `device`: the one `scripts/rxe-vm.sh` found for it
/// (FERRY_RXE_GIDS, by rxe number), else FERRY_RXE_GID_INDEX, else 1.
fn gid_index(device: &str) -> String {
    let own = device
        .strip_prefix("rxe")
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| {
            let gids = std::env::var("FERRY_RXE_GIDS").ok()?;
            gids.split(',').nth(n).map(str::to_owned)
        });
    own.or_else(|| std::env::var("FERRY_RXE_GID_INDEX").ok())
        .unwrap_or_else(|| "1".into())
}

/// perftest's ib_write_bw on every pair at once (one server and one client per pair, all
/// running together, as Ferry's rails do): `size`-byte messages over `qps` queue pairs with
/// `tx_depth` messages in flight on each (perftest's `-t`; its default is 128), about `total`
/// bytes per pair. Returns `baseline.ib_write_bw`: the pairs' average bandwidths added up,
/// each pair's in its parameters (`rails`).
pub fn ib_write_bw(
    pairs: &[IbPair],
    size: u64,
    qps: u32,
    tx_depth: u32,
    total: u64,
) -> anyhow::Result<Option<Row>> {
    if !installed("ib_write_bw") {
        println!("ib_write_bw (perftest) is not installed");
        return Ok(None);
    }
    anyhow::ensure!(!pairs.is_empty(), "ib_write_bw needs a device pair");
    let iterations = (total / size / u64::from(qps)).max(5);
    let common = |port: &str, device: &str| {
        [
            "-d",
            device,
            "-s",
            &size.to_string(),
            "-q",
            &qps.to_string(),
            "-t",
            &tx_depth.max(1).to_string(),
            "-x",
            &gid_index(device),
            "-F",
            "-n",
            &iterations.to_string(),
            "-p",
            port,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    // perftest times itself with the CPU's cycle counter, calibrated against the clock at
    // start; under emulation that calibration can fail (it prints "Correlation coefficient
    // r^2 ... < 0.9" and a bandwidth of 0.00). Such a run says nothing: all pairs run again.
    const TRIES: usize = 4;
    let mut per_pair = Vec::new();
    for attempt in 1..=TRIES {
        per_pair = ib_write_bw_at_once(pairs, size, &common)?;
        let uncalibrated: Vec<String> = (pairs.iter().zip(&per_pair))
            .filter(|(_, rate)| **rate <= 0.0)
            .map(|(pair, _)| format!("{} -> {}", pair.server_device, pair.client_device))
            .collect();
        if uncalibrated.is_empty() {
            break;
        }
        anyhow::ensure!(
            attempt < TRIES,
            "ib_write_bw reported 0 MB/s on {} in {TRIES} tries (its clock calibration failed)",
            uncalibrated.join(", ")
        );
        println!(
            "  ib_write_bw reported 0 MB/s on {} (clock calibration failed): every pair again",
            uncalibrated.join(", ")
        );
    }
    let bytes_per_second: f64 = per_pair.iter().sum();
    let bytes = iterations * size * u64::from(qps) * pairs.len() as u64;
    let rails: Vec<Value> = (pairs.iter().zip(&per_pair))
        .map(|(pair, rate)| {
            json!({
                "server_device": pair.server_device,
                "client_device": pair.client_device,
                "bytes_per_second": rate,
                "share": rate / bytes_per_second,
            })
        })
        .collect();
    let label = if pairs.len() == 1 {
        format!("ib_write_bw -s {size} -q {qps}")
    } else {
        format!(
            "ib_write_bw -s {size} -q {qps}, on {} rail pairs at once",
            pairs.len()
        )
    };
    Ok(Some(
        Row::new(
            "baseline.ib_write_bw",
            &label,
            "ib_write_bw",
            "rdma",
            Measured {
                bytes,
                seconds: bytes as f64 / bytes_per_second,
                cpu_seconds: None,
            },
        )
        .with_parameters(json!({
            "message_size": size, "queue_pairs": qps, "tx_depth": tx_depth, "rails": rails,
        })),
    ))
}

/// One run of ib_write_bw on every pair at once: each pair's average bandwidth, bytes/s.
fn ib_write_bw_at_once(
    pairs: &[IbPair],
    size: u64,
    common: &dyn Fn(&str, &str) -> Vec<String>,
) -> anyhow::Result<Vec<f64>> {
    let mut servers = Vec::new();
    let mut ports: Vec<String> = Vec::new();
    for pair in pairs {
        // Distinct ports even if the kernel hands the same free one out twice.
        let port = loop {
            let port = free_port()?.to_string();
            if !ports.contains(&port) {
                break port;
            }
        };
        servers.push(
            Command::new("ib_write_bw")
                .args(common(&port, pair.server_device))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting ib_write_bw")?,
        );
        ports.push(port);
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut clients = Vec::new();
    for (pair, port) in pairs.iter().zip(&ports) {
        clients.push(
            Command::new("ib_write_bw")
                .args(common(port, pair.client_device))
                .arg(pair.server_addr)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("running ib_write_bw")?,
        );
    }
    let mut per_pair = Vec::new();
    for ((client, mut server), pair) in clients.into_iter().zip(servers).zip(pairs) {
        let output = client.wait_with_output().context("running ib_write_bw")?;
        let _ = server.wait();
        let text = String::from_utf8_lossy(&output.stdout);
        // The result row: bytes, iterations, peak MB/s, average MB/s, Mpps (MB = 2^20 bytes).
        let average = text
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
                    "no result row in ib_write_bw output ({} -> {}):\n{text}{}",
                    pair.server_device,
                    pair.client_device,
                    String::from_utf8_lossy(&output.stderr)
                )
            })?;
        per_pair.push(average * MIB as f64);
    }
    Ok(per_pair)
}
