//! The client workloads, run as a separate process inside the client
//! namespace (so their traffic crosses the faulty network), writing a
//! history file.
//!
//! - Lease workload: clients take turns holding the lease of group `jl`
//!   (each incarnation a fresh holder name, through the library's lease
//!   keeper), and while they hold it write to a shared register through a
//!   fenced write that accepts only the newest epoch. Each records its hold
//!   interval. `--skew-ppm` makes the clients' clocks run slow (the
//!   documented test-only clock option): they believe their lease lasts
//!   longer than it does, which must be caught.
//! - Readers: linearizable `GetLease` of both groups, for epoch
//!   monotonicity.
//! - Redis pair workload: a writer that finds the primary through quorate,
//!   writes with its epoch (deploy/redis/fenced_set.lua), then `WAIT 1`.
//! - Plain writers, one per member: every 10 ms a plain `SET p:{member}:{seq}
//!   {seq}` straight to that member's data Redis, the way most Redis
//!   applications write (no quorate, no epoch, no `WAIT`). They show when a
//!   node accepts writes, which only the agents' fencing can stop: a replica
//!   answers `READONLY`, a fenced primary holds writes (`CLIENT PAUSE
//!   WRITE`) until the client times out, and the agent kills the node's
//!   client connections when it fences.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quorate::client::Client;
use quorate::client::keeper::{self, KeeperEvent, KeeperSpec};
use quorate::pb::v1 as pb;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use crate::history::{OpType, Recorder, now_ns};
use crate::system::{LEASE_GROUP, PAIR};

/// The shared register's fenced write: accepts a write only when its epoch
/// is not older than the newest epoch the register has accepted.
const REGISTER_LUA: &str = r"
local newest = tonumber(redis.call('GET', KEYS[1] .. ':epoch') or '0')
local epoch = tonumber(ARGV[1])
if epoch < newest then return redis.error_reply('STALE_EPOCH ' .. newest) end
redis.call('SET', KEYS[1] .. ':epoch', ARGV[1])
redis.call('SET', KEYS[1], ARGV[2])
return 'OK'
";

/// What the worker does.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub endpoints: String,
    pub out: PathBuf,
    pub duration: Duration,
    pub seed: u64,
    pub lease_clients: usize,
    pub skew_ppm: u64,
    pub register: String,
    /// member id -> data Redis HOST:PORT
    pub data: Vec<(String, String)>,
}

/// How often each plain writer writes.
const PLAIN_INTERVAL: Duration = Duration::from_millis(10);
/// A plain write unanswered for this long is indeterminate. Short, so a
/// fenced node (whose writes block) costs a writer little; long enough for
/// one TCP retransmission (200 ms) under packet loss.
const PLAIN_TIMEOUT: Duration = Duration::from_millis(300);

async fn connect(addr: &str) -> Option<MultiplexedConnection> {
    connect_with(addr, Duration::from_millis(500)).await
}

async fn connect_with(addr: &str, response_timeout: Duration) -> Option<MultiplexedConnection> {
    let c = redis::Client::open(format!("redis://{addr}")).ok()?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(300)))
        .set_response_timeout(Some(response_timeout));
    tokio::time::timeout(Duration::from_secs(1), c.get_multiplexed_async_connection_with_config(&config))
        .await
        .ok()?
        .ok()
}

/// Runs every workload until the duration is over.
pub async fn run(opts: WorkerOptions) -> anyhow::Result<()> {
    let rec = Arc::new(Recorder::create(&opts.out)?);
    let until = Instant::now() + opts.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.lease_clients {
        let (o, r) = (opts.clone(), rec.clone());
        tasks.spawn(async move { lease_client(i, o, r, until).await });
    }
    for group in [LEASE_GROUP, PAIR] {
        let (o, r) = (opts.clone(), rec.clone());
        tasks.spawn(async move { reader(group, o, r, until).await });
    }
    let (o, r) = (opts.clone(), rec.clone());
    tasks.spawn(async move { pair_writer(o, r, until).await });
    for (member, addr) in opts.data.clone() {
        let r = rec.clone();
        tasks.spawn(async move { plain_writer(member, addr, r, until).await });
    }
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            eprintln!("worker task failed: {e}");
        }
    }
    rec.flush();
    Ok(())
}

#[expect(clippy::too_many_lines, reason = "not yet split by what it does (issue 10)")]
async fn lease_client(i: usize, opts: WorkerOptions, rec: Arc<Recorder>, until: Instant) {
    let process = format!("lease-{i}");
    let Ok(client) = Client::from_list(&opts.endpoints) else { return };
    let client = Arc::new(client.with_call_timeout(Duration::from_secs(2)));
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed.wrapping_add(i as u64));
    let mut register: Option<MultiplexedConnection> = None;
    let slow = |valid_for: Duration| {
        // A clock running slow by skew_ppm sees valid_for pass later.
        valid_for.mul_f64(1e6 / (1e6 - opts.skew_ppm.min(900_000) as f64))
    };
    let mut incarnation = 0;
    while Instant::now() < until {
        incarnation += 1;
        let holder = format!("{process}-{incarnation}");
        let (tx, mut events) = mpsc::channel(64);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let spec = KeeperSpec { group: LEASE_GROUP.into(), holder: holder.clone(), ttl_ms: 1_500, wait: true };
        let kc = client.clone();
        let keeper = tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            let _ = keeper::keep(kc.as_ref(), &spec, &tx, stop).await;
        });
        let mut stop_tx = Some(stop_tx);
        let hold_for = Duration::from_millis(rng.random_range(800..2_500));
        // Some holds end by walking away: the client stops renewing without
        // releasing and acts until its own deadline, as a holder whose
        // renewals stopped reaching the cluster would. The next holder then
        // gets the lease only by expiry.
        let abandon = rng.random_bool(0.3);
        let mut abandoned = false;
        // (epoch, start_ns, believed deadline, lost)
        let mut held: Option<(u64, u64, Instant, bool)> = None;
        let mut hold_deadline: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(30));
        let mut events_open = true;
        loop {
            tokio::select! {
                ev = events.recv(), if events_open => match ev {
                    Some(KeeperEvent::Acquired { epoch, valid_until }) => {
                        let start = now_ns();
                        rec.op(&process, OpType::Ok, "acquire", json!({"group": LEASE_GROUP, "holder": holder, "epoch": epoch}));
                        held = Some((epoch, start, Instant::now() + slow(valid_until.saturating_duration_since(Instant::now())), false));
                        hold_deadline = Some(Instant::now() + hold_for);
                    }
                    Some(KeeperEvent::Renewed { valid_until, .. }) => {
                        if let Some(h) = held.as_mut() {
                            h.2 = Instant::now() + slow(valid_until.saturating_duration_since(Instant::now()));
                        }
                    }
                    Some(KeeperEvent::Lost { .. }) | Some(KeeperEvent::Released { .. }) => {
                        if let Some(h) = held.as_mut() {
                            h.3 = true;
                        }
                    }
                    Some(KeeperEvent::Busy { .. }) => {}
                    // The keeper is gone (it ended, or we walked away): act
                    // out the hold on the tick.
                    None => events_open = false,
                },
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            // The hold ends at the last instant the client was entitled to
            // act: now, or its believed deadline if that came first.
            let end_hold = |held: &mut Option<(u64, u64, Instant, bool)>| {
                if let Some((epoch, start, believed, _)) = held.take() {
                    let late = now.saturating_duration_since(believed).as_nanos() as u64;
                    let end = now_ns().saturating_sub(late).max(start);
                    rec.op(
                        &process,
                        OpType::Ok,
                        "hold",
                        json!({"group": LEASE_GROUP, "holder": holder, "epoch": epoch, "start": start, "end": end}),
                    );
                }
            };
            if hold_deadline.is_some_and(|d| now >= d) && abandon && held.is_some() && !abandoned {
                keeper.abort();
                abandoned = true;
                hold_deadline = None;
            }
            // Done holding (or done altogether): stop acting first, then
            // release.
            if hold_deadline.is_some_and(|d| now >= d) || now >= until {
                end_hold(&mut held);
                if let Some(s) = stop_tx.take() {
                    let _ = s.send(());
                }
                hold_deadline = None;
            }
            if let Some((epoch, _, believed, lost)) = held {
                // An honest client stops at the keeper's loss signal; one
                // that walked away, or whose clock is skewed, trusts its own
                // deadline.
                if now < believed && (!lost || opts.skew_ppm > 0 || abandoned) {
                    write_register(&process, &opts.register, &mut register, &rec, epoch, &holder).await;
                } else {
                    end_hold(&mut held);
                    if let Some(s) = stop_tx.take() {
                        let _ = s.send(());
                    }
                }
            }
            if keeper.is_finished() && held.is_none() {
                break;
            }
        }
        let _ = keeper.await;
        drop(stop_tx);
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
    }
}

async fn write_register(
    process: &str,
    addr: &str,
    conn: &mut Option<MultiplexedConnection>,
    rec: &Recorder,
    epoch: u64,
    holder: &str,
) {
    if conn.is_none() {
        *conn = connect(addr).await;
    }
    let Some(c) = conn.as_mut() else { return };
    let invoked = now_ns();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(REGISTER_LUA).arg(1).arg("register").arg(epoch).arg(holder);
    match cmd.query_async::<String>(c).await {
        Ok(_) => {
            rec.op(process, OpType::Ok, "register-write", json!({"epoch": epoch, "invoked": invoked}));
        }
        Err(e) if e.to_string().contains("STALE_EPOCH") => {
            rec.op(
                process,
                OpType::Fail,
                "register-write",
                json!({"epoch": epoch, "invoked": invoked, "error": e.to_string()}),
            );
        }
        Err(e) => {
            *conn = None;
            rec.op(
                process,
                OpType::Info,
                "register-write",
                json!({"epoch": epoch, "invoked": invoked, "error": e.to_string()}),
            );
        }
    }
}

async fn reader(group: &str, opts: WorkerOptions, rec: Arc<Recorder>, until: Instant) {
    let process = format!("reader-{group}");
    let Ok(client) = Client::from_list(&opts.endpoints) else { return };
    let client = client.with_call_timeout(Duration::from_secs(1));
    while Instant::now() < until {
        let invoked = now_ns();
        match client.get_lease(group, pb::Consistency::Linearizable).await {
            Ok(r) => {
                let l = r.lease.unwrap_or_default();
                rec.op(
                    &process,
                    OpType::Ok,
                    "get-lease",
                    json!({"group": group, "holder": l.holder, "epoch": l.epoch, "invoked": invoked}),
                );
            }
            Err(e) => {
                rec.op(
                    &process,
                    OpType::Fail,
                    "get-lease",
                    json!({"group": group, "invoked": invoked, "error": e.to_string()}),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn pair_writer(opts: WorkerOptions, rec: Arc<Recorder>, until: Instant) {
    let Ok(client) = Client::from_list(&opts.endpoints) else { return };
    let client = client.with_call_timeout(Duration::from_secs(1));
    let mut primary: Option<(String, u64, MultiplexedConnection)> = None;
    let mut seq = 0u64;
    while Instant::now() < until {
        if primary.is_none() {
            let found = match client.get_lease(PAIR, pb::Consistency::Linearizable).await {
                Ok(r) => r.lease.filter(|l| !l.holder.is_empty()),
                Err(_) => None,
            };
            if let Some(l) = found
                && let Some((_, addr)) = opts.data.iter().find(|(m, _)| *m == l.holder)
                && let Some(c) = connect(addr).await
            {
                primary = Some((l.holder, l.epoch, c));
            }
            if primary.is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        let (member, epoch, conn) = primary.as_mut().expect("set above");
        seq += 1;
        let key = format!("w:{seq}");
        let invoked = now_ns();
        let mut eval = redis::cmd("EVAL");
        eval.arg(quorate::local::demo::FENCED_SET_LUA)
            .arg(2)
            .arg(&key)
            .arg(quorate::wire::keys::lease_key(PAIR))
            .arg(&key)
            .arg(*epoch);
        match eval.query_async::<()>(conn).await {
            Ok(()) => {
                let acked: i64 = redis::cmd("WAIT").arg(1).arg(100).query_async(conn).await.unwrap_or(0);
                rec.op(
                    "writer",
                    OpType::Ok,
                    "pair-write",
                    json!({"member": member, "epoch": epoch, "key": key, "acked": acked >= 1, "invoked": invoked}),
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                rec.op(
                    "writer",
                    OpType::Fail,
                    "pair-write",
                    json!({"member": member, "epoch": epoch, "key": key, "invoked": invoked, "error": e.to_string()}),
                );
                primary = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Plain writes to one member's data Redis, independently of the other
/// member and of quorate. Each attempt is one op `plain-write` with value
/// `{member, key, seq, invoked}`: `ok` when Redis answered OK, `fail` when it
/// answered an error (`READONLY` on a replica) or the write was never sent
/// (no connection), `info` when the outcome is unknown (timeout, connection
/// lost). After anything but an answer the connection is dropped: Redis runs
/// a client's commands in order, so the next write would wait behind one
/// that a paused node holds.
async fn plain_writer(member: String, addr: String, rec: Arc<Recorder>, until: Instant) {
    let process = format!("plain-{member}");
    let mut conn: Option<MultiplexedConnection> = None;
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(PLAIN_INTERVAL);
    // After a blocked write, carry on at the normal rate, not in a burst.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if Instant::now() >= until {
            break;
        }
        seq += 1;
        let key = format!("p:{member}:{seq}");
        if conn.is_none() {
            conn = connect_with(&addr, PLAIN_TIMEOUT).await;
        }
        let Some(c) = conn.as_mut() else {
            let error = "not sent: cannot connect";
            let value = json!({"member": member, "key": key, "seq": seq, "invoked": now_ns(), "error": error});
            rec.op(&process, OpType::Fail, "plain-write", value);
            continue;
        };
        let invoked = now_ns();
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(seq);
        // The connection's response timeout ends a blocked write; the outer
        // timeout is only a backstop should that timer not fire.
        let reply = tokio::time::timeout(PLAIN_TIMEOUT + Duration::from_millis(50), set.query_async::<String>(c)).await;
        let base = json!({"member": member, "key": key, "seq": seq, "invoked": invoked});
        let with_error = |e: String| {
            let mut v = base.clone();
            v["error"] = json!(e);
            v
        };
        match reply {
            Ok(Ok(ok)) if ok == "OK" => {
                rec.op(&process, OpType::Ok, "plain-write", base);
            }
            // An error reply: Redis refused the write, definitely.
            Ok(Err(e)) if e.code().is_some() => {
                rec.op(&process, OpType::Fail, "plain-write", with_error(e.to_string()));
            }
            Ok(Ok(other)) => {
                rec.op(&process, OpType::Info, "plain-write", with_error(format!("unexpected reply {other:?}")));
                conn = None;
            }
            Ok(Err(e)) => {
                rec.op(&process, OpType::Info, "plain-write", with_error(e.to_string()));
                conn = None;
            }
            Err(_) => {
                rec.op(&process, OpType::Info, "plain-write", with_error("timed out".into()));
                conn = None;
            }
        }
    }
}
