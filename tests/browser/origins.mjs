// A user's server attacks whoever opens it, in headless Chromium. Started by
// aggregator/tests/it/portal.rs against a real aggregator, where `mallory` runs a
// `custom` server `evil` whose page (attack.html) tries the API with the visitor's
// authority: by relative and absolute URLs, with and without credentials, and reads
// document.cookie. The admin opens it (from the admin page, confirmed), then its owner
// (from her servers page). The Rust side then checks that nothing was created.
//
// Environment: KCLOUD_URL, KCLOUD_ADMIN_USER, KCLOUD_ADMIN_PASSWORD,
// KCLOUD_MALLORY_PASSWORD, SCREENSHOTS. Prints one line `RESULT <json>` per visitor and
// `ORIGINS OK`; exits non-zero, with the reason, on the first failed step.
import { launchChromium } from './chromium.mjs';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const base = process.env.KCLOUD_URL;
const shots = process.env.SCREENSHOTS || 'origin-screenshots';
const LONG = 60_000;
const portal = new URL(base);
const malloryOrigin = `${portal.protocol}//mallory.localhost:${portal.port}`;

mkdirSync(shots, { recursive: true });
function check(cond, msg) {
  if (!cond) throw new Error(`check failed: ${msg}`);
}

const browser = await launchChromium();

// Signs `user` in to the portal in a fresh browser; opens the server `evil` from the
// page at `hash` with `open` (a click); returns what the attack page recorded.
async function visit(who, user, password, hash, open) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
  const page = await context.newPage();
  await page.goto(base + '/');
  await page.getByLabel('User name').fill(user);
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#who', { hasText: user }).waitFor();
  await page.goto(`${base}/${hash}`);
  const card = page.locator('article.server[data-owner="mallory"][data-server="evil"][data-status="running"]');
  await card.waitFor({ timeout: LONG });
  const [tab] = await Promise.all([context.waitForEvent('page'), open(page, card)]);
  await tab.waitForFunction(() => document.title === 'attack done', null, { timeout: LONG });
  check(new URL(tab.url()).origin === malloryOrigin, `served on mallory's origin, got ${tab.url()}`);
  await tab.screenshot({ path: join(shots, `${who}-attack-page.png`) });
  const result = JSON.parse(await tab.locator('#out').innerText());
  result.opener = await tab.evaluate(() => window.opener === null ? 'null' : 'present');
  // The portal's cookies stay on the portal's origin.
  const portalCookies = (await context.cookies(base)).map((c) => c.name);
  check(portalCookies.includes('__Host-kcloud_access'), `signed in to the portal: ${portalCookies}`);
  const userCookies = await context.cookies(malloryOrigin);
  result.userOriginCookies = userCookies.map((c) => `${c.name}${c.httpOnly ? ' httponly' : ''}`);
  console.log(`RESULT ${who} ${JSON.stringify(result)}`);
  await context.close();
  return result;
}

function assertHarmless(who, r) {
  check(!r.cookie.includes('kcloud'), `${who}: the page saw a kcloud cookie: ${r.cookie}`);
  for (const [url, how, status] of r.tries) {
    check(typeof status !== 'number' || status < 200 || status >= 300,
      `${who}: ${url} (${how}) succeeded with ${status}`);
  }
  check(!String(r.me).startsWith('200'), `${who}: the page read the API: ${r.me}`);
  check(r.opener === 'null', `${who}: the page reached the portal's window`);
  check(r.userOriginCookies.every((c) => c.endsWith('httponly')), `${who}: ${r.userOriginCookies}`);
}

try {
  // The admin, from the admin page: Open asks first (audited), then the new tab.
  const admin = await visit('admin', process.env.KCLOUD_ADMIN_USER, process.env.KCLOUD_ADMIN_PASSWORD,
    '#/admin', async (page, card) => {
      await card.getByRole('button', { name: 'Open mallory/evil' }).click();
      await page.locator('dialog.confirm').getByRole('button', { name: 'Open as admin' }).click();
    });
  assertHarmless('admin', admin);
  // Its owner, from her servers page (the link through the portal's origin).
  const owner = await visit('owner', 'mallory', process.env.KCLOUD_MALLORY_PASSWORD,
    '#/servers', (_page, card) => card.getByRole('link', { name: 'Open evil' }).click());
  assertHarmless('owner', owner);
  console.log('ORIGINS OK');
} catch (e) {
  console.error(e.stack || String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
}
