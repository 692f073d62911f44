#!/usr/bin/env python3
"""Paced HTTP load for scripts/bench-agent.sh: GET one URL at a fixed rate on one
keep-alive connection and print latency percentiles.

wrk has no rate limit and wrk2 is not packaged by Debian, so this is the fixed-rate
half of the benchmark. Standard library only.

Request i is due at start + i/rate. The client sleeps until then, sends, reads the
whole body and records two latencies:
  - service:   send -> last body byte (what the server and the loopback cost);
  - scheduled: due time -> last body byte (includes any wait behind a slow earlier
               request, so a stall is not hidden by coordinated omission).
A request that falls behind schedule is sent at once; none is skipped.

Only loopback hosts are accepted. The run is bounded: rate*duration requests at
most, and a hard deadline of 2*duration + 5 s.

Output: one line of key=value pairs (times in milliseconds), e.g.
  requests=2000 errors=0 rate=200.0 p50_ms=0.310 p90_ms=... p99_ms=... max_ms=...
  sched_p50_ms=... sched_p99_ms=... late=0 bytes=32881
"""

import argparse
import gc
import http.client
import ipaddress
import sys
import time
import urllib.parse


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n*q/100), at least 1
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


def loopback_only(host):
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"bench_paced.py: refusing non-loopback host {host!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="http://127.0.0.1:PORT/path")
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds")
    ap.add_argument("--warmup", type=int, default=20, help="unrecorded requests first")
    ap.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, s")
    args = ap.parse_args()
    if not (0 < args.rate <= 10000 and 0 < args.duration <= 600):
        sys.exit("bench_paced.py: rate must be in (0, 10000], duration in (0, 600]")

    url = urllib.parse.urlsplit(args.url)
    if url.scheme != "http" or not url.hostname:
        sys.exit("bench_paced.py: need an http:// URL")
    loopback_only(url.hostname)
    port = url.port or 80
    path = url.path or "/"
    if url.query:
        path += "?" + url.query

    def connect():
        c = http.client.HTTPConnection(url.hostname, port, timeout=args.timeout)
        c.connect()
        return c

    def fetch(conn):
        conn.request("GET", path, headers={"Accept": "*/*"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise http.client.HTTPException(f"status {resp.status}")
        return len(body)

    conn = connect()
    nbytes = 0
    for _ in range(max(0, args.warmup)):
        nbytes = fetch(conn)

    total = int(args.rate * args.duration)
    interval = 1.0 / args.rate
    service, sched = [], []
    errors = late = 0
    clock = time.perf_counter
    gc.disable()  # keep the client's own pauses out of the numbers
    start = clock() + 0.01
    deadline = start + 2 * args.duration + 5
    for i in range(total):
        due = start + i * interval
        now = clock()
        if now > deadline:
            break
        if due > now:
            time.sleep(due - now)
        else:
            late += now - due > interval
        sent = clock()
        try:
            nbytes = fetch(conn)
        except (OSError, http.client.HTTPException):
            errors += 1
            try:
                conn.close()
                conn = connect()
            except OSError:
                pass
            continue
        done = clock()
        service.append(done - sent)
        sched.append(done - due)
    elapsed = clock() - start
    gc.enable()
    conn.close()

    service.sort()
    sched.sort()
    ms = lambda s: f"{s * 1000:.3f}"  # noqa: E731
    print(
        f"requests={len(service)} errors={errors} "
        f"rate={len(service) / elapsed:.1f} "
        f"p50_ms={ms(percentile(service, 50))} p90_ms={ms(percentile(service, 90))} "
        f"p99_ms={ms(percentile(service, 99))} max_ms={ms(service[-1] if service else float('nan'))} "
        f"sched_p50_ms={ms(percentile(sched, 50))} sched_p99_ms={ms(percentile(sched, 99))} "
        f"late={late} bytes={nbytes}"
    )
    return 0 if service and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
