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
