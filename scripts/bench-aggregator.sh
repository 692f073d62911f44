#!/usr/bin/env bash
# Benchmarks kcloud-aggregator against the scale targets, on 127.0.0.1 only, and prints
# a Markdown section (machine, table of medians, verdict per target).
#
# One aggregator (fresh temp --data-dir, --agent-token-file, bootstrap admin,
# --agent-heartbeat 1h so that no node goes stale during the run), then:
#   load    NODES (10,000) simulated dgx-a100-mig nodes pushed over HTTP (wrk +
#           scripts/bench/push.lua: 4 whole A100s + 4 MIG-mode A100s with 17 instances,
#           ~8.6 KB of JSON each); checked through GET /api/v1/gpus/summary: 25 listed
#           and 21 allocatable devices per node, all free.
#   1 ingest  ROUNDS × wrk -t2 -c16 -dPUSH_SECS: pushes cycling over all nodes, seq
#           increasing (every push must be stored, none ignored or rejected: checked
#           with the aggregator's kcloud_inventory_pushes_total on /metrics and wrk's
#           error count). Also the server's CPU time per push.
#   3 paging  ROUNDS walks of every page (limit=500, following next_cursor, one
#           keep-alive connection, scripts/bench/aggregator.py) for three listings:
#           kind=gpu (the 80,000 GPUs), available=true (210,000 free devices) and no
#           filter (all 250,000 listed devices). Round 0 of each checks the listing (every
#           device exactly once, the expected count).
#   2 latency ROUNDS × wrk -t1 -cGET_CONNS -dGET_SECS for one 500-device page of
#           GET /api/v1/gpus?available=true&limit=500 (cycling over all 420 pages' cursors)
#           and for GET /api/v1/gpus/summary; plus -c1 runs (C1_SECS) for the service
#           time without queueing.
#   4 memory  VmRSS and VmHWM (/proc/<pid>/status) after the load and at the end.
#   5 ledger  target/release/examples/bench_ledger (kcloud-cluster, in-process; no HTTP endpoint for
#           reservations yet): reserve+commit/s with 1 and 2 threads, double-grant checks.
# Per phase, the CPU used by processes other than this benchmark's (server, wrk,
# python, curl) is recorded: the machine may be shared, so all figures are medians
# over rounds.
#
# Usage: scripts/bench-aggregator.sh     (about 5-6 minutes on 2 cores)
#   env: ROUNDS=5 PORT=18931 NODES=10000 PUSH_SECS=8 PUSH_THREADS=2 PUSH_CONNS=16
#        GET_SECS=10 GET_CONNS=4 C1_SECS=4 LEDGER_ROUNDS=5 BENCH_LEDGER=1
# Needs: cargo, curl, python3, wrk (apt-get installs the last three when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=${ROUNDS:-5}
PORT=${PORT:-18931}
NODES=${NODES:-10000}
PUSH_SECS=${PUSH_SECS:-8}
PUSH_THREADS=${PUSH_THREADS:-2}
PUSH_CONNS=${PUSH_CONNS:-16}
GET_SECS=${GET_SECS:-10}
GET_CONNS=${GET_CONNS:-4}
C1_SECS=${C1_SECS:-4}
LEDGER_ROUNDS=${LEDGER_ROUNDS:-5}
BENCH_LEDGER=${BENCH_LEDGER:-1}
for v in ROUNDS PORT NODES PUSH_SECS PUSH_THREADS PUSH_CONNS GET_SECS GET_CONNS C1_SECS LEDGER_ROUNDS; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "bench: $v must be a positive integer" >&2; exit 2; }
done
((ROUNDS <= 20 && NODES <= 50000 && PUSH_SECS <= 60 && GET_SECS <= 60 && C1_SECS <= 60 &&
  PUSH_THREADS <= 8 && PUSH_CONNS <= 256 && GET_CONNS <= 64 && LEDGER_ROUNDS <= 20)) ||
  { echo "bench: settings too large" >&2; exit 2; }
((PUSH_CONNS >= PUSH_THREADS)) || { echo "bench: PUSH_CONNS must be ≥ PUSH_THREADS" >&2; exit 2; }

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

# --- tools -----------------------------------------------------------------------
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)
if ((${#need_apt[@]})); then
  log "installing: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
CLK_TCK=$(getconf CLK_TCK)

# --- build -------------------------------------------------------------------------
# --bins as well: `--examples` alone builds only the examples.
log "cargo build --release -p kcloud-aggregator --bins; -p kcloud-cluster --example bench_ledger"
cargo build --release --locked -p kcloud-aggregator --bins -p kcloud-cluster --example bench_ledger || {
  log "Cargo.lock is not up to date; building without --locked"
  cargo build --release -p kcloud-aggregator --bins -p kcloud-cluster --example bench_ledger
}
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN=$TARGET_DIR/release/kcloud-aggregator
LEDGER_BIN=$TARGET_DIR/release/examples/bench_ledger
[[ -x $BIN ]] || die "no $BIN after the build"
[[ -x $LEDGER_BIN ]] || die "no $LEDGER_BIN after the build"

# --- server ------------------------------------------------------------------------
TMP=$(mktemp -d /tmp/kcloud-aggbench.XXXXXX)
RES=$TMP/results
mkdir -p "$RES"
SERVER_PID=
stop_server() {
  local pid=$SERVER_PID i
  SERVER_PID=
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  stop_server
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

BASE=http://127.0.0.1:$PORT
rc=0
curl -s -o /dev/null --max-time 2 "$BASE/" || rc=$?
[[ $rc -eq 7 ]] || die "127.0.0.1:$PORT is in use (set PORT)"

umask 077
python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$TMP/agent.token"
AGENT_TOKEN=$(cat "$TMP/agent.token")
export KCLOUD_BENCH_PASSWORD
KCLOUD_BENCH_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')
KCLOUD_BOOTSTRAP_ADMIN_PASSWORD=$KCLOUD_BENCH_PASSWORD RUST_LOG=warn \
  "$BIN" --listen "127.0.0.1:$PORT" --data-dir "$TMP/data" --agent-token-file "$TMP/agent.token" \
  --agent-heartbeat 1h --access-ttl 1h --local-agent off >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for ((i = 0; i < 100; i++)); do
  curl -sf -o /dev/null --max-time 1 "$BASE/readyz" && break
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -5 "$TMP/server.log" >&2; die "aggregator exited"; }
  sleep 0.1
done
curl -sf -o /dev/null --max-time 1 "$BASE/readyz" || die "aggregator not ready after 10 s"
python3 scripts/bench/aggregator.py login --base "$BASE" --password-env KCLOUD_BENCH_PASSWORD >"$TMP/access.token"
ACCESS_TOKEN=$(cat "$TMP/access.token")

# --- helpers -----------------------------------------------------------------------
put() { echo "$2" >>"$RES/$1"; } # metric value
kv() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k {print $2}'; } # key line
cpu_ticks() { sed 's/^.*) //' "/proc/$SERVER_PID/stat" | awk '{print $12 + $13}'; }
status_mib() { awk -v k="$1:" '$1 == k {printf "%.1f\n", $2 / 1024}' "/proc/$SERVER_PID/status"; }
now_s() { date +%s.%N; }
busy_s() { awk -v hz="$CLK_TCK" '$1 == "cpu" {print ($2 + $3 + $4 + $9) / hz; exit}' /proc/stat; }
# CPU seconds of this benchmark into OWN_S: the server (while it runs) and every reaped
# child (wrk, python, curl, bench_ledger): bash's `times`, second line. Not in a $(...)
# subshell: a forked shell starts with zero child times.
own_cpu() {
  local srv=0
  [[ -n $SERVER_PID ]] && srv=$(awk -v t="$(cpu_ticks)" -v hz="$CLK_TCK" 'BEGIN {print t / hz}')
  times >"$TMP/times"
  OWN_S=$(tail -1 "$TMP/times" | awk -v srv="$srv" '{s = 0; for (i = 1; i <= 2; i++) {split($i, a, /[ms]/);
    s += a[1] * 60 + a[2]}; print s + srv}')
}
phase_start() { PH_T=$(now_s); PH_BUSY=$(busy_s); own_cpu; PH_OWN=$OWN_S; }
# PHASE_OTHER: % of all CPUs used by other processes since phase_start
phase_end() {
  own_cpu
  PHASE_OTHER=$(awk -v t0="$PH_T" -v t1="$(now_s)" -v b0="$PH_BUSY" -v b1="$(busy_s)" -v o0="$PH_OWN" \
    -v o1="$OWN_S" -v n="$(nproc)" 'BEGIN {v = ((b1 - b0) - (o1 - o0)) / ((t1 - t0) * n) * 100;
    if (v < 0) v = 0; printf "%.0f\n", v}')
}
pushes_metric() { # result label
  curl -s --max-time 5 "$BASE/metrics" |
    awk -v r="kcloud_inventory_pushes_total{result=\"$1\"}" '$1 == r {print $2} END {}' | head -1
}
median_stdin() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "n/a";
  else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
med() { if [[ -s $RES/$1 ]]; then median_stdin <"$RES/$1"; else echo n/a; fi; }
span() { if [[ -s $RES/$1 ]]; then sort -g "$RES/$1" | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%g–%g", lo, hi}'; else echo -; fi; }
fmt() { awk -v v="$1" -v d="${2:-1}" 'BEGIN {if (v == "n/a") print v; else printf "%.*f\n", d, v}'; }

push_run() { # seconds seq-base -> the PUSH line
  local out=$TMP/push.out
  timeout $(($1 + 60)) wrk -t"$PUSH_THREADS" -c"$PUSH_CONNS" -d"$1s" --timeout 5s \
    -s scripts/bench/push.lua "$BASE" -- "$AGENT_TOKEN" "$NODES" "$2" "$PUSH_THREADS" >"$out" 2>"$TMP/push.err" ||
    { cat "$TMP/push.err" >&2; die "wrk (push) failed"; }
  grep '^PUSH ' "$out" || { cat "$out" "$TMP/push.err" >&2; die "wrk (push) printed no result"; }
}
get_run() { # prefix conns secs path-or-@file
  local line
  line=$(timeout $(($3 + 60)) wrk -t1 -c"$2" -d"$3s" --timeout 5s -s scripts/bench/get.lua "$BASE" \
    -- "$ACCESS_TOKEN" "$4" 2>"$TMP/get.err" | grep '^GET ') || { cat "$TMP/get.err" >&2; die "wrk (get) failed"; }
  [[ $(kv errors "$line") == 0 && $(kv non2xx "$line") == 0 ]] || die "GET errors: $line"
  put "$1.p50_ms" "$(awk -v u="$(kv p50_us "$line")" 'BEGIN {print u / 1000}')"
  put "$1.p99_ms" "$(awk -v u="$(kv p99_us "$line")" 'BEGIN {print u / 1000}')"
  put "$1.rps" "$(awk -v n="$(kv requests "$line")" -v d="$(kv duration_us "$line")" 'BEGIN {print n / d * 1e6}')"
  put "$1.bytes" "$(awk -v b="$(kv bytes "$line")" -v n="$(kv requests "$line")" 'BEGIN {printf "%.0f\n", b / n}')"
}

# --- run ---------------------------------------------------------------------------
CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
log "machine: $(nproc) CPUs, ${CPU_MODEL:-unknown CPU}, load $(cut -d' ' -f1-3 /proc/loadavg)"
EXPECT_ALL=$((NODES * 25))
EXPECT_FREE=$((NODES * 21))
EXPECT_GPUS=$((NODES * 8))

log "load: $NODES dgx-a100-mig nodes over HTTP"
SEQ_ROUND=1
loaded=0
for ((try = 0; try < 3; try++)); do
  push_run 3 $((1000000000 + SEQ_ROUND * 100000000)) >/dev/null
  SEQ_ROUND=$((SEQ_ROUND + 1))
  line=$(python3 scripts/bench/aggregator.py summary --base "$BASE" --token-file "$TMP/access.token")
  if [[ $(kv total "$line") == "$EXPECT_FREE" && $(kv free "$line") == "$EXPECT_FREE" ]]; then
    loaded=1
    break
  fi
done
((loaded)) || die "after loading: $line (expected total=free=$EXPECT_FREE)"
DEVICES=$(curl -s --max-time 5 "$BASE/metrics" | awk '$1 == "kcloud_devices" {print $2}')
[[ $DEVICES == "$EXPECT_ALL" ]] || die "kcloud_devices=$DEVICES, expected $EXPECT_ALL"
FRESH=$(curl -s --max-time 5 "$BASE/metrics" | awk '$1 == "kcloud_nodes{state=\"fresh\"}" {print $2}')
[[ $FRESH == "$NODES" ]] || die "fresh nodes: $FRESH, expected $NODES"
RSS_LOADED=$(status_mib VmRSS)
HWM_LOADED=$(status_mib VmHWM)
log "loaded: $FRESH nodes, $DEVICES devices listed, $EXPECT_FREE free; VmRSS $RSS_LOADED MiB"

log "1. ingest: $ROUNDS × wrk -t$PUSH_THREADS -c$PUSH_CONNS -d${PUSH_SECS}s"
phase_start
for ((r = 1; r <= ROUNDS; r++)); do
  ((SEQ_ROUND < 89)) || die "too many push runs for the 10-digit seq scheme"
  s0=$(pushes_metric stored)
  i0=$(pushes_metric ignored)
  j0=$(pushes_metric rejected)
  c0=$(cpu_ticks)
  line=$(push_run "$PUSH_SECS" $((1000000000 + SEQ_ROUND * 100000000)))
  c1=$(cpu_ticks)
  s1=$(pushes_metric stored)
  SEQ_ROUND=$((SEQ_ROUND + 1))
  n=$(kv requests "$line")
  i1=$(pushes_metric ignored)
  j1=$(pushes_metric rejected)
  [[ $(kv errors "$line") == 0 ]] || die "push errors: $line"
  [[ ${i1:-0} == "${i0:-0}" && ${j1:-0} == "${j0:-0}" ]] ||
    die "pushes ignored ($((${i1:-0} - ${i0:-0}))) or rejected ($((${j1:-0} - ${j0:-0}))): $line"
  # wrk counts completed responses; /metrics may count a few more (in flight at the end).
  stored=$((s1 - s0))
  ((stored >= n && stored <= n + PUSH_CONNS)) || die "/metrics counted $stored stored pushes, wrk $n"
  rate=$(awk -v n="$n" -v d="$(kv duration_us "$line")" 'BEGIN {print n / d * 1e6}')
  put push.rps "$rate"
  put push.p50_ms "$(awk -v u="$(kv p50_us "$line")" 'BEGIN {print u / 1000}')"
  put push.p99_ms "$(awk -v u="$(kv p99_us "$line")" 'BEGIN {print u / 1000}')"
  put push.cpu_us "$(awk -v d=$((c1 - c0)) -v n="$n" -v hz="$CLK_TCK" 'BEGIN {printf "%.1f\n", d / hz * 1e6 / n}')"
  put push.body "$(kv body_bytes "$line")"
  put push.stored "$stored"
  log "  round $r: $(fmt "$rate" 0) pushes/s, all $n stored"
done
phase_end
OTHER_PUSH=$PHASE_OTHER

log "3. paging: $ROUNDS walks each of kind=gpu, available=true, everything"
phase_start
walk() { # name query expect [paths-out]
  local line
  line=$(python3 scripts/bench/aggregator.py walk --base "$BASE" --token-file "$TMP/access.token" \
    --query "$2" --rounds "$ROUNDS" --expect "$3" ${4:+--paths-out "$4"} 2>"$TMP/walk.err") ||
    { cat "$TMP/walk.err" >&2; die "walk $2 failed"; }
  for k in pages devices wall_ms min_ms max_ms page_p50_ms; do put "walk.$1.$k" "$(kv $k "$line")"; done
  log "  $2: $(kv devices "$line") devices in $(kv pages "$line") pages, median $(kv wall_ms "$line") ms"
}
walk gpu 'kind=gpu&limit=500' "$EXPECT_GPUS"
walk free 'available=true&limit=500' "$EXPECT_FREE" "$TMP/pages.txt"
walk all 'limit=500' "$EXPECT_ALL"
phase_end
OTHER_WALK=$PHASE_OTHER

log "2. latency: $ROUNDS × wrk -t1 -c$GET_CONNS -d${GET_SECS}s (+ -c1 -d${C1_SECS}s), page and summary alternating"
phase_start
for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2)); then order=(page summary); else order=(summary page); fi
  for t in "${order[@]}"; do
    if [[ $t == page ]]; then what=@$TMP/pages.txt; else what=/api/v1/gpus/summary; fi
    get_run "$t.c$GET_CONNS" "$GET_CONNS" "$GET_SECS" "$what"
    get_run "$t.c1" 1 "$C1_SECS" "$what"
  done
  log "  round $r: page p99 $(tail -1 "$RES/page.c$GET_CONNS.p99_ms") ms, summary p99 $(tail -1 "$RES/summary.c$GET_CONNS.p99_ms") ms"
done
phase_end
OTHER_GET=$PHASE_OTHER
RSS_END=$(status_mib VmRSS)
HWM_END=$(status_mib VmHWM)
SERVER_CPU_S=$(awk -v t="$(cpu_ticks)" -v hz="$CLK_TCK" 'BEGIN {printf "%.0f\n", t / hz}')
stop_server

LEDGER_OUT=
if [[ $BENCH_LEDGER == 1 ]]; then
  log "5. ledger: bench_ledger --nodes $NODES --rounds $LEDGER_ROUNDS --threads 1,2"
  phase_start
  timeout 600 "$LEDGER_BIN" --nodes "$NODES" --rounds "$LEDGER_ROUNDS" --threads 1,2 --secs 10 \
    >"$TMP/ledger.out" 2>"$TMP/ledger.err" || { cat "$TMP/ledger.err" >&2; die "bench_ledger failed its checks"; }
  phase_end
  OTHER_LEDGER=$PHASE_OTHER
  LEDGER_OUT=$TMP/ledger.out
fi

# --- report ------------------------------------------------------------------------
verdict() { # value op limit -> met / NOT met
  awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {if (v == "n/a") {print "n/a"; exit}
    ok = (op == "<") ? (v < l) : (v >= l); print ok ? "**met**" : "**NOT met**"}'
}
PUSH_RPS=$(med push.rps)
PAGE_P99=$(med "page.c$GET_CONNS.p99_ms")
SUM_P99=$(med "summary.c$GET_CONNS.p99_ms")
WALK_GPU=$(med walk.gpu.wall_ms)
WALK_FREE=$(med walk.free.wall_ms)
WALK_ALL=$(med walk.all.wall_ms)
WALK_MAX=$(printf '%s\n' "$WALK_GPU" "$WALK_FREE" "$WALK_ALL" | sort -g | tail -1)
MEM_MAX=$(awk -v a="$HWM_END" -v b="$RSS_END" 'BEGIN {print (a > b) ? a : b}')
MEM_MB=$(awk -v m="$MEM_MAX" 'BEGIN {printf "%.0f\n", m * 1.048576}')

echo
echo "## kcloud-aggregator"
echo
echo "Command: \`scripts/bench-aggregator.sh\` (ROUNDS=$ROUNDS NODES=$NODES PUSH_SECS=$PUSH_SECS PUSH_THREADS=$PUSH_THREADS PUSH_CONNS=$PUSH_CONNS GET_SECS=$GET_SECS GET_CONNS=$GET_CONNS C1_SECS=$C1_SECS LEDGER_ROUNDS=$LEDGER_ROUNDS); release build; server, wrk and Python on the same machine over loopback."
echo
echo "Machine: $(nproc) CPUs, ${CPU_MODEL:-unknown CPU}, $(date -u '+%Y-%m-%d %H:%M UTC'). CPU taken by other processes on the machine (user+system+steal time not used by this benchmark, share of all CPUs): ingest $OTHER_PUSH %, paging $OTHER_WALK %, latency $OTHER_GET %${OTHER_LEDGER:+, ledger $OTHER_LEDGER %}."
echo
echo "Load: $NODES simulated dgx-a100-mig nodes (4 whole A100 + 4 MIG-mode A100 with 17 instances each): $EXPECT_ALL devices listed ($EXPECT_GPUS GPUs + $((NODES * 17)) MIG instances), $EXPECT_FREE allocatable, push body $(med push.body) bytes. Figures are medians over $ROUNDS rounds (range in brackets)."
echo
echo "| # | target | measured (median of $ROUNDS) | verdict |"
echo "|---|---|---|---|"
echo "| 1 | inventory ingest ≥ 20,000 pushes/s over HTTP | $(fmt "$PUSH_RPS" 0) pushes/s [$(span push.rps | awk -F'–' '{printf "%.0f–%.0f", $1, $2}')]; wrk -t$PUSH_THREADS -c$PUSH_CONNS, ${PUSH_SECS}s/round; all stored; p50 $(fmt "$(med push.p50_ms)" 2) ms, p99 $(fmt "$(med push.p99_ms)" 2) ms; server CPU $(fmt "$(med push.cpu_us)" 1) µs/push | $(verdict "$PUSH_RPS" '>=' 20000) |"
echo "| 2a | one 500-device page of \`GET /api/v1/gpus?available=true&limit=500\`, p99 < 20 ms | c$GET_CONNS: p50 $(fmt "$(med "page.c$GET_CONNS.p50_ms")" 2) ms, **p99 $(fmt "$PAGE_P99" 2) ms** [$(span "page.c$GET_CONNS.p99_ms")], $(fmt "$(med "page.c$GET_CONNS.rps")" 0) req/s; c1: p50 $(fmt "$(med page.c1.p50_ms)" 2) ms, p99 $(fmt "$(med page.c1.p99_ms)" 2) ms, $(fmt "$(med page.c1.rps)" 0) req/s; $(fmt "$(med "page.c$GET_CONNS.bytes")" 0) bytes/page | $(verdict "$PAGE_P99" '<' 20) |"
echo "| 2b | \`GET /api/v1/gpus/summary\`, p99 < 20 ms | c$GET_CONNS: p50 $(fmt "$(med "summary.c$GET_CONNS.p50_ms")" 2) ms, **p99 $(fmt "$SUM_P99" 2) ms** [$(span "summary.c$GET_CONNS.p99_ms")], $(fmt "$(med "summary.c$GET_CONNS.rps")" 0) req/s; c1: p50 $(fmt "$(med summary.c1.p50_ms)" 2) ms, p99 $(fmt "$(med summary.c1.p99_ms)" 2) ms, $(fmt "$(med summary.c1.rps)" 0) req/s | $(verdict "$SUM_P99" '<' 20) |"
echo "| 3 | all devices paged through (500/page, next_cursor) < 1 s | kind=gpu, $(med walk.gpu.devices) devices / $(med walk.gpu.pages) pages: **$(fmt "$WALK_GPU" 0) ms** [$(fmt "$(med walk.gpu.min_ms)" 0)–$(fmt "$(med walk.gpu.max_ms)" 0)]; available=true, $(med walk.free.devices) / $(med walk.free.pages): $(fmt "$WALK_FREE" 0) ms [$(fmt "$(med walk.free.min_ms)" 0)–$(fmt "$(med walk.free.max_ms)" 0)]; everything, $(med walk.all.devices) / $(med walk.all.pages): $(fmt "$WALK_ALL" 0) ms [$(fmt "$(med walk.all.min_ms)" 0)–$(fmt "$(med walk.all.max_ms)" 0)]; page p50 $(fmt "$(med walk.free.page_p50_ms)" 2) ms | $(verdict "$WALK_MAX" '<' 1000) |"
echo "| 4 | resident memory < 300 MB with that load | after load: VmRSS $RSS_LOADED MiB, VmHWM $HWM_LOADED MiB; at the end: VmRSS $RSS_END MiB, **VmHWM $HWM_END MiB** (= $MEM_MB MB) | $(verdict "$MEM_MB" '<' 300) |"
if [[ -n $LEDGER_OUT ]]; then
  lr() { grep "^RESULT mode=$1 threads=$2 " "$LEDGER_OUT" | tr ' ' '\n' | awk -F= -v k="$3" '$1 == k {print $2}'; }
  LOW=$(for m in gpus mig exact; do for t in 1 2; do lr $m $t median_rate; done; done | sort -g | head -1)
  PROB=$(for m in gpus mig exact; do for t in 1 2; do lr $m $t problems; done; done | awk '{s += $1} END {print s + 0}')
  echo "| 5 | ≥ 5,000 reserve+commit/s, zero double allocations (in-process) | lowest median of 6 cases: **$(fmt "$LOW" 0)/s** (table below); double allocations / check failures: **$PROB** | $(awk -v l="$LOW" -v p="$PROB" 'BEGIN {print (l >= 5000 && p == 0) ? "**met**" : "**NOT met**"}') |"
fi
echo
echo "Server: $SERVER_CPU_S s of CPU over the HTTP phases; the aggregator ran with 2 tokio workers (one per CPU) and shared both CPUs with wrk."
if [[ -n $LEDGER_OUT ]]; then
  echo
  sed -n '/^bench_ledger:/,$p' "$LEDGER_OUT" | sed '1s/^bench_ledger: /In-process ledger (`cargo run --release -p kcloud-cluster --example bench_ledger`): /'
  echo
  echo "In-process \`Inventory::ingest\` of a new node (layout indexed, no HTTP/JSON): median $(fmt "$(grep '^RESULT ingest_inprocess_median=' "$LEDGER_OUT" | cut -d= -f2)" 0) nodes/s."
fi
