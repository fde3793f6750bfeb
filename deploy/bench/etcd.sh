# etcd as a benchmark anchor: a 3-member etcd cluster on 127.0.0.1, for
# deploy/bench/leader-change.sh and deploy/bench/throughput.sh (sourced,
# like deploy/lib/deps.sh). etcd is Debian's etcd-server (3.4); it is
# driven by `quorate bench --target etcd`, the same Rust client code that
# drives quorate.
#
# Files in DIR: m$ID/ (data), m$ID.log, m$ID.pid, m$ID.cmd (the command
# line, for a restart), endpoints (client HOST:PORT,... in member order).
# Member ID (1..3) listens for clients on BASE_PORT+2*(ID-1) and for peers
# on the port after it.
#
# Needs: deploy/lib/deps.sh sourced first; QUORATE (the quorate binary)
# for etcd_leader_pid.

# The Debian package's own unit, which would serve on 2379/2380 with
# /var/lib/etcd/default. Installed with a policy-rc.d that forbids
# starting services (so its postinst starts nothing even where systemd
# runs), and stopped and disabled afterwards where systemd is PID 1.
need_etcd() {
  if ! command -v etcd >/dev/null 2>&1; then
    local own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
      as_root chmod +x /usr/sbin/policy-rc.d
      own_policy=1
    fi
    need_cmd etcd etcd-server || { [ -n "$own_policy" ] && as_root rm -f /usr/sbin/policy-rc.d; return 1; }
    [ -n "$own_policy" ] && as_root rm -f /usr/sbin/policy-rc.d
  fi
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now etcd.service >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/etcd ]; then
    as_root /etc/init.d/etcd stop >/dev/null 2>&1 || true
  fi
}

# etcd_version: "3.4.23" (what `etcd --version` says).
etcd_version() {
  etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p' | head -n 1
}

_etcd_client_port() { echo $(($2 + 2 * ($1 - 1))); }

_etcd_start_member() {
  local dir=$1 id=$2
  # shellcheck disable=SC2046
  setsid $(cat "$dir/m$id.cmd") >>"$dir/m$id.log" 2>&1 </dev/null &
  echo $! >"$dir/m$id.pid"
}

# etcd_up DIR BASE_PORT: starts 3 members and waits (at most 30 s) until
# each answers /health. Heartbeat and election timeout are etcd's defaults
# (100 ms, 1000 ms) unless ETCD_HEARTBEAT_MS / ETCD_ELECTION_MS are set.
etcd_up() {
  local dir=$1 base=$2 id cluster= endpoints=
  local hb=${ETCD_HEARTBEAT_MS:-100} el=${ETCD_ELECTION_MS:-1000}
  mkdir -p "$dir"
  for id in 1 2 3; do
    cluster+="${cluster:+,}m$id=http://127.0.0.1:$(($(_etcd_client_port $id "$base") + 1))"
    endpoints+="${endpoints:+,}127.0.0.1:$(_etcd_client_port $id "$base")"
  done
  echo "$endpoints" >"$dir/endpoints"
  for id in 1 2 3; do
    local cp; cp=$(_etcd_client_port $id "$base")
    # Plain text, like `local up --insecure`; the zap logger because
    # 3.4's default one is deprecated; no auto-compaction or quota
    # changes: etcd as packaged.
    echo "etcd --name m$id --data-dir $dir/m$id \
--listen-client-urls http://127.0.0.1:$cp --advertise-client-urls http://127.0.0.1:$cp \
--listen-peer-urls http://127.0.0.1:$((cp + 1)) --initial-advertise-peer-urls http://127.0.0.1:$((cp + 1)) \
--initial-cluster $cluster --initial-cluster-token quorate-bench --initial-cluster-state new \
--heartbeat-interval $hb --election-timeout $el --logger zap --log-outputs stderr" >"$dir/m$id.cmd"
    _etcd_start_member "$dir" $id
  done
  etcd_wait_healthy "$dir" 30
}

# etcd_wait_healthy DIR SECONDS: every member's /health says true (etcd
# answers it after a quorum read through the leader), within SECONDS.
etcd_wait_healthy() {
  local dir=$1 secs=$2 deadline ep ok
  deadline=$((SECONDS + secs))
  while [ $SECONDS -lt "$deadline" ]; do
    ok=1
    for ep in $(tr , ' ' <"$dir/endpoints"); do
      curl -sf -m 1 "http://$ep/health" 2>/dev/null | grep -q '"health":"true"' || { ok=; break; }
    done
    [ -n "$ok" ] && return 0
    sleep 0.2
  done
  echo "etcd in $dir not healthy after ${secs} s (logs: $dir/m*.log)" >&2
  return 1
}

# etcd_down DIR: kills every member of DIR (bounded: SIGTERM, then
# SIGKILL after 5 s); data is kept.
etcd_down() {
  local dir=$1 f pid i
  for f in "$dir"/m*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

# etcd_leader DIR: "ID PID ENDPOINT" of the member that leads now
# (`quorate bench leader --target etcd` asks every member's Status).
etcd_leader() {
  local dir=$1 ep id
  ep=$("$QUORATE" --json bench leader --target etcd --etcd-endpoints "$(cat "$dir/endpoints")" | jq -r .endpoint)
  id=$(tr , '\n' <"$dir/endpoints" | grep -nx "$ep" | cut -d: -f1)
  [ -n "$id" ] || { echo "no etcd leader found in $dir" >&2; return 1; }
  echo "$id $(cat "$dir/m$id.pid") $ep"
}

# etcd_leader_pid DIR: the pid of the member that leads now.
etcd_leader_pid() {
  local l; l=$(etcd_leader "$1") || return 1
  echo "$l" | cut -d' ' -f2
}

# etcd_restart_member DIR ID: starts member ID again on its data (after a
# kill) and waits until the cluster is healthy.
etcd_restart_member() {
  local dir=$1 id=$2 pid
  pid=$(cat "$dir/m$id.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; sleep 0.2; fi
  _etcd_start_member "$dir" "$id"
  etcd_wait_healthy "$dir" 30
}
