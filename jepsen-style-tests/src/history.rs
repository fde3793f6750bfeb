//! The history: one JSON line per operation, Jepsen style.
//!
//! Every process of a run (the harness, the workers in the client
//! namespace) shares one kernel and so one `CLOCK_MONOTONIC`: every event is
//! stamped with it, in nanoseconds, which gives an exact real-time order
//! across processes. Types: `invoke` (started), `ok` (happened), `fail`
//! (definitely did not happen), `info` (unknown, or a nemesis event).

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;

use nix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Nanoseconds on the host's monotonic clock.
pub fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    (t.tv_sec() as u64) * 1_000_000_000 + t.tv_nsec() as u64
}

/// What kind of event an op is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Host monotonic time, ns.
    pub t: u64,
    /// The logical process ("lease-2", "writer", "nemesis", ...).
    pub process: String,
    #[serde(rename = "type")]
    pub kind: OpType,
    /// The operation: acquire, hold, register-write, get-lease, pair-write,
    /// kill, partition, heal, ...
    pub f: String,
    #[serde(default)]
    pub value: Value,
}

impl Op {
    pub fn new(process: &str, kind: OpType, f: &str, value: Value) -> Self {
        Self { t: now_ns(), process: process.to_owned(), kind, f: f.to_owned(), value }
    }

    pub fn u64(&self, key: &str) -> Option<u64> {
        self.value.get(key).and_then(Value::as_u64)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.value.get(key).and_then(Value::as_str)
    }
}

/// Appends ops to a JSONL file; shared by a process's tasks.
#[derive(Debug)]
pub struct Recorder {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl Recorder {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::File::options().create(true).append(true).open(path)?;
        Ok(Self { out: Mutex::new(std::io::BufWriter::new(f)) })
    }

    pub fn record(&self, op: &Op) {
        let line = serde_json::to_string(op).expect("ops serialize");
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "{line}");
    }

    pub fn op(&self, process: &str, kind: OpType, f: &str, value: Value) -> Op {
        let op = Op::new(process, kind, f, value);
        self.record(&op);
        op
    }

    pub fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

/// Reads and merges JSONL histories, sorted by time.
pub fn read(paths: &[&Path]) -> std::io::Result<Vec<Op>> {
    let mut ops = Vec::new();
    for p in paths {
        let Ok(f) = std::fs::File::open(p) else { continue };
        for line in std::io::BufReader::new(f).lines() {
            let line = line?;
            if let Ok(op) = serde_json::from_str::<Op>(&line) {
                ops.push(op);
            }
        }
    }
    ops.sort_by_key(|o| o.t);
    Ok(ops)
}
