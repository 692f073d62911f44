// Personal API tokens: for desktop clients (VS Code, PyCharm, a local Jupyter) that
// connect to my servers or call the API. The secret is shown once, when created.
import { api, enc } from './api.js';
import { h, toast, confirmDialog } from './dom.js';

const SCOPES = [
  ['proxy', 'use my servers through the proxy (Jupyter clients)'],
  ['servers', 'create and delete my servers and reservations (and read)'],
  ['read', 'read the API'],
];

export async function tokensPage(ctx) {
  const me = ctx.me.user.name;
  const list = h('ul', { class: 'tokens' });
  const shown = h('div', { class: 'token-shown', role: 'status' });
  const load = async () => {
    const tokens = await api('GET', `/api/v1/users/${enc(me)}/tokens`);
    list.replaceChildren(...(tokens.length ? tokens.map((t) => h('li', { dataset: { token: t.id } },
      h('strong', {}, t.name), ` · ${t.scopes.join(', ')} · expires ${new Date(t.expires_at_ms).toLocaleDateString()}`,
      t.last_used_ms ? ` · last used ${new Date(t.last_used_ms).toLocaleString()}` : ' · never used', ' ',
      h('button', {
        type: 'button',
        class: 'danger',
        'aria-label': `Revoke ${t.name}`,
        onclick: async () => {
          if (!(await confirmDialog(`Revoke token ${t.name}? Clients using it stop at once.`, 'Revoke'))) return;
          try {
            await api('DELETE', `/api/v1/users/${enc(me)}/tokens/${enc(t.id)}`);
            toast(`Token ${t.name} revoked`);
            await load();
          } catch (e) { toast(e.message, 'error'); }
        },
      }, 'Revoke'))) : [h('li', { class: 'muted' }, 'No tokens.')]));
  };
  const name = h('input', { name: 'name', required: true, maxlength: 64, placeholder: 'laptop VS Code' });
  const expires = h('select', { name: 'expires' }, ['7d', '30d', '90d', '366d'].map((d) => h('option', { value: d, selected: d === '90d' }, d)));
  const boxes = SCOPES.map(([s, what]) => h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'scope', value: s, checked: s === 'proxy' }), ` ${s}: ${what}`));
  const error = h('p', { class: 'form-error', role: 'alert' });
  const form = h('form', {
    class: 'card',
    onsubmit: async (e) => {
      e.preventDefault();
      error.textContent = '';
      const scopes = [...form.querySelectorAll('input[name=scope]:checked')].map((i) => i.value);
      try {
        const t = await api('POST', `/api/v1/users/${enc(me)}/tokens`, { name: name.value, scopes, expires_in: expires.value });
        const code = h('code', { class: 'secret' }, t.token);
        shown.replaceChildren(h('p', {}, `Token ${t.name} (copy it now: it is not shown again):`), code,
          h('p', { class: 'muted' }, `Jupyter clients: ${location.origin}/user/${me}/<server>/ with the token; other clients: Authorization: Bearer <token>.`));
        name.value = '';
        await load();
      } catch (err) { error.textContent = err.message; }
    },
  },
  h('h3', {}, 'New token'),
  h('label', {}, 'Name ', name),
  h('fieldset', {}, h('legend', {}, 'Scopes'), boxes),
  h('label', {}, 'Expires in ', expires),
  error,
  h('button', { type: 'submit', class: 'primary' }, 'Create token'));
  await load();
  return h('div', {}, h('h2', {}, 'API tokens'),
    h('p', {}, 'For desktop clients that connect to your servers or use the API. A token can do only what its scopes say, and never manages tokens or your account.'),
    form, shown, h('h3', {}, 'My tokens'), list);
}
