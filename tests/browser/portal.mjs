// End-to-end walk through the kcloud portal in headless Chromium (Debian's package,
// driven by playwright-core). Started by aggregator/tests/it/portal.rs against a real
// aggregator (`--simulate dgx-a100-mig`, local provisioner, real JupyterLab).
//
// Environment: KCLOUD_URL, KCLOUD_ADMIN_USER, KCLOUD_ADMIN_PASSWORD, SCREENSHOTS (a
// folder). Exits non-zero, with the reason, on the first failed step.
import { launchChromium } from './chromium.mjs';
import AxeBuilder from '@axe-core/playwright';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const base = process.env.KCLOUD_URL;
const adminUser = process.env.KCLOUD_ADMIN_USER;
const adminPass = process.env.KCLOUD_ADMIN_PASSWORD;
const shots = process.env.SCREENSHOTS || 'portal-screenshots';
const user = 'alice';
const userPass = 'alice-password-1234';
// Generous waits: JupyterLab's first start on a busy 2-core machine is slow. These
// bound a hang; nothing asserts how fast a step is.
const LONG = 180_000;

mkdirSync(shots, { recursive: true });
let step = 0;
let page;
async function shot(name) {
  step += 1;
  const file = join(shots, `${String(step).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`step ${step}: ${name} (${file})`);
  await a11y(name);
}
function check(cond, msg) {
  if (!cond) throw new Error(`check failed: ${msg}`);
}
// Accessibility: axe-core on a page as it is now; serious and critical violations
// are collected and fail the walk at its end (all of them listed, not just the first).
const a11yProblems = [];
async function a11y(name) {
  const { violations } = await new AxeBuilder({ page }).analyze();
  for (const v of violations.filter((x) => x.impact === 'serious' || x.impact === 'critical')) {
    a11yProblems.push(`${name}: ${v.id} (${v.impact}) ${v.help}: ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(' | ')}`);
  }
}

const browser = await launchChromium();
const context = await browser.newContext({ viewport: { width: 1366, height: 800 } });
page = await context.newPage();
const consoleErrors = [];
// Refused requests the walk makes on purpose (wrong password, a user asking for admin
// data) show up as "Failed to load resource"; script errors are what must not happen.
page.on('console', (m) => {
  if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) consoleErrors.push(m.text());
});
page.on('pageerror', (e) => consoleErrors.push(String(e)));

async function signIn(name, password) {
  await page.getByLabel('User name').fill(name);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Sign in' }).click();
}

try {
  // 1. The sign-in page, a wrong password, then the admin.
  const resp = await page.goto(base + '/');
  const csp = resp.headers()['content-security-policy'] || '';
  check(csp.includes("script-src 'self'") && !csp.includes('unsafe-inline'), `strict CSP, got ${csp}`);
  await page.getByRole('heading', { name: 'Sign in to kcloud' }).waitFor();
  await signIn(adminUser, 'not-the-password');
  await page.locator('#signin-error', { hasText: 'Wrong user name or password' }).waitFor();
  await shot('signin-error');
  await signIn(adminUser, adminPass);
  await page.locator('#who', { hasText: `${adminUser} (admin)` }).waitFor();

  // 2. Admin creates a researcher account in the admin page.
  await page.getByRole('link', { name: 'Admin' }).click();
  await page.getByRole('heading', { name: 'Users' }).waitFor();
  const form = page.getByRole('form', { name: 'New user' });
  await form.getByLabel('User name').fill(user);
  await form.getByLabel('Password').fill(userPass);
  await form.getByRole('button', { name: 'Create user' }).click();
  await page.locator(`tr[data-user="${user}"]`).waitFor();
  // The admin page says how servers are isolated (the sandbox in this walk).
  await page.locator('section.isolation[data-mode="sandbox"]', { hasText: 'memory' }).waitFor();
  await shot('admin-users');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByRole('heading', { name: 'Sign in to kcloud' }).waitFor();

  // 3. The researcher signs in and sees the 8 simulated GPUs with their MIG slices.
  await signIn(user, userPass);
  await page.locator('#who', { hasText: user }).waitFor();
  await page.getByRole('link', { name: 'Cluster' }).click();
  await page.locator('.gpu').nth(7).waitFor();
  const gpus = await page.locator('.gpu').count();
  check(gpus === 8, `8 GPUs drawn, saw ${gpus}`);
  const migGpus = await page.locator('.gpu:has(.badge:text("MIG"))').count();
  const migSlices = await page.locator('.dev[data-uuid^="MIG-"]').count();
  check(migGpus === 4 && migSlices === 17, `4 MIG GPUs with 17 slices, saw ${migGpus} and ${migSlices}`);
  check(await page.locator('.dev.free').count() === 21, 'every device free at first');
  // At 1366 pixels every slice shows its whole name (`1g.10gb`, not `g.10g`).
  const cut = await page.evaluate(() => [...document.querySelectorAll('.dev')]
    .filter((e) => e.scrollWidth > e.clientWidth).map((e) => e.querySelector('.dev-name').textContent));
  check(cut.length === 0, `no device label cut, cut: ${cut.join(', ')}`);
  await shot('cluster');

  // 4. A non-admin neither sees nor reaches the admin pages, and the API refuses.
  check(await page.locator('#nav-admin').isHidden(), 'admin link hidden for users');
  await page.goto(base + '/#/admin');
  await page.getByRole('heading', { name: 'Not allowed' }).waitFor();
  const apiStatus = await page.evaluate(async () => (await fetch('/api/v1/users')).status);
  check(apiStatus === 403, `GET /api/v1/users as a user: 403, got ${apiStatus}`);
  const csrfless = await page.evaluate(async () => (await fetch('/api/v1/users/alice/servers', {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{"name":"x"}',
  })).status);
  check(csrfless === 403, `a write without the CSRF header is refused, got ${csrfless}`);
  await shot('admin-denied');

  // 5. Create a server on a chosen MIG slice, picked on the cluster picture.
  await page.getByRole('link', { name: 'New server' }).click();
  const create = page.getByRole('form', { name: 'New server' });
  await create.waitFor();
  await create.getByLabel('Name').fill('Bad Name');
  await create.getByRole('button', { name: 'Create server' }).click();
  await create.locator('.field[data-field="name"] .field-error', { hasText: 'DNS-1123' }).waitFor();
  await create.getByLabel('Name').fill('lab');
  const nameError = await create.locator('.field[data-field="name"] .field-error').textContent();
  check(nameError === '', `no stale message under a corrected name, saw "${nameError}"`);
  const slice = create.locator('.dev.free[data-uuid^="MIG-"]').first();
  await slice.waitFor();
  const uuid = await slice.getAttribute('data-uuid');
  await slice.click();
  await page.locator('#picked', { hasText: 'Picked:' }).waitFor();
  await shot('new-server');
  await create.getByRole('button', { name: 'Create server' }).click();

  // 6. Wait for running: the card shows the phases, then Open.
  const card = page.locator('article.server[data-server="lab"]');
  await card.waitFor();
  await card.locator('.phases').or(card.locator('.status-running')).first().waitFor();
  await shot('server-starting');
  await page.locator('article.server[data-server="lab"][data-status="running"]').waitFor({ timeout: LONG });
  await shot('server-running');

  // 7. Open it: JupyterLab loads through the proxy in a new tab.
  const [lab] = await Promise.all([
    context.waitForEvent('page'),
    card.getByRole('link', { name: 'Open lab' }).click(),
  ]);
  await lab.waitForLoadState('domcontentloaded');
  // On the user's own origin, never the portal's, signed in there by a one-time code.
  const portalUrl = new URL(base);
  const userOrigin = `${portalUrl.protocol}//${user}.localhost:${portalUrl.port}`;
  check(lab.url().startsWith(`${userOrigin}/user/${user}/lab/`), `opened on ${userOrigin}: ${lab.url()}`);
  await lab.locator('#jp-main-dock-panel, .jp-LabShell').first().waitFor({ timeout: LONG });
  await lab.locator('.jp-Launcher, .jp-DirListing').first().waitFor({ timeout: LONG });
  step += 1;
  await lab.screenshot({ path: join(shots, `${String(step).padStart(2, '0')}-jupyterlab.png`) });
  console.log(`step ${step}: jupyterlab`);
  await lab.close();

  // 8. The slice is mine on the cluster picture.
  await page.getByRole('link', { name: 'Cluster' }).click();
  await page.locator(`.dev.mine[data-uuid="${uuid}"]`).waitFor();
  await shot('cluster-mine');

  // 9. Storage: a volume, a file uploaded with progress, listed.
  await page.getByRole('link', { name: 'Storage' }).click();
  const vol = page.getByRole('form', { name: 'New volume' });
  await vol.getByLabel('Volume name').fill('data');
  await vol.getByLabel('Size').fill('1Gi');
  await vol.getByRole('button', { name: 'Create volume' }).click();
  await page.locator('tr[data-volume="data"]').waitFor();
  await page.getByRole('button', { name: 'Browse volume data' }).click();
  await page.getByLabel('Upload files').setInputFiles({
    name: 'hello.txt', mimeType: 'text/plain', buffer: Buffer.from('hello from the portal test\n'),
  });
  await page.locator('#upload').click();
  await page.locator('tr[data-entry="hello.txt"]').waitFor();
  check(!(await page.locator('.browser').innerText()).includes('null'), 'no stray "null" in the file browser');
  await shot('storage-uploaded');

  // 10. A fleet: 30 more nodes (pushed as their agents would) turn the cluster page
  // into a summary and a node list drawn a screenful at a time; a node opens with its
  // GPUs and charts; nodes that stop reporting show up under "stale only".
  const agentToken = process.env.KCLOUD_AGENT_TOKEN;
  for (let i = 0; i < 30; i++) {
    const node = `rack-${String(i).padStart(2, '0')}`;
    const mem = { total_bytes: 85899345920, used_bytes: 1 << 30, free_bytes: 85899345920 - (1 << 30) };
    const r = await page.request.put(`${base}/api/v1/nodes/${node}/inventory`, {
      headers: { Authorization: `Bearer ${agentToken}` },
      data: {
        node, boot_id: 'b', seq: 1, agent_version: '0.1.0', collected_at_ms: Date.now(), simulated: true,
        group: i < 10 ? 'rack-a' : 'rack-b', nvml: { up: true, driver_version: '550.54.15' },
        host: { hostname: node, cpu_count: 64, cpu_utilization_percent: 10, memory_total_bytes: 2 ** 40,
          memory_used_bytes: 2 ** 38, load_average: [1, 1, 1], uptime_seconds: 100 },
        gpus: [0, 1].map((g) => ({ index: g, uuid: `GPU-${node}-${g}`, model: 'NVIDIA H100 80GB HBM3',
          pci_bus_id: `00000000:0${g}:00.0`, memory: mem, utilization_gpu_percent: 40, mig_mode: { current: false, pending: false } })),
      },
    });
    check(r.ok(), `push ${node}: ${r.status()}`);
  }
  // The cluster page is the fleet view now (an open one turns into it by itself).
  await page.getByRole('link', { name: 'Cluster' }).click();
  await page.locator('#fleet-summary', { hasText: '31 nodes' }).waitFor();
  await page.locator('#fleet-summary table.groups', { hasText: 'rack-b' }).waitFor();
  await page.locator('.fleet-row').first().waitFor();
  const drawnRows = await page.locator('.fleet-row').count();
  check(drawnRows > 5 && drawnRows < 31, `only the rows on screen are drawn: ${drawnRows}`);
  await page.locator('select[name=node-model]').selectOption('NVIDIA H100 80GB HBM3');
  await page.locator('#fleet-count', { hasText: '30 of 31 nodes' }).waitFor();
  await page.locator('select[name=node-model]').selectOption('');
  await page.getByPlaceholder('node name contains…').fill('rack-07');
  await page.locator('#fleet-count', { hasText: '1 of 31 nodes' }).waitFor();
  await shot('fleet');
  await page.locator('.fleet-row[data-node="rack-07"]').click();
  await page.locator('.fleet-detail .gpu').nth(1).waitFor();
  check(await page.locator('.fleet-detail .gpu').count() === 2, 'the opened node shows its 2 GPUs');
  check(await page.locator('.fleet-detail figure.chart').count() >= 3, 'charts of the opened node');
  await shot('fleet-node');
  await page.getByRole('button', { name: '← All nodes' }).click();
  await page.getByPlaceholder('node name contains…').fill('');
  await page.locator('select[name=node-stale]').selectOption('stale');
  // The pushed nodes stop reporting (the aggregator expects a push a second here).
  await page.locator('#fleet-count', { hasText: '30 of 31 nodes' }).waitFor({ timeout: 30_000 });
  await shot('fleet-stale');
  // The servers page follows the nodes its servers run on for their charts, and
  // settles on one stream (no reconnect loop).
  const streams = [];
  page.on('request', (r) => { if (r.url().includes('/api/v1/events')) streams.push(r.url()); });
  await page.getByRole('link', { name: 'My servers' }).click();
  await page.locator('article.server[data-server="lab"] figure.chart').first().waitFor();
  await page.waitForTimeout(3000);
  check(streams.length <= 2, `the servers page settles on one stream, opened ${streams.length}`);

  // 11. Delete the server (confirmed) and see the slice free again, on the node opened
  // from the fleet list.
  await page.getByRole('link', { name: 'My servers' }).click();
  await page.locator('article.server[data-server="lab"]').getByRole('button', { name: 'Delete lab' }).click();
  await page.locator('dialog.confirm').getByRole('button', { name: 'Delete' }).click();
  await page.locator('article.server[data-server="lab"]').waitFor({ state: 'detached', timeout: LONG });
  await page.getByRole('link', { name: 'Cluster' }).click();
  const host = (await page.evaluate(async () => (await (await fetch('/api/v1/nodes')).json())))
    .find((n) => !n.name.startsWith('rack-')).name;
  await page.getByPlaceholder('node name contains…').fill(host);
  await page.locator(`.fleet-row[data-node="${host}"]`).click();
  await page.locator(`.dev.free[data-uuid="${uuid}"]`).waitFor();
  await shot('slice-free-again');

  // 12. Waiting and booking. Take the node's four whole GPUs with one server, then ask
  // for one more GPU, willing to wait: the card shows its place in the queue; deleting
  // the first server starts it (a toast says so).
  const newServer = async (name, wait) => {
    await page.locator('#nav').getByRole('link', { name: 'New server' }).click();
    const f = page.getByRole('form', { name: 'New server' });
    await f.waitFor();
    await f.getByLabel('Name').fill(name);
    await f.getByLabel('IDE').selectOption('custom');
    await f.getByLabel('Command').fill('sleep 600');
    await f.getByLabel('How to choose').selectOption('gpus');
    await f.getByLabel('How many GPUs').fill(name === 'hog' ? '4' : '1');
    if (wait) await f.getByLabel('If none is free').selectOption('1h');
    await f.getByRole('button', { name: 'Create server' }).click();
    await page.locator(`article.server[data-server="${name}"]`).waitFor();
  };
  await newServer('hog', false);
  await newServer('waiter', true);
  const waiter = page.locator('article.server[data-server="waiter"][data-status="queued"]');
  await waiter.locator('.queue-place', { hasText: '#1 in line' }).waitFor();
  await shot('queued');
  // Toasts replace one another (the delete's own may come last): collect them all.
  await page.evaluate(() => {
    window.toasts = [];
    const t = document.getElementById('toast');
    new MutationObserver(() => window.toasts.push(t.textContent)).observe(t, { childList: true, characterData: true, subtree: true });
  });
  await page.locator('article.server[data-server="hog"]').getByRole('button', { name: 'Delete hog' }).click();
  await page.locator('dialog.confirm').getByRole('button', { name: 'Delete' }).click();
  await page.locator('article.server[data-server="waiter"]:not([data-status="queued"])').waitFor({ timeout: LONG });
  await page.waitForFunction(() => window.toasts.some((x) => x.includes('waiter left the queue')));
  await shot('dequeued');

  // Book a span by dragging on a GPU's lane of the timeline; it is listed as mine.
  await page.locator('#nav').getByRole('link', { name: 'Reservations' }).click();
  await page.getByLabel('Node').fill(host);
  await page.getByLabel('Node').dispatchEvent('change');
  const lane = page.locator('.timeline .lane[data-uuid^="GPU-"]').first();
  await lane.waitFor();
  const box = await lane.boundingBox();
  await page.mouse.move(box.x + box.width * 0.2, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.3, box.y + box.height / 2, { steps: 4 });
  await page.mouse.up();
  const booked = await page.getByLabel('Devices', { exact: true }).inputValue();
  check(booked === await lane.getAttribute('data-uuid'), `the dragged lane's device is in the form: ${booked}`);
  await page.getByRole('button', { name: 'Book', exact: true }).click();
  await page.locator('.my-reservations li').first().waitFor();
  await page.locator('.timeline .bar.reserved.mine').first().waitFor();
  await shot('reservation');

  // 13. Usage: the hog and the waiter held GPUs this month: the page says how many
  // GPU-hours, with a chart, and the CSV link answers CSV.
  await page.locator('#nav').getByRole('link', { name: 'Usage' }).click();
  await page.locator('.usage-total', { hasText: 'This month' }).waitFor();
  const total = await page.locator('.usage-total').textContent();
  check(!/This month: 0\.00 /.test(total), `some GPU-hours this month: ${total}`);
  check(await page.locator('figure.chart').count() === 1, 'a chart of GPU-hours per day');
  const csv = await page.evaluate(async () => (await fetch(document.querySelector('a[download]').href)).text());
  check(csv.startsWith('key,gpu_hours,recovered'), `CSV from the link: ${csv.slice(0, 40)}`);
  await shot('usage');

  // 14. The admin's Usage page adds the waste report (held against used GPU-hours),
  // with the researcher's row, and its CSV.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await signIn(adminUser, adminPass);
  await page.locator('#who', { hasText: `${adminUser} (admin)` }).waitFor();
  await page.locator('#nav').getByRole('link', { name: 'Usage' }).click();
  const waste = page.locator('table.waste');
  await waste.waitFor();
  check(await waste.locator('tbody th', { hasText: user }).count() === 1, `the researcher's row in the waste report`);
  const wasteCsv = await page.evaluate(async () => (await fetch(document.querySelector('a[download="kcloud-efficiency.csv"]').href)).text());
  check(wasteCsv.startsWith('user,gpu_hours,measured_gpu_hours'), `waste CSV: ${wasteCsv.slice(0, 40)}`);
  await shot('usage-admin');

  // 15. API tokens: one created on the Tokens page is shown once, works as a bearer
  // token, is listed without its secret, and stops working when revoked there.
  await page.locator('#nav').getByRole('link', { name: 'Tokens' }).click();
  await page.getByRole('textbox', { name: 'Name' }).fill('laptop');
  await page.getByRole('checkbox', { name: /^read/ }).check();
  await page.getByRole('button', { name: 'Create token' }).click();
  const secret = (await page.locator('code.secret').textContent()).trim();
  check(secret.startsWith('kct_'), `a token is shown: ${secret.slice(0, 8)}`);
  const withToken = (t) => page.evaluate(async (t) => (await fetch('/api/v1/gpus?limit=1', { credentials: 'omit', headers: { authorization: `Bearer ${t}` } })).status, t);
  check(await withToken(secret) === 200, 'the token reads the API');
  await page.locator('ul.tokens li', { hasText: 'laptop' }).waitFor();
  check(!(await page.locator('ul.tokens').textContent()).includes(secret.slice(-20)), 'listed without its secret');
  await shot('tokens');
  await page.getByRole('button', { name: 'Revoke laptop' }).click();
  await page.locator('dialog.confirm').getByRole('button', { name: 'Revoke' }).click();
  await page.locator('ul.tokens li.muted', { hasText: 'No tokens' }).waitFor();
  check(await withToken(secret) === 401, 'a revoked token is refused at once');

  check(a11yProblems.length === 0, `no serious or critical accessibility violations (axe-core):\n${a11yProblems.join('\n')}`);
  check(consoleErrors.length === 0, `no console errors: ${consoleErrors.join(' | ')}`);
  console.log('PORTAL OK');
} catch (e) {
  try { await shot('failure'); } catch (_) { /* the page may be gone */ }
  console.error(e.stack || String(e));
  if (consoleErrors.length) console.error('console errors:', consoleErrors.join(' | '));
  process.exitCode = 1;
} finally {
  await browser.close();
}
