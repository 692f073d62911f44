// Admin: users, all servers, settings (read-only). The API refuses all of it to
// non-admins; the page is only a view.
import { api, enc, ApiError } from './api.js';
import { h, toast, confirmDialog, field, showError } from './dom.js';
import { serverList } from './servers.js';

export async function adminPage(ctx) {
  const [users, settings] = await Promise.all([api('GET', '/api/v1/users'), api('GET', '/api/v1/settings')]);
  const reload = () => window.dispatchEvent(new HashChangeEvent('hashchange'));
  const patch = async (u, body) => {
    try { await api('PATCH', `/api/v1/users/${enc(u.name)}`, body); toast(`Updated ${u.name}`); reload(); } catch (e) { toast(e.message, 'error'); }
  };
  const num = (v) => (v.trim() === '' ? null : Number(v));
  const rows = users.map((u) => {
    const gpus = h('input', { type: 'number', min: 0, value: u.quota?.gpus ?? '', 'aria-label': `GPU quota of ${u.name}`, class: 'narrow' });
    const servers = h('input', { type: 'number', min: 0, value: u.quota?.servers ?? '', 'aria-label': `server quota of ${u.name}`, class: 'narrow' });
    return h('tr', { dataset: { user: u.name } },
      h('td', {}, u.name),
      h('td', {}, h('select', { 'aria-label': `role of ${u.name}`, onchange: (e) => patch(u, { role: e.target.value }) },
        ['user', 'admin'].map((r) => h('option', { value: r, selected: u.role === r }, r)))),
      h('td', {}, h('button', { type: 'button', onclick: () => patch(u, { disabled: !u.disabled }) }, u.disabled ? 'Enable' : 'Disable')),
      h('td', { class: 'row' }, gpus, servers, h('button', {
        type: 'button',
        onclick: () => patch(u, { quota: { ...u.quota, gpus: num(gpus.value), servers: num(servers.value) } }),
      }, 'Set quota')),
      h('td', {}, h('button', {
        type: 'button', class: 'danger', 'aria-label': `Delete user ${u.name}`,
        onclick: async () => {
          if (!(await confirmDialog(`Delete user ${u.name}?`))) return;
          try { await api('DELETE', `/api/v1/users/${enc(u.name)}`); reload(); } catch (e) { toast(e.message, 'error'); }
        },
      }, 'Delete')));
  });
  const name = h('input', { name: 'name', required: true, autocomplete: 'off' });
  const password = h('input', { name: 'password', type: 'password', required: true, autocomplete: 'new-password', minlength: 12 });
  const role = h('select', { name: 'role' }, h('option', { value: 'user' }, 'user'), h('option', { value: 'admin' }, 'admin'));
  const form = h('form', { class: 'row', 'aria-label': 'New user' },
    field('User name', name), field('Password', password, 'at least 12 characters'), field('Role', role),
    h('button', { type: 'submit', class: 'primary' }, 'Create user'), h('p', { class: 'form-error', role: 'alert' }));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      await api('POST', '/api/v1/users', { name: name.value.trim(), password: password.value, role: role.value });
      toast(`User ${name.value} created`);
      reload();
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showError(form, e, (err) => (/password/i.test(err.message) ? 'password' : 'name'));
    }
  });
  const dl = (obj) => h('dl', { class: 'facts' }, Object.entries(obj).flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v ?? 'unlimited'))]));
  const iso = settings.isolation;
  const isolation = h('section', { class: `isolation ${iso.mode === 'none' ? 'warning' : ''}`, 'aria-label': 'Isolation', dataset: { mode: iso.mode } },
    h('h3', {}, 'Isolation'),
    h('p', {}, iso.mode === 'sandbox' ? 'Servers run sandboxed, each as its owner\'s uid, in a cgroup of its own.'
      : iso.mode === 'pods' ? 'Servers run as Kubernetes pods.'
        : 'Servers run UNCONFINED as the aggregator\'s user (--isolation none): any server can read the platform\'s secrets and other users\' files.'),
    iso.enforced.length ? h('ul', {}, iso.enforced.map((e) => h('li', {}, e))) : null,
    iso.notes.length ? h('ul', { class: 'muted' }, iso.notes.map((n) => h('li', {}, n))) : null);
  return h('div', { class: 'admin' },
    h('h2', {}, 'Admin'),
    isolation,
    h('h3', {}, 'Users'),
    h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, ['User', 'Role', 'Account', 'Quota (GPUs, servers)', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows)),
    form,
    h('h3', {}, 'All servers'),
    serverList(ctx, () => true, true),
    h('h3', {}, 'Settings (read-only)'),
    h('h4', {}, 'Default quota'), dl(settings.default_quota),
    h('h4', {}, 'Images'), dl(settings.images),
    h('h4', {}, 'Presets'), dl(settings.presets));
}
