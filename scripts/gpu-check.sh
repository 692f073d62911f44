#!/usr/bin/env bash
# Device check: kcloud against a real NVIDIA driver, read-only.
# Usage: copy target/release/kcloud-agent, a kcloud-aggregator build and the
# `cargo test -p kcloud-agent --test gpu --no-run` binary (as gpu-test) into devbin/
# (ignored), then on the GPU machine: OUT=<dir> bash scripts/gpu-check.sh
cd "$(dirname "$0")/../devbin"
exec > >(tee "$OUT/run.log") 2>&1
set -x
uname -a; cat /etc/os-release | head -2
nvidia-smi; nvidia-smi -L
nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,memory.total,mig.mode.current,driver_version --format=csv
command -v curl python3
ldconfig -p | grep -i nvidia-ml
./gpu-test --ignored --test-threads=1 --nocapture > "$OUT/gpu-test.txt" 2>&1; echo "gpu-test rc=$?"
tail -5 "$OUT/gpu-test.txt"
./kcloud-agent --listen 127.0.0.1:9400 --interval 1s > "$OUT/agent.log" 2>&1 &
AGENT=$!
sleep 5
python3 - <<'PY'
import http.client, json, os, time, statistics
out = os.environ["OUT"]
c = http.client.HTTPConnection("127.0.0.1", 9400)
def get(p):
    c.request("GET", p); r = c.getresponse(); return r.status, r.read()
s, b = get("/inventory"); open(f"{out}/inventory.json", "wb").write(b); print("inventory", s, len(b))
inv = json.loads(b); print("nvml", inv["nvml"], "gpus", [(g["uuid"], g["model"], g.get("mig_mode"), len(g["mig_instances"])) for g in inv["gpus"]])
s, b = get("/metrics"); open(f"{out}/metrics.txt", "wb").write(b); print("metrics", s, len(b))
for name in ["kcloud_nvml_up", "kcloud_collection_duration", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "kcloud_mig_utilization_ratio"]:
    print([l for l in b.decode().splitlines() if l.startswith(name)][:3])
for rnd in range(3):
    t = []
    for i in range(500):
        t0 = time.perf_counter(); get("/metrics"); t.append((time.perf_counter() - t0) * 1000)
    t.sort(); print(f"round {rnd}: scrape ms median {statistics.median(t):.3f} p99 {t[int(len(t)*0.99)]:.3f}")
PY
grep -E "VmRSS|VmHWM" /proc/$AGENT/status
# collection cost on the real driver: CPU seconds over 30 s at 1 s interval
T0=$(awk '{print $14+$15}' /proc/$AGENT/stat); sleep 30; T1=$(awk '{print $14+$15}' /proc/$AGENT/stat)
echo "agent CPU ticks over 30 s at 1 s interval: $((T1-T0)) (100 ticks = 1 CPU-second)"
curl -s 127.0.0.1:9400/metrics | grep -E "^kcloud_collection_duration" | head -5
kill -TERM $AGENT; wait $AGENT; echo "agent exit $?"
tail -5 "$OUT/agent.log"
mkdir -p /tmp/kc
KCLOUD_BOOTSTRAP_ADMIN_PASSWORD=device-check-password-1 ./kcloud-aggregator --listen 127.0.0.1:8080 --data-dir /tmp/kc/data > "$OUT/aggregator.log" 2>&1 &
AGG=$!
sleep 6
python3 - <<'PY'
import json, os, urllib.request
out = os.environ["OUT"]
def req(p, body=None, tok=None):
    r = urllib.request.Request("http://127.0.0.1:8080" + p, data=json.dumps(body).encode() if body else None, headers={"content-type": "application/json", **({"authorization": "Bearer " + tok} if tok else {})})
    return json.loads(urllib.request.urlopen(r).read())
tok = req("/api/v1/auth/login", {"username": "admin", "password": "device-check-password-1"})["access_token"]
nodes = req("/api/v1/nodes", tok=tok); gpus = req("/api/v1/gpus", tok=tok)
json.dump({"nodes": nodes, "gpus": gpus}, open(f"{out}/aggregator-view.json", "w"), indent=1)
print("nodes", [(n["name"], n["simulated"], n["nvml_up"], n["driver_version"], n["devices_total"]) for n in nodes])
print("gpus", [(g["uuid"], g["kind"], g["model"], g["available"]) for g in gpus["items"]])
PY
kill -TERM $AGG; wait $AGG; echo "aggregator exit $?"
head -20 "$OUT/aggregator.log"
