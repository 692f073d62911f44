#!/usr/bin/env bash
# Measures the portal's budget in headless Chromium (tests/browser/bench.mjs): first
# load (bytes transferred, time until the cluster is drawn and interactive) and the
# fleet view with 10,000 nodes x 8 GPUs under 1,000 pushes/s (NODES, PUSH_RATE,
# PUSH_SECS). Figures: BENCHMARKS.md.
#
#   ./scripts/bench-portal.sh            # debug build of the aggregator
#   PROFILE=release ./scripts/bench-portal.sh
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-debug}
flag=(); [ "$profile" = release ] && flag=(--release)
cargo build -q -p kcloud-aggregator "${flag[@]}"
[ -d tests/browser/node_modules/playwright-core ] || (cd tests/browser && npm ci --no-audit --no-fund --silent)

data=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$data"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KCLOUD_BOOTSTRAP_ADMIN_USER=admin KCLOUD_BOOTSTRAP_ADMIN_PASSWORD=bench-admin-password \
  "target/$profile/kcloud-aggregator" --listen "127.0.0.1:$port" --data-dir "$data/data" \
  --simulate dgx-a100-mig --agent-heartbeat 1h >"$data/log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done

echo "aggregator: $profile build; chromium: $(chromium --version 2>/dev/null | head -1); $(nproc) cores"
cd tests/browser
KCLOUD_URL="http://127.0.0.1:$port" KCLOUD_ADMIN_USER=admin KCLOUD_ADMIN_PASSWORD=bench-admin-password \
  KCLOUD_AGENT_TOKEN="$(cat "$data/data/agent.token")" node bench.mjs
