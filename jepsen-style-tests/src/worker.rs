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
    /// The system's certificates (`System::pki`).
    pub tls_dir: PathBuf,
}

impl WorkerOptions {
    /// A client of the coordinators as identity `name`.
    fn client(&self, name: &str) -> Option<Client> {
        let files = quorate::tls::config::TlsFiles::named(&self.tls_dir, name);
        crate::system::client_with(&self.endpoints, files).ok()
    }
}

/// The identity the lease clients hold as: `client@lease-I-N`.
const LEASE_IDENTITY: &str = quorate::tls::certs::LOCAL_CLIENT;

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

/// One lease client: who it is, its random choices and its register
/// connection, which last across its incarnations.
struct LeaseClient {
    process: String,
    opts: WorkerOptions,
    rec: Arc<Recorder>,
    client: Arc<Client>,
    rng: rand::rngs::StdRng,
    register: Option<MultiplexedConnection>,
    until: Instant,
}

/// The lease an incarnation holds, as its client sees it.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    start_ns: u64,
    /// When the client believes the lease ends, by its own clock.
    believed: Instant,
    /// The keeper said it is lost (or released).
    lost: bool,
}

/// One incarnation: a fresh holder name with a keeper of its own, holding
/// for a while and then releasing or walking away.
struct Incarnation {
    holder: String,
    keeper: tokio::task::JoinHandle<()>,
    /// Asks the keeper to release; taken when sent.
    stop: Option<oneshot::Sender<()>>,
    hold_for: Duration,
    /// Some holds end by walking away: the client stops renewing without
    /// releasing and acts until its own deadline, as a holder whose
    /// renewals stopped reaching the cluster would. The next holder then
    /// gets the lease only by expiry.
    abandon: bool,
    abandoned: bool,
    held: Option<Held>,
    /// When this hold is to end; set when the lease is acquired.
    hold_deadline: Option<Instant>,
}

impl Incarnation {
    fn hold_due(&self, now: Instant) -> bool {
        self.hold_deadline.is_some_and(|d| now >= d)
    }

    fn release(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Takes turns at the lease, one incarnation after another, until `until`.
async fn lease_client(i: usize, opts: WorkerOptions, rec: Arc<Recorder>, until: Instant) {
    let process = format!("lease-{i}");
    let Some(client) = opts.client(LEASE_IDENTITY) else { return };
    let mut me = LeaseClient {
        process,
        client: Arc::new(client.with_call_timeout(Duration::from_secs(2))),
        rng: rand::rngs::StdRng::seed_from_u64(opts.seed.wrapping_add(i as u64)),
        register: None,
        opts,
        rec,
        until,
    };
    let mut incarnation = 0;
    while Instant::now() < until {
        incarnation += 1;
        me.incarnation(incarnation).await;
        tokio::time::sleep(Duration::from_millis(me.rng.random_range(50..400))).await;
    }
}

impl LeaseClient {
    /// Where the client believes a lease valid until `valid_until` ends: a
    /// clock running slow by skew_ppm sees the time left pass later.
    fn believed(&self, valid_until: Instant) -> Instant {
        let slow = |valid_for: Duration| valid_for.mul_f64(1e6 / (1e6 - self.opts.skew_ppm.min(900_000) as f64));
        Instant::now() + slow(valid_until.saturating_duration_since(Instant::now()))
    }

    /// Starts a keeper for `holder`: its events, and the sender that asks
    /// it to release.
    fn spawn_keeper(
        &self,
        holder: &str,
    ) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<KeeperEvent>, oneshot::Sender<()>) {
        let (tx, events) = mpsc::channel(64);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let spec = KeeperSpec { group: LEASE_GROUP.into(), holder: holder.to_owned(), ttl_ms: 1_500, wait: true };
        let kc = self.client.clone();
        let keeper = tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            let _ = keeper::keep(kc.as_ref(), &spec, &tx, stop).await;
        });
        (keeper, events, stop_tx)
    }

    /// Incarnation `n`: acquires, holds and acts, stops; returns once its
    /// keeper has ended.
    async fn incarnation(&mut self, n: u32) {
        let holder = format!("{LEASE_IDENTITY}@{}-{n}", self.process);
        let (keeper, mut events, stop_tx) = self.spawn_keeper(&holder);
        let mut inc = Incarnation {
            holder,
            keeper,
            stop: Some(stop_tx),
            hold_for: Duration::from_millis(self.rng.random_range(800..2_500)),
            abandon: self.rng.random_bool(0.3),
            abandoned: false,
            held: None,
            hold_deadline: None,
        };
        let mut tick = tokio::time::interval(Duration::from_millis(30));
        let mut events_open = true;
        loop {
            tokio::select! {
                ev = events.recv(), if events_open => match ev {
                    Some(ev) => self.on_event(&mut inc, ev),
                    // The keeper is gone (it ended, or we walked away): act
                    // out the hold on the tick.
                    None => events_open = false,
                },
                _ = tick.tick() => {}
            }
            if self.step(&mut inc, Instant::now()).await {
                break;
            }
        }
        let _ = inc.keeper.await;
        drop(inc.stop);
    }

    /// What the keeper reports changes what the client believes it holds.
    fn on_event(&self, inc: &mut Incarnation, ev: KeeperEvent) {
        match ev {
            KeeperEvent::Acquired { epoch, valid_until } => {
                let start_ns = now_ns();
                let value = json!({"group": LEASE_GROUP, "holder": inc.holder, "epoch": epoch});
                self.rec.op(&self.process, OpType::Ok, "acquire", value);
                inc.held = Some(Held { epoch, start_ns, believed: self.believed(valid_until), lost: false });
                inc.hold_deadline = Some(Instant::now() + inc.hold_for);
            }
            KeeperEvent::Renewed { valid_until, .. } => {
                if let Some(h) = inc.held.as_mut() {
                    h.believed = self.believed(valid_until);
                }
            }
            KeeperEvent::Lost { .. } | KeeperEvent::Released { .. } => {
                if let Some(h) = inc.held.as_mut() {
                    h.lost = true;
                }
            }
            KeeperEvent::Busy { .. } => {}
        }
    }

    /// After every event and tick: walk away, end the hold, or act on it
    /// with a register write. True once the incarnation is over (its keeper
    /// ended and nothing is held).
    async fn step(&mut self, inc: &mut Incarnation, now: Instant) -> bool {
        if inc.hold_due(now) && inc.abandon && inc.held.is_some() && !inc.abandoned {
            inc.keeper.abort();
            inc.abandoned = true;
            inc.hold_deadline = None;
        }
        // Done holding (or done altogether): stop acting first, then
        // release.
        if inc.hold_due(now) || now >= self.until {
            self.end_hold(inc, now);
            inc.release();
            inc.hold_deadline = None;
        }
        if let Some(h) = inc.held {
            // An honest client stops at the keeper's loss signal; one that
            // walked away, or whose clock is skewed, trusts its own
            // deadline.
            if now < h.believed && (!h.lost || self.opts.skew_ppm > 0 || inc.abandoned) {
                write_register(&self.process, &self.opts.register, &mut self.register, &self.rec, h.epoch, &inc.holder)
                    .await;
            } else {
                self.end_hold(inc, now);
                inc.release();
            }
        }
        inc.keeper.is_finished() && inc.held.is_none()
    }

    /// Records the hold, if any, and forgets it. The hold ends at the last
    /// instant the client was entitled to act: `now`, or its believed
    /// deadline if that came first.
    fn end_hold(&self, inc: &mut Incarnation, now: Instant) {
        if let Some(h) = inc.held.take() {
            let late = now.saturating_duration_since(h.believed).as_nanos() as u64;
            let end = now_ns().saturating_sub(late).max(h.start_ns);
            self.rec.op(
                &self.process,
                OpType::Ok,
                "hold",
                json!({"group": LEASE_GROUP, "holder": inc.holder, "epoch": h.epoch, "start": h.start_ns, "end": end}),
            );
        }
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
    let Some(client) = opts.client("reader") else { return };
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
    let Some(client) = opts.client("reader") else { return };
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
