// The portal shell: session, navigation, and the live store shared by all pages.
import { api, Live, ApiError } from './api.js';
import { h, toast, field } from './dom.js';
import { clusterView, entitledTo } from './cluster.js';
import { newServerPage, serversPage } from './servers.js';

const main = document.getElementById('main');
const ctx = { me: null, live: null };

function signInPage(message) {
  const user = h('input', { name: 'username', autocomplete: 'username', required: true });
  const pass = h('input', { name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const error = h('p', { class: 'form-error', role: 'alert', id: 'signin-error' }, message || '');
  const form = h('form', { class: 'signin', 'aria-label': 'Sign in' },
    h('h2', {}, 'Sign in to kcloud'), field('User name', user), field('Password', pass), error,
    h('button', { type: 'submit', class: 'primary' }, 'Sign in'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    error.textContent = '';
    try {
      await api('POST', '/api/v1/auth/login', { name: user.value.trim(), password: pass.value });
      await start();
    } catch (e) {
      error.textContent = e.status === 401 ? 'Wrong user name or password.' : e.message;
      pass.select();
    }
  });
  // Single sign-on, when configured: a button first; the password form stays for
  // local accounts unless they are off.
  api('GET', '/api/v1/auth/providers').then((p) => {
    if (!p.oidc) return;
    const sso = h('a', { class: 'button primary sso', href: p.oidc.login_url }, `Sign in with ${p.oidc.name}`);
    form.querySelector('h2').after(h('p', {}, sso));
    if (p.local === 'off') for (const el of form.querySelectorAll('.field, button[type=submit]')) el.hidden = true;
  }).catch(() => {});
  return form;
}

// A single sign-on that failed comes back as /?sso_error=...: shown once, then dropped
// from the address bar.
function ssoError() {
  const params = new URLSearchParams(location.search);
  const e = params.get('sso_error');
  if (e) history.replaceState(null, '', location.pathname + location.hash);
  return e ? `Single sign-on failed: ${e}` : '';
}

function showSignIn(message) {
  if (ctx.live) ctx.live.stop();
  ctx.live = null;
  ctx.me = null;
  document.getElementById('nav').hidden = true;
  document.getElementById('signout').hidden = true;
  document.getElementById('who').textContent = '';
  document.getElementById('live').textContent = '';
  const form = signInPage(message);
  main.replaceChildren(form);
  form.querySelector('input').focus();
}

async function start() {
  let me;
  try {
    me = await api('GET', '/api/v1/me');
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) { showSignIn(ssoError()); return; }
    main.replaceChildren(h('p', { class: 'form-error' }, `Cannot reach kcloud: ${e.message}`));
    return;
  }
  ctx.me = me;
  const admin = me.user.role === 'admin';
  document.getElementById('nav').hidden = false;
  document.getElementById('nav-admin').hidden = !admin;
  document.getElementById('signout').hidden = false;
  document.getElementById('who').textContent = `${me.user.name}${admin ? ' (admin)' : ''}`;
  if (ctx.live) ctx.live.stop();
  ctx.live = new Live();
  // A browser notification when one of my queued servers starts (if allowed; asked
  // when a server is queued), and a toast in any case.
  ctx.live.addEventListener('dequeued', (e) => {
    const s = e.detail;
    if (s.owner !== ctx.me.user.name) return;
    const text = `Your server ${s.name} left the queue: ${s.status}.`;
    toast(text);
    if ('Notification' in window && Notification.permission === 'granted') new Notification('kcloud', { body: text });
  });
  ctx.live.start();
  await route();
}

const pages = {
  cluster: () => h('div', {}, h('h2', {}, 'Cluster'), clusterView(ctx.live, { me: ctx.me.user.name, admin: ctx.me.user.role === 'admin', entitled: entitledTo(ctx.me.entitlements) })),
  new: () => newServerPage(ctx),
  servers: () => serversPage(ctx),
  storage: async () => (await import('./storage.js')).storagePage(ctx),
  reservations: async () => (await import('./reservations.js')).reservationsPage(ctx),
  usage: async () => (await import('./usage.js')).usagePage(ctx),
  tokens: async () => (await import('./tokens.js')).tokensPage(ctx),
  admin: async () => {
    if (ctx.me.user.role !== 'admin') {
      return h('div', { class: 'denied' }, h('h2', {}, 'Not allowed'), h('p', {}, 'The admin pages are for administrators.'));
    }
    return (await import('./admin.js')).adminPage(ctx);
  },
};

let routing = 0;
async function route() {
  if (!ctx.me) return;
  const name = (location.hash.replace(/^#\/?/, '').split('/')[0]) || 'cluster';
  const page = pages[name] || pages.cluster;
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.page === name) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  const mine = ++routing;
  try {
    const el = await page();
    if (mine !== routing) return;
    main.replaceChildren(el);
    main.dataset.page = name;
    document.title = `kcloud · ${name}`;
  } catch (e) {
    if (mine !== routing) return;
    main.replaceChildren(h('div', {}, h('h2', {}, 'Error'), h('p', { class: 'form-error', role: 'alert' }, e.message)));
    main.dataset.page = name;
  }
}

window.addEventListener('hashchange', route);
window.addEventListener('kcloud:signedout', () => showSignIn('Your session ended; sign in again.'));
document.getElementById('signout').addEventListener('click', async () => {
  try { await api('POST', '/api/v1/auth/logout', undefined, { retry: false }); } catch (e) { toast(e.message, 'error'); }
  history.replaceState(null, '', '#/cluster');
  showSignIn('Signed out.');
});
start();
