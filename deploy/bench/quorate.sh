# quorate's side of the side-by-side benchmarks (deploy/bench/*.sh),
# sourced: a local 3-node cluster (`quorate local up`), its leader's pid,
# a restart of a killed node, and the rows every benchmark appends.
#
# Needs QUORATE (the quorate binary). Mutual TLS, as `local up` starts it
# by default (BENCH_QUORATE_INSECURE=1: plain text, like the etcd anchor).

# quorate_up DIR BASE_PORT: 3 nodes on BASE_PORT.. (and +500, +600 for
# their Sentinel and HTTP endpoints); exports QUORATE_ENDPOINTS and the
# client's TLS files. `local up` returns once a leader exists.
quorate_up() {
  local dir=$1 base=$2
  local flags=()
  [ -n "${BENCH_QUORATE_INSECURE:-}" ] && flags+=(--insecure)
  "$QUORATE" "${flags[@]}" local up --nodes 3 --dir "$dir" --base-port "$base" >/dev/null
  export QUORATE_ENDPOINTS=127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))
  if [ -n "${BENCH_QUORATE_INSECURE:-}" ]; then
    export QUORATE_INSECURE=true
  else
    # local up's client identity (it may read and hold leases).
    export QUORATE_CA=$dir/tls/ca.crt QUORATE_CERT=$dir/tls/client.crt QUORATE_KEY=$dir/tls/client.key
  fi
  quorate_wait_healthy 30
}

# quorate_down DIR: stops what quorate_up started (data is kept).
quorate_down() {
  "$QUORATE" local down --dir "$1" >/dev/null 2>&1 || true
}

# quorate_wait_healthy SECONDS: a leader, and every node current (heard
# from lately and caught up), within SECONDS.
quorate_wait_healthy() {
  local deadline=$((SECONDS + $1))
  while [ $SECONDS -lt "$deadline" ]; do
    "$QUORATE" --json cluster members 2>/dev/null |
      jq -e '.leader != null and (.nodes | length) == 3 and all(.nodes[]; .currency == "current")' >/dev/null &&
      return 0
    sleep 0.2
  done
  echo "quorate cluster not healthy after $1 s" >&2
  return 1
}

# quorate_leader DIR: "ID PID ENDPOINT" of the node that leads now.
quorate_leader() {
  local dir=$1 id ep
  ep=$("$QUORATE" --json bench leader --target quorate) || return 1
  id=$(echo "$ep" | jq -r .node_id)
  echo "$id $(jq -r --argjson id "$id" '.nodes[] | select(.id == $id) | .pid' "$dir/cluster.json") $(echo "$ep" | jq -r .endpoint)"
}

# quorate_restart DIR BASE_PORT: starts what is not running (a killed
# node) on its old data and ports, then waits until healthy.
quorate_restart() {
  local flags=()
  [ -n "${BENCH_QUORATE_INSECURE:-}" ] && flags+=(--insecure)
  "$QUORATE" "${flags[@]}" local up --nodes 3 --dir "$1" --base-port "$2" >/dev/null
  quorate_wait_healthy 30
}

# bench_row OUT METRIC QUORATE ANCHOR ANCHOR_NAME GOAL: one row of
# OUT/rows.tsv (also printed).
bench_row() {
  local out=$1
  shift
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" | tee -a "$out/rows.tsv"
}

# median: the median of the numbers on stdin (one a line), to 1 decimal.
median() {
  sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) printf "%.1f\n", v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# maximum: the largest number on stdin, to 1 decimal.
maximum() {
  sort -g | tail -n 1 | awk '{printf "%.1f\n", $1}'
}

# bench_binary: builds the release binary (unless SKIP_BUILD is set) and
# sets QUORATE.
bench_binary() {
  if [ -z "${SKIP_BUILD:-}" ]; then
    nice -n 19 cargo build --release --locked -p quorate >&2
  fi
  QUORATE=${QUORATE:-${CARGO_TARGET_DIR:-$PWD/target}/release/quorate}
  [ -x "$QUORATE" ] || { echo "no quorate binary at $QUORATE" >&2; return 1; }
}
