-- wrk script for scripts/bench-aggregator.sh: agents pushing node inventories.
--
--   wrk -t T -c C -d D -s scripts/bench/push.lua http://127.0.0.1:PORT \
--       -- <agent-token> <nodes> <seq-base> <threads>
--
-- Every request is `PUT /api/v1/nodes/<node>/inventory` with a dgx-a100-mig node's
-- inventory (4 whole A100s + 4 A100s in MIG mode with 17 instances, as the agent's
-- `--simulate dgx-a100-mig` reports them; about 8 KB of JSON). Thread t pushes nodes
-- t, t+T, t+2T, ... of gpu-node-00000 .. gpu-node-<nodes-1> in turn, so each node
-- belongs to one thread and its `seq` (seq-base + that thread's request number) only
-- grows: every push is newer than the stored one and is accepted (`stored: true`),
-- never ignored as older. seq-base must exceed every seq of earlier runs; the script
-- uses 10^9 + run * 10^8 (a run sends far fewer than 10^8 requests per thread; seq
-- stays 10 digits, so Content-Length is fixed per node and the whole request is built
-- once per node: request() only joins three strings).
--
-- done() prints one line for the script:
--   PUSH requests=N duration_us=N errors=N p50_us=N p99_us=N body_bytes=N
-- errors counts socket errors, timeouts and non-2xx responses. There is no response()
-- callback (it would cost the client CPU that the server needs on a small machine):
-- the script checks stored/ignored/rejected from the aggregator's own counter
-- kcloud_inventory_pushes_total on /metrics before and after each run.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local A100 = "NVIDIA A100-SXM4-80GB"
local MIB = 1048576
local MIG_LAYOUT = {
  { "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb" },
  { "3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb" },
  { "4g.40gb", "3g.40gb" },
  { "2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb" },
}
local BUSES = { 0x07, 0x0f, 0x47, 0x4e, 0x87, 0x90, 0xb7, 0xbd }
local PROFILE_MIB = { ["1g.10gb"] = 10240, ["2g.20gb"] = 20480, ["3g.40gb"] = 40960, ["4g.40gb"] = 40960 }

local function gpu_uuid(n, g)
  return string.format("GPU-%08x-5a1e-4b6c-8d2e-%012x", n, g)
end

local function mig_uuid(n, g, s)
  return string.format("MIG-%08x-%04x-4f3a-9c1b-%012x", n, g, s)
end

local function mem(total, used)
  return string.format('{"total_bytes":%d,"used_bytes":%d,"free_bytes":%d}', total, used, total - used)
end

-- The body after `{"seq":<10 digits>`, in the field order serde writes NodeInventory.
local function body_rest(n, name, now_ms)
  local gpus = {}
  for g = 0, 7 do
    local uuid = gpu_uuid(n, g)
    local layout = g >= 4 and MIG_LAYOUT[g - 3] or nil
    local migs = {}
    local used = 0
    if layout then
      for s, p in ipairs(layout) do
        local total = PROFILE_MIB[p] * MIB
        local u = math.floor(total * ((n + g + s) % 9) / 10)
        used = used + u
        migs[#migs + 1] = string.format(
          '{"uuid":"%s","parent_uuid":"%s","index":%d,"profile":"%s","gpu_instance_id":%d,' ..
          '"compute_instance_id":0,"memory":%s}',
          mig_uuid(n, g, s - 1), uuid, s - 1, p, s, mem(total, u))
      end
    else
      used = ((n * 7 + g) % 90) * 819 * MIB
    end
    local load = (n * 13 + g * 7) % 100
    local util = layout and "" or string.format('"utilization_gpu_percent":%d,"utilization_memory_percent":%d,',
      load, math.floor(load * 0.6))
    gpus[#gpus + 1] = string.format(
      '{"index":%d,"uuid":"%s","model":"%s","pci_bus_id":"00000000:%02X:00.0","lost":false,' ..
      '"memory":%s,%s"temperature_celsius":%d,"power_watts":%.1f,"energy_millijoules":%d,' ..
      '"sm_clock_mhz":1410,"memory_clock_mhz":1593,"mig_mode":{"current":%s,"pending":%s},' ..
      '"mig_instances":[%s],"processes":[]}',
      g, uuid, A100, BUSES[g + 1], mem(81920 * MIB, used), util, 30 + math.floor(load * 0.45),
      60 + load * 3.4, 1000000000 + n * 1000 + g, layout and "true" or "false",
      layout and "true" or "false", table.concat(migs, ","))
  end
  return string.format(
    ',"node":"%s","boot_id":"bench-boot-1","agent_version":"0.1.0","collected_at_ms":%d,' ..
    '"simulated":true,"nvml":{"up":true,"driver_version":"550.54.15","cuda_driver_version":12040},' ..
    '"host":{"hostname":"%s","cpu_count":256,"cpu_utilization_percent":12.5,' ..
    '"memory_total_bytes":2199023255552,"memory_used_bytes":274877906944,' ..
    '"load_average":[3.5,3.1,2.9],"uptime_seconds":86400},"gpus":[%s]}',
    name, now_ms, name, table.concat(gpus, ","))
end

function init(args)
  local token, nodes, base, nthreads = args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[4])
  assert(token and nodes and base and nthreads, "args: <agent-token> <nodes> <seq-base> <threads>")
  assert(base >= 1e9 and base + 1e8 < 1e10, "seq-base must be in 1e9 .. 9.9e9 (10-digit seq)")
  seq_base = base
  local host = "Host: " .. wrk.host .. ":" .. wrk.port .. "\r\n"
  local now_ms = os.time() * 1000
  reqs = {}
  for n = id, nodes - 1, nthreads do
    local name = string.format("gpu-node-%05d", n)
    local rest = body_rest(n, name, now_ms)
    local len = #'{"seq":' + 10 + #rest
    reqs[#reqs + 1] = {
      "PUT /api/v1/nodes/" .. name .. "/inventory HTTP/1.1\r\n" .. host ..
      "Authorization: Bearer " .. token .. "\r\nContent-Type: application/json\r\n" ..
      "Content-Length: " .. len .. "\r\n\r\n" .. '{"seq":',
      rest,
    }
  end
  body_bytes = #'{"seq":' + 10 + #reqs[1][2]
  nreqs = #reqs
  i = 0
end

function request()
  local r = reqs[(i % nreqs) + 1]
  local seq = seq_base + i
  i = i + 1
  return r[1] .. string.format("%d", seq) .. r[2]
end

function done(summary, latency, requests)
  local bytes = threads[1]:get("body_bytes")
  local e = summary.errors
  io.write(string.format(
    "PUSH requests=%d duration_us=%d errors=%d p50_us=%d p99_us=%d body_bytes=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), bytes))
end
