// Volumes and the file browser (volumes and shares), against the storage API.
import { api, upload, enc, encPath, ApiError } from './api.js';
import { h, bytes, toast, confirmDialog, field, showError } from './dom.js';

export async function storagePage(ctx) {
  const user = ctx.me.user.name;
  const root = h('div', { class: 'storage' }, h('h2', {}, 'Storage'));
  let volumes, shares;
  try {
    [volumes, shares] = await Promise.all([
      api('GET', `/api/v1/users/${enc(user)}/volumes`),
      api('GET', '/api/v1/shares'),
    ]);
  } catch (e) {
    root.append(h('p', { class: 'muted' }, `Storage is not available: ${e.message}`));
    return root;
  }
  const browser = h('div', { class: 'browser' });
  const reload = () => { location.hash = '#/storage'; window.dispatchEvent(new HashChangeEvent('hashchange')); };

  const name = h('input', { name: 'name', required: true, placeholder: 'e.g. data', autocomplete: 'off' });
  const size = h('input', { name: 'size', required: true, value: '10Gi' });
  const form = h('form', { class: 'row', 'aria-label': 'New volume' },
    field('Volume name', name), field('Size', size),
    h('button', { type: 'submit', class: 'primary' }, 'Create volume'),
    h('p', { class: 'form-error', role: 'alert' }));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      await api('POST', `/api/v1/users/${enc(user)}/volumes`, { name: name.value.trim(), size: size.value.trim() });
      toast(`Volume ${name.value} created`);
      reload();
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      showError(form, e, (err) => (/size|quota/i.test(err.message) ? 'size' : 'name'));
    }
  });

  const volRows = volumes.map((v) => h('tr', { dataset: { volume: v.name } },
    h('td', {}, h('button', { type: 'button', class: 'link', 'aria-label': `Browse volume ${v.name}`, onclick: () => browse(browser, `/api/v1/users/${enc(user)}/volumes/${enc(v.name)}/files`, `volume ${v.name}`, false, '') }, v.name)),
    h('td', {}, bytes(v.size_bytes)),
    h('td', {}, v.used_bytes !== undefined ? bytes(v.used_bytes) : '–'),
    h('td', {}, v.status),
    h('td', {}, (v.mounted_by || []).join(', ') || '–'),
    h('td', {}, h('button', {
      type: 'button', class: 'danger', 'aria-label': `Delete volume ${v.name}`,
      onclick: async () => {
        if (!(await confirmDialog(`Delete volume ${v.name} and all its files?`))) return;
        try { await api('DELETE', `/api/v1/users/${enc(user)}/volumes/${enc(v.name)}`); reload(); } catch (e) { toast(e.message, 'error'); }
      },
    }, 'Delete'))));
  root.append(
    h('h3', {}, 'Volumes'),
    h('table', { class: 'grid' },
      h('thead', {}, h('tr', {}, ['Name', 'Size', 'Used', 'Status', 'Mounted by', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, volRows.length ? volRows : h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No volumes yet.')))),
    form,
    h('h3', {}, 'Shares'),
    shares.length
      ? h('ul', { class: 'shares' }, shares.map((s) => h('li', {},
        h('button', { type: 'button', class: 'link', onclick: () => browse(browser, `/api/v1/shares/${enc(s.name)}/files`, `share ${s.name}`, s.read_only, '') }, s.name),
        s.read_only ? ' (read-only)' : '', s.description ? ` — ${s.description}` : '')))
      : h('p', { class: 'muted' }, 'No shares.'),
    browser);
  return root;
}

// The file browser for one volume or share at `path`.
async function browse(box, base, title, readOnly, path) {
  const url = (p) => `${base}/${encPath(p)}`;
  let listing;
  try {
    listing = await api('GET', `${url(path)}`);
  } catch (e) { toast(e.message, 'error'); return; }
  const crumbs = [h('button', { type: 'button', class: 'link', onclick: () => browse(box, base, title, readOnly, '') }, title)];
  const parts = path.split('/').filter(Boolean);
  parts.forEach((p, i) => {
    const to = parts.slice(0, i + 1).join('/');
    crumbs.push(' / ', h('button', { type: 'button', class: 'link', onclick: () => browse(box, base, title, readOnly, to) }, p));
  });
  const join = (n) => (path ? `${path}/${n}` : n);
  const again = () => browse(box, base, title, readOnly, path);
  const rows = listing.entries.map((e) => h('tr', { dataset: { entry: e.name, type: e.type } },
    h('td', {}, e.type === 'dir'
      ? h('button', { type: 'button', class: 'link', onclick: () => browse(box, base, title, readOnly, join(e.name)) }, `${e.name}/`)
      : h('a', { href: `${url(join(e.name))}?download=true`, download: e.name }, e.name)),
    h('td', {}, e.type === 'dir' ? '–' : bytes(e.size)),
    h('td', {}, e.modified_ms ? new Date(e.modified_ms).toLocaleString() : '–'),
    h('td', { class: 'row' }, readOnly ? null : [
      h('button', {
        type: 'button', 'aria-label': `Rename ${e.name}`,
        onclick: async () => {
          const to = prompt(`Rename ${e.name} to (path inside this volume):`, join(e.name));
          if (!to) return;
          try { await api('POST', url(join(e.name)), { op: 'rename', to }); again(); } catch (err) { toast(err.message, 'error'); }
        },
      }, 'Rename'),
      h('button', {
        type: 'button', class: 'danger', 'aria-label': `Delete ${e.name}`,
        onclick: async () => {
          if (!(await confirmDialog(`Delete ${join(e.name)}${e.type === 'dir' ? ' and everything in it' : ''}?`))) return;
          try { await api('DELETE', `${url(join(e.name))}${e.type === 'dir' ? '?recursive=true' : ''}`); again(); } catch (err) { toast(err.message, 'error'); }
        },
      }, 'Delete')])));
  const fileInput = h('input', { type: 'file', name: 'file', multiple: true });
  const bar = h('progress', { max: 1, value: 0, hidden: true, 'aria-label': 'upload progress' });
  const dirName = h('input', { name: 'dir', placeholder: 'new folder' });
  const tools = readOnly ? h('p', { class: 'muted' }, 'Read-only share.') : h('div', { class: 'row tools' },
    field('Upload files', fileInput),
    h('button', {
      type: 'button', class: 'primary', id: 'upload',
      onclick: async () => {
        bar.hidden = false;
        try {
          for (const f of fileInput.files) {
            await upload(url(join(f.name)), f, (p) => { bar.value = p; });
            toast(`Uploaded ${f.name}`);
          }
          again();
        } catch (e) { toast(e.message, 'error'); bar.hidden = true; }
      },
    }, 'Upload'), bar,
    field('Folder name', dirName),
    h('button', {
      type: 'button',
      onclick: async () => {
        if (!dirName.value.trim()) return;
        try { await api('POST', url(join(dirName.value.trim())), { op: 'mkdir' }); again(); } catch (e) { toast(e.message, 'error'); }
      },
    }, 'New folder'));
  // replaceChildren would print a null as "null": wrap in a div, which h() cleans.
  box.replaceChildren(h('div', {},
    h('h3', {}, 'Files'),
    h('nav', { class: 'crumbs', 'aria-label': 'folder' }, crumbs),
    tools,
    h('table', { class: 'grid files' },
      h('thead', {}, h('tr', {}, ['Name', 'Size', 'Modified', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 4, class: 'muted' }, 'Empty folder.')))),
    listing.next_offset ? h('p', { class: 'muted' }, `Showing ${listing.entries.length} of ${listing.total}.`) : null));
}
