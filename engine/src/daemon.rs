//! `ferry serve`: builds the pool, the I/O engine and the store, then runs the data-plane
//! listener and the control API until SIGTERM or SIGINT, and then drains.
//!
//! Lifecycle, as systemd's `Type=notify` sees it: READY=1 once the store is recovered and the
//! data and control listeners are bound. On the first SIGTERM or SIGINT: STOPPING=1, new
//! transfers and imports are refused (UNAVAILABLE), running transfers finish the pieces they
//! have in flight and take no more; after `drain_timeout_secs`, or at a second signal, the
//! transfers still running are cancelled. Every held piece is already durable (journaled and
//! synced before it counts), so then the listeners close and the process exits 0.

use crate::config::{Config, ControlEndpoint};
use crate::control::{tcp_control_security, BearerAuth, ControlService, HostInfo};
use crate::io::{BufferPool, IoEngine, Shares};
use crate::metrics::Metrics;
use crate::proto::ferry_server::FerryServer;
use crate::rdma::{RdmaHost, RdmaSettings};
use crate::sd_notify;
use crate::serve::StoreProvider;
use crate::store::{Store, StoreOptions};
use crate::transfer::{Engine, OutputPolicy, TransferSettings};
use crate::transport::TcpTransport;
use anyhow::Context;
use ferry_fallback_tcp::{ClientConfig, Server, ServerConfig};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;

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
    // Before anything is created: an unknown output.owner is a configuration error.
    let output_policy = OutputPolicy::resolve(&config.output)?;
    output_policy.check_capability(&config.output)?;
    // Handlers first: a signal during start-up (pinning a large pool takes seconds) then
    // drains right after start-up instead of killing the process half-way.
    let mut signals = Signals::install().context("installing the SIGTERM and SIGINT handlers")?;
    let started = Instant::now();
    let slot = (config.pool.slot_mib * MIB) as usize;
    let sizing = config.pool_sizing();
    let slots = (sizing.size_mib / config.pool.slot_mib) as usize;
    // The rails first: the pool is laid out by their NUMA nodes (one part per node with
    // rails, each registered only on its node's rails).
    let found = RdmaHost::discover(&config.rdma);
    let layout = crate::rdma::pool_layout(found.plan(&config.rdma), slots);
    let pool = BufferPool::with_layout(slot, &layout, Shares::default_for(slots))
        .context("allocating the buffer pool")?;
    // For fault tests: a slot given back early and reused would then show as wrong bytes
    // (caught by the piece digests) instead of going unnoticed.
    if std::env::var_os("FERRY_TEST_POISON_POOL").is_some_and(|v| v == "1") {
        tracing::warn!("FERRY_TEST_POISON_POOL=1: every buffer returned to the pool is overwritten (a test setting; it costs a memset per piece)");
        pool.set_poison_on_release(true);
    }
    let info = pool.info();
    let shares = pool.shares();
    tracing::info!(
        bytes = pool.total_bytes(),
        slot_bytes = info.slot_size,
        huge_pages = info.huge_pages,
        locked = info.locked,
        sized = %sizing.why,
        receive_reserved_slots = shares.receive,
        serve_reserved_slots = shares.serve,
        import_reserved_slots = shares.import,
        parts = pool.parts().len(),
        "buffer pool ready"
    );
    for (index, part) in pool.parts().iter().enumerate() {
        tracing::info!(
            part = index,
            numa_node = ?part.numa_node,
            first_slot = part.first_slot,
            slots = part.slots,
            sampled_pages_on_node = ?part.pages_on_node,
            "buffer pool part"
        );
    }
    let rdma = Arc::new(RdmaHost::open(found, &config.rdma, &pool));
    let io = IoEngine::start(&pool, config.io.backend, config.io.threads)
        .context("starting the I/O engine")?;
    tracing::info!(backend = io.name(), "I/O engine ready");
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let io_timeout = Duration::from_secs(config.store.io_timeout_secs);
    // A pool drained by stuck work fails the waiting piece instead of hanging it.
    pool.set_acquire_timeout(Some(io_timeout));
    let options = StoreOptions {
        direct_io: config.io.direct,
        io_timeout,
        max_open_tasks: config.store.max_open_tasks,
    };
    let store = Arc::new(Store::open_with(&config.data_dir, pool, io, options)?);
    for set_aside in store.quarantined() {
        tracing::warn!(task = %set_aside.name, path = %set_aside.path.display(), reason = %set_aside.reason, "task dir quarantined at start-up");
    }

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
    let streams_per_source =
        transfer.streams_per_source(rdma.open_rails().len(), config.rdma.window);
    tracing::info!(
        streams_per_source,
        rails = rdma.open_rails().len(),
        "pieces in flight per source"
    );
    let settings = TransferSettings {
        streams_per_source,
        piece_timeout: Duration::from_secs(transfer.piece_timeout_secs),
        max_attempts: transfer.max_attempts,
        source_failure_limit: transfer.source_failure_limit,
        max_task_bytes: config.store.max_task_bytes,
    };
    let mut output_dirs = Vec::new();
    for dir in &config.output_dirs {
        output_dirs.push(
            dir.canonicalize()
                .with_context(|| format!("output dir {}", dir.display()))?,
        );
    }
    if output_dirs.is_empty() {
        tracing::info!("output_dirs is empty: transfers fill the store only; a request naming an output path, and every export, is refused until output_dirs (--output-dir) is set");
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
        stripe_pieces: config.rdma.stripe_pieces,
        rail_health: config.rdma.rail_health(),
    };
    let idle_timeout = Duration::from_secs(config.server.idle_timeout_secs);
    let metrics = Arc::new(Metrics::new());
    metrics.observe_pool(Arc::clone(store.pool()));
    metrics.observe_io(Arc::clone(store.io_counters()));
    metrics.set_rdma_registered_bytes(rdma.registered_bytes());
    let (rdma_transport, rdma_service) = rdma
        .exchange_observed(&store, rdma_settings, idle_timeout, &metrics)
        .unzip();
    let rdma_available = rdma_service.is_some();
    let engine = Arc::new(
        Engine::new(
            Arc::clone(&store),
            tcp,
            rdma_transport,
            settings,
            output_dirs,
        )
        .with_output_policy(output_policy)
        .with_origin_settings(config.origin.settings())
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
    let mut server = Server::new(listener, provider, server_config);
    for listener in rdma.rail_listeners(bound).await {
        server = server.also_listen(listener);
    }
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
        Some(tokio::spawn(crate::metrics::serve(
            listener,
            Arc::clone(&metrics),
        )))
    };

    let dragonfly_stop = CancellationToken::new();
    let dragonfly = if config.dragonfly.enabled() {
        Some(
            start_dragonfly(
                &config,
                &data_address,
                bound.port(),
                &host,
                &rdma,
                rdma_available,
                &store,
                &metrics,
                &dragonfly_stop,
            )
            .await?,
        )
    } else {
        None
    };

    let leaving = dragonfly.clone();
    let drain = Drain::new(Duration::from_secs(config.drain_timeout_secs));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FerryServer<ControlService>>().await;
    let service = FerryServer::new(ControlService {
        engine: Arc::clone(&engine),
        host,
        rdma,
        import_dirs,
        drain: Arc::clone(&drain),
        dragonfly,
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

    // Resolves once drained; the control server then stops accepting and closes.
    let drained = CancellationToken::new();
    let shutdown = {
        let engine = Arc::clone(&engine);
        let drained = drained.clone();
        async move {
            drain_on_signal(&mut signals, &engine, &drain, &health).await;
            drained.cancel();
        }
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
            let served = close_within_grace(
                router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown),
                &drained,
            )
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
            close_within_grace(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown),
                &drained,
            )
            .await
        }
    };
    dragonfly_stop.cancel();
    if let Some(scheduler) = &leaving {
        scheduler.leave().await;
    }
    data_plane.abort();
    if let Some(endpoint) = metrics_endpoint {
        endpoint.abort();
    }
    result.context("control API server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Starts the Dragonfly peer: the DfdaemonUpload server on `upload_listen` (with
/// grpc.health.v1), the tx/rx rate sampler and the AnnounceHost loop.
#[allow(clippy::too_many_arguments)]
async fn start_dragonfly(
    config: &Config,
    data_address: &str,
    data_port: u16,
    host: &HostInfo,
    rdma: &RdmaHost,
    rdma_available: bool,
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> anyhow::Result<Arc<crate::dragonfly::scheduler::Scheduler>> {
    use crate::dragonfly::{self, HostFacts, Peer, Rates};
    let listen = &config.dragonfly.upload_listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding dragonfly.upload_listen {listen}"))?;
    let upload = listener.local_addr()?;
    let ip = dragonfly_ip(data_address, upload).await;
    let hostname = config
        .dragonfly
        .hostname
        .clone()
        .unwrap_or_else(|| host.hostname.clone());
    let speed = if rdma_available {
        rdma.devices_message()
            .iter()
            .flat_map(|d| d.ports.iter())
            .filter(|p| p.state.eq_ignore_ascii_case("active"))
            .map(|p| p.speed_gbps)
            .fold(0.0, f64::max)
    } else {
        0.0
    };
    let max_bandwidth = dragonfly::max_bandwidth(
        config.dragonfly.max_bandwidth_bps,
        speed,
        std::path::Path::new("/sys/class/net"),
    );
    let rates = Arc::new(Rates::default());
    rates.spawn_sampler(Arc::clone(metrics));
    let peer = Arc::new(Peer {
        config: config.dragonfly.clone(),
        host: HostFacts {
            id: format!("{ip}-{hostname}"),
            hostname,
            ip: ip.clone(),
            upload_port: upload.port(),
            data_port,
            data_dir: config.data_dir.clone(),
        },
        max_bandwidth,
        rates,
        store: Arc::clone(store),
        metrics: Arc::clone(metrics),
        rdma: rdma_available,
    });
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<dragonfly_api::dfdaemon::v2::dfdaemon_upload_server::DfdaemonUploadServer<
            dragonfly::upload::UploadService,
        >>()
        .await;
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(dragonfly::upload::server(Arc::clone(&peer)));
    let serving_stop = stop.clone();
    tokio::spawn(async move {
        let _health = health;
        if let Err(err) = router
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                serving_stop.cancelled(),
            )
            .await
        {
            tracing::error!(error = %err, "the DfdaemonUpload server failed");
        }
    });
    // Tests and operators that ask for port 0 learn the real one from this line.
    tracing::info!(upload_address = %upload, ip, max_tx_bandwidth = peer.max_bandwidth.bps, bandwidth_from = %peer.max_bandwidth.from, schedulers = ?config.dragonfly.scheduler, "Dragonfly peer: DfdaemonUpload listening");
    let scheduler = crate::dragonfly::scheduler::Scheduler::new(peer)
        .map_err(|s| anyhow::anyhow!("dragonfly.scheduler: {}", s.message()))?;
    scheduler.spawn_announcer(stop.clone());
    Ok(scheduler)
}

/// The IP announced to Dragonfly: the data address's when it is one, else the upload
/// listener's when it is specific, else the first non-loopback address the hostname
/// resolves to, else 127.0.0.1.
async fn dragonfly_ip(data_address: &str, upload: SocketAddr) -> String {
    let host = data_address
        .rsplit_once(':')
        .map_or(data_address, |(h, _)| h)
        .trim_matches(['[', ']']);
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        if !ip.is_unspecified() {
            return ip.to_string();
        }
    }
    if !upload.ip().is_unspecified() {
        return upload.ip().to_string();
    }
    if let Ok(addrs) = tokio::net::lookup_host((host, 0)).await {
        let addrs: Vec<_> = addrs.collect();
        if let Some(addr) = addrs
            .iter()
            .find(|a| !a.ip().is_loopback())
            .or(addrs.first())
        {
            return addr.ip().to_string();
        }
    }
    tracing::warn!(host, "cannot tell this host's IP for Dragonfly; announcing 127.0.0.1 (set advertise = \"IP:PORT\")");
    "127.0.0.1".into()
}

/// How long control connections may stay open once the drain is over.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Runs the control server. Its graceful close waits for open calls, which the drain has just
/// ended; a client that keeps one open does not hold the daemon up past [`CLOSE_GRACE`].
async fn close_within_grace<E>(
    serving: impl std::future::Future<Output = Result<(), E>>,
    drained: &CancellationToken,
) -> Result<(), E> {
    let too_long = async {
        drained.cancelled().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        result = serving => result,
        () = too_long => {
            tracing::warn!(grace = ?CLOSE_GRACE, "control connections still open after the drain; closing them");
            Ok(())
        }
    }
}

/// How long cancelled transfers may take to wind down after the drain timeout.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Admission control for the work the control API starts (transfers and imports), and the
/// drain that ends it. An [`Admission`] is held for as long as its work runs.
#[derive(Debug)]
pub struct Drain {
    state: watch::Sender<DrainState>,
    timeout: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
struct DrainState {
    draining: bool,
    /// The drain timeout passed (or a second signal came) and running transfers were cancelled.
    forced: bool,
    in_flight: usize,
}

/// One admitted transfer or import; dropping it marks that work finished.
#[derive(Debug)]
pub struct Admission(Arc<Drain>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.state.send_modify(|state| state.in_flight -= 1);
    }
}

impl Drain {
    pub fn new(timeout: Duration) -> Arc<Drain> {
        Arc::new(Drain {
            state: watch::Sender::new(DrainState::default()),
            timeout,
        })
    }

    /// Admits new work, unless draining.
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let mut admitted = false;
        self.state.send_if_modified(|state| {
            admitted = !state.draining;
            if admitted {
                state.in_flight += 1;
            }
            admitted
        });
        admitted.then(|| Admission(Arc::clone(self)))
    }

    pub fn is_draining(&self) -> bool {
        self.state.borrow().draining
    }

    /// Whether running transfers were cancelled because the drain took too long.
    pub fn was_forced(&self) -> bool {
        self.state.borrow().forced
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn in_flight(&self) -> usize {
        self.state.borrow().in_flight
    }

    /// Stops admitting work; returns how much is in flight.
    pub fn begin(&self) -> usize {
        self.state.send_modify(|state| state.draining = true);
        self.in_flight()
    }

    fn force(&self) {
        self.state.send_modify(|state| state.forced = true);
    }

    /// Resolves once no admitted work is in flight.
    pub async fn idle(&self) {
        let mut state = self.state.subscribe();
        let _ = state.wait_for(|state| state.in_flight == 0).await;
    }
}

/// SIGTERM and SIGINT, each counted: the first drains, the second cuts the drain short.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Waits for a signal, then drains: see the module documentation.
async fn drain_on_signal(
    signals: &mut Signals,
    engine: &Engine,
    drain: &Drain,
    health: &tonic_health::server::HealthReporter,
) {
    let signal = signals.next().await;
    let in_flight = drain.begin();
    engine.stop_taking_pieces();
    health
        .set_not_serving::<FerryServer<ControlService>>()
        .await;
    let timeout = drain.timeout();
    tell_systemd(&format!(
        "{}\nSTATUS=draining: {in_flight} transfers and imports in flight, at most {}s",
        sd_notify::STOPPING,
        timeout.as_secs()
    ));
    tracing::info!(
        signal,
        in_flight,
        timeout_secs = timeout.as_secs(),
        "draining: new transfers and imports are refused; pieces in flight may finish"
    );
    let drained = tokio::select! {
        () = drain.idle() => true,
        () = tokio::time::sleep(timeout) => {
            tracing::warn!(in_flight = drain.in_flight(), "drain timeout passed: cancelling the transfers still running");
            false
        }
        second = signals.next() => {
            tracing::warn!(signal = second, in_flight = drain.in_flight(), "second signal: cancelling the transfers still running");
            false
        }
    };
    if !drained {
        drain.force();
        engine.cancel_all();
        // Cancelled transfers stop at once; an import still copying its file is not waited
        // for much longer (the pieces it wrote stay held, the task shows as partial).
        tokio::select! {
            () = drain.idle() => {}
            () = tokio::time::sleep(CANCEL_GRACE) => {
                tracing::warn!(in_flight = drain.in_flight(), "work still running after cancelling; stopping anyway");
            }
            _ = signals.next() => {}
        }
    }
    tracing::info!("drained: every held piece is journaled and synced; closing the listeners");
}

/// A failed notification is logged, never fatal: the daemon works the same without systemd.
fn tell_systemd(state: &str) {
    if let Err(err) = sd_notify::notify(state) {
        tracing::warn!(error = %err, "could not notify systemd (NOTIFY_SOCKET)");
    }
}

/// Start-up is over: the store is recovered and both listeners are bound (connections queue in
/// their backlogs until served).
fn announce(config: &Config, data_address: &str, store: &Store, started: Instant) {
    tell_systemd(&format!(
        "{}\nSTATUS=serving: data plane {data_address}, control {}, {} tasks",
        sd_notify::READY,
        config.control,
        store.list().len()
    ));
    tracing::info!(
        control = %config.control,
        data = %data_address,
        data_dir = %config.data_dir.display(),
        tasks = store.list().len(),
        quarantined = store.quarantined().len(),
        max_open_tasks = store.max_open_tasks(),
        io = store.io_backend(),
        startup_ms = started.elapsed().as_millis() as u64,
        "ferry daemon ready"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_refuses_new_work_and_is_idle_once_admitted_work_ends() {
        let drain = Drain::new(Duration::from_secs(7));
        let first = drain.admit().expect("admitted before the drain");
        let second = drain.admit().expect("admitted before the drain");
        assert_eq!(drain.begin(), 2);
        assert!(drain.is_draining());
        assert!(drain.admit().is_none(), "nothing new while draining");
        drop(first);
        assert_eq!(drain.in_flight(), 1);
        let idle = tokio::spawn({
            let drain = Arc::clone(&drain);
            async move { drain.idle().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!idle.is_finished(), "one admission is still held");
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), idle)
            .await
            .expect("idle once the last admission ends")
            .unwrap();
        assert!(!drain.was_forced());
        drain.force();
        assert!(drain.was_forced());
        assert_eq!(drain.timeout(), Duration::from_secs(7));
    }
}
