# Real Redis Sentinel on 127.0.0.1, for comparisons with quorate: a Redis
# primary/replica pair and 3 sentinels (`redis-server --sentinel`, quorum 2,
# down-after-milliseconds 500 like quorate's default down_after_ms), every
# process in one directory with its pid in DIR/NAME.pid. Sourced by
# deploy/test-sentinel-clients.sh and deploy/bench/failover.sh; needs
# redis-server and redis-cli (Debian's redis-server package brings both).
#
#   sentinel_up DIR MASTER_NAME REDIS_PORT1 REDIS_PORT2 SENTINEL_PORT...
#   sentinel_settled MASTER_NAME TIMEOUT_S SENTINEL_PORT...
#   sentinel_master_port SENTINEL_PORT MASTER_NAME
#   sentinel_restart_as_replica DIR PORT MASTER_NAME SENTINEL_PORT
#   sentinel_redis_synced PORT TIMEOUT_S
#   sentinel_down DIR
#
# Every wait is bounded; every function returns non-zero on failure rather
# than exiting, so that the caller decides.

SENTINEL_DOWN_AFTER_MS=${SENTINEL_DOWN_AFTER_MS:-500}
SENTINEL_FAILOVER_TIMEOUT_MS=${SENTINEL_FAILOVER_TIMEOUT_MS:-5000}

# sentinel_redis_start DIR PORT [MASTER_PORT]: a redis-server on PORT (a
# replica of MASTER_PORT when given), no persistence; pid in DIR/PORT.pid.
sentinel_redis_start() {
  local dir=$1 port=$2 master=${3:-}
  mkdir -p "$dir/$port"
  # shellcheck disable=SC2086
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir/$port" \
    --repl-diskless-sync-delay 0 ${master:+--replicaof 127.0.0.1 "$master"} >>"$dir/$port.log" 2>&1 &
  echo $! >"$dir/$port.pid"
  disown "$!" # no "Killed" line from the shell when a kill -9 reaches it
}

# sentinel_start DIR MASTER_NAME MASTER_PORT SENTINEL_PORT: one sentinel
# monitoring MASTER_NAME at MASTER_PORT; pid in DIR/sentinel-PORT.pid. Its
# config file is its own (a sentinel rewrites it).
sentinel_start() {
  local dir=$1 name=$2 master=$3 port=$4
  cat >"$dir/sentinel-$port.conf" <<CONF
port $port
bind 127.0.0.1
sentinel monitor $name 127.0.0.1 $master 2
sentinel down-after-milliseconds $name $SENTINEL_DOWN_AFTER_MS
sentinel failover-timeout $name $SENTINEL_FAILOVER_TIMEOUT_MS
sentinel parallel-syncs $name 1
CONF
  redis-server "$dir/sentinel-$port.conf" --sentinel --dir "$dir" >>"$dir/sentinel-$port.log" 2>&1 &
  echo $! >"$dir/sentinel-$port.pid"
  disown "$!"
}

# _sentinel_field FIELD: from redis-cli's raw output of a reply of field/value
# pairs (nested arrays come out flat), every value of FIELD, one a line.
_sentinel_field() {
  awk -v f="$1" 'prev == f { print } { prev = $0 }'
}

# sentinel_master_port SENTINEL_PORT MASTER_NAME: the port the sentinel names
# as the master (empty when it does not answer).
sentinel_master_port() {
  timeout 2 redis-cli -p "$1" SENTINEL get-master-addr-by-name "$2" 2>/dev/null | sed -n 2p
}

# sentinel_settled MASTER_NAME TIMEOUT_S SENTINEL_PORT...: waits until every
# sentinel names the same master, sees it up, knows the other sentinels and
# at least one replica, every replica it knows being up with its link to the
# master ok (so a failover can pick it).
sentinel_settled() {
  local name=$1 timeout_s=$2 start=$SECONDS s ok want=$(($# - 3))
  shift 2
  while [ $((SECONDS - start)) -lt "$timeout_s" ]; do
    ok=1
    local first=""
    for s in "$@"; do
      local m r flags links port
      m=$(timeout 2 redis-cli -p "$s" SENTINEL master "$name" 2>/dev/null) || { ok=0; break; }
      port=$(_sentinel_field port <<<"$m")
      [ -n "$port" ] || { ok=0; break; }
      [ -z "$first" ] && first=$port
      [ "$port" = "$first" ] || { ok=0; break; }
      [ "$(_sentinel_field flags <<<"$m")" = master ] || { ok=0; break; }
      [ "$(_sentinel_field num-other-sentinels <<<"$m")" -ge "$want" ] || { ok=0; break; }
      [ "$(_sentinel_field num-slaves <<<"$m")" -ge 1 ] || { ok=0; break; }
      r=$(timeout 2 redis-cli -p "$s" SENTINEL replicas "$name" 2>/dev/null) || { ok=0; break; }
      flags=$(_sentinel_field flags <<<"$r" | sort -u)
      links=$(_sentinel_field master-link-status <<<"$r" | sort -u)
      [ "$flags" = slave ] && [ "$links" = ok ] || { ok=0; break; }
    done
    [ "$ok" = 1 ] && return 0
    sleep 0.2
  done
  echo "sentinel_settled: the sentinels on $* did not settle within ${timeout_s}s" >&2
  return 1
}

# sentinel_redis_synced PORT TIMEOUT_S: waits until the redis-server on PORT
# is a replica whose link to its master is up and done syncing.
sentinel_redis_synced() {
  local port=$1 timeout_s=$2 start=$SECONDS info
  while [ $((SECONDS - start)) -lt "$timeout_s" ]; do
    info=$(timeout 2 redis-cli -p "$port" INFO replication 2>/dev/null | tr -d '\r') || true
    if grep -qx 'role:slave' <<<"$info" && grep -qx 'master_link_status:up' <<<"$info" \
      && grep -qx 'master_sync_in_progress:0' <<<"$info"; then
      return 0
    fi
    sleep 0.1
  done
  echo "sentinel_redis_synced: redis on $port is not a synced replica after ${timeout_s}s" >&2
  return 1
}

# sentinel_up DIR MASTER_NAME REDIS_PORT1 REDIS_PORT2 SENTINEL_PORT...: the
# pair (PORT1 primary, PORT2 its replica) and one sentinel per SENTINEL_PORT,
# returning once they have settled (30 s at most).
sentinel_up() {
  local dir=$1 name=$2 p1=$3 p2=$4 s
  shift 4
  mkdir -p "$dir"
  sentinel_redis_start "$dir" "$p1"
  sentinel_redis_start "$dir" "$p2" "$p1"
  sentinel_redis_synced "$p2" 15 || return 1
  for s in "$@"; do sentinel_start "$dir" "$name" "$p1" "$s"; done
  sentinel_settled "$name" 30 "$@"
}

# sentinel_restart_as_replica DIR PORT MASTER_NAME SENTINEL_PORT: restarts
# the (killed) redis-server on PORT as a replica of the master the sentinel
# names now, and waits until it has synced (15 s at most).
sentinel_restart_as_replica() {
  local dir=$1 port=$2 name=$3 s=$4 master
  master=$(sentinel_master_port "$s" "$name")
  [ -n "$master" ] && [ "$master" != "$port" ] || {
    echo "sentinel_restart_as_replica: sentinel $s names master '${master}' for $name" >&2
    return 1
  }
  sentinel_redis_start "$dir" "$port" "$master"
  sentinel_redis_synced "$port" 15
}

# sentinel_pid_alive PID: whether PID is a live redis-server (not a recycled
# pid of something else).
sentinel_pid_alive() {
  [ -n "$1" ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q redis-server
}

# sentinel_down DIR: kill -9 of every redis-server and sentinel recorded in
# DIR that is still one.
sentinel_down() {
  local f p
  for f in "$1"/*.pid; do
    [ -e "$f" ] || continue
    p=$(cat "$f")
    if sentinel_pid_alive "$p"; then kill -9 "$p" 2>/dev/null || true; fi
  done
}
