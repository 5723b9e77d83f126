//! The stack benchmark's results: one row per figure (scenario, measure, figure, target, met?),
//! printed at the end as one Markdown table; percentiles of latency samples; what /proc says
//! about a process (resident memory, CPU time, connections to a port).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Whether a figure meets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Met {
    Yes,
    No,
    /// No target for this figure (or none at this size).
    NoTarget,
}

impl Met {
    /// `Yes` when `holds`, else `No`.
    pub fn from(holds: bool) -> Met {
        if holds {
            Met::Yes
        } else {
            Met::No
        }
    }

    fn label(self) -> &'static str {
        match self {
            Met::Yes => "yes",
            Met::No => "**no**",
            Met::NoTarget => "",
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub measure: String,
    pub figure: String,
    pub target: String,
    pub met: Met,
}

/// The rows measured so far, shared by the scenarios (a scenario that fails half-way keeps the
/// rows it measured before).
#[derive(Clone, Default)]
pub struct Table {
    rows: Arc<Mutex<Vec<Row>>>,
}

impl Table {
    /// Adds a row and echoes it on stderr, so progress is visible during a long run.
    pub fn push(
        &self,
        scenario: &str,
        measure: impl Into<String>,
        figure: impl Into<String>,
        target: impl Into<String>,
        met: Met,
    ) {
        let row = Row {
            scenario: scenario.to_string(),
            measure: measure.into(),
            figure: figure.into(),
            target: target.into(),
            met,
        };
        eprintln!(
            "[{}] {}: {} (target {}) {}",
            row.scenario,
            row.measure,
            row.figure,
            if row.target.is_empty() {
                "none"
            } else {
                &row.target
            },
            row.met.label()
        );
        self.rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(row);
    }

    /// A row without a target.
    pub fn info(&self, scenario: &str, measure: impl Into<String>, figure: impl Into<String>) {
        self.push(scenario, measure, figure, "", Met::NoTarget);
    }

    /// The whole table as Markdown.
    pub fn markdown(&self) -> String {
        let rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::from("| scenario | measure | figure | target | met? |\n");
        text.push_str("|---|---|---|---|---|\n");
        // A figure may quote an error answer: nothing in it may break the table.
        let cell = |value: &str| value.replace('|', "\\|").replace(['\n', '\r'], " ");
        for row in rows.iter() {
            let _ = writeln!(
                text,
                "| {} | {} | {} | {} | {} |",
                cell(&row.scenario),
                cell(&row.measure),
                cell(&row.figure),
                cell(&row.target),
                row.met.label()
            );
        }
        text
    }
}

/// Latency samples in milliseconds: p50 and p99 (nearest rank) and the count.
pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    pub fn new(mut samples: Vec<Duration>) -> Latencies {
        samples.sort();
        Latencies { sorted: samples }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The `fraction` percentile by nearest rank (`None` without samples).
    pub fn percentile(&self, fraction: f64) -> Option<Duration> {
        if self.sorted.is_empty() {
            return None;
        }
        let rank = (fraction * self.sorted.len() as f64).ceil() as usize;
        Some(self.sorted[rank.clamp(1, self.sorted.len()) - 1])
    }

    pub fn p50(&self) -> Option<Duration> {
        self.percentile(0.5)
    }

    /// `p50 X ms, p99 Y ms (n samples)`.
    pub fn describe(&self) -> String {
        match (self.p50(), self.percentile(0.99)) {
            (Some(p50), Some(p99)) => format!(
                "p50 {}, p99 {} (n={})",
                millis(p50),
                millis(p99),
                self.len()
            ),
            _ => "no sample".to_string(),
        }
    }

    /// Whether p50 is within `limit` (`Met::No` without samples).
    pub fn p50_within(&self, limit: Duration) -> Met {
        Met::from(self.p50().is_some_and(|p50| p50 <= limit))
    }
}

/// A duration in milliseconds with a precision that fits its size.
pub fn millis(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// A duration in seconds.
pub fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

/// Resident memory of `pid` in bytes (`VmRSS`), `None` when it is gone.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let process = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?;
    Some(process.status().ok()?.vmrss? * 1024)
}

/// CPU time `pid` has used so far (user + system), `None` when it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let process = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?;
    let stat = process.stat().ok()?;
    let ticks = stat.utime + stat.stime;
    Some(Duration::from_secs_f64(
        ticks as f64 / procfs::ticks_per_second() as f64,
    ))
}

/// Bytes as MB (10^6).
pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// How many established TCP connections process `pid` holds to 127.0.0.1:`port`: its socket
/// file descriptors matched against its network namespace's `/proc/<pid>/net/tcp`.
pub fn connections_to(pid: u32, port: u16) -> Option<usize> {
    let process = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?;
    let sockets: HashSet<u64> = process
        .fd()
        .ok()?
        .filter_map(|fd| match fd.ok()?.target {
            procfs::process::FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect();
    let mut entries = process.tcp().ok()?;
    entries.extend(process.tcp6().unwrap_or_default());
    Some(
        entries
            .iter()
            .filter(|entry| {
                entry.state == procfs::net::TcpState::Established
                    && entry.remote_address.port() == port
                    && sockets.contains(&entry.inode)
            })
            .count(),
    )
}
