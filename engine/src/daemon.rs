//! `ferry serve`: builds the pool, the I/O engine and the store, then runs the data-plane
//! listener and the control API until SIGTERM or SIGINT.

use crate::config::{Config, ControlEndpoint};
use crate::control::{tcp_control_security, BearerAuth, ControlService, HostInfo};
use crate::io::{BufferPool, IoEngine};
use crate::metrics::Metrics;
use crate::proto::ferry_server::FerryServer;
use crate::rdma::{RdmaHost, RdmaSettings};
use crate::store::{Store, StoreProvider};
use crate::transfer::{Engine, TransferSettings};
use crate::transport::TcpTransport;
use anyhow::Context;
use ferry_fallback_tcp::{ClientConfig, Server, ServerConfig};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};

const MIB: u64 = 1024 * 1024;

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The address peers should dial: the configured one, else the bound one (with the
/// hostname standing in for an unspecified IP).
fn advertised_address(config: &Config, bound: SocketAddr) -> String {
    if let Some(advertise) = &config.advertise {
        return advertise.clone();
    }
    if bound.ip().is_unspecified() {
        format!("{}:{}", hostname(), bound.port())
    } else {
        bound.to_string()
    }
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let started = Instant::now();
    let slot = (config.pool.slot_mib * MIB) as usize;
    let slots = (config.pool.size_mib / config.pool.slot_mib) as usize;
    let pool = BufferPool::new(slot, slots).context("allocating the buffer pool")?;
    let info = pool.info();
    tracing::info!(
        bytes = pool.total_bytes(),
        slot_bytes = info.slot_size,
        huge_pages = info.huge_pages,
        locked = info.locked,
        "buffer pool ready"
    );
    let rdma = Arc::new(RdmaHost::start(&config.rdma, &pool));
    let io = IoEngine::start(&pool, config.io.backend, config.io.threads)
        .context("starting the I/O engine")?;
    tracing::info!(backend = io.name(), "I/O engine ready");
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let store = Arc::new(Store::open(&config.data_dir, pool, io, config.io.direct)?);

    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding data port {}", config.listen))?;
    let bound = listener.local_addr()?;
    let hostname = hostname();
    let data_address = advertised_address(&config, bound);
    let host_ip = data_address
        .rsplit_once(':')
        .map(|(ip, _)| ip.trim_matches(['[', ']']).to_owned())
        .unwrap_or_default();
    let host = HostInfo {
        host_id: format!("{host_ip}-{hostname}"),
        hostname,
        data_address: data_address.clone(),
    };

    let transfer = &config.transfer;
    let tcp = Arc::new(TcpTransport::new(ClientConfig {
        connect_timeout: Duration::from_secs(transfer.connect_timeout_secs),
        io_timeout: Duration::from_secs(transfer.io_timeout_secs),
    }));
    let settings = TransferSettings {
        streams_per_source: transfer.streams_per_source,
        piece_timeout: Duration::from_secs(transfer.piece_timeout_secs),
        max_attempts: transfer.max_attempts,
        source_failure_limit: transfer.source_failure_limit,
    };
    let mut output_dirs = Vec::new();
    for dir in &config.output_dirs {
        output_dirs.push(
            dir.canonicalize()
                .with_context(|| format!("output dir {}", dir.display()))?,
        );
    }
    if output_dirs.is_empty() {
        tracing::info!("output_dirs is empty: transfers fill the store only; a request naming an output path is refused until output_dirs (--output-dir) is set");
    }
    let mut import_dirs = Vec::new();
    for dir in &config.import_dirs {
        import_dirs.push(
            dir.canonicalize()
                .with_context(|| format!("import_dirs: {}", dir.display()))?,
        );
    }
    let rdma_settings = RdmaSettings {
        chunk_size: config.rdma.chunk_kib * 1024,
        connect_timeout: Duration::from_secs(transfer.connect_timeout_secs),
        io_timeout: Duration::from_secs(transfer.io_timeout_secs),
        window: config.rdma.window as usize,
        queue_pairs: config.rdma.queue_pairs as usize,
    };
    let idle_timeout = Duration::from_secs(config.server.idle_timeout_secs);
    let metrics = Arc::new(Metrics::new());
    metrics.observe_pool(Arc::clone(store.pool()));
    metrics.set_rdma_registered_bytes(rdma.registered_bytes());
    let (rdma_transport, rdma_service) = rdma
        .exchange_observed(&store, rdma_settings, idle_timeout, &metrics)
        .unzip();
    let engine = Arc::new(
        Engine::new(
            Arc::clone(&store),
            tcp,
            rdma_transport,
            settings,
            output_dirs,
        )
        .with_metrics(Arc::clone(&metrics)),
    );

    let provider = Arc::new(StoreProvider {
        store: Arc::clone(&store),
        host_id: host.host_id.clone(),
        rdma: rdma_service,
    });
    let server_config = ServerConfig {
        idle_timeout: Duration::from_secs(config.server.idle_timeout_secs),
        write_timeout: Duration::from_secs(config.server.write_timeout_secs),
        max_connections: config.server.max_connections,
        max_connections_per_peer: config.server.max_connections_per_peer,
    };
    let server = Server::new(listener, provider, server_config);
    metrics.observe_server(server.stats());
    let data_plane = tokio::spawn(server.run());
    let metrics_endpoint = if config.metrics.listen.is_empty() {
        None
    } else {
        let listener = TcpListener::bind(&config.metrics.listen)
            .await
            .with_context(|| format!("binding metrics address {}", config.metrics.listen))?;
        // Tests and operators that ask for port 0 learn the real one from this line.
        tracing::info!(metrics_address = %listener.local_addr()?, "metrics endpoint listening (GET /metrics)");
        Some(tokio::spawn(crate::metrics::serve(listener, metrics)))
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FerryServer<ControlService>>().await;
    let service = FerryServer::new(ControlService {
        engine: Arc::clone(&engine),
        host,
        rdma,
        import_dirs,
    });
    let endpoint = ControlEndpoint::parse(&config.control);
    let mut builder = tonic::transport::Server::builder();
    let auth = match &endpoint {
        ControlEndpoint::Unix(_) => BearerAuth::none(),
        ControlEndpoint::Tcp(_) => {
            let (tls, auth) = tcp_control_security(&config.control_tcp)?;
            builder = builder.tls_config(tls).context(
                "control_tcp.tls_cert / control_tcp.tls_key / control_tcp.tls_client_ca",
            )?;
            auth
        }
    };
    let router = builder
        .layer(tonic::service::InterceptorLayer::new(auth))
        .add_service(health_service)
        .add_service(service);

    let shutdown_engine = Arc::clone(&engine);
    let shutdown = async move {
        wait_for_signal().await;
        tracing::info!("shutting down: cancelling transfers");
        shutdown_engine.cancel_all();
    };
    let result = match &endpoint {
        ControlEndpoint::Unix(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)
                .with_context(|| format!("binding control socket {}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            announce(&config, &data_address, &store, started);
            let served = router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await;
            let _ = std::fs::remove_file(path);
            served
        }
        ControlEndpoint::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding control address {addr}"))?;
            tracing::info!(%addr, client_certificates = config.control_tcp.tls_client_ca.is_some(), token = config.control_tcp.token_file.is_some(), "control API on TCP with TLS");
            announce(&config, &data_address, &store, started);
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
    };
    data_plane.abort();
    if let Some(endpoint) = metrics_endpoint {
        endpoint.abort();
    }
    result.context("control API server failed")?;
    tracing::info!("stopped");
    Ok(())
}

fn announce(config: &Config, data_address: &str, store: &Store, started: Instant) {
    tracing::info!(
        control = %config.control,
        data = %data_address,
        data_dir = %config.data_dir.display(),
        tasks = store.list().len(),
        io = store.io_backend(),
        startup_ms = started.elapsed().as_millis() as u64,
        "ferry daemon ready"
    );
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
