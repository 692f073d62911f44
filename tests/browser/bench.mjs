// Portal budget measurements in headless Chromium, run by scripts/bench-portal.sh
// against a running aggregator (KCLOUD_URL, admin KCLOUD_ADMIN_USER/PASSWORD,
// KCLOUD_AGENT_TOKEN for pushing simulated nodes).
//
// 1. First load, cold cache: bytes transferred (CDP encodedDataLength, all requests
//    up to the drawn cluster) and time from navigation start until the cluster with
//    its 8 GPUs is drawn and the page answers input (median of RUNS).
// 2. 100 nodes x 8 GPUs: time to draw them, then ROUNDS rounds of 100 pushes with new
//    readings while the page applies the streamed updates: frame intervals
//    (requestAnimationFrame) and long tasks (> 50 ms) during the updates.
import { chromium } from 'playwright-core';

const base = process.env.KCLOUD_URL;
const admin = { username: process.env.KCLOUD_ADMIN_USER, password: process.env.KCLOUD_ADMIN_PASSWORD };
const agentToken = process.env.KCLOUD_AGENT_TOKEN;
const RUNS = Number(process.env.RUNS || 5);
const ROUNDS = Number(process.env.ROUNDS || 10);
const NODES = 100;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});
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
  const access = storageState.cookies.find((c) => c.name === 'kcloud_access').value;
  const resp = await fetch(`${base}/api/v1/events`, { headers: { Authorization: `Bearer ${access}` } });
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

// 2. 100 nodes x 8 GPUs.
function inventory(node, seq) {
  const mem = (used) => ({ total_bytes: 85899345920, used_bytes: used, free_bytes: 85899345920 - used });
  const layouts = [null, null, null, null, Array(7).fill('1g.10gb'), ['3g.40gb', '2g.20gb', '1g.10gb', '1g.10gb'],
    ['4g.40gb', '3g.40gb'], ['2g.20gb', '2g.20gb', '2g.20gb', '1g.10gb']];
  return {
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
  };
}
async function pushAll(seq) {
  await Promise.all(Array.from({ length: NODES }, (_, n) => {
    const node = `bench-${String(n).padStart(3, '0')}`;
    return fetch(`${base}/api/v1/nodes/${node}/inventory`, {
      method: 'PUT', headers: { Authorization: `Bearer ${agentToken}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(inventory(node, seq)),
    }).then((r) => { if (!r.ok) throw new Error(`push ${node}: ${r.status}`); });
  }));
}
await pushAll(1);
const { page } = await signedInPage();
const t0 = Date.now();
await page.goto(`${base}/#/cluster`);
await page.locator('section.node').nth(NODES).waitFor(); // 100 pushed + the simulated host
const drawMs = Date.now() - t0;
const gpus = await page.locator('.gpu').count();
await page.evaluate(() => {
  window.__frames = [];
  window.__long = [];
  let last = performance.now();
  const tick = (now) => { window.__frames.push(now - last); last = now; if (!window.__stop) requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__long.push(e.duration); }).observe({ type: 'longtask' });
});
const u0 = Date.now();
for (let r = 2; r < 2 + ROUNDS; r++) await pushAll(r);
// Wait until the page shows the last round's readings.
await page.waitForFunction((seq) => {
  const cpu = (seq * 7) % 100;
  return document.querySelector('section.node[data-node="bench-099"] .node-head')?.textContent.includes(`${cpu}%`);
}, 1 + ROUNDS, { timeout: 60_000 });
const updMs = Date.now() - u0;
const perf = await page.evaluate(() => { window.__stop = true; return { frames: window.__frames.slice(1), long: window.__long }; });
console.log(`${NODES} nodes x 8 GPUs (${gpus} GPUs drawn): first draw ${drawMs} ms; ${ROUNDS} rounds of ${NODES} pushes applied in ${updMs} ms; ` +
  `frame interval p50 ${pct(perf.frames, 0.5).toFixed(1)} ms, p95 ${pct(perf.frames, 0.95).toFixed(1)} ms, max ${Math.max(...perf.frames).toFixed(1)} ms ` +
  `over ${perf.frames.length} frames; long tasks: ${perf.long.length} (max ${perf.long.length ? Math.max(...perf.long).toFixed(0) : 0} ms)`);
await browser.close();
