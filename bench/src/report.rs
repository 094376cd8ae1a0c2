//! What every benchmark produces: rows (Ferry's paths and the standard tools' runs), each
//! Ferry row pointing at the baseline row it is compared with, printed as one table and
//! written as JSON. The JSON field names are a stable interface (like iperf3's `-J`): add
//! fields, never rename or remove them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Bumped only if a field changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// Process CPU time (user + system) so far: Ferry's CPU cost includes both ends, which run in
/// this one process, as iperf3's figure below adds its client's and its server's.
pub fn cpu_time() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(usage.user_time()) + tv(usage.system_time())
}

/// A started measurement: wall clock and CPU time.
pub struct Stopwatch {
    wall: Instant,
    cpu: Duration,
}

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    pub fn stop(self, bytes: u64) -> Measured {
        Measured {
            bytes,
            seconds: self.wall.elapsed().as_secs_f64(),
            cpu_seconds: Some((cpu_time() - self.cpu).as_secs_f64()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub bytes: u64,
    pub seconds: f64,
    /// None where the tool does not report it.
    pub cpu_seconds: Option<f64>,
}

impl Measured {
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Stable identifier, e.g. `tcp.into_memory`, `baseline.iperf3`.
    pub id: String,
    /// What a reader sees in the table.
    pub label: String,
    /// `ferry` or the standard tool's name.
    pub tool: String,
    /// `tcp`, `rdma` or `disk`.
    pub transport: String,
    pub bytes: u64,
    pub seconds: f64,
    pub bits_per_second: f64,
    pub bytes_per_second: f64,
    pub cpu_seconds_per_gb: Option<f64>,
    /// The `id` of the row this one is compared with.
    pub baseline: Option<String>,
    /// This row's throughput over the baseline's.
    pub ratio: Option<f64>,
    /// The ratio Ferry aims for on this path, where there is one.
    pub target: Option<f64>,
    /// Parameters of this row (piece length, pieces in flight, queue pairs, ...).
    #[serde(default)]
    pub parameters: Value,
}

impl Row {
    pub fn new(id: &str, label: &str, tool: &str, transport: &str, m: Measured) -> Row {
        Row {
            id: id.into(),
            label: label.into(),
            tool: tool.into(),
            transport: transport.into(),
            bytes: m.bytes,
            seconds: m.seconds,
            bits_per_second: m.bytes_per_second() * 8.0,
            bytes_per_second: m.bytes_per_second(),
            cpu_seconds_per_gb: m.cpu_seconds.map(|c| c / (m.bytes as f64 / 1e9)),
            baseline: None,
            ratio: None,
            target: None,
            parameters: Value::Null,
        }
    }

    pub fn with_parameters(mut self, parameters: Value) -> Row {
        self.parameters = parameters;
        self
    }

    /// Compares this row with `baseline` (None: the tool was not there to run).
    pub fn against(mut self, baseline: Option<&Row>, target: Option<f64>) -> Row {
        if let Some(b) = baseline {
            self.baseline = Some(b.id.clone());
            self.ratio = Some(self.bytes_per_second / b.bytes_per_second);
        }
        self.target = target;
        self
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub benchmark: String,
    pub parameters: Value,
    pub rows: Vec<Row>,
    /// Anything else worth keeping (registration times, tool versions, ...).
    #[serde(default)]
    pub extra: Value,
    /// What was missing or assumed, in words.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(benchmark: &str, parameters: Value) -> Report {
        Report {
            schema_version: SCHEMA_VERSION,
            benchmark: benchmark.into(),
            parameters,
            rows: Vec::new(),
            extra: Value::Object(Default::default()),
            notes: Vec::new(),
        }
    }

    pub fn row(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        println!("note: {note}");
        self.notes.push(note);
    }

    pub fn print(&self) {
        println!();
        println!(
            "{:<58} {:>11} {:>10} {:>9} {:>8} {:>7}",
            "path", "Gbit/s", "MB/s", "CPU s/GB", "ratio", "target"
        );
        for row in &self.rows {
            let ratio = row
                .ratio
                .map(|r| format!("{r:.2}x"))
                .unwrap_or_else(|| "-".into());
            let target = match (row.target, row.ratio) {
                (Some(t), Some(r)) if r >= t => format!(">={t} ok"),
                (Some(t), Some(_)) => format!(">={t} NO"),
                (Some(t), None) => format!(">={t} ?"),
                (None, _) => String::new(),
            };
            let cpu = row
                .cpu_seconds_per_gb
                .map(|c| format!("{c:.3}"))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<58} {:>11.3} {:>10.1} {:>9} {:>8} {:>7}",
                row.label,
                row.bits_per_second / 1e9,
                row.bytes_per_second / 1e6,
                cpu,
                ratio,
                target
            );
        }
        let compared: Vec<&Row> = self.rows.iter().filter(|r| r.baseline.is_some()).collect();
        if !compared.is_empty() {
            println!("ratio: Ferry's throughput over the row named in its JSON `baseline`, measured in this run");
        }
    }
}
