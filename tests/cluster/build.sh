#!/usr/bin/env bash
# Build the local control-plane toolchain (hetmoe-k8s, kwok, helm) into a cache
# outside the repository, keyed by the Kubernetes version and a hash of the
# inputs, so a machine compiles Kubernetes once and every later run is a no-op.
#
# stdout: exactly one line, the bin dir (for `BIN=$(bash tests/cluster/build.sh)`).
# stderr: progress.
# Env knobs: HETMOE_CACHE (default ~/.cache/hetmoe).
set -euo pipefail

readonly KWOK_VERSION=v0.8.0
readonly HELM_VERSION=v3.21.4

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod_dir="$here/k8s"
cache_root="${HETMOE_CACHE:-$HOME/.cache/hetmoe}"

log() { printf '[build.sh] %s\n' "$*" >&2; }

k8s_version() {
  awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$mod_dir/go.mod"
}

input_hash() {
  cat "$mod_dir/go.sum" "$mod_dir/go.mod" "$mod_dir/main.go" "${BASH_SOURCE[0]}" |
    sha256sum | cut -c1-12
}

have_all() {
  local bin="$1"
  [[ -x "$bin/hetmoe-k8s" && -x "$bin/kwok" && -x "$bin/helm" && -s "$bin/../stages.yaml" ]]
}

# Version strings so /version and `kubectl version` report the real release.
k8s_ldflags() {
  local version="$1" major minor date
  major="$(cut -d. -f1 <<<"${version#v}")"
  minor="$(cut -d. -f2 <<<"$version")"
  date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local flags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  printf '%s' "$flags"
}

build_k8s() {
  local out="$1" version="$2"
  log "building hetmoe-k8s $version (cold: 10-25 min on 2 cores)"
  (cd "$mod_dir" && GOFLAGS="-mod=readonly -buildvcs=false" \
    go build -trimpath -ldflags "$(k8s_ldflags "$version")" -o "$out/hetmoe-k8s" .)
}

build_kwok() {
  local out="$1"
  log "building kwok $KWOK_VERSION"
  (cd / && GOBIN="$out" GOFLAGS=-buildvcs=false go install -trimpath "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")
}

build_helm() {
  local out="$1" v="helm.sh/helm/v3"
  log "building helm $HELM_VERSION"
  (cd / && GOBIN="$out" GOFLAGS=-buildvcs=false go install -trimpath \
    -ldflags "-s -w -X $v/internal/version.version=$HELM_VERSION -X $v/internal/version.gitTreeState=clean \
 -X $v/pkg/lint/rules.k8sVersionMajor=1 -X $v/pkg/lint/rules.k8sVersionMinor=36 \
 -X $v/pkg/chartutil.k8sVersionMajor=1 -X $v/pkg/chartutil.k8sVersionMinor=36" \
    "$v/cmd/helm@$HELM_VERSION")
}

# kwok v0.8.0 ships no default stages; concatenate the upstream ones we rely on.
write_stages() {
  local dest="$1" stage_dir
  stage_dir="$(cd / && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" |
    awk -F'"' '$2 == "Dir" {print $4}')/kustomize/stage"
  local f first=1
  : >"$dest"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml \
    pod/chaos/pod-container-running-failed.yaml; do
    ((first)) || echo '---' >>"$dest"
    first=0
    cat "$stage_dir/$f" >>"$dest"
  done
}

main() {
  local version key_dir bin
  version="$(k8s_version)"
  key_dir="$cache_root/k8s-$version-$(input_hash)"
  bin="$key_dir/bin"
  if have_all "$bin"; then
    log "cached: $bin"
    echo "$bin"
    return
  fi
  mkdir -p "$cache_root"
  # One build at a time per machine: a second caller waits, then finds the cache.
  exec 9>"$cache_root/build.lock"
  flock 9
  if ! have_all "$bin"; then
    local start staging="$key_dir.tmp.$$"
    start="$(date +%s)"
    rm -rf "$staging" && mkdir -p "$staging/bin"
    # A failed or interrupted build must not leave a half-filled staging dir.
    trap "rm -rf '$staging'" EXIT
    build_k8s "$staging/bin" "$version"
    build_kwok "$staging/bin"
    build_helm "$staging/bin"
    write_stages "$staging/stages.yaml"
    echo "$(($(date +%s) - start))" >"$staging/build-seconds"
    rm -rf "$key_dir" && mv "$staging" "$key_dir"
    trap - EXIT
    log "built in $(cat "$key_dir/build-seconds") s"
  fi
  echo "$bin"
}

main "$@"
