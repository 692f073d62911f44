-- wrk script for scripts/bench-aggregator.sh: authenticated GETs, optionally cycling
-- over a list of paths (e.g. every page of a listing, one `cursor=` each).
--
--   wrk -t1 -c4 -d10s -s scripts/bench/get.lua http://127.0.0.1:PORT \
--       -- <access-token> <path-or-@file>
--
-- <path> is requested every time; @file names a file with one path per line, requested
-- in turn (per thread). done() prints one line for the script:
--   GET requests=N duration_us=N errors=N non2xx=N p50_us=N p90_us=N p99_us=N max_us=N bytes=N

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local token, what = args[1], args[2]
  assert(token and what, "args: <access-token> <path-or-@file>")
  local paths = {}
  if what:sub(1, 1) == "@" then
    for line in io.lines(what:sub(2)) do
      if #line > 0 then
        paths[#paths + 1] = line
      end
    end
  else
    paths[1] = what
  end
  assert(#paths > 0, "no paths")
  reqs = {}
  for k, p in ipairs(paths) do
    reqs[k] = wrk.format("GET", p, { ["Authorization"] = "Bearer " .. token })
  end
  n = #reqs
  i = 0
  non2xx = 0
end

function request()
  local r = reqs[(i % n) + 1]
  i = i + 1
  return r
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if non2xx <= 3 then
      io.stderr:write("GET failed: " .. status .. " " .. tostring(body) .. "\n")
    end
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + t:get("non2xx")
  end
  local e = summary.errors
  io.write(string.format(
    "GET requests=%d duration_us=%d errors=%d non2xx=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d bytes=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, bad,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, summary.bytes))
end
