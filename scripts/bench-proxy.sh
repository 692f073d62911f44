#!/usr/bin/env bash
# Benchmarks kcloud's proxy to a real JupyterLab, side by side with direct access to
# the same JupyterLab and with configurable-http-proxy (JupyterHub's proxy) in front of
# it, all in one run; then the kernel round trip and the platform's create -> running
# overhead. Prints Markdown sections for BENCHMARKS.md on stdout (progress on stderr).
#
# Parts (PARTS, default all):
#   http     wrk against JupyterLab's /files/ (a small file, a 1 MiB file): direct (its
#            token as `Authorization: token`), through kcloud on the portal's origin
#            (the user's bearer token), through kcloud on the user's own origin
#            (`admin.localhost`, the server's cookie a browser gets), through
#            configurable-http-proxy; rounds alternate the four; medians of rounds for
#            req/s and for wrk's p99 (--latency), ratios to direct.
#   browser  the same round trip from a page in headless Chromium (playwright-core,
#            tests/browser/kernel-rtt.mjs): direct / kcloud on the user's origin (the
#            server's cookie, as the portal's Open gives it) / chp; a browser sets no
#            TCP_QUICKACK, so this is what users feel.
#   download a DOWNLOAD_MIB (1024) file through kcloud, the aggregator's VmHWM before
#            and after (and the same file directly, for the rate).
#   kernel   examples/bench_kernel.rs: execute_request `1+1` round trips on a websocket
#            to one kernel, direct / kcloud (bearer) / kcloud on the user origin (cookie)
#            / chp, client with and without TCP_QUICKACK.
#   create   POST -> `running` for a custom server whose program answers at once
#            (python3 -m http.server), minus the same program's own start-up measured
#            directly; and POST -> 201.
#
# Usage: scripts/bench-proxy.sh    (about 5 minutes)
#   env: ROUNDS=5 DURATION=5 CONNS=8 KERNEL_N=100 CREATE_N=10 DOWNLOAD_MIB=1024
#        PARTS="http download kernel browser create" PORT=18951 SKIP_BUILD=1
#        (CONNS=1 gives the one-connection figures)
# Needs: cargo, curl, python3, wrk (apt-get install wrk), jupyter-lab (pip install
# jupyterlab), node + npm (configurable-http-proxy is installed into a cache dir with
# npm when missing: CHP_DIR, default ~/.cache/kcloud-bench/chp).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
CONNS=${CONNS:-8}
KERNEL_N=${KERNEL_N:-100}
CREATE_N=${CREATE_N:-10}
DOWNLOAD_MIB=${DOWNLOAD_MIB:-1024}
PORT=${PORT:-18951}
PARTS=${PARTS:-http download kernel browser create}
for v in ROUNDS DURATION CONNS KERNEL_N CREATE_N DOWNLOAD_MIB PORT; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "bench: $v must be a positive integer" >&2; exit 2; }
done
((ROUNDS <= 20 && DURATION <= 60 && CONNS <= 256 && KERNEL_N <= 10000 && CREATE_N <= 100 &&
  DOWNLOAD_MIB <= 16384)) || { echo "bench: settings too large" >&2; exit 2; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
for t in curl python3 wrk jupyter-lab; do
  command -v "$t" >/dev/null || die "$t is needed (see the header of this script)"
done

BIN=target/release/kcloud-aggregator
KBIN=target/release/examples/bench_kernel
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building $BIN and $KBIN"
  cargo build --release --quiet -p kcloud-aggregator --bin kcloud-aggregator --example bench_kernel
fi
[[ -x $BIN && -x $KBIN ]] || die "$BIN or $KBIN is missing"

CHP_DIR=${CHP_DIR:-$HOME/.cache/kcloud-bench/chp}
CHP=$CHP_DIR/node_modules/.bin/configurable-http-proxy
if want http || want kernel || want browser; then
  if [[ ! -x $CHP ]]; then
    command -v npm >/dev/null || die "npm is needed for configurable-http-proxy"
    log "installing configurable-http-proxy into $CHP_DIR"
    mkdir -p "$CHP_DIR"
    npm install --prefix "$CHP_DIR" --no-audit --no-fund --silent configurable-http-proxy@5 >&2
  fi
  [[ -x $CHP ]] || die "configurable-http-proxy did not install"
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

BASE=http://127.0.0.1:$PORT
CHP_PORT=$((PORT + 1))
for p in "$PORT" "$CHP_PORT" "$((PORT + 2))"; do
  rc=0
  curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$p/" || rc=$?
  [[ $rc -eq 7 ]] || die "127.0.0.1:$p is in use (set PORT)"
done

umask 077
# --isolation none: the benchmark reaches JupyterLab directly on 127.0.0.1 too (a
# sandboxed server listens in its own network namespace); the proxy's path is the same.
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')
KCLOUD_BOOTSTRAP_ADMIN_PASSWORD=$PASSWORD RUST_LOG=warn \
  "$BIN" --listen "127.0.0.1:$PORT" --data-dir "$TMP/data" --simulate dgx-a100-mig \
  --access-ttl 1h --isolation none >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
for ((i = 0; i < 100; i++)); do
  curl -sf -o /dev/null --max-time 1 "$BASE/readyz" && break
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -5 "$TMP/server.log" >&2; die "aggregator exited"; }
  sleep 0.1
done
TOKEN=$(curl -sf --max-time 30 -H 'content-type: application/json' \
  -d "{\"username\":\"admin\",\"password\":\"$PASSWORD\"}" "$BASE/api/v1/auth/login" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
BEARER="Bearer $TOKEN"
SERVERS=$BASE/api/v1/users/admin/servers

hwm() { awk '/^VmHWM:/ {print int($2 / 1024)}' "/proc/$SERVER_PID/status"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
ratio() { python3 -c "print(f'{$1 / $2 * 100:.0f} %')"; }
CPUS=$(nproc)
MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
TODAY=$(date -u +%Y-%m-%d)

# Waits until server $1 is running; fails on `failed`.
wait_running() {
  for ((i = 0; i < 1200; i++)); do
    st=$(curl -sf -H "authorization: $BEARER" "$SERVERS/$1" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])') || st='?'
    [[ $st == running ]] && return 0
    [[ $st == failed ]] && die "server $1 failed: $(curl -s -H "authorization: $BEARER" "$SERVERS/$1")"
    sleep 0.1
  done
  die "server $1 did not start within 120 s"
}

JP='' JTOKEN='' CHP_PID=''
# The URL and the request headers (one per line) of each path to the server.
url_of() {
  case $1 in
    direct) echo "$DIRECT" ;; kcloud | origin) echo "$KCLOUD" ;; chp) echo "$CHPURL" ;;
  esac
}
headers_of() {
  case $1 in
    direct | chp) echo "Authorization: $JAUTH" ;;
    kcloud) echo "Authorization: $BEARER" ;;
    origin) echo "$ORIGIN_HEADERS" ;;
  esac
}
if want browser && [[ ! -d tests/browser/node_modules/playwright-core ]]; then
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

if want http || want download || want kernel || want browser; then
  log "creating JupyterLab server admin/bench through the API"
  curl -sf -H "authorization: $BEARER" -H 'content-type: application/json' \
    -d '{"name":"bench"}' "$SERVERS" >/dev/null || die "could not create the server"
  wait_running bench
  # The benchmark reads the server's own port and token from the data dir (users never
  # see them; the proxy adds the token).
  read -r JP JTOKEN < <(python3 - "$TMP/data/kcloud.db" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print(*db.execute("SELECT port, token FROM servers WHERE owner='admin' AND name='bench'").fetchone())
EOF
  )
  [[ -n $JP && -n $JTOKEN ]] || die "could not read the server's port and token"
  WORK=$TMP/data/servers/admin/bench/work
  head -c 100 /dev/urandom | base64 -w0 | head -c 100 >"$WORK/small.txt"
  head -c 1048576 /dev/urandom >"$WORK/1mib.bin"
  PREFIX=/user/admin/bench
  DIRECT=http://127.0.0.1:$JP$PREFIX
  KCLOUD=$BASE$PREFIX
  CHPURL=http://127.0.0.1:$CHP_PORT$PREFIX
  JAUTH="token $JTOKEN"
  # The user's origin as a browser reaches it: a one-time link from the API, traded
  # there for the server's cookie (one redirect at open, none per request).
  ORIGIN_HOST=admin.localhost:$PORT
  OPEN_URL=$(curl -sf -H "authorization: $BEARER" -H 'content-type: application/json' -d '{}' \
    "$SERVERS/bench/open" | python3 -c 'import json,sys; print(json.load(sys.stdin)["url"])') ||
    die "could not open the server"
  SRV_COOKIE=$(curl -sf -o /dev/null -D - --resolve "$ORIGIN_HOST:127.0.0.1" "$OPEN_URL" |
    sed -n 's/^set-cookie: \([^;]*\).*/\1/Ip' | tr -d '\r')
  [[ $SRV_COOKIE == kcloud_srv_bench=* ]] || die "no server cookie from $OPEN_URL"
  ORIGIN_HEADERS="Cookie: $SRV_COOKIE"$'\n'"Host: $ORIGIN_HOST"

  if want http || want kernel || want browser; then
    log "starting configurable-http-proxy on $CHP_PORT -> JupyterLab on $JP"
    CONFIGPROXY_AUTH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))') \
      "$CHP" --ip 127.0.0.1 --port "$CHP_PORT" --api-ip 127.0.0.1 --api-port "$((PORT + 2))" \
      --default-target "http://127.0.0.1:$JP" --log-level warn >"$TMP/chp.log" 2>&1 &
    CHP_PID=$!
    PIDS+=("$CHP_PID")
    for ((i = 0; i < 100; i++)); do
      curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$CHP_PORT/" && break
      sleep 0.1
    done
  fi
  # Same bytes on every path before anything is timed.
  for f in small.txt 1mib.bin; do
    want=$(sha256sum "$WORK/$f" | cut -d' ' -f1)
    for name in direct kcloud origin chp; do
      [[ $name == chp && -z $CHP_PID ]] && continue
      mapfile -t hs < <(headers_of "$name")
      args=()
      for h in "${hs[@]}"; do args+=(-H "$h"); done
      got=$(curl -sf "${args[@]}" "$(url_of "$name")/files/$f" | sha256sum | cut -d' ' -f1) ||
        die "$name: GET /files/$f failed"
      [[ $got == "$want" ]] || die "$name: /files/$f returned other bytes"
    done
  done
fi

# wrk URL HEADER... -> "req/s p99_ms"; fails on errors or non-2xx answers.
run_wrk() {
  local out url=$1 args=()
  shift
  for h in "$@"; do args+=(-H "$h"); done
  out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${args[@]}" "$url")
  if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then
    printf '%s\n' "$out" >&2
    die "wrk saw errors against $1"
  fi
  python3 -c '
import re, sys
out = sys.stdin.read()
rps = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
v, unit = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
ms = float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
print(rps, f"{ms:.3f}")' <<<"$out"
}

if want http; then
  declare -A RPS P99
  for ((r = 1; r <= ROUNDS; r++)); do
    for f in small.txt 1mib.bin; do
      for name in direct kcloud origin chp; do
        mapfile -t hs < <(headers_of "$name")
        read -r rps p99 < <(run_wrk "$(url_of "$name")/files/$f" "${hs[@]}")
        log "round $r $f $name: $rps req/s, p99 $p99 ms"
        RPS[$f,$name]+="$rps " P99[$f,$name]+="$p99 "
      done
    done
  done
  cat <<EOF

## Proxy: kcloud vs configurable-http-proxy vs direct (JupyterLab \`/files/\`)

Command: \`scripts/bench-proxy.sh\` (ROUNDS=$ROUNDS, wrk -t1 -c$CONNS -d${DURATION}s --latency),
release aggregator \`--simulate dgx-a100-mig\`, one JupyterLab $(jupyter-lab --version 2>/dev/null)
created through the API, configurable-http-proxy $("$CHP" --version) (node $(node --version)),
all on 127.0.0.1; $CPUS CPUs ($MODEL), $TODAY. Rounds alternate direct, kcloud (bearer
token, portal origin), origin (the server's cookie on \`admin.localhost\`, as a browser), chp.
Small file: 100 bytes; large: 1 MiB. Per round: req/s (p99 ms).

| file | path | $(for ((r = 1; r <= ROUNDS; r++)); do printf 'round %d | ' "$r"; done)median req/s | vs direct | median p99 | p99 added |
|---|---|$(for ((r = 1; r <= ROUNDS; r++)); do printf -- '---|'; done)---|---|---|---|
EOF
  for f in small.txt 1mib.bin; do
    # shellcheck disable=SC2086
    d_rps=$(median ${RPS[$f,direct]}) d_p99=$(median ${P99[$f,direct]})
    for name in direct kcloud origin chp; do
      read -ra rr <<<"${RPS[$f,$name]}"
      read -ra pp <<<"${P99[$f,$name]}"
      cells=""
      for ((i = 0; i < ${#rr[@]}; i++)); do cells+="${rr[i]%.*} (${pp[i]}) | "; done
      m_rps=$(median "${rr[@]}") m_p99=$(median "${pp[@]}")
      added=$(python3 -c "print(f'{$m_p99 - $d_p99:+.2f} ms')")
      echo "| $f | $name | $cells${m_rps%.*} | $(ratio "$m_rps" "$d_rps") | $m_p99 ms | $added |"
      echo "RESULT http $f $name $m_rps $m_p99" >&2
    done
  done
fi

KID=''
new_kernel() {
  KID=$(curl -sf -H "authorization: $JAUTH" -H 'content-type: application/json' -d '{}' \
    "$DIRECT/api/kernels" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])') ||
    die "could not start a kernel"
}

if want kernel; then
  log "kernel round trips"
  new_kernel
  ch=/api/kernels/$KID/channels
  TABLE=$("$KBIN" --n "$KERNEL_N" --warmup 5 --rounds 3 --quickack both \
    --target "direct=ws://127.0.0.1:$JP$PREFIX$ch" --auth "direct=$JAUTH" \
    --target "kcloud=ws://127.0.0.1:$PORT$PREFIX$ch" --auth "kcloud=$BEARER" \
    --target "origin=ws://$ORIGIN_HOST$PREFIX$ch" --connect "origin=127.0.0.1:$PORT" \
    --header "origin=Cookie: $SRV_COOKIE" --header "origin=Origin: http://$ORIGIN_HOST" \
    --target "chp=ws://127.0.0.1:$CHP_PORT$PREFIX$ch" --auth "chp=$JAUTH")
  cat <<EOF

## Kernel round trip: \`execute_request\` \`1+1\` over the kernel websocket

Command: \`scripts/bench-proxy.sh\` (\`PARTS=kernel\`), client
\`aggregator/examples/bench_kernel.rs\` (release): one kernel, 3 rounds per path, each a
fresh websocket with 5 untimed then $KERNEL_N timed executions one at a time, timed from
send to both \`execute_result\` and \`execute_reply\`; the client sets TCP_NODELAY, and
TCP_QUICKACK after every read where marked. $CPUS CPUs, $TODAY.

$TABLE
EOF
fi

if want browser; then
  log "kernel round trips from headless Chromium"
  new_kernel
  ch=/api/kernels/$KID/channels
  TARGETS=$(python3 - "$DIRECT" "$CHPURL" "http://$ORIGIN_HOST$PREFIX" "$ch" "$JTOKEN" \
    "${SRV_COOKIE%%=*}" "${SRV_COOKIE#*=}" <<'EOF'
import json, sys
direct, chp, origin, ch, token, cname, cvalue = sys.argv[1:]
ws = lambda http: "ws" + http.removeprefix("http")
print(json.dumps([
    {"name": "direct", "page": f"{direct}/api/status?token={token}", "ws": f"{ws(direct)}{ch}?token={token}"},
    {"name": "kcloud", "page": f"{origin}/api/status", "ws": f"{ws(origin)}{ch}",
     "cookies": [{"name": cname, "value": cvalue, "url": origin.split("/user/")[0]}]},
    {"name": "chp", "page": f"{chp}/api/status?token={token}", "ws": f"{ws(chp)}{ch}?token={token}"},
]))
EOF
  )
  LINES=$(cd tests/browser && TARGETS=$TARGETS N=$KERNEL_N ROUNDS=3 node kernel-rtt.mjs) ||
    die "the browser round trips failed"
  TABLE=$(python3 -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
print("| path | per round: median / p99 (ms) | all rounds: median | p99 |")
print("|---|---|---|---|")
def p99(a):
    a = sorted(a)
    return a[min(len(a) - 1, int(len(a) * 0.99))]
for name in dict.fromkeys(r["name"] for r in rows):
    mine = [r["ms"] for r in rows if r["name"] == name]
    per = ", ".join(f"{statistics.median(m):.2f} / {p99(m):.2f}" for m in mine)
    every = [x for m in mine for x in m]
    print(f"| {name} | {per} | {statistics.median(every):.2f} ms | {p99(every):.2f} ms |")
    print(f"RESULT browser {name} {statistics.median(every):.3f} {p99(every):.3f}", file=sys.stderr)
' <<<"$LINES")
  cat <<EOF

## Kernel round trip from a browser: headless Chromium, \`execute_request\` \`1+1\`

Command: \`scripts/bench-proxy.sh\` (\`PARTS=browser\`), \`tests/browser/kernel-rtt.mjs\`:
Chromium $(chromium --version 2>/dev/null | awk '{print $2}') headless (playwright-core), a
page on each path's origin opens the kernel's websocket (direct and chp with JupyterLab's
token in the URL, kcloud on \`admin.localhost\` with the server's cookie as the portal's
Open sets it), 3 rounds alternating the paths, each a fresh context with 5 untimed then
$KERNEL_N timed executions one at a time, from send to both \`execute_result\` and
\`execute_reply\` (performance.now()). $CPUS CPUs, $TODAY.

$TABLE
EOF
fi

if want download; then
  MB=$DOWNLOAD_MIB
  truncate -s $((MB << 20)) "$WORK/big.bin"
  idle=$(hwm)
  log "downloading $MB MiB through kcloud"
  read -r size t < <(curl -sf -H "authorization: $BEARER" -o /dev/null \
    -w '%{size_download} %{time_total}\n' "$KCLOUD/files/big.bin") || die "download failed"
  [[ $size == $((MB << 20)) ]] || die "downloaded $size bytes, not $((MB << 20))"
  after=$(hwm)
  read -r dsize dt < <(curl -sf -H "authorization: $JAUTH" -o /dev/null \
    -w '%{size_download} %{time_total}\n' "$DIRECT/files/big.bin") || die "direct download failed"
  [[ $dsize == "$size" ]] || die "direct download has $dsize bytes"
  cat <<EOF

## Proxy: ${MB} MiB download through kcloud

Command: \`scripts/bench-proxy.sh\` (\`PARTS=download\`), curl, JupyterLab \`/files/\`; $TODAY.

| path | time | rate | aggregator VmHWM before → after |
|---|---|---|---|
| kcloud | $t s | $(python3 -c "print(round($MB / $t))") MiB/s | $idle MiB → $after MiB |
| direct | $dt s | $(python3 -c "print(round($MB / $dt))") MiB/s | |
EOF
fi

if want create; then
  log "create -> running overhead ($CREATE_N servers)"
  python3 - "$BASE" "$BEARER" "$CREATE_N" <<'EOF'
import http.client, json, socket, statistics, subprocess, sys, time

base, bearer, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
host, port = base.removeprefix("http://").split(":")
# The interpreter by absolute path on both sides: a bare `python3` can resolve to a
# pyenv shim (a bash script adding ~45 ms) for one side and not the other.
cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}"]
POLL = 0.002  # both sides are polled at the same interval

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def answers(p):
    try:
        c = http.client.HTTPConnection("127.0.0.1", p, timeout=1)
        c.request("GET", "/")
        ok = c.getresponse().status < 500
        c.close()
        return ok
    except OSError:
        return False

def own_startup():
    p = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([a.replace("{port}", str(p)) for a in cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not answers(p):
        time.sleep(POLL)
    t = time.perf_counter() - t0
    proc.terminate(); proc.wait()
    return t * 1e3

api = http.client.HTTPConnection(host, int(port), timeout=30)
def call(method, path, body=None):
    h = {"authorization": bearer}
    if body is not None:
        h["content-type"] = "application/json"
    api.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
    r = api.getresponse()
    return r.status, r.read()

def via_api(i):
    name = f"c{i}"
    t0 = time.perf_counter()
    st, body = call("POST", "/api/v1/users/admin/servers", {"name": name, "command": cmd})
    t201 = time.perf_counter() - t0
    if st != 201:
        sys.exit(f"create {name}: {st} {body[:200]!r}")
    while True:
        st, body = call("GET", f"/api/v1/users/admin/servers/{name}")
        s = json.loads(body)["status"]
        if s == "running":
            break
        if s == "failed":
            sys.exit(f"{name} failed: {body[:300]!r}")
        time.sleep(POLL)
    t = time.perf_counter() - t0
    st, _ = call("DELETE", f"/api/v1/users/admin/servers/{name}")
    if st not in (200, 202, 204):
        sys.exit(f"delete {name}: {st}")
    return t201 * 1e3, t * 1e3

own, post, running = [], [], []
for i in range(n):  # alternate, so that load drifts hit both
    own.append(own_startup())
    a, b = via_api(i)
    post.append(a); running.append(b)
    print(f"create {i}: own {own[-1]:.1f} ms, POST->201 {a:.1f} ms, POST->running {b:.1f} ms",
          file=sys.stderr)
med = statistics.median
over = [r - o for r, o in zip(running, own)]
fmt = lambda v: ", ".join(f"{x:.0f}" for x in v)
print(f"""
## Create → running overhead (local provisioner)

Command: `scripts/bench-proxy.sh` (`PARTS=create`, CREATE_N={n}): a custom server whose
program answers at once (`python3 -m http.server`), created through the API and polled
(GET, every {POLL * 1e3:.0f} ms) until `running`, then deleted; alternating with the same
command started directly and polled (GET /, every {POLL * 1e3:.0f} ms) until it answers.

| | per server (ms) | median |
|---|---|---|
| program's own start-up (direct) | {fmt(own)} | {med(own):.1f} ms |
| POST → 201 | {fmt(post)} | {med(post):.1f} ms |
| POST → `running` | {fmt(running)} | {med(running):.1f} ms |
| platform overhead (POST → running − own start-up, per pair) | {fmt(over)} | {med(over):.1f} ms |
""")
print(f"RESULT create own={med(own):.1f} post={med(post):.1f} running={med(running):.1f} overhead={med(over):.1f}", file=sys.stderr)
EOF
fi
