// Single sign-on in headless Chromium: through the provider's real login page into the
// portal, for two users in different groups. Started by aggregator/tests/it/sso.rs
// against the aggregator binary and tests/oidc-provider.
//
// Environment: KCLOUD_URL, CHROMIUM, SCREENSHOTS, SSO_NAME (the button's provider
// name). Users: dana (provider groups vision-lab, kcloud-admins), eli (nlp-lab).
import { launchChromium } from './chromium.mjs';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const base = process.env.KCLOUD_URL;
const shots = process.env.SCREENSHOTS || 'sso-screenshots';
mkdirSync(shots, { recursive: true });
let step = 0;
let page;
async function shot(name) {
  step += 1;
  await page.screenshot({ path: join(shots, `${String(step).padStart(2, '0')}-${name}.png`), fullPage: true });
  console.log(`step ${step}: ${name}`);
}
function check(cond, msg) {
  if (!cond) throw new Error(`check failed: ${msg}`);
}

const browser = await launchChromium();
page = await (await browser.newContext()).newPage();

async function signInWithSso(user, password) {
  await page.goto(base);
  await page.getByRole('link', { name: `Sign in with ${process.env.SSO_NAME}` }).click();
  // The provider's own login page, on its own origin.
  await page.locator('input[name=username]').waitFor();
  check(!page.url().startsWith(base), `at the provider: ${page.url()}`);
  await page.locator('input[name=username]').fill(user);
  await page.locator('input[name=password]').fill(password);
  await page.getByRole('button', { name: 'Login' }).click();
  await page.locator('#who', { hasText: user }).waitFor({ timeout: 30_000 });
  check(page.url().startsWith(base), `back at the portal: ${page.url()}`);
}

try {
  // A wrong password stays at the provider.
  await page.goto(base);
  await page.getByRole('link', { name: `Sign in with ${process.env.SSO_NAME}` }).waitFor();
  await shot('signin-with-sso');

  // dana: an admin through the provider's kcloud-admins group; nothing greyed out.
  await signInWithSso('dana', 'dana-password-1234');
  check((await page.locator('#who').textContent()).includes('dana (admin)'), 'dana is an admin');
  check(await page.locator('#nav-admin').isVisible(), 'the admin link');
  await page.locator('#nav').getByRole('link', { name: 'Cluster' }).click();
  await page.locator('.dev').first().waitFor();
  check(await page.locator('.dev.not-entitled').count() === 0, 'an admin may use everything');
  await shot('dana');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.getByRole('link', { name: `Sign in with ${process.env.SSO_NAME}` }).waitFor();

  // eli: nlp-lab may use 3g.40gb slices only: the others are greyed out.
  await signInWithSso('eli', 'eli-password-12345');
  check(!(await page.locator('#who').textContent()).includes('admin'), 'eli is not an admin');
  await page.locator('#nav').getByRole('link', { name: 'Cluster' }).click();
  await page.locator('.dev').first().waitFor();
  const denied = await page.locator('.dev.not-entitled').count();
  const allowed3g = await page.locator('.dev:not(.not-entitled)', { hasText: '3g.40gb' }).count();
  const denied1g = await page.locator('.dev.not-entitled', { hasText: '1g.10gb' }).count();
  check(denied > 0 && allowed3g > 0 && denied1g > 0, `eli's entitlements: ${denied} greyed, ${allowed3g} 3g.40gb usable, ${denied1g} 1g.10gb greyed`);
  await shot('eli');
  console.log('SSO OK');
} catch (e) {
  console.error(e);
  if (page) await page.screenshot({ path: join(shots, 'failure.png'), fullPage: true }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
