#!/usr/bin/env bash
# The live fleet view under load (issue 15): inventory ingest with and without open
# event streams, bytes per stream, memory with stalled streams. Prints a Markdown
# section. 127.0.0.1 only.
#
# One aggregator (fresh --data-dir, --agent-heartbeat 1h so no node goes stale), loaded
# with NODES (10,000) simulated dgx-a100-mig nodes (scripts/bench/push.lua, 25 devices
# each), then ROUNDS × two push runs of PUSH_SECS (wrk -t2 -c16, every push stored):
#   none     no stream open;
#   streams  50 streams open (scripts/bench/streams.py), all admins (holders shown):
#            48 as the portal's fleet view opens them (summary, every node's line, the
#            one node looked at: `summary=true&rows=true&nodes=<node>`), 1 summary-only,
#            1 following one node only. Opened and synced before the run.
# Per run: pushes/s (wrk) and aggregator CPU per push (/proc/<pid>/stat); per stream
# kind: bytes/s and events/s received while the pushes ran, and node events naming a
# node the stream does not follow (must be 0).
# Then memory: VmRSS after MEM_SECS of pushes with no stream, and after MEM_SECS of
# pushes with 50 streams of which 10 are stalled (they read nothing all along).
#
# AGGREGATOR_BIN=path runs another build instead of this tree's (to compare with an
# older commit: the old stream ignores the query and sends everything).
#
# Usage: scripts/bench-fleet.sh      (about 6 minutes on 2 cores)
#   env: ROUNDS=3 PORT=18941 NODES=10000 PUSH_SECS=8 MEM_SECS=60 STREAMS=50 STALLED=10
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
PORT=${PORT:-18941}
NODES=${NODES:-10000}
PUSH_SECS=${PUSH_SECS:-8}
MEM_SECS=${MEM_SECS:-60}
STREAMS=${STREAMS:-50}
STALLED=${STALLED:-10}
for v in ROUNDS PORT NODES PUSH_SECS MEM_SECS STREAMS STALLED; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "bench: $v must be a positive integer" >&2; exit 2; }
done
((ROUNDS <= 20 && NODES <= 50000 && PUSH_SECS <= 60 && MEM_SECS <= 300 && STREAMS >= 3 &&
  STREAMS <= 500 && STALLED < STREAMS)) || { echo "bench: settings out of range" >&2; exit 2; }

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

need_apt=()
for t in wrk curl python3; do command -v $t >/dev/null || need_apt+=($t); done
if ((${#need_apt[@]})); then
  log "installing: ${need_apt[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
CLK_TCK=$(getconf CLK_TCK)

if [[ -n ${AGGREGATOR_BIN:-} ]]; then
  BIN=$AGGREGATOR_BIN
else
  log "cargo build --release -p kcloud-aggregator"
  cargo build --release -q -p kcloud-aggregator --bins
  BIN=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/kcloud-aggregator
fi
[[ -x $BIN ]] || die "no $BIN"

TMP=$(mktemp -d /tmp/kcloud-fleetbench.XXXXXX)
RES=$TMP/results
mkdir -p "$RES"
SERVER_PID=
STREAMS_PID=
cleanup() {
  local rc=$?
  [[ -n $STREAMS_PID ]] && kill -TERM "$STREAMS_PID" 2>/dev/null
  [[ -n $SERVER_PID ]] && { kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; }
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
python3 scripts/bench/aggregator.py login --base "$BASE" --password-env KCLOUD_BENCH_PASSWORD >"$TMP/access.token"

put() { echo "$2" >>"$RES/$1"; }
kv() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k {print $2}'; }
cpu_ticks() { sed 's/^.*) //' "/proc/$SERVER_PID/stat" | awk '{print $12 + $13}'; }
rss_mib() { awk '$1 == "VmRSS:" {printf "%.1f\n", $2 / 1024}' "/proc/$SERVER_PID/status"; }
med() { if [[ -s $RES/$1 ]]; then sort -g "$RES/$1" | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2];
  else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; else echo n/a; fi; }
span() { if [[ -s $RES/$1 ]]; then sort -g "$RES/$1" | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%g–%g", lo, hi}'; else echo -; fi; }
fmt() { awk -v v="$1" -v d="${2:-1}" 'BEGIN {if (v == "n/a") print v; else printf "%.*f\n", d, v}'; }

SEQ_ROUND=0
pushes_stored() {
  curl -s --max-time 5 "$BASE/metrics" | awk '$1 == "kcloud_inventory_pushes_total{result=\"stored\"}" {print $2}'
}
# One wrk run of pushes, every one newer than the stored snapshot. Call it outside a
# $(...) subshell: the sequence base it moves on must outlive it. -> $PUSH_LINE
push_run() { # seconds
  local s0 s1 n
  SEQ_ROUND=$((SEQ_ROUND + 1))
  s0=$(pushes_stored)
  PUSH_LINE=$(timeout $(($1 + 60)) wrk -t2 -c16 -d"$1s" --timeout 5s -s scripts/bench/push.lua "$BASE" \
    -- "$AGENT_TOKEN" "$NODES" $((1000000000 + SEQ_ROUND * 10000000)) 2 2>"$TMP/push.err" | grep '^PUSH ') ||
    { cat "$TMP/push.err" >&2; die "wrk failed"; }
  s1=$(pushes_stored)
  [[ $(kv errors "$PUSH_LINE") == 0 ]] || die "push errors: $PUSH_LINE"
  n=$(kv requests "$PUSH_LINE")
  # wrk counts completed responses; /metrics may count a few more (in flight at the end).
  (($(printf '%.0f' "$s1") - $(printf '%.0f' "$s0") >= n)) || die "only $((s1 - s0)) of $n pushes stored"
}
measured_push() { # label seconds
  local c0 c1 n rate
  c0=$(cpu_ticks)
  push_run "$2"
  c1=$(cpu_ticks)
  n=$(kv requests "$PUSH_LINE")
  rate=$(awk -v n="$n" -v d="$(kv duration_us "$PUSH_LINE")" 'BEGIN {print n / d * 1e6}')
  put "$1.rps" "$rate"
  put "$1.cpu_us" "$(awk -v d=$((c1 - c0)) -v n="$n" -v hz="$CLK_TCK" 'BEGIN {printf "%.1f\n", d / hz * 1e6 / n}')"
  log "  $1: $(fmt "$rate" 0) pushes/s, all stored"
}
open_streams() { # stalled-count -> starts streams.py, waits for ready
  local fleet=$((STREAMS - 2 - $1)) args=()
  args+=(--streams "fleet:$fleet:summary=true&rows=true&nodes={node}")
  args+=(--streams "summary:1:summary=true&nodes=")
  args+=(--streams "one-node:1:nodes={node}")
  (($1 > 0)) && args+=(--stalled "stalled:$1:summary=true&rows=true&nodes={node}")
  # Not the last round's "ready": the shell truncates the file only once the child runs.
  rm -f "$TMP/streams.out"
  python3 scripts/bench/streams.py --base "$BASE" --token-file "$TMP/access.token" "${args[@]}" \
    >"$TMP/streams.out" 2>"$TMP/streams.err" &
  STREAMS_PID=$!
  for ((i = 0; i < 1200; i++)); do
    grep -q '^ready' "$TMP/streams.out" && return 0
    kill -0 "$STREAMS_PID" 2>/dev/null || { cat "$TMP/streams.err" >&2; die "streams.py exited"; }
    sleep 0.1
  done
  die "streams not synced after 120 s"
}
close_streams() { # -> STREAMS lines in $TMP/streams.out
  kill -TERM "$STREAMS_PID"
  wait "$STREAMS_PID" || { cat "$TMP/streams.err" >&2; die "streams.py failed"; }
  STREAMS_PID=
}

CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
log "machine: $(nproc) CPUs, ${CPU_MODEL:-unknown CPU}; aggregator $BIN"
log "load: $NODES nodes"
push_run 3
push_run 3
FRESH=$(curl -s --max-time 5 "$BASE/metrics" | awk '$1 == "kcloud_nodes{state=\"fresh\"}" {print $2}')
[[ $FRESH == "$NODES" ]] || die "fresh nodes: $FRESH, expected $NODES"
log "loaded: VmRSS $(rss_mib) MiB"

for ((r = 1; r <= ROUNDS; r++)); do
  log "round $r"
  measured_push none "$PUSH_SECS"
  open_streams 0
  kill -USR1 "$STREAMS_PID"
  measured_push streams "$PUSH_SECS"
  close_streams
  while read -r line; do
    label=$(kv label "$line")
    put "$label.bps" "$(kv bytes_per_s "$line")"
    put "$label.eps" "$(kv events_per_s "$line")"
    put "$label.foreign" "$(kv foreign_nodes "$line")"
  done < <(grep '^STREAMS ' "$TMP/streams.out")
done

log "memory: ${MEM_SECS}s of pushes with no stream, then with $STREAMS streams ($STALLED stalled)"
push_run "$MEM_SECS"
RSS_NONE=$(rss_mib)
open_streams "$STALLED"
push_run "$MEM_SECS"
RSS_STALLED=$(rss_mib)
close_streams
sleep 2
RSS_AFTER=$(rss_mib)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "n/a" || b == "n/a" || b == 0) print "n/a"; else printf "%.2f\n", a / b}'; }
R0=$(med none.rps) R1=$(med streams.rps) C0=$(med none.cpu_us) C1=$(med streams.cpu_us)
CAP=$(ratio "$R1" "$R0")
CPUR=$(ratio "$C1" "$C0")
SUMMARY_BPS=$(med summary.bps)
verdict() { if awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN {exit !(v != "n/a" && ((op == ">=" && v >= t) || (op == "<=" && v <= t)))}'; then echo met; else echo "NOT met"; fi; }
DMEM=$(awk -v a="$RSS_STALLED" -v b="$RSS_NONE" 'BEGIN {printf "%.1f\n", a - b}')
FOREIGN=$(cat "$RES"/one-node.foreign "$RES"/fleet.foreign 2>/dev/null | awk '{s += $1} END {print s + 0}')

cat <<EOF
### Live fleet view at $NODES nodes ($(date -u +%Y-%m-%d), $(nproc) CPUs, ${CPU_MODEL:-unknown CPU})

\`scripts/bench-fleet.sh\` (ROUNDS=$ROUNDS, PUSH_SECS=$PUSH_SECS, MEM_SECS=$MEM_SECS, STREAMS=$STREAMS, STALLED=$STALLED); medians over rounds, range in brackets.

| | no stream | $STREAMS streams | ratio | target | |
|---|---|---|---|---|---|
| pushes/s | $(fmt "$R0" 0) [$(span none.rps)] | $(fmt "$R1" 0) [$(span streams.rps)] | $CAP | ≥ 0.80 | $(verdict "$CAP" ">=" 0.80) |
| aggregator CPU per push (µs) | $(fmt "$C0") [$(span none.cpu_us)] | $(fmt "$C1") [$(span streams.cpu_us)] | $CPUR | ≤ 1.25 | $(verdict "$CPUR" "<=" 1.25) |

| stream (while pushes ran at $(fmt "$R1" 0)/s) | bytes/s per stream | events/s | node events of unfollowed nodes |
|---|---|---|---|
| fleet view (summary, lines, one node) | $(fmt "$(med fleet.bps)" 0) [$(span fleet.bps)] | $(fmt "$(med fleet.eps)" 2) | $(cat "$RES/fleet.foreign" | awk '{s += $1} END {print s + 0}') |
| summary only | $(fmt "$SUMMARY_BPS" 0) [$(span summary.bps)] | $(fmt "$(med summary.eps)" 2) | – |
| one node only | $(fmt "$(med one-node.bps)" 0) [$(span one-node.bps)] | $(fmt "$(med one-node.eps)" 2) | $(cat "$RES/one-node.foreign" | awk '{s += $1} END {print s + 0}') |

Summary stream ≤ 20 KB/s: $(verdict "$SUMMARY_BPS" "<=" 20000). One-node and fleet streams got no other node's events: $([[ $FOREIGN == 0 ]] && echo met || echo "NOT met ($FOREIGN)").

Memory (VmRSS): $RSS_NONE MiB after ${MEM_SECS}s of pushes with no stream; $RSS_STALLED MiB after ${MEM_SECS}s with $STREAMS streams of which $STALLED stalled (Δ $DMEM MiB, target ≤ 50 MB: $(verdict "$DMEM" "<=" 47.7)); $RSS_AFTER MiB 2 s after they closed.
EOF
