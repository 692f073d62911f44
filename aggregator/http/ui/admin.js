// Admin: users, all servers, settings (read-only). The API refuses all of it to
// non-admins; the page is only a view.
import { api, enc, ApiError } from './api.js';
import { h, toast, confirmDialog, field, showError } from './dom.js';
import { serverList } from './servers.js';

export async function adminPage(ctx) {
  const [users, settings, groups] = await Promise.all([api('GET', '/api/v1/users'), api('GET', '/api/v1/settings'), api('GET', '/api/v1/groups')]);
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
    groupsSection(groups, reload),
    h('h3', {}, 'All servers'),
    serverList(ctx, () => true, true),
    h('h3', {}, 'Settings (read-only)'),
    h('h4', {}, 'Default quota'), dl(settings.default_quota),
    h('h4', {}, 'Images'), dl(settings.images),
    h('h4', {}, 'Presets'), dl(settings.presets));
}

// Groups: members, a quota for them together, and what they may use (entitlements as
// lists of names or * patterns; empty: everything of that kind).
function groupsSection(groups, reload) {
  const list = (v) => (v ? v.join(', ') : 'all');
  const rows = groups.map((g) => h('tr', { dataset: { group: g.name } },
    h('td', {}, g.name),
    h('td', {}, g.members.join(', ') || '—'),
    h('td', {}, `GPUs ${g.quota.gpus ?? '∞'} · servers ${g.quota.servers ?? '∞'}${g.quota.gpu_hours_per_month != null ? ` · ${g.quota.gpu_hours_per_month} GPU-h/month` : ''}`),
    h('td', {}, `models: ${list(g.entitlements.models)} · MIG: ${list(g.entitlements.mig_profiles)} · IDEs: ${list(g.entitlements.ide_profiles)}`),
    h('td', {}, h('button', {
      type: 'button', class: 'danger', 'aria-label': `Delete group ${g.name}`,
      onclick: async () => {
        if (!(await confirmDialog(`Delete group ${g.name}? Its members stay.`))) return;
        try { await api('DELETE', `/api/v1/groups/${enc(g.name)}`); reload(); } catch (e) { toast(e.message, 'error'); }
      },
    }, 'Delete'))));
  const input = (name, placeholder) => h('input', { name, placeholder, autocomplete: 'off' });
  const name = input('group', 'lab-a');
  const members = input('members', 'alice, bob');
  const gpus = h('input', { name: 'gpus', type: 'number', min: 0, class: 'narrow' });
  const models = input('models', '*A100* (empty: all)');
  const migs = input('mig_profiles', '1g.10gb, 3g.* (empty: all)');
  const ides = input('ide_profiles', 'jupyterlab (empty: all)');
  const csv = (v) => v.split(',').map((x) => x.trim()).filter(Boolean);
  const opt = (v) => (csv(v).length ? csv(v) : null);
  const form = h('form', { class: 'row', 'aria-label': 'New group' },
    field('Group name', name), field('Members', members), field('GPU quota (together)', gpus),
    field('GPU models', models), field('MIG profiles', migs), field('IDE profiles', ides),
    h('button', { type: 'submit', class: 'primary' }, 'Create group'), h('p', { class: 'form-error', role: 'alert' }));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      await api('POST', '/api/v1/groups', {
        name: name.value.trim(),
        members: csv(members.value),
        quota: gpus.value.trim() === '' ? {} : { gpus: Number(gpus.value) },
        entitlements: { models: opt(models.value), mig_profiles: opt(migs.value), ide_profiles: opt(ides.value) },
      });
      toast(`Group ${name.value} created`);
      reload();
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showError(form, e, () => 'group');
    }
  });
  return h('section', { 'aria-label': 'Groups' },
    h('h3', {}, 'Groups'),
    h('table', { class: 'grid groups' },
      h('thead', {}, h('tr', {}, ['Group', 'Members', 'Quota', 'May use', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No groups: everyone gets the default entitlements.')))),
    form);
}
