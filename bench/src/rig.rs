//! The pieces of Ferry every benchmark is built from, all in this one process: a seed store
//! serving on a real data port (TCP, plus the RDMA upgrade when devices are given), a
//! receiver store, and the daemon's own code paths between them.

use crate::report::{Measured, Stopwatch};
use anyhow::{bail, Context};
use ferry_engine::config::{RdmaConfig, RdmaPoll};
use ferry_engine::geometry::{self, Geometry};
use ferry_engine::import::{import_file, ImportOptions};
use ferry_engine::io::{
    BufferPool, IoChoice, IoEngine, PieceBuffer, Shares, TaskFile, WriteRequest,
};
use ferry_engine::rdma::{RdmaHost, RdmaSettings, RdmaStatus, RdmaTransport};
use ferry_engine::serve::StoreProvider;
use ferry_engine::store::Store;
use ferry_engine::transfer::{Engine, TransferRequest, TransferSettings, TransportChoice};
use ferry_engine::transport::{PieceTransport, TcpTransport};
use ferry_fallback_tcp::{ClientConfig, Server, ServerConfig};
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const MIB: u64 = 1024 * 1024;
pub const SLOT: u64 = 4 * MIB;

/// One rail pair: a device on the serving side and the one on the receiving side that it
/// reaches (inside `scripts/rxe-vm.sh --rails N`: rxe<2k> and rxe<2k+1>).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailPair {
    pub server_device: String,
    pub client_device: String,
    /// The serving device's address (ib_write_bw connects to it).
    pub server_addr: String,
}

/// The rail pairs a benchmark uses; the first one's address is the seed's data port.
#[derive(Debug, Clone)]
pub struct RdmaPlan {
    pub rails: Vec<RailPair>,
    pub chunk_kib: u32,
    /// Stripe pieces of several slots over the rail pairs (`rdma.stripe_pieces`).
    pub stripe_pieces: bool,
    /// How each device's completion thread waits (`rdma.poll`).
    pub poll: RdmaPoll,
}

/// Where the rail pairs come from: flags, else the variables `scripts/rxe-vm.sh` sets.
#[derive(Debug, Clone, Default)]
pub struct PlanRequest {
    pub server_devices: Vec<String>,
    pub client_devices: Vec<String>,
    pub server_addrs: Vec<String>,
    pub rails: Option<usize>,
    pub chunk_kib: u32,
    pub stripe_pieces: bool,
    pub poll: RdmaPoll,
}

impl RdmaPlan {
    /// The plan `request` asks for; None when it names no device and the environment has
    /// none (no RDMA here).
    pub fn new(request: &PlanRequest) -> anyhow::Result<Option<RdmaPlan>> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let list = |name: &str| -> Vec<String> {
            env(name).map_or_else(Vec::new, |v| v.split(',').map(str::to_owned).collect())
        };
        let flags = !(request.server_devices.is_empty()
            && request.client_devices.is_empty()
            && request.server_addrs.is_empty());
        let (servers, clients, addrs) = if flags {
            (
                request.server_devices.clone(),
                request.client_devices.clone(),
                request.server_addrs.clone(),
            )
        } else if request.rails.unwrap_or(1) == 1 {
            // One rail: the first pair scripts/rxe-vm.sh makes.
            match (
                env("FERRY_RXE_DEV0"),
                env("FERRY_RXE_DEV1"),
                env("FERRY_RXE_ADDR0"),
            ) {
                (Some(s), Some(c), Some(a)) => (vec![s], vec![c], vec![a]),
                _ => return Ok(None),
            }
        } else {
            (
                list("FERRY_RXE_A_DEVS"),
                list("FERRY_RXE_B_DEVS"),
                list("FERRY_RXE_A_ADDRS"),
            )
        };
        if servers.is_empty() && clients.is_empty() {
            return Ok(None);
        }
        if servers.len() != clients.len() || servers.len() != addrs.len() {
            bail!(
                "each rail pair needs a server device, a client device and a server address: got {} --server-device, {} --client-device, {} --server-addr",
                servers.len(),
                clients.len(),
                addrs.len()
            );
        }
        let rails = request.rails.unwrap_or(servers.len());
        if rails == 0 {
            bail!("--rails must be at least 1");
        }
        if rails > servers.len() || (flags && rails != servers.len()) {
            bail!(
                "--rails {rails}, but {} rail pair(s) are given{}",
                servers.len(),
                if flags {
                    ""
                } else {
                    " (scripts/rxe-vm.sh --rails N makes N)"
                }
            );
        }
        Ok(Some(RdmaPlan {
            rails: (servers.into_iter().zip(clients).zip(addrs))
                .take(rails)
                .map(|((server_device, client_device), server_addr)| RailPair {
                    server_device,
                    client_device,
                    server_addr,
                })
                .collect(),
            chunk_kib: request.chunk_kib,
            stripe_pieces: request.stripe_pieces,
            poll: request.poll,
        }))
    }

    /// Bytes per RDMA WRITE (also ib_write_bw's message size).
    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.chunk_kib) * 1024
    }

    /// Messages in flight on one ib_write_bw queue pair that match Ferry's: a window of
    /// `window` pieces of `piece_bytes`, in chunks.
    pub fn ib_depth(&self, window: usize, piece_bytes: u64) -> u32 {
        (window as u64 * piece_bytes).div_ceil(self.chunk_bytes()) as u32
    }

    /// The seed's data port binds here: the first rail's address.
    pub fn server_addr(&self) -> &str {
        &self.rails[0].server_addr
    }

    /// The receiving side's first device (registration is timed on it).
    pub fn client_device(&self) -> &str {
        &self.rails[0].client_device
    }

    pub fn server_devices(&self) -> Vec<String> {
        self.rails.iter().map(|r| r.server_device.clone()).collect()
    }

    pub fn client_devices(&self) -> Vec<String> {
        self.rails.iter().map(|r| r.client_device.clone()).collect()
    }

    /// `rxe0 -> rxe1, rxe2 -> rxe3`.
    pub fn describe(&self) -> String {
        (self.rails.iter())
            .map(|r| format!("{} -> {}", r.server_device, r.client_device))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The rail pairs, for ib_write_bw (one run per pair, all at once).
    pub fn ib_pairs(&self) -> Vec<crate::baseline::IbPair<'_>> {
        (self.rails.iter())
            .map(|r| crate::baseline::IbPair {
                server_device: &r.server_device,
                client_device: &r.client_device,
                server_addr: &r.server_addr,
            })
            .collect()
    }

    pub fn settings(&self, window: usize, queue_pairs: usize) -> RdmaSettings {
        RdmaSettings {
            chunk_size: self.chunk_kib * 1024,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            window,
            queue_pairs,
            stripe_pieces: self.stripe_pieces,
            rail_health: Default::default(),
        }
    }
}

/// Memory registration of one pool: bytes and seconds per GiB.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Registration {
    pub side: String,
    pub device: String,
    pub bytes: u64,
    pub seconds_per_gib: f64,
}

pub struct Rig {
    pub seed: Arc<Store>,
    pub receiver: Arc<Store>,
    /// The seed's data port.
    pub addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    client_rdma: Option<Arc<RdmaHost>>,
    _seed_rdma: Option<Arc<RdmaHost>>,
    pub registrations: Vec<Registration>,
    /// What the RDMA sides count (work per queue pair, windows, reads): the design figures.
    pub metrics: Arc<ferry_engine::metrics::Metrics>,
}

fn pool(pool_mib: u64) -> anyhow::Result<Arc<BufferPool>> {
    Ok(BufferPool::new(
        SLOT as usize,
        (pool_mib * MIB / SLOT) as usize,
    )?)
}

/// An RDMA host on `devices` (each one rail), the pool registered on each.
fn registered_host(
    pool: &Arc<BufferPool>,
    devices: &[String],
    poll: RdmaPoll,
    side: &str,
    registrations: &mut Vec<Registration>,
) -> anyhow::Result<Arc<RdmaHost>> {
    let config = RdmaConfig {
        devices: devices.to_vec(),
        poll,
        ..Default::default()
    };
    let host = RdmaHost::start(&config, pool);
    match &host.status {
        RdmaStatus::Ready { rails, .. } => {
            registrations.extend(rails.iter().map(|rail| Registration {
                side: side.into(),
                device: rail.name(),
                bytes: rail.region.len() as u64,
                seconds_per_gib: rail.region.seconds_per_gib(),
            }))
        }
        RdmaStatus::Unavailable(reason) => {
            bail!("RDMA device(s) {} unusable: {reason}", devices.join(", "))
        }
        RdmaStatus::Disabled => bail!("RDMA disabled"),
    }
    Ok(Arc::new(host))
}

impl Rig {
    /// A seed and a receiver, each with a `pool_mib` pool, under `dir`; with `rdma`, each
    /// pool registered on its device and the seed serving the RDMA upgrade on its port.
    pub async fn start(dir: &Path, pool_mib: u64, rdma: Option<&RdmaPlan>) -> anyhow::Result<Rig> {
        let mut registrations = Vec::new();
        let seed_pool = pool(pool_mib)?;
        let receiver_pool = pool(pool_mib)?;
        let (seed_rdma, client_rdma) = match rdma {
            Some(plan) => (
                Some(registered_host(
                    &seed_pool,
                    &plan.server_devices(),
                    plan.poll,
                    "seed",
                    &mut registrations,
                )?),
                Some(registered_host(
                    &receiver_pool,
                    &plan.client_devices(),
                    plan.poll,
                    "receiver",
                    &mut registrations,
                )?),
            ),
            None => (None, None),
        };
        let open = |name: &str, pool: Arc<BufferPool>| -> anyhow::Result<Arc<Store>> {
            let io = IoEngine::start(&pool, IoChoice::Auto, 1)?;
            Ok(Arc::new(Store::open(&dir.join(name), pool, io, true)?))
        };
        let seed = open("seed", seed_pool)?;
        let receiver = open("receiver", receiver_pool)?;
        let metrics = Arc::new(ferry_engine::metrics::Metrics::new());
        let bind = match rdma {
            Some(plan) => format!("{}:0", plan.server_addr()),
            None => "127.0.0.1:0".into(),
        };
        let rdma_service = match (&seed_rdma, rdma) {
            (Some(host), Some(plan)) => Some(
                host.exchange_observed(
                    &seed,
                    plan.settings(1, 1),
                    Duration::from_secs(60),
                    &metrics,
                )
                .context("RDMA not ready on the seed")?
                .1,
            ),
            _ => None,
        };
        let listener = tokio::net::TcpListener::bind(&bind).await?;
        let addr = listener.local_addr()?;
        let provider = Arc::new(StoreProvider {
            store: Arc::clone(&seed),
            host_id: "bench".into(),
            rdma: rdma_service,
        });
        let mut server = Server::new(listener, provider, ServerConfig::default());
        // Queue pairs on the other rails are set up to each rail's own address, as in the
        // daemon.
        if let Some(host) = &seed_rdma {
            for listener in host.rail_listeners(addr).await {
                server = server.also_listen(listener);
            }
        }
        let server = tokio::spawn(server.run());
        Ok(Rig {
            seed,
            receiver,
            addr,
            server,
            client_rdma,
            _seed_rdma: seed_rdma,
            registrations,
            metrics,
        })
    }

    /// Imports `size` random bytes into the seed in pieces of `piece_length`; `warm` reads
    /// the content once so the seed serves from its page cache (as iperf3 sends from memory).
    pub async fn seed_task(
        &self,
        scratch: &Path,
        size: u64,
        piece_length: u64,
        warm: bool,
    ) -> anyhow::Result<(String, Geometry)> {
        let piece_length = geometry::validate_piece_length(piece_length)?;
        let source = scratch.join(format!("source-{piece_length}.bin"));
        let mut random = std::fs::File::open("/dev/urandom")?.take(size);
        std::io::copy(&mut random, &mut std::fs::File::create(&source)?)?;
        let (task, _) = import_file(
            &self.seed,
            &source,
            &ImportOptions {
                piece_length,
                // Same bytes under another piece length are another task.
                url: Some(format!("bench://{}-{piece_length}", std::process::id())),
                ..Default::default()
            },
        )
        .await?;
        std::fs::remove_file(&source)?;
        if warm {
            std::io::copy(
                &mut std::fs::File::open(task.content_path())?,
                &mut std::io::sink(),
            )?;
        }
        Ok((task.id().to_owned(), task.geometry()))
    }

    pub fn tcp(&self) -> Arc<dyn PieceTransport> {
        Arc::new(TcpTransport::new(ClientConfig::default()))
    }

    /// The receiver's RDMA transport with this window and queue pairs per peer.
    pub fn rdma(
        &self,
        plan: &RdmaPlan,
        window: usize,
        queue_pairs: usize,
    ) -> Option<Arc<RdmaTransport>> {
        let host = self.client_rdma.as_ref()?;
        host.exchange_observed(
            &self.receiver,
            plan.settings(window, queue_pairs),
            Duration::from_secs(60),
            &self.metrics,
        )
        .map(|(transport, _)| transport)
    }

    /// Every piece fetched `rounds` times through `transport`, `in_flight` at a time, into the
    /// receiver's pool buffers and digest-verified; nothing written.
    pub async fn fetch_into_memory(
        &self,
        transport: Arc<dyn PieceTransport>,
        task_id: &str,
        geometry: Geometry,
        rounds: u32,
        in_flight: u32,
    ) -> anyhow::Result<Measured> {
        self.fetch_into_memory_from(transport, self.addr, task_id, geometry, rounds, in_flight)
            .await
    }

    /// `fetch_into_memory` from another host's data port.
    pub async fn fetch_into_memory_from(
        &self,
        transport: Arc<dyn PieceTransport>,
        source: SocketAddr,
        task_id: &str,
        geometry: Geometry,
        rounds: u32,
        in_flight: u32,
    ) -> anyhow::Result<Measured> {
        let pool = Arc::clone(self.receiver.pool());
        let total = u64::from(geometry.piece_count()) * u64::from(rounds);
        let next = Arc::new(AtomicU64::new(0));
        let watch = Stopwatch::start();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..in_flight {
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
                    let buf = pool.acquire(piece.length).await?;
                    let fetched = (transport.fetch(source, &task_id, piece, buf).await.result)
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
        Ok(watch.stop(bytes))
    }

    /// The daemon's whole transfer path into the receiver's store (verify, io_uring write,
    /// fdatasync, journal), timed; the received task is deleted afterwards so the next run
    /// fetches everything again.
    pub async fn transfer_into_store(
        &self,
        rdma: Option<Arc<RdmaTransport>>,
        task_id: &str,
        geometry: Geometry,
        in_flight: u32,
        transport: TransportChoice,
    ) -> anyhow::Result<Measured> {
        let engine = Arc::new(Engine::new(
            Arc::clone(&self.receiver),
            Arc::new(TcpTransport::new(ClientConfig::default())),
            rdma,
            TransferSettings {
                streams_per_source: in_flight,
                piece_timeout: Duration::from_secs(120),
                max_attempts: 3,
                source_failure_limit: 3,
                max_task_bytes: ferry_engine::config::DEFAULT_MAX_TASK_BYTES,
            },
            Vec::new(),
        ));
        let prepared = engine
            .prepare(TransferRequest {
                task_id: task_id.to_owned(),
                content_length: geometry.content_length(),
                piece_length: geometry.piece_length(),
                pieces: Vec::new(),
                sources: vec![self.addr.to_string()],
                output: None,
                streams_per_source: in_flight,
                transport,
                digest: None,
                origin: None,
                origin_connections: 0,
                source_weights: Vec::new(),
            })
            .await?;
        let (events, mut drain) = tokio::sync::mpsc::channel(64);
        let drained = tokio::spawn(async move { while drain.recv().await.is_some() {} });
        let watch = Stopwatch::start();
        let summary = engine.run(prepared, events).await?;
        let measured = watch.stop(summary.bytes_fetched);
        drained.await?;
        if summary.bytes_fetched != geometry.content_length() {
            bail!(
                "fetched {} of {} bytes",
                summary.bytes_fetched,
                geometry.content_length()
            );
        }
        if transport == TransportChoice::Rdma && summary.rdma_fallbacks > 0 {
            bail!("{} pieces fell back to TCP", summary.rdma_fallbacks);
        }
        self.receiver.delete(task_id)?;
        Ok(measured)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A recognisable pattern per block, so pages are real data (not zero pages).
pub fn fill(buf: &mut PieceBuffer, seed: u32) {
    for (i, chunk) in buf.chunks_mut().into_iter().enumerate() {
        let word = (u64::from(seed) << 32 | i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .to_le_bytes();
        for bytes in chunk.chunks_exact_mut(8) {
            bytes.copy_from_slice(&word);
        }
    }
}

/// The I/O engine's raw writes, as fio does them: O_DIRECT from registered buffers,
/// `depth` in flight, one sync at the end. The buffers are filled once, before the clock
/// starts, as fio fills its buffers once.
pub async fn engine_writes(
    dir: &Path,
    size: u64,
    block: u64,
    depth: usize,
) -> anyhow::Result<Measured> {
    use futures::stream::{FuturesUnordered, StreamExt};
    // One user of the whole pool: no budgets (the receiving budget alone cannot hold it).
    let pool = BufferPool::with_shares(block as usize, depth, Shares::NONE)?;
    let io = IoEngine::start(&pool, IoChoice::Auto, 1)?;
    let path = dir.join("engine.dat");
    let file = Arc::new(TaskFile::open(&path, true)?);
    let mut free = Vec::new();
    for n in 0..depth {
        let mut buf = pool.acquire(block).await?;
        fill(&mut buf, n as u32);
        free.push(buf);
    }
    let watch = Stopwatch::start();
    let mut in_flight = FuturesUnordered::new();
    let mut offset = 0;
    while offset < size {
        let buf = match free.pop() {
            Some(buf) => buf,
            None => {
                let (buf, result) = in_flight.next().await.expect("depth > 0 in flight");
                result?;
                buf
            }
        };
        let request = WriteRequest {
            file: Arc::clone(&file),
            offset,
            buf,
            len: block as usize,
        };
        let io = &io;
        in_flight.push(async move { io.write(request).await });
        offset += block;
    }
    while let Some((_, result)) = in_flight.next().await {
        result?;
    }
    file.file().sync_all()?;
    let measured = watch.stop(size);
    drop(in_flight);
    io.release_file(&file);
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(measured)
}

/// The store's piece path alone: each piece digested, written, made durable and journaled,
/// `depth` at a time (what a transfer does after the network).
pub async fn store_pieces(
    dir: &Path,
    size: u64,
    block: u64,
    depth: usize,
) -> anyhow::Result<(Measured, bool)> {
    // One user of the whole pool: no budgets (the receiving budget alone cannot hold it).
    let pool = BufferPool::with_shares(block as usize, depth, Shares::NONE)?;
    let io = IoEngine::start(&pool, IoChoice::Auto, 1)?;
    let store = Arc::new(Store::open(
        &dir.join("store"),
        Arc::clone(&pool),
        io,
        true,
    )?);
    let task = store.create_or_get(&"b".repeat(64), Geometry::new(size, block)?)?;
    let mut filled = Vec::new();
    for n in 0..depth {
        let mut buf = pool.acquire(block).await?;
        fill(&mut buf, n as u32);
        filled.push(buf);
    }
    drop(filled);
    let watch = Stopwatch::start();
    let mut running = tokio::task::JoinSet::new();
    for piece in task.geometry().pieces() {
        if running.len() >= depth {
            running.join_next().await.expect("non-empty")??;
        }
        let mut buf = pool.acquire(piece.length).await?;
        // Only the first word of each slot changes: the content stays real data without
        // the benchmark's own filling dominating the figure.
        for chunk in buf.chunks_mut() {
            chunk[..8].copy_from_slice(&u64::from(piece.number).to_le_bytes());
        }
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
    let measured = watch.stop(size);
    let direct = store.direct_io() && task.is_complete();
    store.delete(task.id())?;
    Ok((measured, direct))
}

/// Registers a fresh pool of `pool_mib` on `device` (as the daemon does at start-up) and
/// reports the time per GiB.
pub fn time_registration(device: &str, pool_mib: u64) -> anyhow::Result<Vec<Registration>> {
    let pool = pool(pool_mib)?;
    let mut registrations = Vec::new();
    registered_host(
        &pool,
        &[device.to_owned()],
        RdmaPoll::Event,
        "timed",
        &mut registrations,
    )?;
    Ok(registrations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        servers: &[&str],
        clients: &[&str],
        addrs: &[&str],
        rails: Option<usize>,
    ) -> PlanRequest {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        PlanRequest {
            server_devices: own(servers),
            client_devices: own(clients),
            server_addrs: own(addrs),
            rails,
            chunk_kib: 1024,
            stripe_pieces: true,
            poll: RdmaPoll::Event,
        }
    }

    #[test]
    fn device_flags_pair_in_order_and_the_first_address_is_the_data_port() {
        let plan = RdmaPlan::new(&request(
            &["mlx5_0", "mlx5_1"],
            &["mlx5_2", "mlx5_3"],
            &["10.0.0.1", "10.0.1.1"],
            None,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(plan.rails.len(), 2);
        assert_eq!(plan.server_addr(), "10.0.0.1");
        assert_eq!(plan.client_device(), "mlx5_2");
        assert_eq!(plan.describe(), "mlx5_0 -> mlx5_2, mlx5_1 -> mlx5_3");
        let pairs = plan.ib_pairs();
        assert_eq!(
            (
                pairs[1].server_device,
                pairs[1].client_device,
                pairs[1].server_addr
            ),
            ("mlx5_1", "mlx5_3", "10.0.1.1")
        );
    }

    #[test]
    fn uneven_flags_or_a_rail_count_they_do_not_give_are_errors() {
        for bad in [
            request(&["a", "b"], &["c"], &["10.0.0.1", "10.0.1.1"], None),
            request(&["a"], &["c"], &[], None),
            request(&["a"], &["c"], &["10.0.0.1"], Some(2)),
            request(&["a"], &["c"], &["10.0.0.1"], Some(0)),
        ] {
            assert!(RdmaPlan::new(&bad).is_err(), "{bad:?}");
        }
    }
}
