#!/usr/bin/env bash
# Benchmarks the file browser's streaming: one SIZE_MIB (1024) file uploaded to a volume
# and downloaded again through a release kcloud-aggregator on 127.0.0.1, with the
# server's peak RSS (VmHWM in /proc/<pid>/status) before and after each direction, and
# prints a Markdown section. The bytes are checked (sha256 of what came back, and a
# Range request for the last MiB).
#
# Usage: scripts/bench-storage.sh        (about a minute; needs 2×SIZE_MIB of disk in TMPDIR)
#   env: SIZE_MIB=1024 PORT=18941 ROUNDS=3 SKIP_BUILD=1 (measure the binary as built)
# Needs: cargo, curl, python3, sha256sum.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_MIB=${SIZE_MIB:-1024}
PORT=${PORT:-18941}
ROUNDS=${ROUNDS:-3}
for v in SIZE_MIB PORT ROUNDS; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || { echo "bench: $v must be a positive integer" >&2; exit 2; }
done
((SIZE_MIB <= 16384 && ROUNDS <= 10)) || { echo "bench: settings too large" >&2; exit 2; }

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }
command -v curl >/dev/null || die "curl is needed"
command -v python3 >/dev/null || die "python3 is needed"

BIN=target/release/kcloud-aggregator
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  log "building $BIN"
  cargo build --release --quiet -p kcloud-aggregator
fi
[[ -x $BIN ]] || die "$BIN is missing"

TMP=$(mktemp -d)
SERVER_PID=
cleanup() {
  local rc=$?
  if [[ -n $SERVER_PID ]]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
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
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')
cat >"$TMP/kcloud.toml" <<EOF
[storage]
max_volume_bytes = $(((SIZE_MIB + 64) << 20))
default_volume_bytes = $(((SIZE_MIB + 64) << 20))
[default_quota]
storage_bytes = $(((SIZE_MIB + 64) << 20))
EOF
KCLOUD_BOOTSTRAP_ADMIN_PASSWORD=$PASSWORD RUST_LOG=warn \
  "$BIN" --listen "127.0.0.1:$PORT" --data-dir "$TMP/data" --config "$TMP/kcloud.toml" \
  --access-ttl 1h >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for ((i = 0; i < 100; i++)); do
  curl -sf -o /dev/null --max-time 1 "$BASE/readyz" && break
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -5 "$TMP/server.log" >&2; die "aggregator exited"; }
  sleep 0.1
done
TOKEN=$(curl -sf --max-time 30 -H 'content-type: application/json' \
  -d "{\"username\":\"admin\",\"password\":\"$PASSWORD\"}" "$BASE/api/v1/auth/login" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
AUTH=(-H "authorization: Bearer $TOKEN")
curl -sf "${AUTH[@]}" -H 'content-type: application/json' -d '{"name":"bench"}' \
  "$BASE/api/v1/users/admin/volumes" >/dev/null || die "could not create the volume"
FILES=$BASE/api/v1/users/admin/volumes/bench/files

hwm() { awk '/^VmHWM:/ {print int($2 / 1024)}' "/proc/$SERVER_PID/status"; }
rss() { awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$SERVER_PID/status"; }

log "writing a ${SIZE_MIB} MiB source file"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$TMP/src"
WANT=$(sha256sum "$TMP/src" | cut -d' ' -f1)
IDLE_HWM=$(hwm)

up_s=() down_s=() up_hwm=() down_hwm=()
for ((r = 1; r <= ROUNDS; r++)); do
  log "round $r: upload"
  curl -s "${AUTH[@]}" -X DELETE -o /dev/null "$FILES/blob.bin"
  t=$(curl -sf "${AUTH[@]}" -T "$TMP/src" -o /dev/null -w '%{time_total}' "$FILES/blob.bin") ||
    die "upload failed"
  up_s+=("$t") up_hwm+=("$(hwm)")
  log "round $r: download"
  start=$(date +%s.%N)
  got=$(curl -sf "${AUTH[@]}" "$FILES/blob.bin" | sha256sum | cut -d' ' -f1)
  end=$(date +%s.%N)
  [[ $got == "$WANT" ]] || die "downloaded bytes differ"
  down_s+=("$(python3 -c "print(round($end - $start, 3))")") down_hwm+=("$(hwm)")
done
tail_want=$(tail -c 1048576 "$TMP/src" | sha256sum | cut -d' ' -f1)
tail_got=$(curl -sf "${AUTH[@]}" -H "range: bytes=-1048576" "$FILES/blob.bin" | sha256sum | cut -d' ' -f1)
[[ $tail_got == "$tail_want" ]] || die "range request returned the wrong bytes"

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
MB=$((SIZE_MIB))
UP=$(median "${up_s[@]}")
DOWN=$(median "${down_s[@]}")
cat <<EOF

## kcloud-aggregator file browser: streaming ${SIZE_MIB} MiB

Command: \`scripts/bench-storage.sh\` (SIZE_MIB=$SIZE_MIB, ROUNDS=$ROUNDS), release build,
curl on 127.0.0.1, volume on $(df -PT "$TMP" | awk 'NR == 2 {print $2}') ($(nproc) CPUs, $(date -u +%Y-%m-%d)).

| | median time | throughput | server peak RSS (VmHWM) after |
|---|---|---|---|
| idle, after login | | | $IDLE_HWM MiB |
| upload (PUT, temp + fsync + link) | ${UP} s | $(python3 -c "print(round($MB / $UP))") MiB/s | $(printf '%s ' "${up_hwm[@]}")MiB |
| download (GET, sha256 checked) | ${DOWN} s | $(python3 -c "print(round($MB / $DOWN))") MiB/s | $(printf '%s ' "${down_hwm[@]}")MiB |

Peak RSS grew by $(($(hwm) - IDLE_HWM)) MiB over the whole run for a ${SIZE_MIB} MiB file
(current RSS $(rss) MiB): bodies are streamed in chunks, never held whole.
EOF
