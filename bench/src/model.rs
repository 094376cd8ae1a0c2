//! `ferry-bench model`: a multi-layer ModelPack artifact (N shards of random bytes and a
//! config.json), pushed with `ferry push` to Debian's docker-registry on loopback, then pulled
//! into a directory by `ferry pull oci://... --output DIR` (through a `ferry serve` daemon,
//! every byte back to source from the registry: the layer tasks are deleted before each
//! round), against `oras pull` (the oras Python SDK) and, when installed, `skopeo copy` into
//! a `dir:` of the same artifact, taking turns over `rounds`; medians compared.

use crate::report::{Measured, Report, Row};
use crate::rig::MIB;
use anyhow::{bail, Context};
use ferry_engine::proto;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Weight shards (one layer each).
    #[arg(long, default_value_t = 8)]
    layers: u32,
    /// Size of each shard, MiB.
    #[arg(long, default_value_t = 512)]
    layer_mib: u64,
    /// Rounds of ferry, oras and skopeo taking turns.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The `ferry` binary [default: next to this one].
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// A Python with the `oras` package [default: $FERRY_BENCH_ORAS_PYTHON, else python3].
    #[arg(long)]
    oras_python: Option<PathBuf>,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not come up on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn run_timed(command: &mut Command) -> anyhow::Result<(f64, Vec<u8>)> {
    let started = Instant::now();
    let out = command.stdin(Stdio::null()).output()?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((seconds, out.stdout))
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

const ORAS_PULL: &str = r#"
import sys, oras.client
client = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)
client.pull(target=sys.argv[2], outdir=sys.argv[3])
"#;

pub async fn bench(dir: &Path, args: &ModelArgs) -> anyhow::Result<Report> {
    let shard = args.layer_mib * MIB;
    let total = shard * args.layers as u64;
    println!(
        "== model: {} layers x {} MiB from docker-registry on loopback into a directory, {} rounds",
        args.layers, args.layer_mib, args.rounds
    );
    let mut report = Report::new(
        "model",
        json!({ "layers": args.layers, "layer_bytes": shard, "rounds": args.rounds }),
    );
    let ferry = match &args.ferry {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench's directory")?
            .join("ferry"),
    };
    let python = args
        .oras_python
        .clone()
        .or_else(|| std::env::var_os("FERRY_BENCH_ORAS_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| "python3".into());
    let has_oras = Command::new(&python)
        .args(["-c", "import oras.client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_oras {
        report.note(format!("{} has no oras package: no oras row (python3 -m venv V && V/bin/pip install oras; --oras-python V/bin/python)", python.display()));
    }
    let has_skopeo = crate::baseline::installed("skopeo");
    if !has_skopeo {
        report.note("skopeo is not installed: no skopeo row (Debian: apt-get install skopeo)");
    }

    // The model.
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    for i in 0..args.layers {
        use std::io::Read;
        let path = model.join(format!(
            "model-{:05}-of-{:05}.safetensors",
            i + 1,
            args.layers
        ));
        let mut random = std::fs::File::open("/dev/urandom")?.take(shard);
        std::io::copy(&mut random, &mut std::fs::File::create(path)?)?;
    }
    std::fs::write(
        model.join("config.json"),
        br#"{"model_type":"llama","architectures":["LlamaForCausalLM"]}"#,
    )?;

    // The registry.
    let port = free_port()?;
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry").display()
        ),
    )?;
    let _registry = Killed(
        Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry (Debian: apt-get install docker-registry)")?,
    );
    wait_for_port(port, "docker-registry")?;
    let host = format!("127.0.0.1:{port}");
    let reference = format!("oci://{host}/bench/model:v1");
    run_timed(
        Command::new(&ferry)
            .args(["push", "--plain-http"])
            .arg(&model)
            .arg(&reference),
    )?;

    // The daemon.
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir)?;
    let control = dir.join("control.sock");
    let _daemon = Killed(
        Command::new(&ferry)
            .arg("--control")
            .arg(&control)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", "127.0.0.1:0", "--no-rdma", "--output-dir"])
            .arg(&out_dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("daemon.log"))?)
            .spawn()?,
    );
    let control_text = control.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        if let Ok(client) = ferry_engine::cli::connect(&control_text).await {
            break client;
        }
        if Instant::now() > deadline {
            bail!("the ferry daemon did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Read the registry's blobs once, so every round reads them from the page cache.
    for entry in std::fs::read_dir(&model)? {
        std::fs::read(entry?.path())?;
    }

    let (mut ferry_rows, mut oras_rows, mut skopeo_rows) = (vec![], vec![], vec![]);
    for round in 0..args.rounds.max(1) {
        println!("-- round {} of {}", round + 1, args.rounds.max(1));
        // Ferry, cold: no layer held, no directory there.
        let target = out_dir.join("ferry");
        let _ = std::fs::remove_dir_all(&target);
        for model in client
            .list_models(proto::ListModelsRequest {})
            .await?
            .into_inner()
            .models
        {
            for layer in model.layers {
                let _ = client
                    .delete_task(proto::DeleteTaskRequest {
                        task_id: layer.task_id,
                    })
                    .await;
            }
        }
        let (seconds, stdout) = run_timed(
            Command::new(&ferry)
                .arg("--control")
                .arg(&control)
                .args(["--json", "pull", &reference, "--plain-http", "--output"])
                .arg(&target),
        )?;
        let summary: serde_json::Value = serde_json::from_slice(&stdout)?;
        let fetched = summary["back_to_source_bytes"].as_u64().unwrap_or(0);
        if fetched < total || dir_bytes(&target) < total {
            bail!(
                "ferry fetched {fetched} bytes, placed {}, not {total}",
                dir_bytes(&target)
            );
        }
        ferry_rows.push(Row::new(
            "model.ferry",
            "ferry pull oci:// --output DIR (back to source)",
            "ferry",
            "http",
            Measured {
                bytes: total,
                seconds,
                cpu_seconds: None,
            },
        ));
        if has_oras {
            let target = dir.join("oras-out");
            let _ = std::fs::remove_dir_all(&target);
            let (seconds, _) = run_timed(
                Command::new(&python)
                    .args(["-c", ORAS_PULL, &host])
                    .arg(format!("{host}/bench/model:v1"))
                    .arg(&target),
            )?;
            if dir_bytes(&target) < total {
                bail!("oras pull wrote {} bytes, not {total}", dir_bytes(&target));
            }
            oras_rows.push(Row::new(
                "baseline.oras",
                "oras pull (oras Python SDK) into a directory",
                "oras",
                "http",
                Measured {
                    bytes: total,
                    seconds,
                    cpu_seconds: None,
                },
            ));
            std::fs::remove_dir_all(&target)?;
        }
        if has_skopeo {
            let target = dir.join("skopeo-out");
            let _ = std::fs::remove_dir_all(&target);
            let (seconds, _) = run_timed(
                Command::new("skopeo")
                    .args(["copy", "--quiet", "--src-tls-verify=false"])
                    .arg(format!("docker://{host}/bench/model:v1"))
                    .arg(format!("dir:{}", target.display())),
            )?;
            if dir_bytes(&target) < total {
                bail!(
                    "skopeo copy wrote {} bytes, not {total}",
                    dir_bytes(&target)
                );
            }
            skopeo_rows.push(Row::new(
                "baseline.skopeo",
                "skopeo copy docker:// dir: (blobs by digest)",
                "skopeo",
                "http",
                Measured {
                    bytes: total,
                    seconds,
                    cpu_seconds: None,
                },
            ));
            std::fs::remove_dir_all(&target)?;
        }
    }
    let oras = super::median_row(oras_rows);
    let skopeo = super::median_row(skopeo_rows);
    let best = match (&oras, &skopeo) {
        (Some(o), Some(s)) if s.bytes_per_second > o.bytes_per_second => Some(s),
        (Some(o), _) => Some(o),
        (None, s) => s.as_ref(),
    };
    if let Some(row) = super::median_row(ferry_rows) {
        report.rows.push(row.against(best, Some(1.0)));
    }
    report.rows.extend(oras);
    report.rows.extend(skopeo);
    report.note("ferry: one task per layer, all layers at once, 8 Range requests each, O_DIRECT writes with fdatasync and journal per piece, each layer's SHA-256 verified before the directory is renamed into place (files hard-linked from the store); timed as the `ferry pull` process, manifest resolution included");
    report.note("oras and skopeo write through the page cache with no sync; all read the registry's blobs from the page cache");
    Ok(report)
}
