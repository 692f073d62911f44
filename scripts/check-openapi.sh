#!/usr/bin/env bash
# Fuzzes the API against its own OpenAPI document with schemathesis: every operation
# with generated valid and invalid requests, all default checks (no 5xx, every status
# and content type documented, responses matching their schemas, schema-valid
# requests accepted, invalid ones refused) and the stateful phase, which follows the
# document's links (create a server, then read, stop, delete it, ...).
#
# Starts a real aggregator (the local shape with a simulated DGX, no sandbox) with an
# admin and a real Prometheus behind its node history, and runs as that admin, so
# that every operation is reachable. Phases: examples, fuzzing, stateful (the
# coverage phase does not apply the hooks that state the rules between parameters,
# tests/openapi/hooks.py). Needs the debug build (cargo build -p kcloud-aggregator),
# `st` (pip install schemathesis) and `prometheus`. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> OpenAPI: schemathesis against a live aggregator ($0)"

BIN=${KCLOUD_AGGREGATOR:-target/debug/kcloud-aggregator}
[ -x "$BIN" ] || cargo build --locked -q -p kcloud-aggregator
command -v st >/dev/null || { echo "st (schemathesis) is needed: pip install schemathesis" >&2; exit 1; }
command -v prometheus >/dev/null || { echo "prometheus is needed: apt-get install prometheus" >&2; exit 1; }

work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
prom_port=$(free_port)
pass=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
cleanup() {
  for p in ${pid:-} ${prom_pid:-}; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

printf 'global:\n  scrape_interval: 15s\n' >"$work/prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
KCLOUD_BOOTSTRAP_ADMIN_PASSWORD=$pass "$BIN" --data-dir "$work/data" \
  --listen "127.0.0.1:$port" --simulate dgx-a100-mig --isolation none \
  --prometheus-url "http://127.0.0.1:$prom_port" \
  >"$work/aggregator.log" 2>&1 &
pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 100); do
  curl -sf "$base/healthz" >/dev/null && curl -sf "http://127.0.0.1:$prom_port/-/ready" >/dev/null && break
  sleep 0.2
done
token=$(curl -sf "$base/api/v1/auth/login" -H 'content-type: application/json' \
  -d "{\"name\":\"admin\",\"password\":\"$pass\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

# A fixed seed: a finding reproduces run to run. The hooks teach the generator the
# rules between parameters that OpenAPI cannot state (tests/openapi/hooks.py).
PYTHONPATH=tests/openapi SCHEMATHESIS_HOOKS=hooks st run "$base/api/openapi.json" \
  -H "Authorization: Bearer $token" \
  --max-examples "${ST_MAX_EXAMPLES:-20}" --workers 2 --seed 1 \
  --phases examples,fuzzing,stateful \
  --suppress-health-check filter_too_much \
  --exclude-path /api/v1/auth/logout \
  "$@" || { echo "---- aggregator log (tail)"; tail -40 "$work/aggregator.log"; exit 1; }
