#!/usr/bin/env python3
"""Open event streams for scripts/bench-fleet.sh, like open portal tabs.

Opens `GET /api/v1/events?<query>` streams on 127.0.0.1 with a bearer token, one
asyncio task each, and counts what arrives. Stream specs (repeatable):
  --streams LABEL:N:QUERY  N streams that read everything as it comes
  --stalled LABEL:N:QUERY  N streams that read the response headers, then nothing
                           (a 4 KiB receive buffer, so the aggregator's side fills up)
QUERY may contain {node}: replaced by a different node name per stream
(gpu-node-00000, gpu-node-00001, ...).

Protocol with the caller (stdout, one line each):
  ready                 every reading stream has received `synced`
  then on SIGUSR1       counters start over (the measured window begins)
  then on SIGTERM       one result line per spec and exit:
    STREAMS label=L kind=reading|stalled n=N bytes_per_s=X events_per_s=Y resets=R
        foreign_nodes=F   (node events naming a node the stream does not follow)
Standard library only; loopback addresses only.
"""

import argparse
import asyncio
import ipaddress
import json
import signal
import socket
import sys
import time


class Counter:
    def __init__(self):
        self.bytes = 0
        self.events = 0
        self.resets = 0
        self.foreign = 0
        self.synced = False


async def run_stream(host, port, token, query, follow, stalled, counter, stop):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if stalled:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    writer.write(
        f"GET /api/v1/events?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise SystemExit(f"stream {query}: {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    if stalled:
        await stop.wait()
        writer.close()
        return
    event = None
    # Chunked transfer encoding: size line, data, CRLF. SSE lines inside.
    pending = b""
    while not stop.is_set():
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.strip() or b"0", 16)
        chunk = await reader.readexactly(size + 2)
        counter.bytes += len(size_line) + len(chunk)
        pending += chunk[:-2]
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"event:"):
                event = line[6:].strip().decode()
                counter.events += 1
                if event == "reset":
                    counter.resets += 1
                elif event == "synced":
                    counter.synced = True
            elif line.startswith(b"data:") and event == "node" and follow is not None:
                name = json.loads(line[5:])["name"]
                if name not in follow:
                    counter.foreign += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--streams", action="append", default=[])
    ap.add_argument("--stalled", action="append", default=[])
    a = ap.parse_args()
    url = a.base.removeprefix("http://")
    host, port = url.split(":")
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit("loopback only")
    token = open(a.token_file).read().strip()

    specs = [(s, False) for s in a.streams] + [(s, True) for s in a.stalled]
    node_no = 0

    async def amain():
        nonlocal node_no
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        started = [time.monotonic()]
        groups = []
        tasks = []
        for spec, stalled in specs:
            label, n, query = spec.split(":", 2)
            counters = []
            for _ in range(int(n)):
                node = f"gpu-node-{node_no:05d}"
                node_no += 1
                q = query.replace("{node}", node)
                follow = None
                if "nodes=" in q:
                    names = q.split("nodes=", 1)[1].split("&", 1)[0]
                    follow = None if names == "*" else set(filter(None, names.split(",")))
                c = Counter()
                counters.append(c)
                tasks.append(asyncio.create_task(
                    run_stream(host, int(port), token, q, follow, stalled, c, stop)))
            groups.append((label, stalled, counters))

        def reset():
            started[0] = time.monotonic()
            for _, _, cs in groups:
                for c in cs:
                    c.bytes = c.events = c.resets = c.foreign = 0

        loop.add_signal_handler(signal.SIGUSR1, reset)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        while not all(c.synced for _, st, cs in groups if not st for c in cs):
            for t in tasks:
                if t.done() and t.exception():
                    raise t.exception()
            await asyncio.sleep(0.05)
        print("ready", flush=True)
        await stop.wait()
        secs = time.monotonic() - started[0]
        for spec, stalled, cs in groups:
            n = len(cs)
            print(f"STREAMS label={spec} kind={'stalled' if stalled else 'reading'} n={n} "
                  f"bytes_per_s={sum(c.bytes for c in cs) / n / secs:.0f} "
                  f"events_per_s={sum(c.events for c in cs) / n / secs:.2f} "
                  f"resets={sum(c.resets for c in cs)} foreign_nodes={sum(c.foreign for c in cs)}",
                  flush=True)
        for t in tasks:
            t.cancel()

    asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
