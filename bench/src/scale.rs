//! `ferry-bench scale`: what the per-host figures measured here mean when one seed sends a
//! large model to hundreds of hosts. A deterministic, piece-level simulation of P2P
//! distribution (no I/O, seeded RNG) printed beside its closed-form lower bound. The model,
//! its inputs and what is measured versus assumed are in bench/SCALE.md.

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ferry_engine::geometry::{default_piece_length, validate_piece_length};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

const GB: f64 = 1e9;
const MIB: u64 = 1024 * 1024;

/// Defaults measured in this repository (README, Benchmarks) or assumed (bench/SCALE.md).
mod defaults {
    /// Ferry's TCP path into memory, 4 streams, CPU seconds per GB for both ends together
    /// (`ferry-bench tcp`: sender and receiver run in one process). Measured.
    pub const TCP_CPU_S_PER_GB: f64 = 0.34;
    /// TCP goodput per byte on the wire with a 1500-byte MTU: 1448 payload bytes per
    /// 1538-byte frame (headers, timestamps, preamble, gap). Computed, not measured.
    pub const TCP_EFFICIENCY: f64 = 0.94;
    /// `ib_write_bw` on a real RDMA NIC reaches about this fraction of line rate. Assumed
    /// (vendor figures); soft-RoCE here says nothing about it.
    pub const RDMA_WIRE_EFFICIENCY: f64 = 0.95;
    /// Ferry's RDMA piece path versus `ib_write_bw` in the same run, 4 pieces in flight:
    /// 1.19x measured under emulation; above 1 is emulation noise, so 1.0 is used.
    pub const RDMA_VS_IB_WRITE_BW: f64 = 1.0;
    /// RDMA moves bytes without the CPU; what is left is the receiver's CRC32 (crc32fast:
    /// 0.047 CPU-s/GB on this machine) and the sender's copy from its store into the
    /// registered buffer (a 64 MiB memcpy: 0.12 CPU-s/GB here). Measured, piecewise.
    pub const RDMA_CPU_S_PER_GB: f64 = 0.17;
    /// Ferry's durable store writes versus fio on the same disk (`ferry-bench disk`,
    /// +fdatasync): 0.92x. Measured.
    pub const STORE_EFFICIENCY: f64 = 0.92;
}

/// Holders of a piece compared per pick.
const SOURCE_TRIES: usize = 8;
/// Candidate pieces compared per pick (rarest of a random sample).
const PIECE_SAMPLE: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportChoice {
    Rdma,
    Tcp,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Destination {
    /// Pieces land in memory (a RAM disk, page cache or GPU staging buffers).
    Memory,
    /// Pieces are written durably to the host's NVMe store.
    Store,
    Both,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Content size, GB (10^9 bytes).
    #[arg(long, default_value_t = 1000.0)]
    size_gb: f64,
    /// Hosts that fetch the content (besides the seed).
    #[arg(long, default_value_t = 500)]
    hosts: usize,
    /// Every host's NIC line rate, Gbit/s (full duplex), per rail.
    #[arg(long, default_value_t = 400.0)]
    nic_gbit: f64,
    /// RDMA NICs (rails) per host that Ferry stripes over; TCP uses one (the front-end NIC).
    #[arg(long, default_value_t = 1)]
    rails: u32,
    /// The seed's uplink per rail, Gbit/s [default: --nic-gbit].
    #[arg(long)]
    seed_uplink_gbit: Option<f64>,
    /// CPU cores each host can give the data plane.
    #[arg(long, default_value_t = 8.0)]
    cores: f64,
    #[arg(long, value_enum, default_value_t = TransportChoice::Both)]
    transport: TransportChoice,
    /// Where pieces land.
    #[arg(long, value_enum, default_value_t = Destination::Both)]
    into: Destination,
    /// The NVMe array's raw sequential rate per host, GB/s (e.g. 4 drives x 7 GB/s).
    #[arg(long, default_value_t = 28.0)]
    store_gbyte_s: f64,
    /// Ferry's durable writes as a fraction of the raw disk rate (measured against fio).
    #[arg(long, default_value_t = defaults::STORE_EFFICIENCY)]
    store_efficiency: f64,
    /// Ferry's TCP path, CPU seconds per GB moved, both ends together.
    #[arg(long, default_value_t = defaults::TCP_CPU_S_PER_GB)]
    tcp_cpu_s_per_gb: f64,
    /// TCP goodput as a fraction of line rate.
    #[arg(long, default_value_t = defaults::TCP_EFFICIENCY)]
    tcp_efficiency: f64,
    /// Ferry's RDMA path, CPU seconds per GB moved, both ends together.
    #[arg(long, default_value_t = defaults::RDMA_CPU_S_PER_GB)]
    rdma_cpu_s_per_gb: f64,
    /// RDMA piece path as a fraction of line rate [default: 0.95 x Ferry/ib_write_bw, at most 1].
    #[arg(long)]
    rdma_efficiency: Option<f64>,
    /// Piece length, MiB [default: Dragonfly's rule, next_pow2(size/500) within 4..64 MiB].
    #[arg(long)]
    piece_mib: Option<u64>,
    /// Pieces in flight into one host (from all its sources together).
    #[arg(long, default_value_t = 16)]
    pieces_in_flight: usize,
    /// Pieces in flight from one source to one host (Ferry's transfer.streams_per_source).
    #[arg(long, default_value_t = 4)]
    per_source: usize,
    /// Pieces one host uploads at once.
    #[arg(long, default_value_t = 32)]
    upload_slots: usize,
    /// Seed of the simulation's random choices.
    #[arg(long, default_value_t = 1)]
    rng_seed: u64,
    /// Time-step floor: a host's download slots each finish a piece in about this many
    /// steps (more: slower and closer to the exact answer).
    #[arg(long, default_value_t = 32.0)]
    steps_per_piece: f64,
    /// ferry-bench JSON results to take measured inputs from (TCP CPU-s/GB, RDMA vs
    /// ib_write_bw ratio); missing files leave the defaults, which are then named as such.
    #[arg(long)]
    from: Vec<PathBuf>,
}

/// One transport's per-host inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransportModel {
    pub name: &'static str,
    /// Fraction of line rate the piece path reaches.
    pub efficiency: f64,
    /// CPU seconds per GB moved, both ends together; each end is charged half.
    pub cpu_s_per_gb: f64,
    /// NICs the transport stripes over on every host (the seed included).
    pub rails: u32,
}

/// The hardware every host shares in the scenario.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hardware {
    pub nic_bytes_s: f64,
    pub seed_uplink_bytes_s: f64,
    pub cores: f64,
    /// The store's raw rate, bytes/s; None: pieces land in memory.
    pub store_bytes_s: Option<f64>,
    pub store_efficiency: f64,
}

/// Effective per-host rates (bytes/s) and what bounds them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub seed_up: f64,
    pub seed_limit: &'static str,
    /// A fetching host's download and upload rate each (the model gives both the same).
    pub peer: f64,
    pub peer_limit: &'static str,
}

fn min_named(options: &[(f64, &'static str)]) -> (f64, &'static str) {
    options
        .iter()
        .copied()
        .fold((f64::INFINITY, "-"), |a, b| if b.0 < a.0 { b } else { a })
}

/// Per-host rates for one transport. A fetching host uploads about as much as it downloads
/// (the swarm's uploads are its downloads), so its CPU and its store are split evenly
/// between the two directions; the seed only sends.
pub fn host_rates(transport: &TransportModel, hw: &Hardware) -> Rates {
    let rails = f64::from(transport.rails.max(1));
    let nic = hw.nic_bytes_s * rails * transport.efficiency;
    let seed_nic = hw.seed_uplink_bytes_s * rails * transport.efficiency;
    // Sending and receiving one GB costs cpu_s_per_gb between them.
    let peer_cpu = hw.cores * GB / transport.cpu_s_per_gb;
    let seed_cpu = hw.cores * GB / (transport.cpu_s_per_gb / 2.0);
    let mut peer = vec![(nic, "nic"), (peer_cpu, "cpu")];
    let mut seed = vec![(seed_nic, "nic"), (seed_cpu, "cpu")];
    if let Some(raw) = hw.store_bytes_s {
        // The seed reads its store; a fetching host writes each piece (durably, at the
        // measured fraction of the raw rate) and reads pieces back to serve them, on the
        // same drives: down/write + up/read <= 1 with down = up.
        let write = raw * hw.store_efficiency;
        peer.push((1.0 / (1.0 / write + 1.0 / raw), "store"));
        seed.push((raw, "store"));
    }
    let (peer, peer_limit) = min_named(&peer);
    let (seed_up, seed_limit) = min_named(&seed);
    Rates {
        seed_up,
        seed_limit,
        peer,
        peer_limit,
    }
}

/// `transport`'s per-host rates with each rail count of `rails`: what more NICs buy before
/// the CPU or the store is the bound.
pub fn rails_rates(transport: &TransportModel, hw: &Hardware, rails: &[u32]) -> Vec<(u32, Rates)> {
    rails
        .iter()
        .map(|&n| {
            (
                n,
                host_rates(
                    &TransportModel {
                        rails: n,
                        ..*transport
                    },
                    hw,
                ),
            )
        })
        .collect()
}

/// A swarm to simulate: host 0 is the seed and holds every piece.
#[derive(Debug, Clone, PartialEq)]
pub struct Swarm {
    pub size: u64,
    pub piece_length: u64,
    /// Upload capacity per host, bytes/s.
    pub up: Vec<f64>,
    /// Download capacity per host, bytes/s (the seed's is unused).
    pub down: Vec<f64>,
    pub pieces_in_flight: usize,
    pub per_source: usize,
    pub upload_slots: usize,
    pub rng_seed: u64,
    pub steps_per_piece: f64,
}

impl Swarm {
    /// One seed and `hosts` identical fetching hosts.
    pub fn uniform(size: u64, piece_length: u64, rates: &Rates, hosts: usize) -> Self {
        let mut up = vec![rates.peer; hosts + 1];
        up[0] = rates.seed_up;
        Swarm {
            size,
            piece_length,
            up,
            down: vec![rates.peer; hosts + 1],
            pieces_in_flight: 16,
            per_source: 4,
            upload_slots: 32,
            rng_seed: 1,
            steps_per_piece: 32.0,
        }
    }

    pub fn pieces(&self) -> usize {
        self.size.div_ceil(self.piece_length) as usize
    }

    fn piece_bytes(&self, piece: usize) -> f64 {
        let start = piece as u64 * self.piece_length;
        (self.size - start).min(self.piece_length) as f64
    }

    /// No schedule finishes before this: the seed must send every byte once
    /// (S/U_seed), every host must receive every byte (S/D), and all N*S bytes received
    /// must be sent by someone (N*S / total upload).
    pub fn lower_bound(&self) -> f64 {
        let size = self.size as f64;
        let hosts = (self.up.len() - 1) as f64;
        let slowest_down = self.down[1..].iter().copied().fold(f64::INFINITY, f64::min);
        let total_up: f64 = self.up.iter().sum();
        (size / self.up[0])
            .max(size / slowest_down)
            .max(hosts * size / total_up)
    }
}

/// What a simulation run found.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Seconds until each fetching host (1..=N, in order) holds every piece.
    pub finish: Vec<f64>,
    pub seed_bytes: f64,
    pub deliveries: u64,
    pub steps: u64,
}

impl Outcome {
    pub fn last(&self) -> f64 {
        self.finish.iter().copied().fold(0.0, f64::max)
    }
    pub fn median(&self) -> f64 {
        let mut sorted = self.finish.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }
}

/// SplitMix64: a small, well-mixed generator; the simulation needs reproducibility, not
/// cryptographic quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        // Lemire's multiply-shift: no division, and unbiased enough for a simulation.
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
}

struct Transfer {
    src: u32,
    dst: u32,
    piece: u32,
    remaining: f64,
    rate: f64,
}

/// Simulation state; host 0 is the seed.
struct Sim<'a> {
    swarm: &'a Swarm,
    pieces: usize,
    /// Pieces each host neither holds nor fetches: `pieces` slots per host, the first
    /// `missing_len[host]` in use, in no order (a random one is one index away).
    missing: Vec<u32>,
    missing_len: Vec<usize>,
    held: Vec<usize>,
    claimed_count: Vec<usize>,
    /// Hosts holding or fetching each piece (its rarity).
    replicas: Vec<u32>,
    /// Fetching hosts that hold each piece.
    replicas_held: Vec<u32>,
    /// Fetching hosts that hold each piece and can upload it.
    piece_holders: Vec<Vec<u32>>,
    uploads: Vec<usize>,
    downloads: Vec<usize>,
    /// Sources of each host's downloads in flight.
    sources: Vec<Vec<u32>>,
    transfers: Vec<Transfer>,
    /// The seed hands out pieces nobody else holds or fetches yet, in order, from here.
    fresh: usize,
    /// Pieces at least one fetching host holds.
    out: usize,
    rng: Rng,
}

impl Sim<'_> {
    /// Up to PIECE_SAMPLE random pieces `dst` neither holds nor fetches, rarest first, each
    /// with its index in `dst`'s missing list.
    fn missing_sample(&mut self, dst: usize, out: &mut [(usize, usize); PIECE_SAMPLE]) -> usize {
        let len = self.missing_len[dst];
        let row = &self.missing[dst * self.pieces..];
        let mut count = 0;
        for _ in 0..PIECE_SAMPLE.min(len) {
            let index = self.rng.below(len);
            let piece = row[index] as usize;
            if !out[..count].iter().any(|&(p, _)| p == piece) {
                out[count] = (piece, index);
                count += 1;
            }
        }
        let replicas = &self.replicas;
        out[..count].sort_by_key(|&(p, _)| replicas[p]);
        count
    }

    /// Whether `src` can start one more upload to `dst`.
    fn can_serve(&self, src: usize, dst: usize) -> bool {
        self.uploads[src] < self.swarm.upload_slots
            && self.sources[dst]
                .iter()
                .filter(|&&s| s as usize == src)
                .count()
                < self.swarm.per_source
    }

    /// The piece and source for one more download into `dst`, as a central scheduler that
    /// knows every host's pieces would choose:
    /// - the seed injects first: while some piece exists only at the seed and the seed has
    ///   a free upload, it sends that piece (super-seeding: no piece twice before every
    ///   piece is out, since the seed's upload is what the whole swarm waits on);
    /// - otherwise rarest first among a random sample of the pieces `dst` lacks, each from
    ///   the holder (of a few sampled) with the largest share of upload to offer.
    fn pick(&mut self, dst: usize) -> Option<(usize, usize, usize)> {
        while self.fresh < self.pieces && self.replicas[self.fresh] > 1 {
            self.fresh += 1;
        }
        if self.fresh < self.pieces && self.can_serve(0, dst) {
            let row = &self.missing[dst * self.pieces..][..self.missing_len[dst]];
            let index = row
                .iter()
                .position(|&p| p as usize == self.fresh)
                .expect("a piece only the seed has is missing everywhere else");
            return Some((0, self.fresh, index));
        }
        let mut sample = [(0usize, 0usize); PIECE_SAMPLE];
        let count = self.missing_sample(dst, &mut sample);
        // A host with downloads in flight skips a source that would give it less than a
        // quarter of its fair per-slot rate, and waits for a better one: a piece started
        // from a swamped source (often the seed near the end) would finish last.
        let slowest_worth_it = if self.downloads[dst] > 0 {
            self.swarm.down[dst] / self.swarm.pieces_in_flight as f64 / 4.0
        } else {
            0.0
        };
        for &(piece, index) in &sample[..count] {
            let mut best: Option<(f64, usize)> = None;
            let mut consider = |sim: &Self, src: usize| {
                let share = sim.swarm.up[src] / (sim.uploads[src] + 1) as f64;
                if share >= slowest_worth_it
                    && best.is_none_or(|(b, _)| share > b)
                    && src != dst
                    && sim.can_serve(src, dst)
                {
                    best = Some((share, src));
                }
            };
            // The seed sends second copies only once every first copy has arrived: until
            // then they would slow the first copies, which every host waits for.
            if self.out == self.pieces {
                consider(self, 0);
            }
            let holders = self.piece_holders[piece].len();
            if holders <= SOURCE_TRIES {
                for i in 0..holders {
                    consider(self, self.piece_holders[piece][i] as usize);
                }
            } else {
                for _ in 0..SOURCE_TRIES {
                    let i = self.rng.below(holders);
                    consider(self, self.piece_holders[piece][i] as usize);
                }
            }
            if let Some((_, src)) = best {
                return Some((src, piece, index));
            }
        }
        None
    }

    /// Starts `piece` from `src` into `dst`; `index` is its place in `dst`'s missing list.
    fn start(&mut self, src: usize, dst: usize, piece: usize, index: usize) {
        let row = &mut self.missing[dst * self.pieces..];
        debug_assert_eq!(row[index] as usize, piece);
        row.swap(index, self.missing_len[dst] - 1);
        self.missing_len[dst] -= 1;
        self.claimed_count[dst] += 1;
        self.replicas[piece] += 1;
        self.uploads[src] += 1;
        self.downloads[dst] += 1;
        self.sources[dst].push(src as u32);
        self.transfers.push(Transfer {
            src: src as u32,
            dst: dst as u32,
            piece: piece as u32,
            remaining: self.swarm.piece_bytes(piece),
            rate: 0.0,
        });
    }

    /// Shares each host's upload and download among its transfers, approximately max-min
    /// fair (what parallel TCP streams or RDMA queue pairs roughly converge to): two rounds
    /// in which capacity a transfer cannot use (it is held back at its other end) goes to
    /// the transfers that can, then a scale-down wherever a host would be over capacity.
    fn allocate(&mut self, up_share: &mut [f64], down_share: &mut [f64], scratch: &mut Scratch) {
        let sw = self.swarm;
        for h in 0..up_share.len() {
            up_share[h] = sw.up[h] / self.uploads[h].max(1) as f64;
            down_share[h] = sw.down[h] / self.downloads[h].max(1) as f64;
        }
        for _ in 0..2 {
            scratch.clear();
            for t in &self.transfers {
                let (s, d) = (t.src as usize, t.dst as usize);
                let rate = up_share[s].min(down_share[d]);
                if rate < up_share[s] {
                    scratch.up_fixed[s] += rate;
                } else {
                    scratch.up_free[s] += 1;
                }
                if rate < down_share[d] {
                    scratch.down_fixed[d] += rate;
                } else {
                    scratch.down_free[d] += 1;
                }
            }
            for h in 0..up_share.len() {
                if scratch.up_free[h] > 0 {
                    let spare = (sw.up[h] - scratch.up_fixed[h]) / scratch.up_free[h] as f64;
                    up_share[h] = up_share[h].max(spare);
                }
                if scratch.down_free[h] > 0 {
                    let spare = (sw.down[h] - scratch.down_fixed[h]) / scratch.down_free[h] as f64;
                    down_share[h] = down_share[h].max(spare);
                }
            }
        }
        scratch.clear();
        for t in &mut self.transfers {
            t.rate = up_share[t.src as usize].min(down_share[t.dst as usize]);
            scratch.up_fixed[t.src as usize] += t.rate;
        }
        for t in &mut self.transfers {
            let s = t.src as usize;
            if scratch.up_fixed[s] > sw.up[s] {
                t.rate *= sw.up[s] / scratch.up_fixed[s];
            }
            scratch.down_fixed[t.dst as usize] += t.rate;
        }
        for t in &mut self.transfers {
            let d = t.dst as usize;
            if scratch.down_fixed[d] > sw.down[d] {
                t.rate *= sw.down[d] / scratch.down_fixed[d];
            }
        }
    }
}

struct Scratch {
    up_fixed: Vec<f64>,
    down_fixed: Vec<f64>,
    up_free: Vec<u32>,
    down_free: Vec<u32>,
}

impl Scratch {
    fn clear(&mut self) {
        self.up_fixed.fill(0.0);
        self.down_fixed.fill(0.0);
        self.up_free.fill(0);
        self.down_free.fill(0);
    }
}

/// Runs the swarm to completion. Time advances to the next piece completion, but by at
/// least a floor: a piece at the mean rate of the transfers in flight takes
/// `steps_per_piece` steps, so about 1 / steps_per_piece of the transfers complete in a step
/// whatever the number of hosts or pieces in flight. A piece that completes inside a step is
/// credited at its exact completion time; its slot stays idle to the end of the step, which
/// overestimates the time by up to about 1 / (2 steps_per_piece).
pub fn simulate(swarm: &Swarm) -> anyhow::Result<Outcome> {
    let n = swarm.up.len();
    if n < 2 {
        bail!("a swarm needs the seed and at least one host");
    }
    if swarm.down.len() != n {
        bail!("upload and download capacities differ in length");
    }
    if swarm.size == 0 || swarm.piece_length == 0 {
        bail!("size and piece length must be positive");
    }
    if !(swarm.steps_per_piece >= 1.0 && swarm.steps_per_piece.is_finite()) {
        bail!("steps per piece must be at least 1");
    }
    if swarm.pieces_in_flight == 0 || swarm.per_source == 0 || swarm.upload_slots == 0 {
        bail!("pieces in flight, per source and upload slots must be at least 1");
    }
    if swarm.up[0] <= 0.0 || swarm.down[1..].iter().any(|&d| d <= 0.0 || !d.is_finite()) {
        bail!("the seed's upload and every host's download must be positive");
    }
    if swarm.up.iter().any(|&u| u < 0.0 || !u.is_finite()) {
        bail!("upload capacities must be finite and not negative");
    }
    let pieces = swarm.pieces();
    if pieces > u32::MAX as usize || n > u32::MAX as usize {
        bail!("too many pieces or hosts");
    }
    let mut sim = Sim {
        swarm,
        pieces,
        missing: (0..n).flat_map(|_| 0..pieces as u32).collect(),
        missing_len: vec![pieces; n],
        held: vec![0; n],
        claimed_count: vec![0; n],
        replicas: vec![1; pieces],
        replicas_held: vec![0; pieces],
        piece_holders: vec![Vec::new(); pieces],
        uploads: vec![0; n],
        downloads: vec![0; n],
        sources: vec![Vec::new(); n],
        transfers: Vec::new(),
        fresh: 0,
        out: 0,
        rng: Rng(swarm.rng_seed),
    };
    sim.missing_len[0] = 0;
    sim.held[0] = pieces;
    sim.claimed_count[0] = pieces;

    let mut finish = vec![f64::NAN; n];
    let mut done = 1;
    let mut now = 0.0;
    let mut seed_bytes = 0.0;
    let mut deliveries = 0u64;
    let mut steps = 0u64;
    let mut idle_rounds = 0;
    let mut up_share = vec![0.0; n];
    let mut down_share = vec![0.0; n];
    let mut scratch = Scratch {
        up_fixed: vec![0.0; n],
        down_fixed: vec![0.0; n],
        up_free: vec![0; n],
        down_free: vec![0; n],
    };
    while done < n {
        // Hosts fill free download slots, in a rotating order so no host is always first.
        let first = sim.rng.below(n - 1);
        for k in 0..n - 1 {
            let dst = 1 + (first + k) % (n - 1);
            while sim.downloads[dst] < swarm.pieces_in_flight && sim.claimed_count[dst] < pieces {
                match sim.pick(dst) {
                    Some((src, piece, index)) => sim.start(src, dst, piece, index),
                    None => break,
                }
            }
        }
        if sim.transfers.is_empty() {
            // Only bad luck in the random source choice gets here; try again.
            idle_rounds += 1;
            if idle_rounds > 1000 {
                bail!("the swarm made no progress (every host failed to find a source)");
            }
            continue;
        }
        idle_rounds = 0;
        steps += 1;
        sim.allocate(&mut up_share, &mut down_share, &mut scratch);
        let mut next_completion = f64::INFINITY;
        let mut total_rate = 0.0;
        for t in sim.transfers.iter().filter(|t| t.rate > 0.0) {
            next_completion = next_completion.min(t.remaining / t.rate);
            total_rate += t.rate;
        }
        if !next_completion.is_finite() {
            bail!("every transfer in flight got no bandwidth");
        }
        let mean_rate = total_rate / sim.transfers.len() as f64;
        let step_floor = swarm.piece_length as f64 / mean_rate / swarm.steps_per_piece;
        let dt = next_completion.max(step_floor);
        let mut i = 0;
        while i < sim.transfers.len() {
            let t = &mut sim.transfers[i];
            let moved = (t.rate * dt).min(t.remaining);
            if t.src == 0 {
                seed_bytes += moved;
            }
            // Within a relative 1e-9 of a piece the transfer is complete (rounding).
            if t.remaining - moved > swarm.piece_length as f64 * 1e-9 {
                t.remaining -= moved;
                i += 1;
                continue;
            }
            let completed_at = now + t.remaining / t.rate;
            let t = sim.transfers.swap_remove(i);
            let (src, dst, piece) = (t.src as usize, t.dst as usize, t.piece as usize);
            if sim.replicas_held[piece] == 0 {
                sim.out += 1;
            }
            sim.replicas_held[piece] += 1;
            sim.held[dst] += 1;
            sim.uploads[src] -= 1;
            sim.downloads[dst] -= 1;
            let slot = sim.sources[dst]
                .iter()
                .position(|&s| s as usize == src)
                .expect("every transfer is listed at its destination");
            sim.sources[dst].swap_remove(slot);
            deliveries += 1;
            if swarm.up[dst] > 0.0 {
                // A host that cannot upload is never asked to.
                sim.piece_holders[piece].push(dst as u32);
            }
            if sim.held[dst] == pieces {
                finish[dst] = completed_at;
                done += 1;
            }
        }
        now += dt;
    }
    Ok(Outcome {
        finish: finish.split_off(1),
        seed_bytes,
        deliveries,
        steps,
    })
}

/// Measured inputs found in ferry-bench JSON results.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Measured {
    pub tcp_cpu_s_per_gb: Option<(f64, String)>,
    pub rdma_vs_ib_write_bw: Option<(f64, String)>,
}

fn numeric_leaves(value: &Value, path: &str, out: &mut Vec<(String, f64)>) {
    match value {
        Value::Object(map) => {
            // A row of the stable schema names itself by its id (`tcp.into_memory`,
            // `baseline.iperf3`, ...): that, not its place in `rows`, says what it measured.
            let path = match map.get("id").and_then(Value::as_str) {
                Some(id) => format!("{path}{{{id}}}"),
                None => path.to_string(),
            };
            for (key, v) in map {
                numeric_leaves(v, &format!("{path}.{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                numeric_leaves(v, &format!("{path}[{i}]"), out);
            }
        }
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push((path.to_ascii_lowercase(), x));
            }
        }
        _ => {}
    }
}

/// Takes what it recognises from one ferry-bench JSON result, by key names and row ids
/// rather than a fixed layout: Ferry's TCP CPU seconds per GB (into memory, not a
/// baseline's) and Ferry's RDMA into-memory ratio to ib_write_bw.
pub fn read_measured(text: &str, origin: &str, into: &mut Measured) -> anyhow::Result<()> {
    let value: Value =
        serde_json::from_str(text).with_context(|| format!("{origin} is not valid JSON"))?;
    let root = value
        .get("benchmark")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut leaves = Vec::new();
    numeric_leaves(&value, &root, &mut leaves);
    // Baselines' figures, and paths that include the store (into_store, e2e), are not the
    // network path's.
    let foreign = |p: &str| {
        ["iperf", "baseline", "store", "e2e"]
            .iter()
            .any(|w| p.contains(w))
    };
    let plausible = |x: f64, max: f64| x > 0.0 && x < max;
    let mut tcp: Vec<&(String, f64)> = leaves
        .iter()
        .filter(|(p, x)| {
            p.ends_with("cpu_seconds_per_gb")
                && p.contains("tcp")
                && !foreign(p)
                && plausible(*x, 100.0)
        })
        .collect();
    tcp.sort_by_key(|(p, _)| !p.contains("memory"));
    if into.tcp_cpu_s_per_gb.is_none() {
        if let Some((p, x)) = tcp.first() {
            into.tcp_cpu_s_per_gb = Some((*x, format!("{origin}: {p}")));
        }
    }
    // "ratio" anywhere in the path: `ratio` fields and `ratios.into_memory_vs_ib_write_bw`.
    let mut rdma: Vec<&(String, f64)> = leaves
        .iter()
        .filter(|(p, x)| {
            p.contains("ratio")
                && p.contains("rdma")
                && !foreign(p)
                && !p.contains("tcp")
                && plausible(*x, 100.0)
        })
        .collect();
    rdma.sort_by_key(|(p, _)| !p.contains("memory"));
    if into.rdma_vs_ib_write_bw.is_none() {
        if let Some((p, x)) = rdma.first() {
            into.rdma_vs_ib_write_bw = Some((*x, format!("{origin}: {p}")));
        }
    }
    Ok(())
}

fn gbit(bytes_s: f64) -> f64 {
    bytes_s * 8.0 / GB
}

/// Runs the scenario, prints its table and writes the JSON (default bench/out/scale.json).
pub fn run(args: &ScaleArgs, json_out: Option<&Path>) -> anyhow::Result<()> {
    let results = run_scenario(args)?;
    let out = json_out.unwrap_or(Path::new("bench/out/scale.json"));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!("results written to {}", out.display());
    Ok(())
}

fn run_scenario(args: &ScaleArgs) -> anyhow::Result<Value> {
    for (name, value) in [
        ("--size-gb", args.size_gb),
        ("--nic-gbit", args.nic_gbit),
        ("--cores", args.cores),
        ("--store-gbyte-s", args.store_gbyte_s),
        ("--store-efficiency", args.store_efficiency),
        ("--tcp-cpu-s-per-gb", args.tcp_cpu_s_per_gb),
        ("--tcp-efficiency", args.tcp_efficiency),
        ("--rdma-cpu-s-per-gb", args.rdma_cpu_s_per_gb),
        ("--seed-uplink-gbit", args.seed_uplink_gbit.unwrap_or(1.0)),
        ("--rdma-efficiency", args.rdma_efficiency.unwrap_or(1.0)),
    ] {
        if !(value.is_finite() && value > 0.0) {
            bail!("{name} must be a positive number, got {value}");
        }
    }
    for (name, value) in [
        ("--store-efficiency", args.store_efficiency),
        ("--tcp-efficiency", args.tcp_efficiency),
        ("--rdma-efficiency", args.rdma_efficiency.unwrap_or(1.0)),
    ] {
        if value > 1.0 {
            bail!("{name} is a fraction of line rate: at most 1, got {value}");
        }
    }
    if args.hosts == 0 {
        bail!("--hosts must be at least 1");
    }
    if !(1..=64).contains(&args.rails) {
        bail!("--rails must be 1 to 64, got {}", args.rails);
    }
    let size = (args.size_gb * GB) as u64;
    let piece_length = match args.piece_mib {
        Some(mib) => validate_piece_length(mib * MIB)?,
        None => default_piece_length(size),
    };

    let mut measured = Measured::default();
    for path in &args.from {
        read_measured_file(path, &mut measured)?;
    }
    let tcp_cpu = match &measured.tcp_cpu_s_per_gb {
        Some((x, origin)) => {
            println!("TCP CPU-s/GB {x:.3} from {origin}");
            *x
        }
        None => args.tcp_cpu_s_per_gb,
    };
    let rdma_efficiency = match (args.rdma_efficiency, &measured.rdma_vs_ib_write_bw) {
        (Some(e), _) => e,
        (None, Some((ratio, origin))) => {
            println!("Ferry RDMA / ib_write_bw {ratio:.2} from {origin} (capped at 1)");
            defaults::RDMA_WIRE_EFFICIENCY * ratio.min(1.0)
        }
        (None, None) => defaults::RDMA_WIRE_EFFICIENCY * defaults::RDMA_VS_IB_WRITE_BW,
    };
    if !args.from.is_empty() && measured.tcp_cpu_s_per_gb.is_none() {
        println!("no TCP CPU-s/GB in --from files: using {tcp_cpu} (--tcp-cpu-s-per-gb)");
    }
    if !args.from.is_empty()
        && measured.rdma_vs_ib_write_bw.is_none()
        && args.rdma_efficiency.is_none()
    {
        println!("no RDMA ratio in --from files: using efficiency {rdma_efficiency:.2}");
    }

    let transports: Vec<TransportModel> = [
        TransportModel {
            name: "rdma",
            efficiency: rdma_efficiency,
            cpu_s_per_gb: args.rdma_cpu_s_per_gb,
            rails: args.rails,
        },
        TransportModel {
            name: "tcp",
            efficiency: args.tcp_efficiency,
            cpu_s_per_gb: tcp_cpu,
            rails: 1,
        },
    ]
    .into_iter()
    .filter(|t| match args.transport {
        TransportChoice::Both => true,
        TransportChoice::Rdma => t.name == "rdma",
        TransportChoice::Tcp => t.name == "tcp",
    })
    .collect();
    let destinations: Vec<Destination> = match args.into {
        Destination::Both => vec![Destination::Memory, Destination::Store],
        d => vec![d],
    };

    let nic_bytes_s = args.nic_gbit * GB / 8.0;
    let seed_uplink_bytes_s = args.seed_uplink_gbit.unwrap_or(args.nic_gbit) * GB / 8.0;
    let pieces = size.div_ceil(piece_length);
    println!(
        "{} GB to {} hosts from 1 seed; NIC {} Gbit/s x {} rail(s) for RDMA (1 for TCP), seed uplink {} Gbit/s per rail, {} cores, store {} GB/s raw; \
         {} MiB pieces x {pieces}; {} in flight per host, {} per source, {} uploads per host",
        args.size_gb,
        args.hosts,
        args.nic_gbit,
        args.rails,
        gbit(seed_uplink_bytes_s),
        args.cores,
        args.store_gbyte_s,
        piece_length / MIB,
        args.pieces_in_flight,
        args.per_source,
        args.upload_slots
    );
    println!();
    println!(
        "{:<5} {:<7} {:>11} {:<6} {:>11} {:<6} {:>9} {:>10} {:>9} {:>8} {:>9} {:>6}",
        "",
        "into",
        "host Gbit/s",
        "bound",
        "seed Gbit/s",
        "bound",
        "lower s",
        "last s",
        "median s",
        "sim/lb",
        "seed GB",
        "run s"
    );
    // Each destination's hardware, and its name in the table and the JSON.
    let hardware = |destination: Destination| Hardware {
        nic_bytes_s,
        seed_uplink_bytes_s,
        cores: args.cores,
        store_bytes_s: (destination == Destination::Store).then_some(args.store_gbyte_s * GB),
        store_efficiency: args.store_efficiency,
    };
    let into_name = |destination: Destination| match destination {
        Destination::Store => "store",
        _ => "memory",
    };
    let mut rows = Vec::new();
    for &destination in &destinations {
        let hw = hardware(destination);
        for transport in &transports {
            let rates = host_rates(transport, &hw);
            let mut swarm = Swarm::uniform(size, piece_length, &rates, args.hosts);
            swarm.pieces_in_flight = args.pieces_in_flight;
            swarm.per_source = args.per_source;
            swarm.upload_slots = args.upload_slots;
            swarm.rng_seed = args.rng_seed;
            swarm.steps_per_piece = args.steps_per_piece;
            let started = Instant::now();
            let outcome = simulate(&swarm)?;
            let run_seconds = started.elapsed().as_secs_f64();
            let bound = swarm.lower_bound();
            let into = into_name(destination);
            println!(
                "{:<5} {:<7} {:>11.1} {:<6} {:>11.1} {:<6} {:>9.2} {:>10.2} {:>9.2} {:>7.3}x {:>9.0} {:>6.1}",
                transport.name,
                into,
                gbit(rates.peer),
                rates.peer_limit,
                gbit(rates.seed_up),
                rates.seed_limit,
                bound,
                outcome.last(),
                outcome.median(),
                outcome.last() / bound,
                outcome.seed_bytes / GB,
                run_seconds
            );
            rows.push(json!({
                "transport": transport.name,
                "into": into,
                "efficiency": transport.efficiency,
                "cpu_seconds_per_gb": transport.cpu_s_per_gb,
                "host_gbit_per_s": gbit(rates.peer),
                "host_limited_by": rates.peer_limit,
                "seed_gbit_per_s": gbit(rates.seed_up),
                "seed_limited_by": rates.seed_limit,
                "lower_bound_seconds": bound,
                "last_host_seconds": outcome.last(),
                "median_host_seconds": outcome.median(),
                "seed_bytes_sent": outcome.seed_bytes,
                "piece_deliveries": outcome.deliveries,
                "steps": outcome.steps,
                "simulation_wall_seconds": run_seconds,
            }));
        }
    }
    // What more rails give: per-host RDMA rates by rail count (no simulation; the table above
    // shows how per-host rates turn into swarm times).
    let mut rails_rows = Vec::new();
    if let Some(rdma) = transports.iter().find(|t| t.name == "rdma") {
        let mut counts = vec![1, 2, 4, 8, args.rails];
        counts.sort_unstable();
        counts.dedup();
        println!();
        println!("RDMA rails per host (host rate and its bound):");
        for &destination in &destinations {
            let into = into_name(destination);
            let cells: Vec<String> = rails_rates(rdma, &hardware(destination), &counts)
                .into_iter()
                .map(|(n, rates)| {
                    rails_rows.push(json!({
                        "into": into, "rails": n, "host_gbit_per_s": gbit(rates.peer),
                        "host_limited_by": rates.peer_limit, "seed_gbit_per_s": gbit(rates.seed_up),
                        "seed_limited_by": rates.seed_limit,
                    }));
                    format!("{n}: {:.0} ({})", gbit(rates.peer), rates.peer_limit)
                })
                .collect();
            println!("  into {into:<7} {}", cells.join(", "));
        }
    }
    let mut ratios = Vec::new();
    for into in ["memory", "store"] {
        let last = |name: &str| {
            rows.iter()
                .find(|r| r["transport"] == name && r["into"] == into)
                .and_then(|r| r["last_host_seconds"].as_f64())
        };
        if let (Some(rdma), Some(tcp)) = (last("rdma"), last("tcp")) {
            println!(
                "RDMA vs TCP into {into}: last host {:.2}x sooner",
                tcp / rdma
            );
            ratios.push(json!({ "into": into, "tcp_over_rdma_last_host": tcp / rdma }));
        }
    }
    Ok(json!({
        "schema_version": 1,
        "benchmark": "scale",
        "parameters": {
            "size_bytes": size,
            "hosts": args.hosts,
            "nic_gbit_per_s": args.nic_gbit,
            "rdma_rails": args.rails,
            "seed_uplink_gbit_per_s": gbit(seed_uplink_bytes_s),
            "cores": args.cores,
            "store_gbyte_per_s": args.store_gbyte_s,
            "store_efficiency": args.store_efficiency,
            "piece_length": piece_length,
            "pieces": pieces,
            "pieces_in_flight": args.pieces_in_flight,
            "per_source": args.per_source,
            "upload_slots": args.upload_slots,
            "rng_seed": args.rng_seed,
            "steps_per_piece": args.steps_per_piece,
            "from": args.from,
        },
        "results": rows,
        "rails": rails_rows,
        "ratios": ratios,
    }))
}

fn read_measured_file(path: &Path, measured: &mut Measured) -> anyhow::Result<()> {
    match std::fs::read_to_string(path) {
        Ok(text) => read_measured(&text, &path.display().to_string(), measured),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!(
                "{} does not exist: the defaults stand in for it",
                path.display()
            );
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn swarm(size: u64, piece_length: u64, up: Vec<f64>, down: Vec<f64>) -> Swarm {
        Swarm {
            size,
            piece_length,
            up,
            down,
            pieces_in_flight: 16,
            per_source: 4,
            upload_slots: 32,
            rng_seed: 7,
            steps_per_piece: 16.0,
        }
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    #[test]
    fn one_seed_one_host_takes_size_over_the_slower_end() {
        let size = 10 * 64 * MIB + 5 * MIB; // a short last piece too
        let s = size as f64;
        // The seed's upload is the bottleneck, then the host's download.
        for (up, down) in [(1e9, 2e9), (3e9, 1.5e9), (2e9, 2e9)] {
            let mut sw = swarm(size, 64 * MIB, vec![up, 0.0], vec![0.0, down]);
            let expected = s / f64::min(up, down);
            assert_eq!(sw.lower_bound(), expected);
            // With a negligible step floor the run is event by event, and exact.
            sw.steps_per_piece = 1e9;
            let outcome = simulate(&sw).unwrap();
            assert!(
                close(outcome.last(), expected, 1e-9),
                "up {up} down {down}: {} vs {expected}",
                outcome.last()
            );
            assert!(close(outcome.seed_bytes, s, 1e-9));
            assert_eq!(outcome.deliveries, 11);
            // With the default floor, the short last piece's slot idles to the end of a
            // step: a small, bounded overestimate.
            sw.steps_per_piece = 16.0;
            let outcome = simulate(&sw).unwrap();
            assert!(outcome.last() >= expected);
            assert!(close(outcome.last(), expected, 0.03), "{}", outcome.last());
        }
    }

    #[test]
    fn the_lower_bound_is_never_beaten() {
        let mib = 4 * MIB;
        let cases: Vec<(usize, f64, f64, f64)> = vec![
            // hosts, seed up, peer up, peer down (bytes/s)
            (2, 1e9, 1e9, 1e9),
            (5, 1e9, 0.2e9, 1e9),  // weak peer uplinks: the swarm bound binds
            (5, 0.3e9, 2e9, 1e9),  // weak seed: S/U_seed binds
            (20, 4e9, 1e9, 1e9),   // the host's download binds
            (40, 1e9, 0.5e9, 2e9), // the swarm bound binds
            (3, 1e9, 0.0, 1e9),    // peers cannot upload at all: N*S/U_seed
        ];
        for (i, &(hosts, seed_up, peer_up, peer_down)) in cases.iter().enumerate() {
            for rng_seed in 1..4 {
                let mut up = vec![peer_up; hosts + 1];
                up[0] = seed_up;
                let mut sw = swarm(40 * mib, mib, up, vec![peer_down; hosts + 1]);
                sw.rng_seed = rng_seed;
                let outcome = simulate(&sw).unwrap();
                let bound = sw.lower_bound();
                assert!(
                    outcome.last() >= bound * (1.0 - 1e-9),
                    "case {i} seed {rng_seed}: {} beats the bound {bound}",
                    outcome.last()
                );
                assert!(outcome.finish.iter().all(|t| t.is_finite() && *t > 0.0));
                assert_eq!(outcome.deliveries, 40 * hosts as u64);
                assert!(outcome.seed_bytes >= 40.0 * mib as f64 * (1.0 - 1e-9));
            }
        }
        // No uploads from peers: the seed sends everything to everyone, and the bound is
        // exact.
        let sw = swarm(40 * mib, mib, vec![1e9, 0.0, 0.0, 0.0], vec![1e12; 4]);
        let outcome = simulate(&sw).unwrap();
        assert!(close(outcome.last(), sw.lower_bound(), 0.02));
    }

    #[test]
    fn more_hosts_never_finish_before_the_bound_and_the_swarm_keeps_up() {
        let mib = 4 * MIB;
        let mut previous_bound = 0.0;
        for hosts in [1, 2, 4, 8, 16, 64] {
            let rates = Rates {
                seed_up: 1e9,
                seed_limit: "nic",
                peer: 1e9,
                peer_limit: "nic",
            };
            let sw = Swarm::uniform(256 * mib, mib, &rates, hosts);
            let outcome = simulate(&sw).unwrap();
            let bound = sw.lower_bound();
            assert!(bound >= previous_bound);
            previous_bound = bound;
            assert!(outcome.last() >= bound * (1.0 - 1e-9), "{hosts} hosts");
            // Peers upload as fast as they download, so the bound stays S/D however many
            // hosts there are, and the simulation stays within a modest factor of it.
            assert!(close(bound, 256.0 * mib as f64 / 1e9, 1e-9));
            assert!(
                outcome.last() < 1.5 * bound,
                "{hosts} hosts: {}",
                outcome.last()
            );
        }
    }

    #[test]
    fn a_slow_host_finishes_last_and_no_sooner_than_its_download_allows() {
        let mut down = vec![2e9; 11];
        down[7] = 0.25e9;
        let mut up = vec![2e9; 11];
        up[0] = 4e9;
        let sw = swarm(32 * 4 * MIB, 4 * MIB, up, down);
        let outcome = simulate(&sw).unwrap();
        let slow = sw.size as f64 / 0.25e9;
        assert_eq!(sw.lower_bound(), slow);
        assert!(outcome.finish[6] >= slow * (1.0 - 1e-9));
        assert_eq!(outcome.last(), outcome.finish[6]);
        assert!(outcome.median() < outcome.last());
    }

    #[test]
    fn a_fixed_seed_gives_the_same_run() {
        let rates = Rates {
            seed_up: 3e9,
            seed_limit: "nic",
            peer: 1e9,
            peer_limit: "nic",
        };
        let mut sw = Swarm::uniform(300 * MIB, 4 * MIB, &rates, 30);
        let first = simulate(&sw).unwrap();
        assert_eq!(first, simulate(&sw).unwrap());
        sw.rng_seed = 2;
        let other = simulate(&sw).unwrap();
        assert_eq!(other.deliveries, first.deliveries);
        assert_ne!(other.finish, first.finish);
    }

    #[test]
    fn a_weak_seed_sends_every_piece_once_before_any_twice() {
        // The seed is the bottleneck (S/U_seed), and peers are ten times faster: the run
        // comes close to the bound only if the seed sends no piece twice before every piece
        // is out, which is what super-seeding is for.
        let mut up = vec![10e9; 51];
        up[0] = 1e9;
        for rng_seed in 1..5 {
            let mut sw = swarm(256 * 4 * MIB, 4 * MIB, up.clone(), vec![10e9; 51]);
            sw.rng_seed = rng_seed;
            let bound = sw.lower_bound();
            assert_eq!(bound, sw.size as f64 / 1e9);
            let outcome = simulate(&sw).unwrap();
            let size = sw.size as f64;
            assert!(outcome.last() >= bound);
            assert!(
                outcome.last() < 1.2 * bound,
                "{} vs {bound}",
                outcome.last()
            );
            // Second copies from the seed are few: peers serve them.
            assert!(outcome.seed_bytes >= size * (1.0 - 1e-9));
            assert!(
                outcome.seed_bytes < 1.15 * size,
                "{}",
                outcome.seed_bytes / size
            );
        }
    }

    #[test]
    fn bad_swarms_are_refused() {
        let ok = swarm(8 * MIB, 4 * MIB, vec![1e9, 1e9], vec![1e9, 1e9]);
        assert!(simulate(&ok).is_ok());
        let mut no_down = ok.clone();
        no_down.down[1] = 0.0;
        assert!(simulate(&no_down).is_err());
        let mut no_seed = ok.clone();
        no_seed.up[0] = 0.0;
        assert!(simulate(&no_seed).is_err());
        let mut alone = ok.clone();
        alone.up.truncate(1);
        alone.down.truncate(1);
        assert!(simulate(&alone).is_err());
        let mut no_slots = ok.clone();
        no_slots.per_source = 0;
        assert!(simulate(&no_slots).is_err());
    }

    #[test]
    fn dragonfly_piece_length_for_a_terabyte() {
        let size = 1_000_000_000_000u64;
        let piece_length = default_piece_length(size);
        assert_eq!(piece_length, 64 * MIB);
        assert_eq!(size.div_ceil(piece_length), 14_902);
    }

    #[test]
    fn per_host_rates_follow_the_nic_the_cpu_and_the_store() {
        let hw = Hardware {
            nic_bytes_s: 50e9,
            seed_uplink_bytes_s: 50e9,
            cores: 8.0,
            store_bytes_s: None,
            store_efficiency: 0.92,
        };
        let tcp = TransportModel {
            name: "tcp",
            efficiency: 0.94,
            cpu_s_per_gb: 0.34,
            rails: 1,
        };
        let rdma = TransportModel {
            name: "rdma",
            efficiency: 0.95,
            cpu_s_per_gb: 0.17,
            rails: 1,
        };
        let r = host_rates(&tcp, &hw);
        assert!(close(r.peer, 8.0 / 0.34 * 1e9, 1e-12));
        assert_eq!(r.peer_limit, "cpu");
        // The seed only sends: half the cost per GB, so the NIC binds first.
        assert!(close(r.seed_up, 47e9, 1e-12));
        assert_eq!(r.seed_limit, "nic");
        // RDMA's CPU cost per GB is half TCP's: 8 cores just about keep up with 400 Gbit/s
        // (47.1 GB/s against 47.5), 16 leave the NIC as the limit.
        let r = host_rates(&rdma, &hw);
        assert!(close(r.peer, 8.0 / 0.17 * 1e9, 1e-12));
        assert_eq!(r.peer_limit, "cpu");
        assert!(close(r.seed_up, 47.5e9, 1e-12));
        let r = host_rates(&rdma, &Hardware { cores: 16.0, ..hw });
        assert!(close(r.peer, 47.5e9, 1e-12));
        assert_eq!(r.peer_limit, "nic");
        let store = Hardware {
            store_bytes_s: Some(28e9),
            ..hw
        };
        let r = host_rates(&rdma, &store);
        let write = 28e9 * 0.92;
        assert!(close(r.peer, 1.0 / (1.0 / write + 1.0 / 28e9), 1e-12));
        assert_eq!(r.peer_limit, "store");
        assert!(close(r.seed_up, 28e9, 1e-12));
        assert_eq!(r.seed_limit, "store");
    }

    #[test]
    fn rails_multiply_the_nic_until_the_cpu_or_the_store_binds() {
        let hw = Hardware {
            nic_bytes_s: 50e9,
            seed_uplink_bytes_s: 50e9,
            cores: 64.0,
            store_bytes_s: None,
            store_efficiency: 0.92,
        };
        let rdma = TransportModel {
            name: "rdma",
            efficiency: 0.95,
            cpu_s_per_gb: 0.17,
            rails: 1,
        };
        let rows = rails_rates(&rdma, &hw, &[1, 2, 4, 8]);
        // 64 cores carry 376 GB/s: the NIC binds up to 4 rails (190 GB/s), the CPU at 8.
        for (rails, rates) in &rows[..3] {
            assert!(close(rates.peer, f64::from(*rails) * 47.5e9, 1e-12));
            assert_eq!(rates.peer_limit, "nic");
            assert!(close(rates.seed_up, f64::from(*rails) * 47.5e9, 1e-12));
        }
        assert!(close(rows[3].1.peer, 64.0 / 0.17 * 1e9, 1e-12));
        assert_eq!(rows[3].1.peer_limit, "cpu");
        assert_eq!(rows[3].1.seed_limit, "nic");
        // Into a 28 GB/s store, more than one rail buys nothing.
        let store = Hardware {
            store_bytes_s: Some(28e9),
            ..hw
        };
        let rows = rails_rates(&rdma, &store, &[1, 2]);
        assert_eq!(rows[0].1.peer, rows[1].1.peer);
        assert_eq!(rows[1].1.peer_limit, "store");
    }

    #[test]
    fn measured_inputs_are_found_by_name_in_each_results_layout() {
        // `ferry-bench tcp`'s layout.
        let tcp = r#"{"benchmark":"tcp","ferry":{"into_memory":{"cpu_seconds_per_gb":0.34},
            "into_store":{"cpu_seconds_per_gb":0.9}},
            "baseline":{"copy":{"cpu_seconds_per_gb":0.52}}}"#;
        // `ferry-bench rdma`'s layout.
        let rdma = r#"{"benchmark":"rdma","ferry":{"into_memory":{"cpu_seconds_per_gb":21.3}},
            "ratios":{"into_memory_vs_ib_write_bw":1.19,"into_store_vs_ib_write_bw":1.13}}"#;
        let mut m = Measured::default();
        read_measured(tcp, "tcp.json", &mut m).unwrap();
        read_measured(rdma, "rdma.json", &mut m).unwrap();
        assert_eq!(m.tcp_cpu_s_per_gb.as_ref().unwrap().0, 0.34);
        assert_eq!(m.rdma_vs_ib_write_bw.as_ref().unwrap().0, 1.19);
        // A comparison file with both transports side by side.
        let compare = r#"{"benchmark":"compare","tcp":{"gbit_per_s":40,"cpu_seconds_per_gb":0.3,"ratio":2.0},
            "rdma":{"gbit_per_s":0.4,"ratio":0.97}}"#;
        let mut m = Measured::default();
        read_measured(compare, "compare.json", &mut m).unwrap();
        assert_eq!(m.tcp_cpu_s_per_gb.unwrap().0, 0.3);
        assert_eq!(m.rdma_vs_ib_write_bw.unwrap().0, 0.97);
        // The stable schema (`ferry-bench compare`): rows named by id.
        let stable = r#"{"schema_version":1,"benchmark":"compare","rows":[
            {"id":"baseline.iperf3","transport":"tcp","cpu_seconds_per_gb":0.52,"ratio":null},
            {"id":"tcp.into_store","transport":"tcp","cpu_seconds_per_gb":0.9,"ratio":0.58},
            {"id":"e2e.tcp","transport":"tcp","cpu_seconds_per_gb":0.8,"ratio":0.9},
            {"id":"tcp.into_memory","transport":"tcp","cpu_seconds_per_gb":0.31,"ratio":2.0},
            {"id":"rdma.into_store","transport":"rdma","cpu_seconds_per_gb":20,"ratio":1.13},
            {"id":"rdma.into_memory","transport":"rdma","cpu_seconds_per_gb":21,"ratio":1.19}]}"#;
        let mut m = Measured::default();
        read_measured(stable, "compare.json", &mut m).unwrap();
        assert_eq!(m.tcp_cpu_s_per_gb.unwrap().0, 0.31);
        assert_eq!(m.rdma_vs_ib_write_bw.unwrap().0, 1.19);
        // Nothing recognisable: nothing taken, no error.
        let mut m = Measured::default();
        read_measured(r#"{"benchmark":"disk","x":1}"#, "disk.json", &mut m).unwrap();
        assert_eq!(m, Measured::default());
        // Not JSON: a precise error.
        let err = read_measured("{not json", "bad.json", &mut m).unwrap_err();
        assert!(format!("{err:#}").contains("bad.json is not valid JSON"));
        // A missing file leaves the defaults.
        read_measured_file(Path::new("/nonexistent/compare.json"), &mut m).unwrap();
        assert_eq!(m, Measured::default());
    }
}
