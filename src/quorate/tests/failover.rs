//! Failover of a managed Redis primary/replica pair, with real redis-server
//! processes, agents and a 3-node cluster.

// Each test holds the process-wide `serial()` guard for its whole run, on
// purpose: it serializes tests that each run on their own runtime.
#![allow(clippy::await_holding_lock)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{PairFixture, fenced_set, missing_on, redis_conn, role_of, serial, signal, wait_one};
use nix::sys::signal::Signal;

const DOWN_AFTER: Duration = Duration::from_millis(500);
/// The group lease of the fixture: the default (`FailoverPolicy::default`).
const LEASE_TTL: Duration = Duration::from_millis(600);

/// Writes `n` keys to `member`'s Redis under the epoch quorate gives it, and
/// returns them once a replica has acknowledged each (`WAIT 1` >= 1). A write
/// refused or cut off is written again: an agent fences and disconnects its
/// clients whenever its lease lapses, even one it takes again at once (a
/// busy machine can cause that; it is not a failover), so the writer
/// reconnects and goes on under the current epoch, as a client that follows
/// quorate does. Panics if no write to `member` is acknowledged for 10 s
/// (it lost the lease, or no replica acknowledges).
async fn write_acked(f: &PairFixture, member: &str, prefix: &str, n: usize) -> Vec<String> {
    let port = f.data_port(member);
    let mut session: Option<(redis::aio::MultiplexedConnection, u64)> = None;
    let mut acked = Vec::new();
    let mut failing_since: Option<(Instant, String)> = None;
    for i in 0..n {
        let key = format!("{prefix}:{i}");
        loop {
            if let Some((since, why)) = &failing_since {
                assert!(since.elapsed() < Duration::from_secs(10), "writes to {member} failed for 10 s: {why}");
            }
            if session.is_none() {
                session = match (f.primary().await, redis_conn(port).await) {
                    (Some((holder, epoch)), Some(conn)) if holder == member => Some((conn, epoch)),
                    (p, _) => {
                        failing_since.get_or_insert((Instant::now(), format!("lease {p:?}, or no connection")));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
            }
            let (conn, epoch) = session.as_mut().unwrap();
            match fenced_set(conn, &key, &key, *epoch).await {
                Ok(()) if wait_one(conn, 1000).await >= 1 => {
                    acked.push(key);
                    failing_since = None;
                    break;
                }
                Ok(()) => {
                    // Written but not replicated within WAIT's second: the
                    // 10 s bound above catches a replica that never answers.
                    failing_since.get_or_insert((Instant::now(), "no replica acknowledged the write".into()));
                }
                Err(e) => {
                    eprintln!("a write to {member} under epoch {epoch} failed ({e}); reconnecting");
                    failing_since.get_or_insert((Instant::now(), e));
                    session = None;
                }
            }
        }
    }
    acked
}

async fn wait_for<F, Fut>(within: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_is_replaced_without_losing_acked_writes_and_rejoins_as_a_replica() {
    let _serial = serial();
    let mut f = PairFixture::start().await;
    let ready = f.wait_ready().await;
    let acked = write_acked(&f, "db-1", "before", 200).await;

    f.crash(0);
    let crashed_at = Instant::now();
    let bound = DOWN_AFTER + LEASE_TTL + Duration::from_secs(1);
    let took = wait_for(Duration::from_secs(20), || async {
        f.primary().await.is_some_and(|(h, e)| h == "db-2" && e > ready)
    })
    .await
    .expect("db-2 never got the lease");
    // The epoch db-2 first took (it may have taken the lease again since).
    let failover_epoch = f.election().await.and_then(|e| e.history.last()?.epoch).expect("a failover in the history");
    assert!(failover_epoch > ready, "failover at epoch {failover_epoch}, the old primary's was {ready}");
    eprintln!("db-2 holds the lease {took:?} after the crash (bound {bound:?})");
    assert!(took <= bound, "failover took {took:?}, bound {bound:?}");
    let promoted =
        wait_for(Duration::from_secs(5), || async { role_of(f.data_port("db-2")).await.as_deref() == Some("master") })
            .await;
    assert!(promoted.is_some(), "db-2's Redis was not promoted");
    eprintln!("db-2's Redis is master {:?} after the crash", crashed_at.elapsed());
    let missing = missing_on(f.data_port("db-2"), &acked).await;
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");

    // The old primary comes back, empty: it rejoins as a replica of db-2,
    // its data replaced by db-2's, and nothing fails back.
    f.restart(0);
    let rejoined = wait_for(Duration::from_secs(30), || async {
        f.election().await.is_some_and(|e| {
            e.members.iter().any(|m| {
                m.member == "db-1"
                    && m.status.as_ref().is_some_and(|s| {
                        s.role == "replica" && s.link_up && s.synced_epoch.is_some_and(|e| e >= failover_epoch)
                    })
            })
        })
    })
    .await;
    assert!(rejoined.is_some(), "db-1 did not rejoin: {:?}", f.election().await);
    let after = write_acked(&f, "db-2", "after", 20).await;
    let missing = missing_on(f.data_port("db-1"), &[acked.clone(), after].concat()).await;
    assert!(missing.is_empty(), "db-1's data was not replaced by db-2's: missing {missing:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(f.primary().await.map(|(h, _)| h).as_deref(), Some("db-2"), "failed back");
    let history = f.election().await.unwrap().history;
    assert_eq!(history.iter().map(|h| h.kind.as_str()).collect::<Vec<_>>(), ["initial", "failover"]);
    assert!(history[1].reason.starts_with("db-1 is DOWN"), "{}", history[1].reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_agent_stops_writes_before_the_replica_is_promoted() {
    let _serial = serial();
    let f = PairFixture::start().await;
    let epoch = f.wait_ready().await;
    // A writer hammering db-1 under its epoch, recording its last success.
    let last_ok: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let first_refusal: Arc<Mutex<Option<(Instant, String)>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = f.data_port("db-1");
    let writer = {
        let (last_ok, first_refusal, stop) = (last_ok.clone(), first_refusal.clone(), stop.clone());
        tokio::spawn(async move {
            let mut conn = redis_conn(port).await.unwrap();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                match fenced_set(&mut conn, &format!("w:{i}"), "x", epoch).await {
                    Ok(()) => *last_ok.lock().unwrap() = Some(Instant::now()),
                    Err(e) => {
                        first_refusal.lock().unwrap().get_or_insert((Instant::now(), e));
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(f.agent_pid(0), Signal::SIGSTOP);
    let stopped_at = Instant::now();
    let promoted =
        wait_for(Duration::from_secs(20), || async { role_of(f.data_port("db-2")).await.as_deref() == Some("master") })
            .await
            .expect("db-2 was never promoted");
    let promoted_at = stopped_at + promoted;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let last = last_ok.lock().unwrap().expect("db-1 accepted writes at first");
    let (refused_at, why) = first_refusal.lock().unwrap().clone().expect("db-1 never refused a write");
    eprintln!(
        "agent frozen at 0; db-1's last fenced write {:?}, first refusal {:?} ({why}); db-2 master {:?}",
        last.saturating_duration_since(stopped_at),
        refused_at.saturating_duration_since(stopped_at),
        promoted
    );
    assert!(why.contains("QUORATE_NO_LEASE"), "{why}");
    assert!(last < promoted_at, "db-1 accepted a write after db-2 was promoted");
    assert!(refused_at < promoted_at, "db-1 refused writes only after db-2 was promoted");

    // Thawed, the old primary fences and follows the new one.
    signal(f.agent_pid(0), Signal::SIGCONT);
    let follows =
        wait_for(Duration::from_secs(20), || async { role_of(f.data_port("db-1")).await.as_deref() == Some("slave") })
            .await;
    assert!(follows.is_some(), "db-1 did not become a replica after it thawed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_shorter_than_down_after_causes_no_failover() {
    let _serial = serial();
    let f = PairFixture::start().await;
    let ready = f.wait_ready().await;
    let before = f.election().await.unwrap().history.len();
    signal(f.agent_pid(0), Signal::SIGSTOP);
    tokio::time::sleep(DOWN_AFTER * 3 / 5).await;
    signal(f.agent_pid(0), Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // No failover: db-1 is still the primary and the history has no new
    // entry. (Its own lease may have lapsed and been taken again on a busy
    // machine, a new epoch but not a failover; the epochs are printed.)
    let now = f.primary().await;
    eprintln!("lease before the pause: db-1 at epoch {ready}; after: {now:?}");
    assert_eq!(now.map(|(h, _)| h).as_deref(), Some("db-1"));
    assert_eq!(f.election().await.unwrap().history.len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_loses_no_acknowledged_write() {
    let _serial = serial();
    let f = PairFixture::start().await;
    let ready = f.wait_ready().await;
    // A writer that follows the primary through quorate.
    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ports = [(String::from("db-1"), f.data_port("db-1")), (String::from("db-2"), f.data_port("db-2"))];
    let client = f.cluster.client_as("reader");
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(r) = client.get_lease("db", quorate::pb::v1::Consistency::Linearizable).await else { continue };
                let l = r.lease.unwrap_or_default();
                let Some((_, port)) = ports.iter().find(|(m, _)| *m == l.holder) else { continue };
                let Some(mut conn) = redis_conn(*port).await else { continue };
                for _ in 0..20 {
                    i += 1;
                    let key = format!("sw:{i}");
                    if fenced_set(&mut conn, &key, &key, l.epoch).await.is_err() {
                        break;
                    }
                    if wait_one(&mut conn, 500).await >= 1 {
                        acked.lock().unwrap().insert(key);
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = f.cluster.client().switchover("db", Some("db-2"), Duration::from_secs(30)).await.expect("switchover");
    eprintln!("switchover to {} at epoch {} took {} ms", r.to, r.epoch, r.took_ms);
    assert_eq!(r.to, "db-2");
    assert!(r.epoch > ready, "switchover at epoch {}, the old primary's was {ready}", r.epoch);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let acked: Vec<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(acked.len() > 100, "only {} writes acknowledged", acked.len());
    let missing = missing_on(f.data_port("db-2"), &acked).await;
    assert!(missing.is_empty(), "{} acknowledged writes lost: {:?}", missing.len(), &missing[..missing.len().min(5)]);
    assert_eq!(f.election().await.unwrap().history.last().unwrap().kind, "switchover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_holds_back_a_failover_until_it_is_turned_off() {
    let _serial = serial();
    let mut f = PairFixture::start().await;
    let ready = f.wait_ready().await;
    let client = f.cluster.client();
    assert!(client.set_maintenance("db", true).await.unwrap().maintenance);
    f.crash(0);
    tokio::time::sleep(DOWN_AFTER + LEASE_TTL + Duration::from_secs(2)).await;
    let e = f.election().await.unwrap();
    assert_eq!(e.designated, "db-1", "designation moved in maintenance");
    assert_ne!(e.lease.as_ref().map(|l| l.holder.as_str()), Some("db-2"));
    assert!(e.decision.contains("maintenance"), "{}", e.decision);
    let off_at = Instant::now();
    client.set_maintenance("db", false).await.unwrap();
    let took = wait_for(Duration::from_secs(20), || async {
        f.primary().await.is_some_and(|(h, e)| h == "db-2" && e > ready)
    })
    .await
    .expect("no failover after maintenance off");
    eprintln!("failover {took:?} after maintenance off ({:?})", off_at.elapsed());
}

/// One plain `SET`, bounded: Ok, a refusal or broken connection (Err with
/// the error), or None when it timed out (a paused node blocks writes).
async fn plain_set(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Result<(), String>> {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg("x");
    match tokio::time::timeout(Duration::from_millis(200), cmd.query_async::<()>(conn)).await {
        Ok(r) => Some(r.map_err(|e| e.to_string())),
        Err(_) => None,
    }
}

/// Every coordinator frozen at once: the primary's agent cannot renew and
/// cannot ask anyone anything. Its fencer still stops plain writes at the
/// lease deadline (not seconds later, behind a coordinator call), and
/// disconnects the clients; once the coordinators are back the same member
/// takes the lease again and writes resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_coordinator_frozen_the_primary_stops_plain_writes_at_its_deadline() {
    let _serial = serial();
    let f = PairFixture::start().await;
    f.wait_ready().await;
    let port = f.data_port("db-1");
    let mut conn = redis_conn(port).await.expect("db-1 answers");
    assert_eq!(plain_set(&mut conn, "before").await, Some(Ok(())));
    let pids: Vec<u32> = f.cluster.nodes.iter().map(|n| n.proc.as_ref().unwrap().pid()).collect();
    for &p in &pids {
        signal(p, Signal::SIGSTOP);
    }
    let frozen_at = Instant::now();
    let mut last_ok = None;
    let mut stopped = None;
    let mut i = 0;
    while frozen_at.elapsed() < Duration::from_secs(5) {
        i += 1;
        match plain_set(&mut conn, &format!("p:{i}")).await {
            Some(Ok(())) => last_ok = Some(frozen_at.elapsed()),
            Some(Err(e)) => {
                stopped = Some((frozen_at.elapsed(), e));
                break;
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fresh = redis_conn(port).await.expect("db-1 still answers");
    let mut fresh2 = fresh.clone();
    let fresh_write = plain_set(&mut fresh2, "after-fence").await;
    for &p in &pids {
        signal(p, Signal::SIGCONT);
    }
    eprintln!("coordinators frozen at 0: last plain write accepted at {last_ok:?}, connection dropped at {stopped:?}");
    let (dropped_at, why) = stopped.expect("the client was never disconnected");
    let last_ok = last_ok.expect("db-1 accepted writes at first");
    // Renewed at most one renewal interval before the freeze, the lease is
    // valid for ttl * (1 - drift) - margin = 940 ms after that renewal was
    // sent; the bound leaves room for a busy machine only.
    assert!(last_ok < LEASE_TTL + Duration::from_millis(300), "db-1 took plain writes {last_ok:?} after the freeze");
    assert!(dropped_at < LEASE_TTL + Duration::from_millis(600), "disconnected only at {dropped_at:?}");
    assert!(fresh_write.is_none(), "a new client could write to the fenced primary: {fresh_write:?} ({why})");
    let log = std::fs::read_to_string(f.cluster.dir.path().join("agent-1.log")).unwrap();
    assert!(log.contains("deadline fence applied"), "no fence in the agent's log");

    // The coordinators are back: db-1 is still the designated primary and
    // takes the lease again; writes resume.
    let resumed = wait_for(Duration::from_secs(20), || async {
        match redis_conn(port).await {
            Some(mut c) => plain_set(&mut c, "resumed").await == Some(Ok(())),
            None => false,
        }
    })
    .await;
    assert!(resumed.is_some(), "writes never resumed on db-1: {:?}", f.election().await);
    assert_eq!(f.primary().await.map(|(h, _)| h), Some("db-1".to_owned()));
}
