// Portal budget measurements in headless Chromium, run by scripts/bench-portal.sh
// against a running aggregator (KCLOUD_URL, admin KCLOUD_ADMIN_USER/PASSWORD,
// KCLOUD_AGENT_TOKEN for pushing simulated nodes).
//
// 1. First load, cold cache: bytes transferred (CDP encodedDataLength, all requests
//    up to the drawn cluster) and time from navigation start until the cluster with
//    its 8 GPUs is drawn and the page answers input (median of RUNS).
// 2. The fleet view with NODES (10,000) nodes x 8 GPUs (4 whole A100s, 4 in MIG mode):
//    time from navigation until the summary and the node list are drawn and the page
//    answers input; then PUSH_SECS of pushes at PUSH_RATE/s (every tenth changes a
//    node's MIG layout, so lines and the summary change too) while the list is
//    scrolled and filtered: frame intervals (requestAnimationFrame), long tasks, and
//    the tab's JS heap after a collection; then opening one node from the list.
import { launchChromium } from './chromium.mjs';

const base = process.env.KCLOUD_URL;
const admin = { username: process.env.KCLOUD_ADMIN_USER, password: process.env.KCLOUD_ADMIN_PASSWORD };
const agentToken = process.env.KCLOUD_AGENT_TOKEN;
const RUNS = Number(process.env.RUNS || 5);
const NODES = Number(process.env.NODES || 10000);
const PUSH_RATE = Number(process.env.PUSH_RATE || 1000);
const PUSH_SECS = Number(process.env.PUSH_SECS || 10);

const browser = await launchChromium();
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
const pct = (a, p) => [...a].sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor(a.length * p))];

// Sign in once (logins are rate-limited) and give each run a fresh context (empty
// cache) with those cookies.
const login = await browser.newContext();
const lr = await login.request.post(`${base}/api/v1/auth/login`, { data: admin });
if (!lr.ok()) throw new Error(`login: ${lr.status()}`);
const storageState = await login.storageState();
await login.close();
async function signedInPage() {
  const context = await browser.newContext({ viewport: { width: 1366, height: 800 }, storageState });
  const page = await context.newPage();
  return { context, page };
}

// 1. First load.
const loads = [];
for (let i = 0; i < RUNS; i++) {
  const { context, page } = await signedInPage();
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  await cdp.send('Network.setCacheDisabled', { cacheDisabled: true });
  let bytes = 0;
  const requests = new Set();
  cdp.on('Network.requestWillBeSent', (e) => requests.add(e.request.url));
  cdp.on('Network.loadingFinished', (e) => { bytes += e.encodedDataLength; });
  // The event stream never finishes loading: its bytes so far are added below.
  await page.goto(`${base}/#/cluster`);
  await page.locator('.gpu').nth(7).waitFor();
  // Interactive: a click on the nav is handled (the handler runs on the main thread).
  const t = await page.evaluate(() => new Promise((resolve) => {
    requestAnimationFrame(() => setTimeout(() => resolve({
      ready: performance.now(),
      dcl: performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd,
    }), 0));
  }));
  const streamBytes = await page.evaluate(() => performance.getEntriesByType('resource')
    .filter((r) => r.name.endsWith('/api/v1/events')).reduce((a, r) => a + r.transferSize, 0));
  loads.push({ bytes: bytes + streamBytes, ms: t.ready, dcl: t.dcl, requests: requests.size });
  await context.close();
}
console.log(`first load (${RUNS} runs, cold cache): median ${median(loads.map((l) => l.ms)).toFixed(0)} ms to the drawn cluster, ` +
  `max ${Math.max(...loads.map((l) => l.ms)).toFixed(0)} ms; DOMContentLoaded median ${median(loads.map((l) => l.dcl)).toFixed(0)} ms; ` +
  `${median(loads.map((l) => l.bytes))} bytes transferred in ${loads[0].requests} requests`);

// The event stream's initial state (one 8-GPU node), which the first load also
// receives but resource timing cannot size while the stream stays open.
async function streamBytes() {
  const access = storageState.cookies.find((c) => c.name.endsWith('kcloud_access')).value;
  // What the portal follows on a small fleet.
  const resp = await fetch(`${base}/api/v1/events?summary=true&rows=true&nodes=*`, { headers: { Authorization: `Bearer ${access}` } });
  const reader = resp.body.getReader();
  let n = 0, text = '';
  while (!text.includes('event: synced')) {
    const { value, done } = await reader.read();
    if (done) break;
    n += value.length;
    text += new TextDecoder().decode(value);
  }
  await reader.cancel();
  return n;
}
const initial = await streamBytes();
console.log(`event stream initial state: ${initial} bytes uncompressed; first load total ${median(loads.map((l) => l.bytes)) + initial} bytes`);

// 2. The fleet view.
function inventory(node, seq, variant) {
  const mem = (used) => ({ total_bytes: 85899345920, used_bytes: used, free_bytes: 85899345920 - used });
  const layouts = [null, null, null, null, Array(7).fill('1g.10gb'), ['3g.40gb', '2g.20gb', '1g.10gb', '1g.10gb'],
    ['4g.40gb', '3g.40gb'], variant ? ['2g.20gb', '2g.20gb', '2g.20gb'] : ['2g.20gb', '2g.20gb', '2g.20gb', '1g.10gb']];
  return JSON.stringify({
    node, boot_id: 'bench', seq, agent_version: '0.1.0', collected_at_ms: Date.now(), simulated: true,
    nvml: { up: true, driver_version: '550.54.15' },
    host: { hostname: node, cpu_count: 128, cpu_utilization_percent: (seq * 7) % 100, memory_total_bytes: 2 ** 40,
      memory_used_bytes: 2 ** 38, load_average: [1, 1, 1], uptime_seconds: 1000 },
    gpus: layouts.map((mig, i) => ({
      index: i, uuid: `GPU-${node}-${i}`, model: 'NVIDIA A100-SXM4-80GB', pci_bus_id: `00000000:${(16 + i).toString(16)}:00.0`,
      memory: mem(((seq + i) % 10) * 2 ** 30), utilization_gpu_percent: mig ? undefined : (seq * 13 + i * 7) % 100,
      temperature_celsius: 30 + ((seq + i) % 40),
      mig_mode: { current: !!mig, pending: !!mig },
      mig_instances: mig ? mig.map((p, j) => ({ uuid: `MIG-${node}-${i}-${j}`, parent_uuid: `GPU-${node}-${i}`, index: j,
        profile: p, gpu_instance_id: j + 1, compute_instance_id: 0 })) : undefined,
    })),
  });
}
const nodeName = (n) => `fleet-${String(n).padStart(5, '0')}`;
const seqs = new Array(NODES).fill(0);
const variants = new Array(NODES).fill(false);
async function push(n, changeLayout) {
  seqs[n] += 1;
  if (changeLayout) variants[n] = !variants[n];
  const node = nodeName(n);
  const r = await fetch(`${base}/api/v1/nodes/${node}/inventory`, {
    method: 'PUT', headers: { Authorization: `Bearer ${agentToken}`, 'Content-Type': 'application/json' },
    body: inventory(node, seqs[n], variants[n]),
  });
  if (!r.ok) throw new Error(`push ${node}: ${r.status}`);
  await r.arrayBuffer();
}
// Loads every node, 32 pushes in flight.
const l0 = Date.now();
let next = 0;
await Promise.all(Array.from({ length: 32 }, async () => { while (next < NODES) await push(next++, false); }));
console.log(`loaded ${NODES} nodes in ${((Date.now() - l0) / 1000).toFixed(1)} s`);

const { context, page } = await signedInPage();
const cdp = await context.newCDPSession(page);
const t0 = Date.now();
await page.goto(`${base}/#/cluster`);
await page.locator('.fleet-row').first().waitFor({ timeout: 60_000 });
await page.waitForFunction((n) => document.querySelector('#fleet-summary')?.textContent.includes(`${n} nodes`), NODES + 1);
await page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0))));
const interactiveMs = Date.now() - t0;
const rowsInDom = await page.locator('.fleet-row').count();

await page.evaluate(() => {
  window.__frames = [];
  window.__long = [];
  let last = performance.now();
  const tick = (now) => { window.__frames.push(now - last); last = now; if (!window.__stop) requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__long.push(e.duration); }).observe({ type: 'longtask' });
});
// Paced pushes: request i is due at start + i/rate; nodes in turn; every tenth push
// changes that node's layout.
const p0 = Date.now();
const total = PUSH_RATE * PUSH_SECS;
let sent = 0, late = 0;
const inflight = new Set();
const pusher = (async () => {
  for (let i = 0; i < total; i++) {
    const due = p0 + (i * 1000) / PUSH_RATE;
    const wait = due - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait)); else if (wait < -100) late++;
    const p = push(i % NODES, i % 10 === 0).finally(() => inflight.delete(p));
    inflight.add(p);
    sent++;
    if (inflight.size >= 64) await Promise.race(inflight);
  }
  await Promise.all(inflight);
})();
// Meanwhile someone scrolls the list and filters it.
const list = page.locator('.fleet-list');
await list.hover();
for (let i = 0; i < 20; i++) { await page.mouse.wheel(0, 900); await page.waitForTimeout(150); }
await page.fill('input[name=node-search]', '0042');
await page.waitForTimeout(500);
await page.fill('input[name=node-search]', '');
await pusher;
const pushSecs = (Date.now() - p0) / 1000;
const perf = await page.evaluate(() => { window.__stop = true; return { frames: window.__frames.slice(1), long: window.__long }; });
await cdp.send('HeapProfiler.collectGarbage');
const { usedSize } = await cdp.send('Runtime.getHeapUsage');
console.log(`fleet view, ${NODES} nodes x 8 GPUs (${rowsInDom} rows in the DOM): interactive ${interactiveMs} ms after navigation; ` +
  `${sent} pushes in ${pushSecs.toFixed(1)} s (${(sent / pushSecs).toFixed(0)}/s, ${late} late by > 100 ms) while scrolling and filtering: ` +
  `frame interval p50 ${pct(perf.frames, 0.5).toFixed(1)} ms, p95 ${pct(perf.frames, 0.95).toFixed(1)} ms, max ${Math.max(...perf.frames).toFixed(1)} ms ` +
  `over ${perf.frames.length} frames; long tasks: ${perf.long.length} (max ${perf.long.length ? Math.max(...perf.long).toFixed(0) : 0} ms); ` +
  `JS heap after GC ${(usedSize / 2 ** 20).toFixed(1)} MiB`);

// Opening one node from the list.
await page.fill('input[name=node-search]', nodeName(1234));
const o0 = Date.now();
await page.locator(`.fleet-row[data-node="${nodeName(1234)}"]`).click();
await page.locator('.fleet-detail .gpu').nth(7).waitFor();
console.log(`opening ${nodeName(1234)} from the list: its 8 GPUs drawn in ${Date.now() - o0} ms`);
await browser.close();
