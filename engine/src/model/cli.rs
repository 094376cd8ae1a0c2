//! The model commands: `ferry pull oci://... --output DIR`, `ferry preheat oci://...`,
//! `ferry push DIR oci://...`, `ferry models [MODEL]` and `ferry import DIR`.

use super::push::{self, ModelMeta};
use super::reference::Reference;
use super::registry::auth::{default_docker_config, docker_config_credentials};
use super::registry::{Credentials, RegistryOptions};
use crate::cli::{ControlClient, PullArgs, TransportArg};
use crate::proto::{self, model_event::Event};
use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;

macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// How to reach and authenticate to an OCI registry.
#[derive(Debug, Clone, Default, Args)]
pub struct RegistryArgs {
    /// Registry credentials, USER:PASS (Basic, or for the token flow) [default: from
    /// ~/.docker/config.json (or $DOCKER_CONFIG/config.json), else anonymous].
    #[arg(long, value_name = "USER:PASS", env = "FERRY_REGISTRY_AUTH")]
    pub registry_auth: Option<String>,
    /// Docker config file to read registry credentials from.
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Talk to the registry over http:// instead of https:// (a local registry).
    #[arg(long)]
    pub plain_http: bool,
}

impl RegistryArgs {
    /// The credentials for a registry: the flag, else the docker config's entry.
    pub fn credentials(&self, registry: &str) -> anyhow::Result<Option<Credentials>> {
        if let Some(text) = &self.registry_auth {
            return Ok(Some(Credentials::parse(text)?));
        }
        let Some(config) = self.docker_config.clone().or_else(default_docker_config) else {
            return Ok(None);
        };
        Ok(docker_config_credentials(&config, registry)?)
    }
}

#[derive(Debug, Args)]
pub struct PreheatArgs {
    /// oci://REGISTRY/REPOSITORY[:TAG][@sha256:HEX]
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Peers' data addresses tried before the registry, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub from: Vec<String>,
    /// auto, tcp or rdma (for peers).
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The model directory: top-level files become raw layers, subdirectories tar layers.
    pub dir: PathBuf,
    /// oci://REGISTRY/REPOSITORY:TAG
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The model's name [default: the directory's name].
    #[arg(long)]
    pub name: Option<String>,
    /// The model's family [default: config.json's model_type].
    #[arg(long)]
    pub family: Option<String>,
    /// The weights' format [default: from their file names, e.g. safetensors].
    #[arg(long)]
    pub format: Option<String>,
    /// The architecture [default: config.json's architectures[0]].
    #[arg(long)]
    pub architecture: Option<String>,
    /// The precision [default: config.json's torch_dtype].
    #[arg(long)]
    pub precision: Option<String>,
}

fn transport(arg: TransportArg) -> i32 {
    (match arg {
        TransportArg::Auto => proto::TransportPreference::Auto,
        TransportArg::Tcp => proto::TransportPreference::Tcp,
        TransportArg::Rdma => proto::TransportPreference::Rdma,
    }) as i32
}

fn registry_request(
    reference: &Reference,
    args: &RegistryArgs,
) -> anyhow::Result<(String, String)> {
    Ok(args
        .credentials(&reference.registry)?
        .map(|c| (c.username, c.password))
        .unwrap_or_default())
}

/// `ferry pull oci://... [--output DIR]`.
pub async fn pull(
    as_json: bool,
    client: &mut ControlClient,
    reference: &str,
    args: &PullArgs,
) -> anyhow::Result<()> {
    let parsed = Reference::parse(reference)?;
    let output = args
        .output
        .as_deref()
        .map(std::path::absolute)
        .transpose()?;
    let (user, pass) = registry_request(&parsed, &args.registry)?;
    let request = proto::PullModelRequest {
        reference: reference.to_owned(),
        output_dir: output.map(|p| p.display().to_string()).unwrap_or_default(),
        registry_username: user,
        registry_password: pass,
        plain_http: args.registry.plain_http,
        sources: args.from.clone(),
        transport: transport(args.transport),
        origin_connections: args.connections.unwrap_or(0),
        layers_in_flight: 0,
    };
    run_pull(as_json, client, request).await
}

/// `ferry preheat oci://...`: the store filled, no directory placed.
pub async fn preheat(
    as_json: bool,
    client: &mut ControlClient,
    args: &PreheatArgs,
) -> anyhow::Result<()> {
    let parsed = Reference::parse(&args.reference)?;
    let (user, pass) = registry_request(&parsed, &args.registry)?;
    let request = proto::PullModelRequest {
        reference: args.reference.clone(),
        output_dir: String::new(),
        registry_username: user,
        registry_password: pass,
        plain_http: args.registry.plain_http,
        sources: args.from.clone(),
        transport: transport(args.transport),
        origin_connections: 0,
        layers_in_flight: 0,
    };
    run_pull(as_json, client, request).await
}

async fn run_pull(
    as_json: bool,
    client: &mut ControlClient,
    request: proto::PullModelRequest,
) -> anyhow::Result<()> {
    let mut stream = client.pull_model(request).await?.into_inner();
    let show_bar = !as_json && std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut started = None;
    let mut summary = None;
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(Event::Started(s)) => {
                if show_bar && !s.already_placed {
                    let held: u64 = s.layers.iter().filter(|l| l.held).map(|l| l.size).sum();
                    let b = ProgressBar::new(s.total_bytes);
                    b.set_style(
                        ProgressStyle::with_template(
                            "{msg} {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                        )
                        .expect("template"),
                    );
                    b.set_message(format!("{} layers", s.layers.len()));
                    b.inc(held);
                    bar = Some(b);
                }
                started = Some(s);
            }
            Some(Event::Progress(p)) => {
                if let Some(b) = &bar {
                    b.inc(p.bytes);
                }
            }
            Some(Event::LayerDone(_)) | None => {}
            Some(Event::Summary(s)) => summary = Some(s),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let Some(s) = summary else {
        bail!("the daemon ended the model pull without a summary")
    };
    if as_json {
        say!(
            "{}",
            json!({
                "reference": s.reference, "manifest_digest": s.manifest_digest, "layers": s.layers,
                "layers_reused": s.layers_reused, "total_bytes": s.total_bytes,
                "bytes_fetched": s.bytes_fetched, "back_to_source_bytes": s.back_to_source_bytes,
                "elapsed_micros": s.elapsed_micros, "output_dir": s.output_dir,
                "already_placed": s.already_placed, "files_placed": s.files_placed,
                "hard_links": s.hard_links,
                "sources": s.sources.iter().map(|x| json!({"source": x.source, "bytes": x.bytes, "pieces": x.pieces, "failures": x.failures})).collect::<Vec<_>>(),
                "transports": s.transports.iter().map(|x| json!({"transport": x.transport, "bytes": x.bytes, "pieces": x.pieces})).collect::<Vec<_>>(),
                "layer_list": started.map(|st| st.layers.iter().map(|l| json!({"digest": l.digest, "size": l.size, "media_type": l.media_type, "format": l.format, "filepath": l.filepath, "task_id": l.task_id})).collect::<Vec<_>>()).unwrap_or_default(),
            })
        );
        return Ok(());
    }
    let secs = s.elapsed_micros as f64 / 1e6;
    if s.already_placed {
        say!(
            "{} ({}) is already at {}: nothing to do",
            s.reference,
            s.manifest_digest,
            s.output_dir
        );
        return Ok(());
    }
    let rate = if secs > 0.0 {
        s.bytes_fetched as f64 / secs
    } else {
        0.0
    };
    let place = if s.output_dir.is_empty() {
        "into the store (preheated)".to_owned()
    } else {
        format!(
            "to {} ({} files, {} hard links)",
            s.output_dir, s.files_placed, s.hard_links
        )
    };
    say!(
        "pulled {} {} in {:.2}s: {} layers ({} already held), {} bytes, {} fetched at {:.1} MiB/s",
        s.reference,
        place,
        secs,
        s.layers,
        s.layers_reused,
        s.total_bytes,
        s.bytes_fetched,
        rate / (1 << 20) as f64
    );
    say!(
        "  manifest {} (every layer's sha256 verified)",
        s.manifest_digest
    );
    say!("  back to source {:>14} bytes", s.back_to_source_bytes);
    for t in &s.transports {
        say!(
            "  transport {:<6} {:>14} bytes  {:>5} pieces",
            t.transport,
            t.bytes,
            t.pieces
        );
    }
    for x in &s.sources {
        say!(
            "  source {:<40} {:>14} bytes  {:>5} pieces  {} failures",
            x.source,
            x.bytes,
            x.pieces,
            x.failures
        );
    }
    Ok(())
}

/// `ferry push` as a whole command: its own runtime, its error on stderr.
pub fn push_main(as_json: bool, args: &PushArgs) -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(push_dir(as_json, args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ferry push: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `ferry push DIR oci://...`: no daemon involved.
pub async fn push_dir(as_json: bool, args: &PushArgs) -> anyhow::Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let meta = ModelMeta {
        name: args.name.clone(),
        family: args.family.clone(),
        format: args.format.clone(),
        architecture: args.architecture.clone(),
        precision: args.precision.clone(),
    };
    let dir = args.dir.clone();
    let plan = tokio::task::spawn_blocking(move || push::plan(&dir, &meta))
        .await
        .context("planning the push")??;
    let tls = if args.registry.plain_http {
        None
    } else {
        Some(crate::origin::tls_client_config(&Default::default())?)
    };
    let options = RegistryOptions {
        plain_http: args.registry.plain_http,
        credentials: args.registry.credentials(&reference.registry)?,
        tls,
    };
    let started = std::time::Instant::now();
    let summary = push::push(&plan, &reference, options).await?;
    let secs = started.elapsed().as_secs_f64();
    if as_json {
        say!(
            "{}",
            json!({
                "reference": reference.to_string(), "manifest_digest": summary.manifest_digest,
                "layers": summary.layers, "uploaded": summary.uploaded, "skipped": summary.skipped,
                "bytes_uploaded": summary.bytes_uploaded, "bytes_total": summary.bytes_total,
                "elapsed_micros": (secs * 1e6) as u64,
            })
        );
    } else {
        say!(
            "pushed {} as {} in {secs:.2}s: {} layers ({} uploaded, {} already there), {} of {} bytes sent",
            reference,
            summary.manifest_digest,
            summary.layers,
            summary.uploaded,
            summary.skipped,
            summary.bytes_uploaded,
            summary.bytes_total
        );
    }
    Ok(())
}

fn model_json(m: &proto::Model) -> serde_json::Value {
    json!({
        "references": m.references, "manifest_digest": m.manifest_digest,
        "config_digest": m.config_digest, "placed": m.placed, "pulled_at": m.pulled_at,
        "total_bytes": m.total_bytes, "complete": m.complete,
        "layers": m.layers.iter().map(|l| json!({"digest": l.digest, "size": l.size, "media_type": l.media_type, "format": l.format, "filepath": l.filepath, "task_id": l.task_id, "held": l.held})).collect::<Vec<_>>(),
    })
}

/// `ferry models [MODEL]`: the models held, or one in detail.
pub async fn models(
    as_json: bool,
    client: &mut ControlClient,
    model: Option<&str>,
) -> anyhow::Result<()> {
    let list = match model {
        Some(model) => vec![client
            .stat_model(proto::StatModelRequest {
                model: model.to_owned(),
            })
            .await?
            .into_inner()],
        None => {
            client
                .list_models(proto::ListModelsRequest {})
                .await?
                .into_inner()
                .models
        }
    };
    if as_json {
        say!(
            "{}",
            serde_json::Value::from(list.iter().map(model_json).collect::<Vec<_>>())
        );
        return Ok(());
    }
    for m in &list {
        say!(
            "{} {} bytes, {} layers{}  {}",
            m.manifest_digest,
            m.total_bytes,
            m.layers.len(),
            if m.complete {
                " (complete)"
            } else {
                " (incomplete)"
            },
            m.references.join(" ")
        );
        if model.is_some() {
            for l in &m.layers {
                say!(
                    "  {} {:>12} {:<4} {:<40} {}{}",
                    l.digest,
                    l.size,
                    l.format,
                    l.filepath,
                    l.task_id,
                    if l.held { "" } else { " (missing)" }
                );
            }
            for p in &m.placed {
                say!("  placed at {p}");
            }
        }
    }
    Ok(())
}

/// `ferry import DIR`: every regular file under DIR imported as its own task; prints the
/// set (path, task id, length, digest) as one manifest.
pub async fn import_dir(
    as_json: bool,
    client: &mut ControlClient,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let root = std::path::absolute(dir)?;
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .with_context(|| format!("reading {}", d.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let ft = entry.file_type()?;
            if entry.file_name() == super::layout::META_DIR {
                continue;
            }
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    let mut set = Vec::new();
    for path in &files {
        let task = client
            .import_task(proto::ImportTaskRequest {
                path: path.display().to_string(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("importing {}", path.display()))?
            .into_inner();
        let relative = path
            .strip_prefix(&root)
            .unwrap_or(path)
            .display()
            .to_string();
        set.push(json!({
            "path": relative, "task_id": task.task_id, "content_length": task.content_length,
            "content_digest": task.content_digest, "import_method": task.import_method,
        }));
    }
    let manifest = json!({ "dir": root.display().to_string(), "files": set });
    if as_json {
        say!("{manifest}");
    } else {
        say!("imported {} files from {}", files.len(), root.display());
        for f in manifest["files"].as_array().expect("files") {
            say!(
                "  {} {} {:>14} bytes  {}",
                f["task_id"].as_str().unwrap_or(""),
                f["content_digest"].as_str().unwrap_or(""),
                f["content_length"],
                f["path"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}
