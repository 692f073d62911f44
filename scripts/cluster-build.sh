#!/usr/bin/env bash
# Builds the control plane the cluster-shape tests run against, from the Go module
# proxy at the exact versions of tests/cluster/k8s/go.mod (kube-apiserver,
# kube-controller-manager, kube-scheduler) and tests/cluster/etcd/go.mod (etcd), into
# a cache directory keyed by those files, and prints that directory. A cached build
# is reused; a cold one takes a while (see BENCHMARKS.md). Concurrent callers wait
# for one build (flock).
#
# Usage: scripts/cluster-build.sh            env: KCLOUD_CLUSTER_CACHE (default
#        ~/.cache/kcloud-tools/cluster)
# Needs: go (1.26), flock (util-linux).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
log() { printf '==> %s\n' "$*" >&2; }

command -v go >/dev/null || { echo "go is needed to build the control plane" >&2; exit 1; }
# The pinned module's version, from a go.mod (`require x v` or inside `require (...)`).
pinned() { awk -v m="$2" '($1 == m) {print $2} ($1 == "require" && $2 == m) {print $3}' "$1" | head -1; }
K8S_VERSION=$(pinned tests/cluster/k8s/go.mod k8s.io/kubernetes)
ETCD_VERSION=$(pinned tests/cluster/etcd/go.mod go.etcd.io/etcd/server/v3)
[[ -n $K8S_VERSION && -n $ETCD_VERSION ]] || { echo "cannot read the pinned versions" >&2; exit 1; }
KEY=$(cat tests/cluster/k8s/go.mod tests/cluster/k8s/go.sum tests/cluster/etcd/go.mod \
  tests/cluster/etcd/go.sum "$0" | sha256sum | cut -c1-12)
CACHE=${KCLOUD_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kcloud-tools/cluster}
OUT=$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-$KEY
mkdir -p "$CACHE"

exec 9>"$CACHE/.lock"
flock 9
if [[ -x $OUT/kube-apiserver && -x $OUT/kube-controller-manager && -x $OUT/kube-scheduler &&
  -x $OUT/etcd ]]; then
  echo "$OUT"
  exit 0
fi

TMP=$OUT.tmp
rm -rf "$TMP"
mkdir -p "$TMP"
start=$(date +%s)
# Static binaries, no debug info; the version stamped as a release build stamps it
# (clients such as helm compare it with a chart's kubeVersion).
minor=${K8S_VERSION#v1.}
minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor \
  -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
log "building kube-apiserver, kube-controller-manager, kube-scheduler $K8S_VERSION (go $(go env GOVERSION))"
(cd tests/cluster/k8s && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$TMP/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler)
log "building etcd $ETCD_VERSION"
(cd tests/cluster/etcd && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$TMP/etcd" \
  go.etcd.io/etcd/server/v3)
rm -rf "$OUT"
mv "$TMP" "$OUT"
log "control plane built in $(($(date +%s) - start)) s into $OUT"
echo "$OUT"
