//! `quorate lease get|acquire|release` and `quorate watch`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{LeaseCommand, emit};
use crate::client::Client;
use crate::client::keeper::{self, KeeperEvent, KeeperSpec};
use crate::pb::v1 as pb;

/// Wall-clock milliseconds of a monotonic instant (for logs and tests that
/// compare events of several processes on one machine).
pub fn unix_ms(at: Instant) -> u64 {
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let now = Instant::now();
    if at <= now {
        now_unix.saturating_sub((now - at).as_millis() as u64)
    } else {
        now_unix + (at - now).as_millis() as u64
    }
}

fn now_unix_ms() -> u64 {
    unix_ms(Instant::now())
}

fn state_name(state: i32) -> &'static str {
    match pb::LeaseState::try_from(state) {
        Ok(pb::LeaseState::Free) => "free",
        Ok(pb::LeaseState::Held) => "held",
        Ok(pb::LeaseState::Expiring) => "expiring",
        _ => "unknown",
    }
}

/// A lease as the JSON object the CLI prints.
pub fn lease_json(l: &pb::Lease) -> Value {
    json!({
        "group": l.group,
        "holder": if l.holder.is_empty() { Value::Null } else { Value::String(l.holder.clone()) },
        "epoch": l.epoch,
        "remaining_ms": l.remaining_ms,
        "ttl_ms": l.ttl_ms,
        "state": state_name(l.state),
        "revision": l.revision,
    })
}

fn lease_text(l: &pb::Lease) -> String {
    if l.holder.is_empty() {
        format!("{}: free (epoch {}, revision {})", l.group, l.epoch, l.revision)
    } else {
        format!(
            "{}: held by {} at epoch {}, {} ms left of {} ms ({}, revision {})",
            l.group,
            l.holder,
            l.epoch,
            l.remaining_ms,
            l.ttl_ms,
            state_name(l.state),
            l.revision
        )
    }
}

pub async fn run(client: Client, cmd: LeaseCommand, json_mode: bool) -> anyhow::Result<()> {
    match cmd {
        LeaseCommand::Get { group, consistency } => {
            let resp = client.get_lease(&group, consistency.to_pb()).await?;
            let lease = resp.lease.unwrap_or_default();
            let mut value = lease_json(&lease);
            value["served_by"] = json!(resp.served_by);
            emit(json_mode, &value, || lease_text(&lease));
            Ok(())
        }
        LeaseCommand::Acquire { group, holder, ttl_ms, wait } => {
            acquire(client, KeeperSpec { group, holder, ttl_ms, wait }, json_mode).await
        }
        LeaseCommand::Release { group, holder, epoch } => {
            let epoch = match epoch {
                Some(e) => e,
                None => {
                    let lease =
                        client.get_lease(&group, pb::Consistency::Linearizable).await?.lease.unwrap_or_default();
                    if lease.holder != holder {
                        anyhow::bail!(
                            "{holder} does not hold {group} (holder: {}); nothing to release",
                            if lease.holder.is_empty() { "none" } else { &lease.holder }
                        );
                    }
                    lease.epoch
                }
            };
            let resp = client.release(&group, &holder, epoch).await?;
            let lease = resp.lease.unwrap_or_default();
            emit(json_mode, &json!({ "event": "released", "group": group, "holder": holder, "epoch": epoch }), || {
                format!("released {group} (epoch {epoch}); {}", lease_text(&lease))
            });
            Ok(())
        }
    }
}

async fn acquire(client: Client, spec: KeeperSpec, json_mode: bool) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel(64);
    let keeper = keeper::keep(&client, &spec, &tx, super::shutdown_signal());
    tokio::pin!(keeper);
    let mut outcome = None;
    let mut lost = false;
    loop {
        tokio::select! {
            res = &mut keeper, if outcome.is_none() => outcome = Some(res),
            ev = rx.recv() => match ev {
                Some(ev) => {
                    lost |= matches!(ev, KeeperEvent::Lost { .. } | KeeperEvent::Busy { .. });
                    print_event(&spec, &ev, json_mode);
                }
                None => break,
            },
        }
        if outcome.is_some() && rx.is_empty() {
            break;
        }
    }
    outcome.unwrap_or(Ok(())).with_context(|| format!("cannot acquire {}", spec.group))?;
    if lost {
        // Holding was the point: a lost (or never taken) lease is a failure.
        std::process::exit(3);
    }
    Ok(())
}

fn print_event(spec: &KeeperSpec, ev: &KeeperEvent, json_mode: bool) {
    let base = |event: &str, epoch: u64| json!({ "event": event, "group": spec.group, "holder": spec.holder, "epoch": epoch, "at_unix_ms": now_unix_ms() });
    let (value, text) = match ev {
        KeeperEvent::Acquired { epoch, valid_until } | KeeperEvent::Renewed { epoch, valid_until } => {
            let valid_until = &valid_until.into_std();
            let name = if matches!(ev, KeeperEvent::Acquired { .. }) { "acquired" } else { "renewed" };
            let mut v = base(name, *epoch);
            v["valid_until_unix_ms"] = json!(unix_ms(*valid_until));
            let left = valid_until.saturating_duration_since(Instant::now()).as_millis();
            (v, format!("{name} {} as {} at epoch {epoch}; valid for {left} ms", spec.group, spec.holder))
        }
        KeeperEvent::Busy { holder, epoch, retry_after_ms } => {
            let mut v = base("busy", *epoch);
            v["current_holder"] = json!(holder);
            v["retry_after_ms"] = json!(retry_after_ms);
            let who = holder.as_deref().unwrap_or("nobody");
            (v, format!("{} is held by {who} at epoch {epoch}; retry in {retry_after_ms} ms or use --wait", spec.group))
        }
        KeeperEvent::Lost { epoch, reason } => {
            let mut v = base("lost", *epoch);
            v["reason"] = json!(reason);
            (v, format!("LOST {} at epoch {epoch}: {reason}", spec.group))
        }
        KeeperEvent::Released { epoch } => {
            (base("released", *epoch), format!("released {} at epoch {epoch}", spec.group))
        }
    };
    emit(json_mode, &value, || text);
}

/// How long `watch` keeps trying to reconnect before it gives up.
const WATCH_RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Streams events until interrupted. When the serving node goes away, it
/// reconnects to another one; the new stream starts with the current state,
/// and revisions tell what happened in between.
pub async fn watch(client: Client, group: &str, json_mode: bool) -> anyhow::Result<()> {
    let stop = super::shutdown_signal();
    tokio::pin!(stop);
    let mut failing_since: Option<Instant> = None;
    loop {
        let stream = tokio::select! {
            s = client.watch(group) => s,
            () = &mut stop => return Ok(()),
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) if matches!(e.code(), tonic::Code::InvalidArgument) => return Err(e.into()),
            Err(e) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > WATCH_RECONNECT_FOR {
                    return Err(
                        anyhow::Error::from(e).context(format!("no node served the watch for {WATCH_RECONNECT_FOR:?}"))
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        failing_since = None;
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                () = &mut stop => return Ok(()),
            };
            let ev = match msg {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(_) => {
                    tracing::warn!("watch stream ended; reconnecting");
                    break;
                }
            };
            print_watch_event(group, &ev, json_mode);
            if ev.kind == pb::EventKind::Deleted as i32 {
                // The group is gone: there is nothing more to watch.
                return Ok(());
            }
        }
    }
}

fn print_watch_event(group: &str, ev: &pb::WatchEvent, json_mode: bool) {
    if let Some(v) = ev.verdict.as_ref().filter(|_| ev.kind == pb::EventKind::Verdict as i32) {
        let to = v.to.clone().unwrap_or_default();
        let from = crate::render::verdict_name(v.from);
        let state = crate::render::verdict_name(to.state);
        let value = json!({
            "event": "verdict",
            "group": group,
            "member": v.member,
            "from": if v.from == 0 { Value::Null } else { json!(from) },
            "state": state,
            "up_votes": to.up_votes,
            "down_votes": to.down_votes,
            "quorum": to.quorum,
            "explanation": to.explanation,
            "at_unix_ms": now_unix_ms(),
        });
        emit(json_mode, &value, || format!(" verdict  {}: {} -> {}  {}", v.member, from, state, to.explanation));
        return;
    }
    if let Some(e) = ev.election.as_ref().filter(|_| ev.kind == pb::EventKind::Election as i32) {
        let lease = ev.lease.clone().unwrap_or_default();
        let mut value = lease_json(&lease);
        value["event"] = json!("election");
        value["designated"] = json!(e.designated);
        value["switchover_to"] = json!(e.switchover_to);
        value["revision"] = json!(e.revision);
        value["at_unix_ms"] = json!(now_unix_ms());
        emit(json_mode, &value, || {
            let so =
                if e.switchover_to.is_empty() { String::new() } else { format!(", switchover to {}", e.switchover_to) };
            format!("election  designated {}{so}; {}", e.designated, lease_text(&lease))
        });
        return;
    }
    let kind = match pb::EventKind::try_from(ev.kind) {
        Ok(pb::EventKind::Current) => "current",
        Ok(pb::EventKind::Acquired) => "acquired",
        Ok(pb::EventKind::Renewed) => "renewed",
        Ok(pb::EventKind::Released) => "released",
        Ok(pb::EventKind::Expired) => "expired",
        Ok(pb::EventKind::Resync) => "resync",
        Ok(pb::EventKind::Deleted) => "deleted",
        _ => "unknown",
    };
    let lease = ev.lease.clone().unwrap_or_default();
    let mut value = lease_json(&lease);
    value["event"] = json!(kind);
    value["at_unix_ms"] = json!(now_unix_ms());
    emit(json_mode, &value, || format!("{kind:>8}  {}", lease_text(&lease)));
}
