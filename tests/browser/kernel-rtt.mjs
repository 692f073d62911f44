// The kernel websocket round trip as a browser sees it: headless Chromium opens a
// page on each path's origin and, from it, the kernel's websocket, then times
// execute_request `1+1` until both its execute_result and execute_reply arrived (one at
// a time, performance.now()). Run by scripts/bench-proxy.sh (PARTS=browser).
//
// env: TARGETS: JSON [{name, page, ws, cookies?: [{name, value, url}]}]; N timed
// executions after WARMUP per round; ROUNDS rounds alternating the targets.
// Prints one JSON line per target and round: {name, round, ms: [...]}.
import { launchChromium } from './chromium.mjs';

const targets = JSON.parse(process.env.TARGETS);
const N = Number(process.env.N || 100);
const WARMUP = Number(process.env.WARMUP || 5);
const ROUNDS = Number(process.env.ROUNDS || 3);

const browser = await launchChromium();
try {
  for (let round = 1; round <= ROUNDS; round++) {
    for (const t of targets) {
      // The page is an API answer, whose CSP (`default-src 'none'`) would refuse the
      // websocket to a script run in it; the network path is the same without it.
      const context = await browser.newContext({ bypassCSP: true });
      if (t.cookies) await context.addCookies(t.cookies);
      const page = await context.newPage();
      const r = await page.goto(t.page);
      if (!r.ok()) throw new Error(`${t.name}: ${t.page} answered ${r.status()}`);
      const ms = await page.evaluate(async ({ ws, n, warmup }) => {
        const sock = new WebSocket(ws);
        await new Promise((ok, fail) => { sock.onopen = ok; sock.onerror = () => fail(new Error(`websocket ${ws}`)); });
        const session = crypto.randomUUID();
        let waiting = null;
        sock.onmessage = (ev) => {
          const m = JSON.parse(ev.data);
          if (!waiting || m.parent_header?.msg_id !== waiting.id) return;
          if (m.header.msg_type === 'execute_result') waiting.result = true;
          if (m.header.msg_type === 'execute_reply') waiting.reply = true;
          if (waiting.result && waiting.reply) waiting.done();
        };
        const once = () => new Promise((done) => {
          const id = crypto.randomUUID();
          waiting = { id, done };
          sock.send(JSON.stringify({
            header: { msg_id: id, username: 'bench', session, msg_type: 'execute_request', version: '5.3', date: new Date().toISOString() },
            parent_header: {}, metadata: {}, channel: 'shell', buffers: [],
            content: { code: '1+1', silent: false, store_history: false, user_expressions: {}, allow_stdin: false, stop_on_error: true },
          }));
        });
        for (let i = 0; i < warmup; i++) await once();
        const out = [];
        for (let i = 0; i < n; i++) {
          const t0 = performance.now();
          await once();
          out.push(performance.now() - t0);
        }
        sock.close();
        return out;
      }, { ws: t.ws, n: N, warmup: WARMUP });
      console.log(JSON.stringify({ name: t.name, round, ms }));
      await context.close();
    }
  }
} finally {
  await browser.close();
}
