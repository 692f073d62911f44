#!/usr/bin/env bash
# Runs every kcloud check: formatting, clippy, and all tests (unit, integration with the
# fake NVML library, end-to-end with a real Prometheus). Installs the tools the tests
# need by package name when they are missing. A missing tool fails its test; it is
# never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(gcc libc6-dev)
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v promtool >/dev/null || need_apt+=(prometheus)
if ((${#need_apt[@]})); then
  echo "==> installing: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: we need the binaries, not the Debian service set-up.
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi
./scripts/check-chart.sh
