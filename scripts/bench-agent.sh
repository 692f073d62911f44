#!/usr/bin/env bash
# Benchmarks kcloud-agent (--simulate dgx-a100-mig) side by side with
# prometheus-node-exporter (default collectors), both on 127.0.0.1 only, and prints a
# Markdown table of medians and ratios. See BENCHMARKS.md for a recorded run.
#
# Per round (ROUNDS, default 5; both servers are started fresh each round and the
# order agent/node-exporter alternates per measurement and round):
#   - in-process render/collect cost of the agent (once, before the rounds: a tiny
#     throw-away crate in a temp dir linked against kcloud-agent, built into the
#     workspace's target dir so only the kcloud crates compile; it leaves
#     target/release/kcloud-render-bench behind; BENCH_INPROC=0 skips it)
#   - sequential scrapes: curl, 200 GETs on one keep-alive connection (time_total);
#     wrk -t1 -c1 for SEQ_SECS
#   - saturation: wrk -t1 -c4 -d10s, plus the server's CPU time per request
#     (utime+stime from /proc/<pid>/stat over the run, divided by requests)
#   - fixed rate: scripts/bench_paced.py, 200 req/s for 10 s on one keep-alive
#     connection, p50/p99; plus a control run against the agent's /healthz (same
#     client, same server, no rendering) to show the machine's own latency floor
#   - VmRSS and VmHWM from /proc/<pid>/status after the load
# Then once: idle CPU of both (fresh, after 2 s of load), concurrently, over IDLE_SECS
# (default 60) at the agent's default --interval (5 s).
#
# Usage: scripts/bench-agent.sh            (about 5-6 minutes on 2 cores)
#   env: ROUNDS=5 AGENT_PORT=19400 NE_PORT=19100 IDLE_SECS=60 SAT_SECS=10
#        PACED_SECS=10 PACED_RATE=200 SEQ_SECS=2 BENCH_INPROC=1
# Needs: cargo, curl, python3, wrk, prometheus-node-exporter (the last two are
# installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=${ROUNDS:-5}
AGENT_PORT=${AGENT_PORT:-19400}
NE_PORT=${NE_PORT:-19100}
IDLE_SECS=${IDLE_SECS:-60}
SAT_SECS=${SAT_SECS:-10}
PACED_SECS=${PACED_SECS:-10}
PACED_RATE=${PACED_RATE:-200}
CONTROL_SECS=${CONTROL_SECS:-5}
SEQ_SECS=${SEQ_SECS:-2}
SEQ_CURL=${SEQ_CURL:-200}
BENCH_INPROC=${BENCH_INPROC:-1}
for v in ROUNDS AGENT_PORT NE_PORT IDLE_SECS SAT_SECS PACED_SECS PACED_RATE CONTROL_SECS SEQ_SECS SEQ_CURL; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "bench: $v must be a positive integer" >&2; exit 2; }
done
((ROUNDS <= 50 && IDLE_SECS <= 600 && SAT_SECS <= 120 && PACED_SECS <= 120 && SEQ_CURL <= 5000)) ||
  { echo "bench: settings too large" >&2; exit 2; }

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

# --- tools -----------------------------------------------------------------------
need_apt=()
command -v prometheus-node-exporter >/dev/null || need_apt+=(prometheus-node-exporter)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)
if ((${#need_apt[@]})); then
  log "installing: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: the binaries, not Debian's service set-up.
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
NE_BIN=$(command -v prometheus-node-exporter)
CLK_TCK=$(getconf CLK_TCK)

# --- build -------------------------------------------------------------------------
log "cargo build --release -p kcloud-agent"
# --locked for a reproducible build; a Cargo.lock that is mid-edit falls back to the
# plain build (which may update the lock file, as any cargo build would).
cargo build --release --locked -p kcloud-agent || {
  log "Cargo.lock is not up to date; building without --locked"
  cargo build --release -p kcloud-agent
}
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
AGENT_BIN=$TARGET_DIR/release/kcloud-agent
[[ -x $AGENT_BIN ]] || die "no $AGENT_BIN after the build"

TMP=$(mktemp -d /tmp/kcloud-bench.XXXXXX)
RES=$TMP/results
mkdir -p "$RES"
AGENT_PID=
NE_PID=

stop_pid() { # pid: TERM, up to 5 s, then KILL
  local pid=$1 i
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
stop_all() {
  stop_pid "$AGENT_PID"
  AGENT_PID=
  stop_pid "$NE_PID"
  NE_PID=
}
cleanup() {
  local rc=$?
  stop_all
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { # a refused connection (curl exit 7) means nobody listens there
  local rc=0
  curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$1/" || rc=$?
  [[ $rc -eq 7 ]]
}
wait_ok() { # url: up to 10 s for a 200
  local i
  for ((i = 0; i < 100; i++)); do
    curl -sf -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.1
  done
  return 1
}
start_all() {
  port_free "$AGENT_PORT" || die "127.0.0.1:$AGENT_PORT is in use (set AGENT_PORT)"
  port_free "$NE_PORT" || die "127.0.0.1:$NE_PORT is in use (set NE_PORT)"
  "$AGENT_BIN" --simulate dgx-a100-mig --listen "127.0.0.1:$AGENT_PORT" --node-name bench \
    >>"$TMP/agent.log" 2>&1 &
  AGENT_PID=$!
  # Default collectors; the log goes to a file (on a container the systemd collector
  # logs one error per scrape).
  "$NE_BIN" --web.listen-address="127.0.0.1:$NE_PORT" >>"$TMP/ne.log" 2>&1 &
  NE_PID=$!
  wait_ok "http://127.0.0.1:$AGENT_PORT/readyz" || { tail -5 "$TMP/agent.log" >&2; die "agent not ready"; }
  wait_ok "http://127.0.0.1:$NE_PORT/metrics" || { tail -5 "$TMP/ne.log" >&2; die "node-exporter not ready"; }
}

url_of() { # agent|ne
  if [[ $1 == agent ]]; then echo "http://127.0.0.1:$AGENT_PORT/metrics"; else echo "http://127.0.0.1:$NE_PORT/metrics"; fi
}
pid_of() { if [[ $1 == agent ]]; then echo "$AGENT_PID"; else echo "$NE_PID"; fi; }
cpu_ticks() { # utime+stime of a pid (all its threads, dead ones included)
  sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
sched_ns() { # on-CPU ns of the live threads (ns resolution; exited threads not counted)
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}'
}
status_kib() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
psi_cpu_us() { # "some" CPU pressure total (µs), 0 where PSI is off
  awk '$1 == "some" {for (i = 2; i <= NF; i++) if ($i ~ /^total=/) {sub("total=", "", $i); print $i}}' \
    /proc/pressure/cpu 2>/dev/null || echo 0
}
now_s() { date +%s.%N; }
psi_pct_since() { # psi-total-then time-then: % of the wall time some task waited for a CPU
  awk -v a="$1" -v b="$(psi_cpu_us)" -v t0="$2" -v t1="$(now_s)" 'BEGIN {printf "%.1f\n", (b - a) / 1e4 / (t1 - t0)}'
}
put() { echo "$3" >>"$RES/$1.$2"; } # target metric value

# wrk's latency figures to milliseconds
wrk_ms() { awk -v p="$1" '$1 == p {v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
  m = (u == "us") ? v / 1000 : (u == "ms") ? v : (u == "s") ? v * 1000 : (u == "m") ? v * 60000 : v;
  printf "%.3f\n", m}' "$2"; }
wrk_rps() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
wrk_reqs() { awk '/ requests in / {print $1}' "$1"; }
wrk_errors() { awk '/Socket errors:/ {gsub(",", ""); n += $4 + $6 + $8 + $10}
  /Non-2xx/ {n += $NF} END {print n + 0}' "$1"; }

# --- measurements ------------------------------------------------------------------
m_seq_curl() { # 200 sequential GETs, one curl process, one keep-alive connection
  local t=$1 url args=() i
  url=$(url_of "$t")
  for ((i = 0; i < SEQ_CURL; i++)); do args+=(-o /dev/null "$url"); done
  curl -s --max-time 60 -w '%{time_total} %{size_download}\n' "${args[@]}" >"$TMP/curl.$t"
  # drop the first transfer (it pays for the connect)
  put "$t" curl_ms "$(tail -n +2 "$TMP/curl.$t" | awk '{print $1 * 1000}' | median_stdin)"
  put "$t" bytes "$(tail -1 "$TMP/curl.$t" | awk '{print $2}')"
  put "$t" series "$(curl -s --max-time 5 "$url" | grep -vc '^#' || true)"
}
m_seq_wrk() {
  local t=$1 out=$TMP/wrk1.$1
  wrk -t1 -c1 -d"${SEQ_SECS}s" --latency --timeout 2s "$(url_of "$t")" >"$out"
  put "$t" seq_p50_ms "$(wrk_ms 50% "$out")"
  put "$t" seq_p99_ms "$(wrk_ms 99% "$out")"
  put "$t" seq_rps "$(wrk_rps "$out")"
}
m_sat() {
  local t=$1 out=$TMP/wrk4.$1 pid c0 c1 n
  pid=$(pid_of "$t")
  c0=$(cpu_ticks "$pid")
  wrk -t1 -c4 -d"${SAT_SECS}s" --latency --timeout 2s "$(url_of "$t")" >"$out"
  c1=$(cpu_ticks "$pid")
  n=$(wrk_reqs "$out")
  put "$t" sat_rps "$(wrk_rps "$out")"
  put "$t" sat_p50_ms "$(wrk_ms 50% "$out")"
  put "$t" sat_p99_ms "$(wrk_ms 99% "$out")"
  put "$t" sat_errors "$(wrk_errors "$out")"
  put "$t" cpu_us_per_req "$(awk -v d=$((c1 - c0)) -v n="$n" -v hz="$CLK_TCK" 'BEGIN {printf "%.1f\n", n ? d / hz * 1e6 / n : 0}')"
}
m_paced() { # target [url] [secs] [prefix]
  local t=$1 url=${2:-$(url_of "$1")} secs=${3:-$PACED_SECS} pre=${4:-paced} line kv p0 t0
  p0=$(psi_cpu_us)
  t0=$(now_s)
  line=$(timeout $((2 * secs + 30)) python3 "$ROOT/scripts/bench_paced.py" \
    --url "$url" --rate "$PACED_RATE" --duration "$secs") || true
  [[ -n $line ]] || die "bench_paced.py gave no result for $url"
  put "$t" "${pre}_psi_pct" "$(psi_pct_since "$p0" "$t0")"
  for kv in $line; do
    case ${kv%%=*} in
      rate | p50_ms | p99_ms | max_ms | sched_p99_ms | errors) put "$t" "${pre}_${kv%%=*}" "${kv#*=}" ;;
    esac
  done
}
m_rss() {
  local t=$1 pid
  pid=$(pid_of "$t")
  put "$t" rss_mib "$(awk -v k="$(status_kib "$pid" VmRSS)" 'BEGIN {printf "%.2f\n", k / 1024}')"
  put "$t" hwm_mib "$(awk -v k="$(status_kib "$pid" VmHWM)" 'BEGIN {printf "%.2f\n", k / 1024}')"
}

median_stdin() { sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "n/a";
  else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
med() { if [[ -s $RES/$1.$2 ]]; then median_stdin <"$RES/$1.$2" | fmt_num; else echo n/a; fi; }
fmt_num() { awk '{v = $1; if (v !~ /^-?[0-9.e+-]+$/) print v; else if (v >= 1000 || v == int(v)) printf "%.0f\n", v;
  else if (v >= 10) printf "%.1f\n", v; else if (v >= 1) printf "%.2f\n", v; else printf "%.3f\n", v}'; }
span() { if [[ -s $RES/$1.$2 ]]; then sort -g "$RES/$1.$2" | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%g–%g", lo, hi}'; else echo -; fi; }

# --- in-process render cost --------------------------------------------------------
inproc() {
  local dir=$TMP/render-bench
  mkdir -p "$dir/src"
  cat >"$dir/Cargo.toml" <<EOF
[package]
name = "kcloud-render-bench"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
kcloud-agent = { path = "$ROOT/agent" }

[profile.release]
lto = "thin"
codegen-units = 4

[workspace]
EOF
  cp "$ROOT/Cargo.lock" "$dir/Cargo.lock"
  cat >"$dir/src/main.rs" <<'EOF'
//! Times Metrics::render (what GET /metrics does, minus HTTP) and Collector::collect
//! (the background task's work) for the dgx-a100-mig simulation.
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kcloud_agent::collector::{Collector, SimLayout, SimulatedSource};
use kcloud_agent::config::Preset;
use kcloud_agent::metrics::Metrics;

fn pct(mut v: Vec<Duration>, q: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6
}

fn main() {
    let metrics = Arc::new(Metrics::new());
    let src = SimulatedSource::new(SimLayout::preset(Preset::DgxA100Mig), "bench").expect("preset");
    let mut c = Collector::new(Box::new(src), "bench".into(), Duration::from_secs(5), metrics.clone())
        .expect("collector");
    let mut collect = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        black_box(c.collect());
        collect.push(t.elapsed());
    }
    let mut size = 0;
    for _ in 0..200 {
        let mut s = String::new();
        metrics.render(&mut s);
        size = s.len();
    }
    let mut render = Vec::new();
    for _ in 0..5000 {
        let t = Instant::now();
        // as the handler does: one allocation sized from the last rendering
        let mut s = String::with_capacity(size + 512);
        metrics.render(&mut s);
        black_box(&s);
        render.push(t.elapsed());
    }
    println!("render_bytes={size} render_p50_us={:.1} render_p99_us={:.1} collect_p50_us={:.1} collect_p99_us={:.1}",
        pct(render.clone(), 0.5), pct(render, 0.99), pct(collect.clone(), 0.5), pct(collect, 0.99));
}
EOF
  # Shares the workspace's target dir so that only the two kcloud crates compile.
  if (cd "$dir" && { CARGO_TARGET_DIR=$TARGET_DIR cargo build -q --release --offline 2>/dev/null ||
    CARGO_TARGET_DIR=$TARGET_DIR cargo build -q --release; }); then
    local line kv i
    for ((i = 0; i < 3; i++)); do
      line=$(timeout 60 "$TARGET_DIR/release/kcloud-render-bench")
      for kv in $line; do put agent "inproc_${kv%%=*}" "${kv#*=}"; done
    done
  else
    log "in-process render bench did not build; skipped"
  fi
}

# --- run ---------------------------------------------------------------------------
CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
log "machine: $(nproc) CPUs, ${CPU_MODEL:-unknown CPU}, load $(cut -d' ' -f1-3 /proc/loadavg)"
log "agent: $("$AGENT_BIN" --version)  node-exporter: $("$NE_BIN" --version 2>&1 | head -1)"

if [[ $BENCH_INPROC == 1 ]]; then
  log "in-process render cost (3 × 5000 renders)"
  inproc
fi

for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2)); then order=(agent ne); else order=(ne agent); fi
  log "round $r/$ROUNDS (${order[*]})"
  start_all
  p0=$(psi_cpu_us)
  t0=$(now_s)
  for t in "${order[@]}"; do wrk -t1 -c1 -d1s "$(url_of "$t")" >/dev/null; done # warm-up
  for t in "${order[@]}"; do m_seq_curl "$t"; done
  for t in "${order[@]}"; do m_seq_wrk "$t"; done
  for t in "${order[@]}"; do m_sat "$t"; done
  for t in "${order[@]}"; do m_paced "$t"; done
  m_paced agent "http://127.0.0.1:$AGENT_PORT/healthz" "$CONTROL_SECS" control
  for t in "${order[@]}"; do m_rss "$t"; done
  put all psi_pct "$(psi_pct_since "$p0" "$t0")"
  put all load1 "$(cut -d' ' -f1 /proc/loadavg)"
  stop_all
done

log "idle CPU: both fresh, 2 s of load each, then ${IDLE_SECS} s without requests"
start_all
for t in agent ne; do wrk -t1 -c4 -d2s "$(url_of "$t")" >/dev/null; done
sleep 6
coll0=$(curl -s --max-time 2 "$(url_of agent)" | awk '$1 == "kcloud_collections_total" {print $2}')
a0=$(cpu_ticks "$AGENT_PID")
n0=$(cpu_ticks "$NE_PID")
as0=$(sched_ns "$AGENT_PID")
ns0=$(sched_ns "$NE_PID")
t0=$(now_s)
sleep "$IDLE_SECS"
a1=$(cpu_ticks "$AGENT_PID")
n1=$(cpu_ticks "$NE_PID")
as1=$(sched_ns "$AGENT_PID")
ns1=$(sched_ns "$NE_PID")
t1=$(now_s)
coll1=$(curl -s --max-time 2 "$(url_of agent)" | awk '$1 == "kcloud_collections_total" {print $2}')
idle_pct() { awk -v d="$1" -v hz="$CLK_TCK" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f\n", d / hz / (b - a) * 100}'; }
put agent idle_pct "$(idle_pct $((a1 - a0)))"
put ne idle_pct "$(idle_pct $((n1 - n0)))"
sched_pct() { awk -v d="$1" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f\n", d / 1e9 / (b - a) * 100}'; }
put agent idle_sched_pct "$(sched_pct $((as1 - as0)))"
put ne idle_sched_pct "$(sched_pct $((ns1 - ns0)))"
put agent idle_ticks $((a1 - a0))
put ne idle_ticks $((n1 - n0))
put agent idle_collections $((${coll1:-0} - ${coll0:-0}))
for t in agent ne; do
  put "$t" idle_rss_mib "$(awk -v k="$(status_kib "$(pid_of "$t")" VmRSS)" 'BEGIN {printf "%.2f\n", k / 1024}')"
done
stop_all

# --- report ------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "n/a" || b == "n/a" || b + 0 == 0) print "–"; else printf "%.3g\n", a / b}'; }
row() { # label metric [agent-only]
  local a n
  a=$(med agent "$2")
  if [[ ${3:-} == agent-only ]]; then
    printf '| %s | %s | – | – |\n' "$1" "$a"
  else
    n=$(med ne "$2")
    printf '| %s | %s | %s | %s |\n' "$1" "$a" "$n" "$(ratio "$a" "$n")"
  fi
}

echo
echo "### Results ($ROUNDS rounds, medians; ratio = agent ÷ node-exporter)"
echo
echo "Machine: $(nproc) CPUs, ${CPU_MODEL:-unknown CPU}, $(date -u '+%Y-%m-%d %H:%M UTC'); CPU pressure (PSI some) during the rounds: median $(med all psi_pct) % (rounds: $(span all psi_pct) %), 1-min load at round end: $(span all load1)."
echo
echo "| measurement | kcloud-agent | node-exporter | ratio |"
echo "|---|---:|---:|---:|"
row "response body, bytes" bytes
row "samples per scrape (non-comment lines)" series
row "in-process render (\`Metrics::render\`), p50 µs" inproc_render_p50_us agent-only
row "in-process render, p99 µs" inproc_render_p99_us agent-only
row "in-process collection (\`Collector::collect\`), p50 µs" inproc_collect_p50_us agent-only
row "sequential scrape, curl keep-alive, median ms" curl_ms
row "sequential scrape, wrk -c1, p50 ms" seq_p50_ms
row "sequential scrape, wrk -c1, p99 ms" seq_p99_ms
row "sequential scrapes/s, wrk -c1" seq_rps
row "saturation, wrk -t1 -c4 -d${SAT_SECS}s, req/s" sat_rps
row "saturation p50 ms" sat_p50_ms
row "saturation p99 ms" sat_p99_ms
row "saturation errors (socket + non-2xx)" sat_errors
row "server CPU per scrape at saturation, µs" cpu_us_per_req
row "paced ${PACED_RATE} req/s: achieved req/s" paced_rate
row "paced ${PACED_RATE} req/s: p50 ms" paced_p50_ms
row "paced ${PACED_RATE} req/s: p99 ms" paced_p99_ms
row "paced ${PACED_RATE} req/s: max ms" paced_max_ms
row "paced ${PACED_RATE} req/s: p99 from schedule ms" paced_sched_p99_ms
row "control: paced ${PACED_RATE} req/s to agent /healthz, p99 ms" control_p99_ms agent-only
row "VmRSS after load, MiB" rss_mib
row "VmHWM after load, MiB" hwm_mib
row "idle CPU, % of one core (${IDLE_SECS} s, 1 sample)" idle_pct
row "idle CPU ticks (1/${CLK_TCK} s) in the window" idle_ticks
row "idle CPU from /proc/<pid>/task/*/schedstat (ns), % of one core" idle_sched_pct
row "agent collections in the idle window" idle_collections agent-only
row "VmRSS after idle, MiB" idle_rss_mib
echo
echo "Per-round spread (min–max): agent paced p99 $(span agent paced_p99_ms) ms, node-exporter paced p99 $(span ne paced_p99_ms) ms; agent saturation $(span agent sat_rps) req/s, node-exporter $(span ne sat_rps) req/s; agent /healthz control p99 $(span agent control_p99_ms) ms."
echo
echo "Per round (CPU pressure = % of the wall time some task on the machine waited for a CPU, from /proc/pressure/cpu, during that paced run):"
echo
echo "| round | CPU pressure, round % | agent paced p99 ms | (pressure %) | agent /healthz control p99 ms | (pressure %) | node-exporter paced p99 ms | (pressure %) | agent sat. req/s | node-exporter sat. req/s |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
col() { if [[ -s $RES/$1.$2 ]]; then sed -n "${3}p" "$RES/$1.$2" | fmt_num; else echo -; fi; }
for ((r = 1; r <= ROUNDS; r++)); do
  echo "| $r | $(col all psi_pct $r) | $(col agent paced_p99_ms $r) | $(col agent paced_psi_pct $r) | $(col agent control_p99_ms $r) | $(col agent control_psi_pct $r) | $(col ne paced_p99_ms $r) | $(col ne paced_psi_pct $r) | $(col agent sat_rps $r) | $(col ne sat_rps $r) |"
done
echo
echo "### Targets (kcloud-agent)"
echo
verdict() { # label value limit unit
  awk -v l="$1" -v v="$2" -v m="$3" -v u="$4" 'BEGIN {
    if (v == "n/a") {printf "- %s: not measured\n", l; exit}
    printf "- %s: %s (%s %s, target < %s %s)\n", l, (v + 0 < m + 0) ? "met" : "NOT met", v, u, m, u}'
}
verdict "one scrape renders in well under 1 ms (in-process render p50)" "$(med agent inproc_render_p50_us)" 1000 µs
verdict "one scrape end to end, sequential (wrk -c1 p50)" "$(med agent seq_p50_ms)" 1 ms
verdict "p99 scrape latency at ${PACED_RATE} req/s" "$(med agent paced_p99_ms)" 2 ms
verdict "resident memory (VmHWM after load; 15 MB = 14.31 MiB)" "$(med agent hwm_mib)" 14.31 MiB
verdict "idle CPU at the default 5 s interval" "$(med agent idle_pct)" 0.5 "% of one core"
