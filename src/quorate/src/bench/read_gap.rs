//! `quorate bench read-gap` and `quorate bench leader`: how long reads stop
//! when the Raft leader dies, on quorate or on etcd.
//!
//! One client reads every `interval` for `duration` and records when each
//! successful read completed; the report gives the longest gap between two
//! consecutive successes (and when it began), every gap over
//! [`REPORTED_GAP`], and whether the run ended inside a gap. A script
//! (`deploy/bench/leader-change.sh`) kills the leader during the window,
//! found with `bench leader`. Numbers, not assertions.
//!
//! The readers behave as a real client would, and alike on both sides:
//! - quorate: `GetLease` through the normal [`Client`], which follows
//!   leader hints, retries on the next endpoint, and bounds each call by
//!   its call timeout;
//! - etcd: `Range` with one channel per endpoint, the endpoint that
//!   answered last first; on an error or when the call timeout passes, the
//!   next endpoint.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::etcd::{Etcd, EtcdError, Target, range_request};
use crate::client::{Client, ClientError};
use crate::pb::etcd::kv_client::KvClient;
use crate::pb::v1 as pb;

/// Gaps longer than this are listed one by one (normal gaps are about
/// one interval plus one read).
pub const REPORTED_GAP: Duration = Duration::from_millis(20);

/// At most this many gaps are listed (the longest one is always reported).
const MAX_LISTED_GAPS: usize = 100;

/// Why a read-gap or leader query failed before measuring anything.
#[derive(Debug, thiserror::Error)]
pub enum ReadGapError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("the quorate cluster knows no leader now")]
    NoLeader,
    #[error("the leader, node {0}, is not among the cluster's nodes")]
    LeaderAddr(u64),
}

/// What to read, and how.
#[derive(Debug, Clone)]
pub struct ReadGapOptions {
    pub duration: Duration,
    pub interval: Duration,
    /// The bound on one call (quorate: the client's call timeout; etcd: one
    /// attempt on one endpoint).
    pub call_timeout: Duration,
    /// quorate: the consistency of `GetLease`; etcd: `Stale` is a
    /// serializable Range, anything else a linearizable one.
    pub consistency: pb::Consistency,
    /// quorate: the group read (need not exist: the read is answered
    /// either way).
    pub group: String,
}

/// One gap between consecutive successful reads.
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    /// When it began (the success before it), seconds after the start.
    pub at_s: f64,
    /// The same instant, milliseconds since the Unix epoch (to line it up
    /// with a kill's time).
    pub at_unix_ms: u64,
    pub ms: f64,
}

/// What one run saw.
#[derive(Debug, Clone, Serialize)]
pub struct ReadGapReport {
    pub target: Target,
    pub consistency: String,
    pub duration_s: f64,
    pub interval_ms: f64,
    pub reads: u64,
    pub errors: u64,
    /// The longest gap (0 with fewer than two successes, unless the run
    /// ended in a gap: then that gap, up to the end, counts).
    pub longest_gap_ms: f64,
    pub longest_gap_at_s: f64,
    pub longest_gap_at_unix_ms: u64,
    /// Every gap over 20 ms, in order (at most 100).
    pub gaps_over_20ms: Vec<Gap>,
    /// No success since the last listed gap began: reads had not resumed
    /// when the run ended.
    pub ended_in_gap: bool,
    pub last_error: Option<String>,
}

impl std::fmt::Display for ReadGapReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read-gap ({:?}, {}): {} reads, {} errors in {:.1} s; longest gap {:.1} ms at {:.3} s{}; {} gaps over 20 ms",
            self.target,
            self.consistency,
            self.reads,
            self.errors,
            self.duration_s,
            self.longest_gap_ms,
            self.longest_gap_at_s,
            if self.ended_in_gap { " (the run ended in it)" } else { "" },
            self.gaps_over_20ms.len()
        )?;
        for g in &self.gaps_over_20ms {
            write!(f, "\n  at {:.3} s: {:.1} ms", g.at_s, g.ms)?;
        }
        if let Some(e) = &self.last_error {
            write!(f, "\n  last error: {e}")?;
        }
        Ok(())
    }
}

/// The one reader of a run, of either system (the quorate client is boxed:
/// it is much larger than the etcd reader).
enum Reader {
    Quorate { client: Box<Client>, group: String, consistency: pb::Consistency },
    Etcd(EtcdReader),
}

impl Reader {
    async fn read(&mut self) -> Result<(), String> {
        match self {
            Reader::Quorate { client, group, consistency } => {
                client.get_lease(group, *consistency).await.map(drop).map_err(|e| e.to_string())
            }
            Reader::Etcd(r) => r.read().await,
        }
    }
}

/// An etcd reader that fails over between endpoints itself, as etcd's
/// clients do: one channel per endpoint, the one that answered last
/// first.
struct EtcdReader {
    kvs: Vec<(String, KvClient<tonic::transport::Channel>)>,
    current: usize,
    call_timeout: Duration,
    serializable: bool,
}

impl EtcdReader {
    fn new(etcd: &Etcd, call_timeout: Duration, serializable: bool) -> Result<Self, EtcdError> {
        let kvs = (0..etcd.endpoints().len())
            .map(|i| etcd.channel(i).map(|(a, ch)| (a, KvClient::new(ch))))
            .collect::<Result<_, _>>()?;
        Ok(Self { kvs, current: 0, call_timeout, serializable })
    }

    /// One read: each endpoint at most once, starting at the current one.
    async fn read(&mut self) -> Result<(), String> {
        let mut last = String::new();
        for k in 0..self.kvs.len() {
            let i = (self.current + k) % self.kvs.len();
            let (addr, kv) = &mut self.kvs[i];
            match tokio::time::timeout(self.call_timeout, kv.range(range_request(self.serializable))).await {
                Ok(Ok(_)) => {
                    self.current = i;
                    return Ok(());
                }
                Ok(Err(s)) => last = format!("{addr}: {}", s.message()),
                Err(_) => last = format!("{addr}: no answer within {:?}", self.call_timeout),
            }
        }
        Err(last)
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs the reader of `target` (quorate through `client`, etcd through
/// `etcd`) for `opts.duration`.
pub async fn run(
    target: Target,
    client: Option<&Client>,
    etcd: Option<&Etcd>,
    opts: &ReadGapOptions,
) -> Result<ReadGapReport, ReadGapError> {
    let serializable = opts.consistency == pb::Consistency::Stale;
    let (mut reader, consistency) = match target {
        Target::Quorate => {
            let client = client.ok_or(ClientError::NoEndpoints)?.another()?.with_call_timeout(opts.call_timeout);
            let name = match opts.consistency {
                pb::Consistency::Stale => "stale",
                pb::Consistency::LeaseRead => "lease-read",
                pb::Consistency::ReadIndex => "read-index",
                _ => "linearizable",
            };
            (
                Reader::Quorate { client: Box::new(client), group: opts.group.clone(), consistency: opts.consistency },
                name,
            )
        }
        Target::Etcd => {
            let etcd = etcd.ok_or(EtcdError::NoEndpoints)?;
            etcd.put_bench_key().await?;
            let r = EtcdReader::new(etcd, opts.call_timeout, serializable)?;
            (Reader::Etcd(r), if serializable { "serializable" } else { "linearizable" })
        }
    };
    let (start, wall) = (Instant::now(), SystemTime::now());
    let end = start + opts.duration;
    let mut gaps = GapLog::default();
    let (mut reads, mut errors, mut last_error) = (0, 0, None);
    while Instant::now() < end {
        let tick = Instant::now();
        match reader.read().await {
            Ok(()) => {
                reads += 1;
                gaps.success(start.elapsed());
            }
            Err(e) => {
                errors += 1;
                last_error = Some(e);
            }
        }
        // The next read one interval after this one began (at once when
        // the read took longer), never past the end.
        tokio::time::sleep_until(tokio::time::Instant::from_std((tick + opts.interval).min(end))).await;
    }
    let ended_in_gap = gaps.finish(start.elapsed());
    let at = |s: f64| unix_ms(wall + Duration::from_secs_f64(s));
    let longest = gaps.longest.clone().unwrap_or(Gap { at_s: 0.0, at_unix_ms: 0, ms: 0.0 });
    Ok(ReadGapReport {
        target,
        consistency: consistency.to_owned(),
        duration_s: start.elapsed().as_secs_f64(),
        interval_ms: opts.interval.as_secs_f64() * 1000.0,
        reads,
        errors,
        longest_gap_ms: longest.ms,
        longest_gap_at_s: longest.at_s,
        longest_gap_at_unix_ms: at(longest.at_s),
        gaps_over_20ms: gaps.listed.into_iter().map(|g| Gap { at_unix_ms: at(g.at_s), ..g }).collect(),
        ended_in_gap,
        last_error,
    })
}

/// The gaps between successes, kept as they come (offsets from the start).
#[derive(Debug, Default)]
struct GapLog {
    last_ok: Option<Duration>,
    longest: Option<Gap>,
    listed: Vec<Gap>,
}

impl GapLog {
    fn gap(&mut self, from: Duration, to: Duration) {
        let g = Gap { at_s: from.as_secs_f64(), at_unix_ms: 0, ms: (to - from).as_secs_f64() * 1000.0 };
        if to - from > REPORTED_GAP && self.listed.len() < MAX_LISTED_GAPS {
            self.listed.push(g.clone());
        }
        if self.longest.as_ref().is_none_or(|l| g.ms > l.ms) {
            self.longest = Some(g);
        }
    }

    /// A read that succeeded, completing at `at`.
    fn success(&mut self, at: Duration) {
        if let Some(from) = self.last_ok {
            self.gap(from, at.max(from));
        }
        self.last_ok = Some(at);
    }

    /// The run ended at `at`: a gap still open then counts, up to `at`,
    /// when it is over [`REPORTED_GAP`]. Whether the run ended in one.
    fn finish(&mut self, at: Duration) -> bool {
        match self.last_ok {
            Some(from) if at.saturating_sub(from) > REPORTED_GAP => {
                self.gap(from, at);
                true
            }
            // Never a success: the whole run is one gap.
            None => {
                self.gap(Duration::ZERO, at);
                true
            }
            Some(_) => false,
        }
    }
}

/// The quorate leader: its node id and address.
#[derive(Debug, Clone, Serialize)]
pub struct QuorateLeader {
    pub target: Target,
    pub node_id: u64,
    pub endpoint: String,
    pub term: Option<u64>,
}

/// Who leads the quorate cluster now (`ClusterMembers`, as
/// `quorate cluster members` shows it).
pub async fn quorate_leader(client: &Client) -> Result<QuorateLeader, ReadGapError> {
    let m = client.cluster_members().await?;
    let id = m.leader_id.ok_or(ReadGapError::NoLeader)?;
    let node = m.nodes.iter().find(|n| n.id == id).ok_or(ReadGapError::LeaderAddr(id))?;
    Ok(QuorateLeader { target: Target::Quorate, node_id: id, endpoint: node.addr.clone(), term: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_longest_gap_and_every_long_one_are_kept() {
        let mut g = GapLog::default();
        for t in [10, 12, 14, 500, 502, 560, 562] {
            g.success(ms(t));
        }
        assert!(!g.finish(ms(570)));
        let longest = g.longest.unwrap();
        assert_eq!((longest.at_s, longest.ms.round()), (0.014, 486.0));
        let listed: Vec<f64> = g.listed.iter().map(|g| g.ms.round()).collect();
        assert_eq!(listed, [486.0, 58.0]);
    }

    #[test]
    fn a_run_that_ends_in_a_gap_counts_it() {
        let mut g = GapLog::default();
        g.success(ms(5));
        g.success(ms(7));
        assert!(g.finish(ms(3_007)));
        assert_eq!(g.longest.unwrap().ms.round(), 3000.0);
        let mut none = GapLog::default();
        assert!(none.finish(ms(1_000)));
        assert_eq!(none.longest.unwrap().ms.round(), 1000.0);
    }
}
