#!/usr/bin/env python3
"""Helpers for scripts/bench-aggregator.sh (standard library only, loopback only).

  login   --base URL --user U --password-env VAR       print an access token
  summary --base URL --token-file F                    print "total=N free=N rows=N"
  walk    --base URL --token-file F --query Q --rounds N [--expect N] [--paths-out F]
          Pages through GET /api/v1/gpus?<Q> following next_cursor, on one keep-alive
          connection, like a client would. Round 0 is a check (untimed): every page is
          parsed in full, every device must appear exactly once, and the device count
          must equal --expect; it also writes the path of every page to --paths-out
          (for wrk). Rounds 1..N are timed: wall time from the first request to the last
          byte of the last page; the client only finds "next_cursor" in the tail of the
          body (no full JSON parse) so that the figure is the server's and loopback's,
          not Python's. Prints one line per round and a final line:
          "WALK pages=N devices=N wall_ms=<median> min_ms max_ms server_ms_per_page=..."
Every loop is bounded (page count, rounds, socket timeouts).
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import time
import urllib.parse

MAX_PAGES = 10_000


def conn_for(base):
    u = urllib.parse.urlsplit(base)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("bench: loopback URLs only")
    return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)


def request(conn, method, path, token=None, body=None):
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"bench: {method} {path}: HTTP {r.status}: {data[:300]!r}")
    return data


def cmd_login(a):
    pw = os.environ.get(a.password_env)
    if not pw:
        sys.exit(f"bench: ${a.password_env} is empty")
    c = conn_for(a.base)
    body = json.dumps({"username": a.user, "password": pw})
    print(json.loads(request(c, "POST", "/api/v1/auth/login", body=body))["access_token"])


def token_of(a):
    with open(a.token_file) as f:
        return f.read().strip()


def cmd_summary(a):
    c = conn_for(a.base)
    rows = json.loads(request(c, "GET", "/api/v1/gpus/summary", token_of(a)))
    print(f"total={sum(r['total'] for r in rows)} free={sum(r['free'] for r in rows)} rows={len(rows)}")


def next_cursor_of(data):
    """The cursor from the tail of a page body: Page serializes next_cursor last."""
    tail = data[-200:]
    k = tail.rfind(b'"next_cursor":"')
    if k < 0:
        return None
    start = k + len(b'"next_cursor":"')
    return tail[start:tail.index(b'"', start)].decode()


def page_path(query, cursor):
    p = "/api/v1/gpus?" + query
    return p if cursor is None else p + "&cursor=" + urllib.parse.quote(cursor)


def cmd_walk(a):
    token = token_of(a)
    c = conn_for(a.base)
    # Round 0: check, untimed.
    seen, paths, cursor = set(), [], None
    for _ in range(MAX_PAGES):
        path = page_path(a.query, cursor)
        paths.append(path)
        page = json.loads(request(c, "GET", path, token))
        for d in page["items"]:
            if d["uuid"] in seen:
                sys.exit(f"bench: device {d['uuid']} listed twice while paging")
            seen.add(d["uuid"])
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    else:
        sys.exit("bench: paging did not end")
    if a.expect is not None and len(seen) != a.expect:
        sys.exit(f"bench: walked {len(seen)} devices, expected {a.expect}")
    if a.paths_out:
        with open(a.paths_out, "w") as f:
            f.write("\n".join(paths) + "\n")
    pages = len(paths)
    walls, per_page = [], []
    for r in range(a.rounds):
        cursor, n, lat = None, 0, []
        t0 = time.perf_counter()
        for _ in range(MAX_PAGES):
            t1 = time.perf_counter()
            data = request(c, "GET", page_path(a.query, cursor), token)
            lat.append(time.perf_counter() - t1)
            n += 1
            cursor = next_cursor_of(data)
            if cursor is None:
                break
        wall = time.perf_counter() - t0
        if n != pages:
            sys.exit(f"bench: round {r + 1} walked {n} pages, the check walked {pages}")
        walls.append(wall * 1000)
        per_page.append(statistics.median(lat) * 1000)
        print(f"walk round={r + 1} pages={n} wall_ms={wall * 1000:.1f} "
              f"page_p50_ms={per_page[-1]:.3f}", file=sys.stderr)
    print(f"WALK pages={pages} devices={len(seen)} wall_ms={statistics.median(walls):.1f} "
          f"min_ms={min(walls):.1f} max_ms={max(walls):.1f} "
          f"page_p50_ms={statistics.median(per_page):.3f}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("login")
    s.add_argument("--base", required=True)
    s.add_argument("--user", default="admin")
    s.add_argument("--password-env", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--base", required=True)
    s.add_argument("--token-file", required=True)
    s = sub.add_parser("walk")
    s.add_argument("--base", required=True)
    s.add_argument("--token-file", required=True)
    s.add_argument("--query", required=True)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--expect", type=int)
    s.add_argument("--paths-out")
    a = p.parse_args()
    if getattr(a, "rounds", 1) not in range(1, 51):
        sys.exit("bench: --rounds must be 1..50")
    {"login": cmd_login, "summary": cmd_summary, "walk": cmd_walk}[a.cmd](a)


if __name__ == "__main__":
    main()
