//! The `ferry` command line: `serve` runs the daemon; every other command is a client of a
//! daemon's control API.

use crate::config::{Config, ControlEndpoint, LogFormat, DEFAULT_CONTROL};
use crate::io::IoChoice;
use crate::proto::{self, ferry_client::FerryClient, transfer_event::Event};
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::{interceptor::InterceptedService, Interceptor};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// `println!` that stops quietly when stdout is closed (`ferry tasks | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "RDMA-accelerated piece transfer engine for GPU clusters (Dragonfly-compatible)"
)]
pub struct Cli {
    /// Control endpoint of the daemon (for `serve` and `config`, where to listen): a unix socket path or
    /// tcp://HOST:PORT [default: /run/ferry/control.sock, or the config file's `control`].
    #[arg(long, global = true, env = "FERRY_CONTROL")]
    pub control: Option<String>,
    #[command(flatten)]
    pub auth: ClientAuthArgs,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// How a client proves itself to a `tcp://` control endpoint (TLS-only; the daemon's side is
/// `[control_tcp]` in its configuration). The token may also come from `FERRY_TOKEN`.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientAuthArgs {
    /// CA certificate (PEM) the daemon's TLS certificate must chain to (tcp:// only).
    #[arg(long, global = true, env = "FERRY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Name to check the daemon's certificate against [default: the host of --control].
    #[arg(long, global = true, env = "FERRY_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// Client certificate (PEM), for a daemon that asks for one (mutual TLS).
    #[arg(long, global = true, env = "FERRY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "FERRY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File holding the bearer token sent as `authorization: Bearer <token>`; the token
    /// itself may instead be in FERRY_TOKEN (never on the command line, where `ps` shows it).
    #[arg(long, global = true, env = "FERRY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl ClientAuthArgs {
    /// What to present to the daemon: files read, the token from the file or FERRY_TOKEN.
    pub fn load(&self) -> anyhow::Result<ClientAuth> {
        let read = |flag: &str, path: &Option<PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
            path.as_ref()
                .map(|p| {
                    std::fs::read(p).with_context(|| format!("{flag}: reading {}", p.display()))
                })
                .transpose()
        };
        let token = match &self.token_file {
            Some(path) => Some(crate::control::read_token_file(path).context("--token-file")?),
            None => std::env::var("FERRY_TOKEN")
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
        };
        Ok(ClientAuth {
            ca_pem: read("--tls-ca", &self.tls_ca)?,
            identity_pem: match (
                read("--tls-cert", &self.tls_cert)?,
                read("--tls-key", &self.tls_key)?,
            ) {
                (Some(cert), Some(key)) => Some((cert, key)),
                _ => None,
            },
            domain: self.tls_domain.clone(),
            token,
        })
    }
}

/// A client's TLS trust, optional client certificate and bearer token, for `tcp://` control
/// endpoints (a unix socket needs none of it).
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    /// PEM CA certificates the daemon's certificate must chain to.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Name the daemon's certificate must carry [default: the endpoint's host].
    pub domain: Option<String>,
    pub token: Option<String>,
}

/// Adds `authorization: Bearer <token>` to every request, when there is a token.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of the control API, sending the bearer token when there is one.
pub type ControlClient = FerryClient<InterceptedService<Channel, BearerToken>>;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the data-plane listener, the store and the control API.
    Serve(ServeArgs),
    /// Print the configuration `ferry serve` would run with (it takes the same flags) and check it.
    ///
    /// Defaults, then the config file, then the flags, printed as TOML (`--json`: JSON). An
    /// invalid value exits non-zero naming the key and what is allowed.
    Config(ServeArgs),
    /// Make a local file a task held by the daemon (its bytes are copied into the store, or
    /// reflinked where the file and the store share a filesystem that has reflinks).
    Import(ImportArgs),
    /// Fetch a task from source peers (or an HTTP origin, --url) into the daemon's store and, with --output, place it at a path.
    /// `ferry pull oci://REGISTRY/REPO:TAG --output DIR` pulls a whole model (every layer a task).
    ///
    /// Without --output the task stays held in the store (and is served to peers from
    /// there); `ferry export` places it later. An output must be inside the daemon's
    /// output_dirs (none set: no output can be placed, pulls into the store still work).
    Pull(PullArgs),
    /// Place a task the daemon holds completely at a path, without contacting any source.
    ///
    /// The path must be inside the daemon's output_dirs (none set: every export is refused).
    /// The file gets the daemon's [output] mode and owner (default 0644, owner unchanged).
    Export(ExportArgs),
    /// Show one task and its pieces.
    Stat {
        /// Task id (64 hex characters).
        task_id: String,
    },
    /// List the tasks the daemon holds.
    Tasks,
    /// Show the transports and devices this host can use.
    Devices,
    /// Cancel the running transfer into a task (pieces already held stay held).
    Cancel { task_id: String },
    /// Delete a task and its bytes from the daemon's store.
    Delete { task_id: String },
    /// Fill the store with a model's layers (oci://...) without placing a directory, so a later pull is local.
    Preheat(crate::model::cli::PreheatArgs),
    /// Build a ModelPack artifact from a model directory and push it to an OCI registry (no daemon needed).
    Push(crate::model::cli::PushArgs),
    /// List the models the daemon holds, or show one (a reference or its manifest digest).
    Models { model: Option<String> },
}

/// The flags that set the daemon's configuration, shared by `serve` and `config`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file; flags override its values.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Where tasks are stored [default: /var/lib/ferry].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Data-plane listen address, IP:PORT [default: 0.0.0.0:4100].
    #[arg(long)]
    pub listen: Option<String>,
    /// Data-plane address to tell peers (when it differs from --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// A directory outputs (pull --output, export) may be placed in, symlinks resolved
    /// (repeatable; never inside the data dir). Without any, no output is placed anywhere:
    /// pulls fill the store only, and exports are refused.
    #[arg(long = "output-dir")]
    pub output_dirs: Vec<PathBuf>,
    /// Only files under this directory (symlinks resolved) may be imported (repeatable).
    /// Without any, every import is refused.
    #[arg(long = "import-dir")]
    pub import_dirs: Vec<PathBuf>,
    /// Buffer pool size in MiB, pinned at start-up [default: 0, sized from the NICs].
    #[arg(long)]
    pub pool_mib: Option<u64>,
    /// Disk I/O backend [default: auto].
    #[arg(long, value_enum)]
    pub io: Option<IoChoice>,
    /// Pieces in flight per source peer [default: 4, or with RDMA one queue pair's window per
    /// rail if more: 16 for 8 rails].
    #[arg(long)]
    pub streams_per_source: Option<u32>,
    /// Seconds of silence from a peer before a read fails [default: 10].
    #[arg(long)]
    pub io_timeout: Option<u64>,
    /// Log format on stderr: text, or json (one JSON object per line) [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Same as --log-format json (kept for existing scripts).
    #[arg(long, hide = true, conflicts_with = "log_format")]
    pub log_json: bool,
    /// Serve Prometheus metrics (GET /metrics) on this IP:PORT [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// On SIGTERM, seconds that pieces in flight may take to finish before running transfers
    /// are cancelled [default: 30].
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<u64>,
    /// Do not use RDMA even if the host has it.
    #[arg(long)]
    pub no_rdma: bool,
    /// A rail to use: DEVICE or DEVICE:PORT (e.g. mlx5_0, mlx5_1:1, rxe0); repeat for more
    /// [default: every active port; config rdma.devices].
    #[arg(long, value_name = "DEVICE[:PORT]")]
    pub rdma_device: Vec<String>,
    /// A rail never to use (a front-end or management NIC), DEVICE or DEVICE:PORT; repeatable
    /// [config rdma.exclude].
    #[arg(long, value_name = "DEVICE[:PORT]")]
    pub rdma_exclude: Vec<String>,
    /// Only this port of each RDMA device [default: every active one].
    #[arg(long)]
    pub rdma_port: Option<u8>,
    /// GID index [default: a RoCE v2 GID carrying an IPv4 address].
    #[arg(long)]
    pub rdma_gid_index: Option<u32>,
    /// A Dragonfly scheduler, HOST:PORT (repeatable): makes this daemon a Dragonfly peer
    /// (`[dragonfly] scheduler`; replaces the file's list).
    #[arg(long = "dragonfly-scheduler", value_name = "ADDR")]
    pub dragonfly_schedulers: Vec<String>,
    /// Where to serve dfdaemon.v2.DfdaemonUpload, IP:PORT [default: 0.0.0.0:4000].
    #[arg(long = "dragonfly-upload", value_name = "ADDR")]
    pub dragonfly_upload: Option<String>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file to import (a directory: every file under it, one task each, and the set printed).
    pub file: PathBuf,
    /// URL used for the task id [default: file://<absolute path>].
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long)]
    pub tag: Option<String>,
    #[arg(long)]
    pub application: Option<String>,
    #[arg(long)]
    pub revision: Option<String>,
    /// Piece length in bytes, 4 MiB to 64 MiB [default: from the file's length].
    #[arg(long)]
    pub piece_length: Option<u64>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// A model, oci://REGISTRY/REPOSITORY[:TAG][@sha256:HEX]: every layer pulled (from --from
    /// peers, else the registry) and, with --output DIR, the model laid out there atomically.
    #[arg(conflicts_with_all = ["task", "url"])]
    pub reference: Option<String>,
    #[command(flatten)]
    pub registry: crate::model::cli::RegistryArgs,
    /// Task id (64 hex characters) [default with --url: Dragonfly's id of the URL].
    #[arg(long, required_unless_present_any = ["url", "reference"])]
    pub task: Option<String>,
    /// Source peers' data addresses, HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',', required_unless_present_any = ["url", "reference"])]
    pub from: Vec<String>,
    /// An http:// or https:// origin: with no --from the only source (concurrent Range
    /// requests), with --from the fallback for pieces no peer could serve (back to source).
    #[arg(long)]
    pub url: Option<String>,
    /// A request header for the origin, `Name: value` (repeatable), e.g. an Authorization.
    #[arg(long = "header", requires = "url")]
    pub headers: Vec<String>,
    /// Task id input with --url, as Dragonfly's tag.
    #[arg(long, requires = "url")]
    pub tag: Option<String>,
    /// Task id input with --url, as Dragonfly's application.
    #[arg(long, requires = "url")]
    pub application: Option<String>,
    /// Range requests in flight to the origin [default: the daemon's origin.connections].
    #[arg(long, requires = "url")]
    pub connections: Option<u32>,
    /// Where the content appears once every piece verified (absolute, or relative to here),
    /// inside the daemon's output_dirs [default: none; the task stays in the store, for
    /// `ferry export`].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Content length, if known (otherwise asked from the sources).
    #[arg(long)]
    pub content_length: Option<u64>,
    /// Piece length, if known (otherwise asked from the sources).
    #[arg(long)]
    pub piece_length: Option<u64>,
    /// Pieces in flight per source [default: the daemon's].
    #[arg(long)]
    pub streams: Option<u32>,
    /// auto: RDMA where both sides have it, else TCP (and TCP for a piece RDMA failed);
    /// tcp: TCP only; rdma: RDMA only.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,
    /// The whole content's SHA-256, `sha256:<hex>`: only sources whose manifest agrees are
    /// used, and nothing is placed unless the content hashes to it. Without it the transfer
    /// pins the first digest a source states, and still verifies the content against it.
    #[arg(long)]
    pub digest: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Task id (64 hex characters) of a complete task the daemon holds.
    pub task: String,
    /// Where the content appears (absolute, or relative to here), inside the daemon's
    /// output_dirs; an existing file there is replaced atomically.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TransportArg {
    Auto,
    Tcp,
    Rdma,
}

pub fn main(cli: Cli) -> ExitCode {
    if let Command::Serve(args) = &cli.command {
        return match run_serve(args, cli.control.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("ferry serve: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Push(args) = &cli.command {
        return crate::model::cli::push_main(cli.json, args);
    }
    if let Command::Config(args) = &cli.command {
        return match show_config(args, cli.json, cli.control.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("ferry config: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run_client(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(status) = err.downcast_ref::<tonic::Status>() {
                eprintln!("ferry: {:?}: {}", status.code(), status.message());
            } else {
                eprintln!("ferry: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: &ServeArgs, control: Option<&str>) -> anyhow::Result<()> {
    let config = effective_config(args, control)?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry")
        .build()?;
    let served = runtime.block_on(crate::daemon::serve(config));
    // A blocking call still running (a file copy of an import the drain gave up on) must
    // not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    served
}

/// `ferry config`: the effective configuration, checked.
fn show_config(args: &ServeArgs, as_json: bool, control: Option<&str>) -> anyhow::Result<()> {
    let config = effective_config(args, control)?;
    config.validate()?;
    // Names are looked up as `serve` would (this host's users and groups).
    crate::transfer::OutputPolicy::resolve(&config.output)?;
    let sizing = config.pool_sizing();
    let pool = format!(
        "the buffer pool is {} MiB ({})",
        sizing.size_mib,
        if sizing.derived {
            format!("pool.size_mib = 0: sized from the NICs: {}", sizing.why)
        } else {
            sizing.why
        }
    );
    if as_json {
        say!("{}", serde_json::to_string_pretty(&config)?);
        eprintln!("ferry config: {pool}");
    } else {
        say!("{}", toml::to_string(&config)?.trim_end());
        say!("\n# {pool}");
    }
    Ok(())
}

/// Defaults, overridden by the config file, overridden by the flags (and `--control`): what
/// `ferry serve` runs with and `ferry config` prints.
pub fn effective_config(args: &ServeArgs, control: Option<&str>) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(v) = control {
        config.control = match ControlEndpoint::parse(v) {
            // The daemon and its clients may run from different directories.
            ControlEndpoint::Unix(path) if path.is_relative() => {
                std::path::absolute(path)?.display().to_string()
            }
            _ => v.to_owned(),
        };
    }
    if let Some(v) = &args.data_dir {
        config.data_dir = std::path::absolute(v)?;
    }
    if let Some(v) = &args.listen {
        config.listen = v.clone();
    }
    if let Some(v) = &args.advertise {
        config.advertise = Some(v.clone());
    }
    if !args.output_dirs.is_empty() {
        config.output_dirs = args
            .output_dirs
            .iter()
            .map(std::path::absolute)
            .collect::<Result<_, _>>()?;
    }
    if !args.import_dirs.is_empty() {
        config.import_dirs = args
            .import_dirs
            .iter()
            .map(std::path::absolute)
            .collect::<Result<_, _>>()?;
    }
    if let Some(v) = args.pool_mib {
        config.pool.size_mib = v;
    }
    if let Some(v) = args.io {
        config.io.backend = v;
    }
    if let Some(v) = args.streams_per_source {
        config.transfer.streams_per_source = v;
    }
    if let Some(v) = args.io_timeout {
        config.transfer.io_timeout_secs = v;
    }
    if args.no_rdma {
        config.rdma.enabled = false;
    }
    if !args.rdma_device.is_empty() {
        config.rdma.device = None;
        config.rdma.devices = args.rdma_device.clone();
    }
    if !args.rdma_exclude.is_empty() {
        config.rdma.exclude = args.rdma_exclude.clone();
    }
    if let Some(v) = args.rdma_port {
        config.rdma.port = Some(v);
    }
    if let Some(v) = args.rdma_gid_index {
        config.rdma.gid_index = Some(v);
    }
    if let Some(v) = args.log_format {
        config.log_format = v;
    }
    if args.log_json {
        config.log_format = LogFormat::Json;
    }
    if let Some(v) = &args.metrics {
        config.metrics.listen = v.clone();
    }
    if let Some(v) = args.drain_timeout {
        config.drain_timeout_secs = v;
    }
    if !args.dragonfly_schedulers.is_empty() {
        config.dragonfly.scheduler = args.dragonfly_schedulers.clone();
    }
    if let Some(v) = &args.dragonfly_upload {
        config.dragonfly.upload_listen = v.clone();
    }
    Ok(config)
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Opens a channel to the daemon's control endpoint (unix socket, or TCP without TLS: only
/// useful to show that a daemon refuses it).
pub async fn channel(control: &str) -> anyhow::Result<Channel> {
    channel_with(control, &ClientAuth::default()).await
}

/// Opens a channel to the daemon's control endpoint: a unix socket, or TLS over TCP when
/// `auth` has a CA (a `tcp://` endpoint without one is tried in plain text, which a Ferry
/// daemon refuses).
pub async fn channel_with(control: &str, auth: &ClientAuth) -> anyhow::Result<Channel> {
    Ok(match ControlEndpoint::parse(control) {
        ControlEndpoint::Tcp(addr) => {
            let Some(ca) = &auth.ca_pem else {
                return Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await
                    .with_context(|| {
                        format!("connecting to control API at {addr} in plain text (a tcp:// control endpoint is TLS-only: give --tls-ca)")
                    });
            };
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &auth.identity_pem {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &auth.domain {
                tls = tls.domain_name(domain.clone());
            }
            Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(tls)
                .context("control TLS configuration (--tls-ca, --tls-cert, --tls-key)")?
                .connect()
                .await
                .with_context(|| format!("connecting to control API at {addr} over TLS"))?
        }
        ControlEndpoint::Unix(path) => {
            let shown = path.display().to_string();
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .with_context(|| {
                    format!("connecting to control socket {shown} (is `ferry serve` running? set --control)")
                })?
        }
    })
}

/// Connects to the daemon's control API over its unix socket.
pub async fn connect(control: &str) -> anyhow::Result<ControlClient> {
    connect_with(control, &ClientAuth::default()).await
}

/// Connects to the daemon's control API, with TLS and a token for a `tcp://` endpoint.
pub async fn connect_with(control: &str, auth: &ClientAuth) -> anyhow::Result<ControlClient> {
    let token = auth
        .token
        .as_deref()
        .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>())
        .transpose()
        .context("the token must be printable ASCII")?;
    Ok(
        FerryClient::with_interceptor(channel_with(control, auth).await?, BearerToken(token))
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

async fn run_client(cli: &Cli) -> anyhow::Result<()> {
    let auth = cli.auth.load()?;
    let control = cli.control.as_deref().unwrap_or(DEFAULT_CONTROL);
    if matches!(ControlEndpoint::parse(control), ControlEndpoint::Tcp(_)) && auth.ca_pem.is_none() {
        bail!("{control}: a tcp:// control endpoint is TLS-only; give the CA its certificate chains to with --tls-ca (or FERRY_TLS_CA)");
    }
    let mut client = connect_with(control, &auth).await?;
    match &cli.command {
        Command::Serve(_) | Command::Config(_) => unreachable!("handled in main"),
        Command::Import(args) if args.file.is_dir() => {
            crate::model::cli::import_dir(cli.json, &mut client, &args.file).await?
        }
        Command::Preheat(args) => crate::model::cli::preheat(cli.json, &mut client, args).await?,
        Command::Models { model } => {
            crate::model::cli::models(cli.json, &mut client, model.as_deref()).await?
        }
        Command::Push(_) => unreachable!("handled in main"),
        Command::Import(args) => {
            let path = std::path::absolute(&args.file)?;
            let task = client
                .import_task(proto::ImportTaskRequest {
                    path: path.display().to_string(),
                    url: args.url.clone().unwrap_or_default(),
                    tag: args.tag.clone().unwrap_or_default(),
                    application: args.application.clone().unwrap_or_default(),
                    revision: args.revision.clone().unwrap_or_default(),
                    piece_length: args.piece_length.unwrap_or(0),
                })
                .await?
                .into_inner();
            print_task(cli.json, &task);
        }
        Command::Pull(args) => pull(cli.json, &mut client, args).await?,
        Command::Export(args) => {
            let path = std::path::absolute(&args.path)?;
            let placed = client
                .export_task(proto::ExportTaskRequest {
                    task_id: args.task.clone(),
                    output_path: path.display().to_string(),
                })
                .await?
                .into_inner();
            if cli.json {
                say!(
                    "{}",
                    json!({
                        "task_id": placed.task_id, "output": placed.output_path,
                        "content_length": placed.content_length, "placement": placed.placement,
                    })
                );
            } else {
                say!(
                    "placed {} ({} bytes) at {} ({})",
                    placed.task_id,
                    placed.content_length,
                    placed.output_path,
                    placed.placement
                );
            }
        }
        Command::Stat { task_id } => {
            let task = client
                .stat_task(proto::StatTaskRequest {
                    task_id: task_id.clone(),
                })
                .await?
                .into_inner();
            print_task(cli.json, &task);
        }
        Command::Tasks => {
            let tasks = client
                .list_tasks(proto::ListTasksRequest {})
                .await?
                .into_inner()
                .tasks;
            if cli.json {
                say!("{}", Value::Array(tasks.iter().map(task_json).collect()));
            } else {
                say!(
                    "{:<64}  {:>14}  {:>10}  {:>9}  STATE",
                    "TASK",
                    "BYTES",
                    "PIECE",
                    "HELD"
                );
                for t in &tasks {
                    let state = if t.transferring {
                        "transferring"
                    } else if t.complete {
                        "complete"
                    } else {
                        "partial"
                    };
                    say!(
                        "{:<64}  {:>14}  {:>10}  {:>4}/{:<4}  {state}",
                        t.task_id,
                        t.content_length,
                        t.piece_length,
                        t.pieces_held,
                        t.piece_count
                    );
                }
            }
        }
        Command::Devices => {
            let caps = client
                .get_capabilities(proto::GetCapabilitiesRequest {})
                .await?
                .into_inner();
            if cli.json {
                say!("{}", capabilities_json(&caps));
            } else {
                say!(
                    "host {} ({}), data plane {}",
                    caps.host_id,
                    caps.hostname,
                    caps.data_address
                );
                if let Some(store) = &caps.store {
                    say!(
                        "store {}: {} writes{}, pool {} MiB in {} KiB slots{}",
                        store.data_dir,
                        store.io_backend,
                        if store.direct_io { " (O_DIRECT)" } else { "" },
                        store.pool_bytes >> 20,
                        store.pool_slot_bytes >> 10,
                        if store.huge_pages { ", huge pages" } else { "" }
                    );
                }
                for t in &caps.transports {
                    let mut props: Vec<_> = t
                        .properties
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    props.sort();
                    say!(
                        "transport {:<5} {:<11} {} {}",
                        t.name,
                        if t.available {
                            "available"
                        } else {
                            "unavailable"
                        },
                        t.detail,
                        props.join(" ")
                    );
                }
                for line in device_lines(&caps.rdma_devices) {
                    say!("{line}");
                }
                for line in rail_lines(&caps.rdma_rails) {
                    say!("{line}");
                }
            }
        }
        Command::Cancel { task_id } => {
            client
                .cancel_transfer(proto::CancelTransferRequest {
                    task_id: task_id.clone(),
                })
                .await?;
            if cli.json {
                say!("{}", json!({"task_id": task_id, "cancelled": true}));
            } else {
                say!("cancelled the transfer into {task_id}");
            }
        }
        Command::Delete { task_id } => {
            client
                .delete_task(proto::DeleteTaskRequest {
                    task_id: task_id.clone(),
                })
                .await?;
            if cli.json {
                say!("{}", json!({"task_id": task_id, "deleted": true}));
            } else {
                say!("deleted {task_id}");
            }
        }
    }
    Ok(())
}

async fn pull(as_json: bool, client: &mut ControlClient, args: &PullArgs) -> anyhow::Result<()> {
    if let Some(reference) = &args.reference {
        return crate::model::cli::pull(as_json, client, reference, args).await;
    }
    let output = args
        .output
        .as_deref()
        .map(std::path::absolute)
        .transpose()?;
    let mut stream = client
        .transfer_pieces(proto::TransferPiecesRequest {
            task_id: args.task.clone().unwrap_or_default(),
            content_length: args.content_length.unwrap_or(0),
            piece_length: args.piece_length.unwrap_or(0),
            pieces: Vec::new(),
            sources: args.from.clone(),
            output_path: output.map(|p| p.display().to_string()).unwrap_or_default(),
            transport: match args.transport {
                TransportArg::Auto => proto::TransportPreference::Auto,
                TransportArg::Tcp => proto::TransportPreference::Tcp,
                TransportArg::Rdma => proto::TransportPreference::Rdma,
            } as i32,
            streams_per_source: args.streams.unwrap_or(0),
            digest: args.digest.clone().unwrap_or_default(),
            url: args.url.clone().unwrap_or_default(),
            headers: args.headers.clone(),
            tag: args.tag.clone().unwrap_or_default(),
            application: args.application.clone().unwrap_or_default(),
            origin_connections: args.connections.unwrap_or(0),
        })
        .await?
        .into_inner();
    let show_bar = !as_json && std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut pieces = Vec::new();
    let mut summary = None;
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(Event::Started(started)) if show_bar => {
                let b = ProgressBar::new(started.bytes_to_fetch);
                b.set_style(
                    ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .expect("template"),
                );
                bar = Some(b);
            }
            Some(Event::Piece(piece)) => {
                if let Some(b) = &bar {
                    b.inc(piece.bytes);
                }
                pieces.push(piece);
            }
            Some(Event::Summary(s)) => summary = Some(s),
            Some(Event::Started(_)) | None => {}
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let Some(summary) = summary else {
        bail!("the daemon ended the transfer without a summary")
    };
    if as_json {
        let value = json!({
            "task_id": summary.task_id,
            "output": summary.output_path,
            "pieces": pieces.iter().map(|p| json!({
                "number": p.number, "offset": p.offset, "length": p.length, "digest": p.digest,
                "source": p.source, "transport": p.transport, "rail": p.rail, "bytes": p.bytes,
                "rails": p.rails.iter().map(|x| json!({"rail": x.rail, "bytes": x.bytes})).collect::<Vec<_>>(),
                "fetch_micros": p.fetch_micros, "write_micros": p.write_micros, "attempt": p.attempt,
            })).collect::<Vec<_>>(),
            "summary": summary_json(&summary),
        });
        say!("{value}");
    } else {
        let secs = summary.elapsed_micros as f64 / 1e6;
        let rate = if secs > 0.0 {
            summary.bytes_fetched as f64 / secs
        } else {
            0.0
        };
        let placed = if summary.output_path.is_empty() {
            "into the store".to_owned()
        } else {
            format!("to {} ({})", summary.output_path, summary.placement)
        };
        say!(
            "pulled {} ({} bytes) {placed} in {:.2}s: {:.1} MiB/s ({:.2} Gbit/s); {} pieces fetched, {} already held, {} retries, {} RDMA fallbacks",
            summary.task_id,
            summary.content_length,
            secs,
            rate / (1 << 20) as f64,
            rate * 8.0 / 1e9,
            summary.pieces_fetched,
            summary.pieces_reused,
            summary.retries,
            summary.rdma_fallbacks
        );
        if !summary.content_digest.is_empty() {
            say!("  content {} (verified)", summary.content_digest);
        }
        if args.url.is_some() {
            say!(
                "  back to source {:>14} bytes  {} origin retries",
                summary.back_to_source_bytes,
                summary.origin_retries
            );
        }
        for refused in &summary.refused_sources {
            say!("  refused source {refused}");
        }
        for t in &summary.transports {
            say!(
                "  transport {:<5} {:>14} bytes  {:>5} pieces",
                t.transport,
                t.bytes,
                t.pieces
            );
        }
        for r in &summary.rails {
            say!(
                "  rail {:<26} {:>14} bytes  {:>5} pieces",
                r.rail,
                r.bytes,
                r.pieces
            );
        }
        for s in &summary.sources {
            say!(
                "  source {:<22} {:>14} bytes  {:>5} pieces  {} failures",
                s.source,
                s.bytes,
                s.pieces,
                s.failures
            );
        }
        if summary.output_path.is_empty() {
            say!(
                "held in the store as task {id}; place it with `ferry export {id} PATH`",
                id = summary.task_id
            );
        }
    }
    Ok(())
}

fn summary_json(s: &proto::TransferSummary) -> Value {
    json!({
        "task_id": s.task_id, "content_length": s.content_length, "piece_length": s.piece_length,
        "pieces_requested": s.pieces_requested, "pieces_fetched": s.pieces_fetched,
        "pieces_reused": s.pieces_reused, "retries": s.retries, "bytes_fetched": s.bytes_fetched,
        "elapsed_micros": s.elapsed_micros, "output_path": s.output_path, "placement": s.placement, "rdma_fallbacks": s.rdma_fallbacks,
        "content_digest": s.content_digest, "refused_sources": s.refused_sources,
        "back_to_source_bytes": s.back_to_source_bytes, "origin_retries": s.origin_retries,
        "bits_per_second": if s.elapsed_micros > 0 { s.bytes_fetched as f64 * 8.0 / (s.elapsed_micros as f64 / 1e6) } else { 0.0 },
        "sources": s.sources.iter().map(|x| json!({"source": x.source, "bytes": x.bytes, "pieces": x.pieces, "failures": x.failures})).collect::<Vec<_>>(),
        "transports": s.transports.iter().map(|x| json!({"transport": x.transport, "bytes": x.bytes, "pieces": x.pieces})).collect::<Vec<_>>(),
        "rails": s.rails.iter().map(|x| json!({"rail": x.rail, "bytes": x.bytes, "pieces": x.pieces})).collect::<Vec<_>>(),
    })
}

fn task_json(t: &proto::Task) -> Value {
    json!({
        "task_id": t.task_id, "content_length": t.content_length, "piece_length": t.piece_length,
        "piece_count": t.piece_count, "pieces_held": t.pieces_held, "complete": t.complete,
        "pieces_served": t.pieces_served, "transferring": t.transferring,
        "content_digest": t.content_digest, "content_digest_state": t.content_digest_state,
        "import_method": t.import_method,
        "pieces": t.pieces.iter().map(|p| json!({"number": p.number, "offset": p.offset, "length": p.length, "digest": p.digest, "held": p.held})).collect::<Vec<_>>(),
    })
}

fn capabilities_json(c: &proto::Capabilities) -> Value {
    json!({
        "host_id": c.host_id, "hostname": c.hostname, "data_address": c.data_address, "version": c.version,
        "transports": c.transports.iter().map(|t| json!({"name": t.name, "available": t.available, "detail": t.detail, "properties": t.properties})).collect::<Vec<_>>(),
        "store": c.store.as_ref().map(|s| json!({
            "data_dir": s.data_dir, "io_backend": s.io_backend, "direct_io": s.direct_io, "pool_bytes": s.pool_bytes,
            "pool_slot_bytes": s.pool_slot_bytes, "huge_pages": s.huge_pages, "output_dirs": s.output_dirs,
        })),
        "rdma_devices": c.rdma_devices.iter().map(|d| json!({
            "name": d.name, "node_guid": d.node_guid,
            "ports": d.ports.iter().map(|p| json!({
                "number": p.number, "state": p.state, "link_layer": p.link_layer, "lid": p.lid, "subnet_prefix": p.subnet_prefix,
                "active_mtu": p.active_mtu, "speed_gbps": p.speed_gbps,
                "gids": p.gids.iter().map(|g| json!({"index": g.index, "gid": g.gid, "type": g.r#type, "netdev": g.netdev, "ipv4": g.ipv4})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "rdma_rails": c.rdma_rails.iter().map(|r| json!({
            "name": r.name, "used": r.used, "reason": r.reason, "carrying": r.carrying,
            "link_layer": r.link_layer, "lid": r.lid, "gid_index": r.gid_index, "gid": r.gid, "fabric": r.fabric,
            "speed_gbps": r.speed_gbps, "numa_node": (r.numa_node >= 0).then_some(r.numa_node), "pci_address": r.pci_address,
        })).collect::<Vec<_>>(),
    })
}

/// `ferry devices` in text: the rails (in use, and the ports that are not, with why).
fn rail_lines(rails: &[proto::RdmaRail]) -> Vec<String> {
    rails
        .iter()
        .map(|r| {
            if !r.used {
                return format!("rail {:<12} not used: {}", r.name, r.reason);
            }
            format!(
                "rail {:<12} {} LID {} GID {} {} fabric {} {} Gbit/s NUMA {} PCI {}{}",
                r.name,
                r.link_layer,
                r.lid,
                r.gid_index,
                r.gid,
                r.fabric,
                r.speed_gbps,
                if r.numa_node >= 0 {
                    r.numa_node.to_string()
                } else {
                    "-".into()
                },
                if r.pci_address.is_empty() {
                    "-"
                } else {
                    &r.pci_address
                },
                if r.carrying { " (carrying pieces)" } else { "" }
            )
        })
        .collect()
}

/// `ferry devices` in text: per device, each port (state, link layer, LID, MTU, speed,
/// subnet prefix) and its GIDs.
fn device_lines(devices: &[proto::RdmaDevice]) -> Vec<String> {
    let mut lines = Vec::new();
    for d in devices {
        lines.push(format!("device {} (node GUID {})", d.name, d.node_guid));
        for p in &d.ports {
            lines.push(format!(
                "  port {} {} link layer {} LID {} MTU {} {} Gbit/s subnet prefix {}",
                p.number, p.state, p.link_layer, p.lid, p.active_mtu, p.speed_gbps, p.subnet_prefix
            ));
            for g in &p.gids {
                lines.push(format!(
                    "    GID {:>3} {:<7} {}{}",
                    g.index,
                    g.r#type,
                    g.gid,
                    if g.netdev.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", g.netdev)
                    }
                ));
            }
        }
    }
    lines
}

fn print_task(as_json: bool, task: &proto::Task) {
    if as_json {
        say!("{}", task_json(task));
        return;
    }
    say!("task {}", task.task_id);
    if !task.import_method.is_empty() {
        say!("  imported by {}", task.import_method);
    }
    say!(
        "  content length {} bytes, piece length {}, {}/{} pieces held{}",
        task.content_length,
        task.piece_length,
        task.pieces_held,
        task.piece_count,
        if task.complete { " (complete)" } else { "" }
    );
    if !task.content_digest.is_empty() {
        say!(
            "  content {} ({})",
            task.content_digest,
            task.content_digest_state
        );
    }
    say!("  pieces served to peers: {}", task.pieces_served);
    for p in &task.pieces {
        say!(
            "  piece {:>5}  offset {:>14}  length {:>10}  {}",
            p.number,
            p.offset,
            p.length,
            if p.held {
                p.digest.as_str()
            } else {
                "(missing)"
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_text_shows_lid_and_link_layer_per_port() {
        let devices = [proto::RdmaDevice {
            name: "mlx5_0".into(),
            node_guid: "0002c90300010203".into(),
            ports: vec![proto::RdmaPort {
                number: 1,
                state: "Active".into(),
                link_layer: "InfiniBand".into(),
                active_mtu: 4096,
                speed_gbps: 400.0,
                gids: vec![proto::RdmaGid {
                    index: 0,
                    gid: "fe80::2:c903:1:203".into(),
                    r#type: "IB".into(),
                    netdev: String::new(),
                    ipv4: String::new(),
                }],
                lid: 17,
                subnet_prefix: "fe80000000000000".into(),
            }],
        }];
        assert_eq!(
            device_lines(&devices),
            [
                "device mlx5_0 (node GUID 0002c90300010203)",
                "  port 1 Active link layer InfiniBand LID 17 MTU 4096 400 Gbit/s subnet prefix fe80000000000000",
                "    GID   0 IB      fe80::2:c903:1:203",
            ]
        );
    }

    #[test]
    fn rails_text_shows_placement_and_why_a_port_is_not_a_rail() {
        let rails = [
            proto::RdmaRail {
                name: "mlx5_0:1".into(),
                used: true,
                link_layer: "Ethernet".into(),
                gid_index: 3,
                gid: "::ffff:10.0.0.1".into(),
                fabric: "10.0.0.0/24".into(),
                speed_gbps: 400.0,
                numa_node: 1,
                pci_address: "0000:17:00.0".into(),
                carrying: true,
                ..Default::default()
            },
            proto::RdmaRail {
                name: "mlx5_bond:1".into(),
                reason: "excluded by rdma.exclude mlx5_bond".into(),
                numa_node: -1,
                ..Default::default()
            },
        ];
        assert_eq!(
            rail_lines(&rails),
            [
                "rail mlx5_0:1     Ethernet LID 0 GID 3 ::ffff:10.0.0.1 fabric 10.0.0.0/24 400 Gbit/s NUMA 1 PCI 0000:17:00.0 (carrying pieces)",
                "rail mlx5_bond:1  not used: excluded by rdma.exclude mlx5_bond",
            ]
        );
    }

    #[test]
    fn rdma_device_flags_are_rails_and_exclusions() {
        let cli = Cli::try_parse_from([
            "ferry",
            "serve",
            "--rdma-device",
            "mlx5_0",
            "--rdma-device",
            "mlx5_1:1",
            "--rdma-exclude",
            "mlx5_bond",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("a serve command");
        };
        assert_eq!(args.rdma_device, ["mlx5_0", "mlx5_1:1"]);
        assert_eq!(args.rdma_exclude, ["mlx5_bond"]);
    }
}
