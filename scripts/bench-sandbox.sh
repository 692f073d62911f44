#!/usr/bin/env bash
# The local sandbox's cost at start: POST -> `running` for the same trivial server
# (`python3 -m http.server`, answering at once) on two aggregators side by side, one
# with --isolation sandbox (own uid, bubblewrap, cgroup) and one with --isolation none;
# creates alternate between them, each server deleted before the next. Also the
# delete time (SIGTERM to gone). Prints a Markdown section for BENCHMARKS.md on stdout.
#
# Usage: scripts/bench-sandbox.sh    (about a minute; as root, with bubblewrap)
#   env: N=30 PORT=18961 SKIP_BUILD=1
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-30}
PORT=${PORT:-18961}
[[ $N =~ ^[0-9]+$ && $N -gt 0 && $N -le 500 ]] || { echo "bench: N must be 1..500" >&2; exit 2; }
log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "the sandbox needs root"
for t in curl python3 bwrap setpriv; do
  command -v "$t" >/dev/null || die "$t is needed"
done

BIN=target/release/kcloud-aggregator
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building $BIN"
  cargo build --release --quiet -p kcloud-aggregator --bin kcloud-aggregator
fi

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

umask 077
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')
start() { # start NAME PORT ISOLATION
  KCLOUD_BOOTSTRAP_ADMIN_PASSWORD=$PASSWORD RUST_LOG=warn \
    "$BIN" --listen "127.0.0.1:$2" --data-dir "$TMP/$1" --simulate dgx-a100-mig \
    --isolation "$3" --stop-grace 5s >"$TMP/$1.log" 2>&1 &
  PIDS+=("$!")
  for ((i = 0; i < 100; i++)); do
    curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$2/readyz" && return 0
    sleep 0.1
  done
  tail -5 "$TMP/$1.log" >&2
  die "aggregator $1 did not start"
}
start sandbox "$PORT" sandbox
start none "$((PORT + 1))" none

log "create -> running, $N each, alternating"
python3 - "$PORT" "$((PORT + 1))" "$PASSWORD" "$N" <<'EOF'
import http.client, json, statistics, sys, time, os, platform

sandbox_port, none_port, password, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
# The system's interpreter by absolute path on both sides (a pyenv shim is a bash
# script, and outside the sandbox's view).
cmd = ["/usr/bin/python3", "-m", "http.server", "{port}", "--bind", "{ip}"]

def client(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/api/v1/auth/login", json.dumps({"username": "admin", "password": password}),
              {"content-type": "application/json"})
    token = json.loads(c.getresponse().read())["access_token"]
    def call(method, path, body=None):
        h = {"authorization": f"Bearer {token}"}
        if body is not None:
            h["content-type"] = "application/json"
        c.request(method, path, json.dumps(body) if body is not None else None, h)
        r = c.getresponse()
        return r.status, r.read()
    return call

calls = {"sandbox": client(sandbox_port), "none": client(none_port)}
times = {"sandbox": [], "none": []}
deletes = {"sandbox": [], "none": []}
for i in range(n):
    for mode in ("sandbox", "none") if i % 2 == 0 else ("none", "sandbox"):
        call = calls[mode]
        name = f"b{i}"
        t0 = time.perf_counter()
        st, body = call("POST", "/api/v1/users/admin/servers", {"name": name, "command": cmd})
        assert st == 201, (mode, st, body)
        while True:
            st, body = call("GET", f"/api/v1/users/admin/servers/{name}")
            s = json.loads(body)["status"]
            if s == "running":
                break
            assert s != "failed", (mode, body)
            time.sleep(0.002)
        times[mode].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        st, _ = call("DELETE", f"/api/v1/users/admin/servers/{name}")
        assert st == 204, (mode, st)
        deletes[mode].append((time.perf_counter() - t0) * 1e3)

med = {m: statistics.median(v) for m, v in times.items()}
dmed = {m: statistics.median(v) for m, v in deletes.items()}
q = lambda v, p: sorted(v)[min(len(v) - 1, int(p * len(v)))]
print(f"""
## Local sandbox: create -> running with and without it

Command: `scripts/bench-sandbox.sh` (N={n} per mode, alternating), release aggregator,
`--simulate dgx-a100-mig`, two aggregators side by side (`--isolation sandbox` and
`--isolation none`), each create a custom server `/usr/bin/python3 -m http.server`
polled every 2 ms until `running`, then deleted (SIGTERM, the server exits at once).
{os.cpu_count()} CPUs, {platform.release()}, {time.strftime('%Y-%m-%d', time.gmtime())}.

| mode | create -> running median | p90 | delete median |
|---|---|---|---|
| sandbox (uid, bubblewrap, cgroup) | {med['sandbox']:.1f} ms | {q(times['sandbox'], 0.9):.1f} ms | {dmed['sandbox']:.1f} ms |
| none | {med['none']:.1f} ms | {q(times['none'], 0.9):.1f} ms | {dmed['none']:.1f} ms |
| **sandbox overhead** | **{med['sandbox'] - med['none']:+.1f} ms** | | {dmed['sandbox'] - dmed['none']:+.1f} ms |
""")
print(f"RESULT sandbox {med['sandbox']:.1f} none {med['none']:.1f}", file=sys.stderr)
EOF
