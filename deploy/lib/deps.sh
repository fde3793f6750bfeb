# Installs what quorate's tests and demo need, when it is missing.
# Sourced by deploy/test.sh, deploy/quickstart.sh and .ci/run.

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  echo "installing: $*" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_redis_server() {
  command -v redis-server >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1; then
    apt_install redis-server
  else
    echo "redis-server is required: install it (e.g. apt-get install redis-server, brew install redis)" >&2
    return 1
  fi
}

need_netns_tools() {
  local missing=()
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v iptables >/dev/null 2>&1 || missing+=(iptables)
  [ ${#missing[@]} -eq 0 ] && return 0
  if command -v apt-get >/dev/null 2>&1; then
    apt_install "${missing[@]}"
  else
    echo "the fault suite needs: ${missing[*]}" >&2
    return 1
  fi
}

# need_cmd COMMAND PACKAGE: installs PACKAGE when COMMAND is missing.
need_cmd() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1; then
    apt_install "$2"
  else
    echo "$1 is required: install $2" >&2
    return 1
  fi
}

need_haproxy() {
  need_cmd haproxy haproxy
}

# promtool (checks deploy/prometheus/alerts.yml). Debian ships it in the
# `prometheus` package, whose install would also start a Prometheus server:
# the package is downloaded and only promtool is taken out of it, into
# .ci-cache/. Sets PROMTOOL.
need_promtool() {
  if command -v promtool >/dev/null 2>&1; then
    PROMTOOL=$(command -v promtool)
    return 0
  fi
  local cache=${QUORATE_TOOL_CACHE:-$PWD/.ci-cache}
  PROMTOOL=$cache/prometheus/usr/bin/promtool
  [ -x "$PROMTOOL" ] && return 0
  command -v apt-get >/dev/null 2>&1 || { echo "promtool is required (Debian package prometheus)" >&2; return 1; }
  echo "downloading: prometheus (for promtool)" >&2
  mkdir -p "$cache"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  (cd "$cache" && apt-get download -qq prometheus >/dev/null)
  dpkg-deb -x "$(ls "$cache"/prometheus_*.deb | head -n 1)" "$cache/prometheus"
  [ -x "$PROMTOOL" ] || { echo "no promtool in the prometheus package" >&2; return 1; }
}
