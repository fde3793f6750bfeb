#!/usr/bin/env bash
# Validates the deployment artifacts with real tools (about 15 s once the
# tools are installed):
#   - deploy/systemd/*.service: `systemd-analyze verify` (Debian package
#     systemd), on copies whose ExecStart points at the built binary (verify
#     needs it to exist); any diagnostic fails;
#   - deploy/kubernetes/*.yaml: kubernetes-validate (PyPI), offline, strict
#     (unknown fields fail), against Kubernetes $K8S_VERSION;
#   - everything, deploy/docker/Dockerfile and compose.yaml included:
#     deploy/deploy-check/check.py (PyYAML, dockerfile-parse, tomllib), whose
#     checks include every `quorate` command line against the real binary's
#     --help.
#
# env: QUORATE_BIN (default target/debug/quorate; built if missing),
#      DEPLOY_CHECK_DEPS (where the Python packages go; default
#      target/deploy-check), K8S_VERSION (1.30.0).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/lib/deps.sh

q=${QUORATE_BIN:-target/debug/quorate}
deps=${DEPLOY_CHECK_DEPS:-target/deploy-check}
k8s_version=${K8S_VERSION:-1.30.0}
if [ ! -x "$q" ]; then
  cargo build -p quorate --locked
fi
q=$(realpath "$q")
mkdir -p "$deps"
deps=$(realpath "$deps")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== deploy artifacts: installing the validators if missing"
need_cmd systemd-analyze systemd
if ! PYTHONPATH="$deps/py" python3 -c 'import kubernetes_validate, dockerfile_parse, yaml' 2>/dev/null; then
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  # A target directory of its own (see deploy/test-sentinel-clients.sh).
  python3 -m pip install -q --target "$deps/py" kubernetes-validate dockerfile-parse pyyaml 2>/dev/null \
    || python3 -m pip install -q --break-system-packages --target "$deps/py" kubernetes-validate dockerfile-parse pyyaml
fi
export PYTHONPATH="$deps/py"
echo "$(systemd-analyze --version | head -n 1), kubernetes-validate $(python3 -m kubernetes_validate --version)"

# The three validators, on the repository at $1 (default: this one).
verify_units() {
  local root=${1:-.} dir
  dir=$(mktemp -d -p "$work")
  # The template is verified as an instance (a member named db-1), as
  # systemd loads it.
  for unit in "$root"/deploy/systemd/*.service; do
    name=$(basename "$unit")
    case $name in *@.service) name=${name%@.service}@db-1.service ;; esac
    sed "s|/usr/local/bin/quorate|$q|g" "$unit" > "$dir/$name"
  done
  # Unknown keys and unparsable values are only printed (exit 0): any
  # output fails too.
  local out
  if ! out=$(cd "$dir" && systemd-analyze verify --man=no ./*.service 2>&1) || [ -n "$out" ]; then
    echo "$out" >&2
    return 1
  fi
  echo "ok   $(cd "$dir" && echo ./*.service)"
}
validate_manifests() {
  python3 -m kubernetes_validate --strict --quiet -k "$k8s_version" "${1:-.}"/deploy/kubernetes/*.yaml \
    && echo "ok   deploy/kubernetes/*.yaml"
}
check_structure() {
  DEPLOY_CHECK_ROOT=${1:-.} python3 deploy/deploy-check/check.py "$q" "$k8s_version"
}

echo "== systemd-analyze verify deploy/systemd/"
verify_units || { echo "systemd-analyze verify found problems in deploy/systemd/" >&2; exit 1; }
echo "== kubernetes-validate --strict -k $k8s_version deploy/kubernetes/"
validate_manifests
echo "== structure and command lines (deploy/deploy-check/check.py)"
check_structure

# Each check must be able to fail: on a copy of the repository with one
# artifact broken, the validator named must refuse it.
echo "== self-test: broken artifacts are refused"
copy_repo() {
  local root
  root=$(mktemp -d -p "$work")
  for p in src proto jepsen-style-tests Cargo.lock rustfmt.toml; do ln -s "$PWD/$p" "$root/$p"; done
  cp -r deploy Cargo.toml .dockerignore "$root/"
  echo "$root"
}
# The control: the copy as it is passes all three, so that a refusal
# below is the broken artifact's.
pristine=$(copy_repo)
{ verify_units "$pristine" && validate_manifests "$pristine" && check_structure "$pristine"; } >/dev/null \
  || { echo "self-test: the unchanged copy of the repository fails" >&2; exit 1; }
must_fail() {
  local validator=$1 file=$2 expr=$3 root
  root=$(copy_repo)
  sed -i "$expr" "$root/$file"
  if cmp -s "$file" "$root/$file"; then
    echo "self-test: '$expr' changed nothing in $file" >&2
    exit 1
  fi
  if "$validator" "$root" >/dev/null 2>&1; then
    echo "self-test: $validator accepted $file broken by '$expr'" >&2
    exit 1
  fi
  echo "ok   $validator refuses $file with '$expr'"
}
must_fail verify_units deploy/systemd/quorate.service 's/^Type=notify/Type=notify\nFrobnicate=yes/'
must_fail verify_units deploy/systemd/quorate-agent@.service 's/^Restart=on-failure/Restart=sometimes/'
must_fail validate_manifests deploy/kubernetes/coordinators.yaml 's/minAvailable: 2/minAvailabe: 2/'
must_fail check_structure deploy/systemd/quorate.service 's/--data-dir /--datadir /'
must_fail check_structure deploy/kubernetes/coordinators.yaml 's|path: /readyz|path: /healthz|'
must_fail check_structure deploy/kubernetes/coordinators.yaml '/publishNotReadyAddresses: true/d'
must_fail check_structure deploy/kubernetes/coordinators.yaml 's/^    http_listen = /    http_listn = /'
must_fail check_structure deploy/kubernetes/redis-pair.yaml 's/quorate switchover db/quorate switchover-now db/'
must_fail check_structure deploy/docker/Dockerfile 's/^COPY proto proto/COPY protos protos/'
must_fail check_structure deploy/docker/compose.yaml 's/--member=db-2/--member=db-3/'
must_fail check_structure deploy/docker/compose.yaml 's/--http-listen=0.0.0.0:8080/--http-listen-on=0.0.0.0:8080/'
must_fail check_structure deploy/docker/db.toml 's|redis://hb-2:6380|redis://hb-3:6380|'
