// New server form and the server lists (mine; everyone's for admins).
import { api, enc, ApiError } from './api.js';
import { h, bytes, age, toast, confirmDialog, field, showError, chart } from './dom.js';
import { clusterView, entitledTo } from './cluster.js';

// Which form control an API error concerns, from its message.
function fieldFor(err) {
  const m = err.message || '';
  if (/^server name|already in use/.test(m)) return 'name';
  if (/^preset/.test(m)) return 'preset';
  if (/^cpu|CPU quota/.test(m)) return 'cpu';
  if (/^memory|memory quota/.test(m)) return 'memory';
  if (/image/.test(m)) return 'image';
  if (/^command|^args/.test(m)) return 'command';
  if (/^env/.test(m)) return 'command';
  if (/volume|share|mount/.test(m)) return 'volumes';
  if (/device|gpu_request|MIG|GPU/.test(m)) return 'devices';
  return null;
}

function words(s) {
  return s.trim() ? s.trim().split(/\s+/) : [];
}

export async function newServerPage(ctx) {
  const { live, me } = ctx;
  const [settings, mine, storage, booked] = await Promise.all([
    api('GET', '/api/v1/settings'),
    api('GET', '/api/v1/me'),
    loadMountables(me.user.name),
    api('GET', '/api/v1/reservations').catch(() => []),
  ]);
  // "free until 14:00": the next window on a device that is not mine.
  const freeUntil = (uuid) => {
    const next = booked.filter((r) => !r.mine && r.devices.includes(uuid)).sort((a, b) => a.start_ms - b.start_ms)[0];
    return next ? ` (free until ${new Date(next.start_ms).toLocaleString([], { weekday: 'short', hour: '2-digit', minute: '2-digit' })})` : '';
  };
  const picked = new Set();
  const form = h('form', { class: 'new-server', novalidate: true, 'aria-label': 'New server' });
  const name = h('input', { name: 'name', required: true, pattern: '[a-z0-9]([a-z0-9-]*[a-z0-9])?', maxlength: 63, autocomplete: 'off', placeholder: 'e.g. lab-1' });
  // IDE profiles from the settings, JupyterLab (the default) first.
  const ides = settings.profiles || { jupyterlab: { description: 'JupyterLab' } };
  const profile = h('select', { name: 'profile' }, Object.entries(ides)
    .sort((a, b) => (b[0] === 'jupyterlab') - (a[0] === 'jupyterlab') || a[0].localeCompare(b[0]))
    .map(([k, p]) => h('option', { value: k }, p.user_command ? `${k} — your own command` : (p.description || k))));
  const preset = h('select', { name: 'preset' },
    Object.entries(settings.presets).sort((a, b) => a[1].cpu_millis - b[1].cpu_millis || a[1].memory_bytes - b[1].memory_bytes).map(([k, p]) => h('option', { value: k }, `${k} — ${p.description || `${p.cpu_millis / 1000} CPUs, ${bytes(p.memory_bytes)}`}`)),
    h('option', { value: '' }, 'Custom CPU and memory'));
  const cpu = h('input', { name: 'cpu', placeholder: 'e.g. 2 or 500m', disabled: true });
  const memory = h('input', { name: 'memory', placeholder: 'e.g. 8Gi', disabled: true });
  preset.addEventListener('change', () => { cpu.disabled = memory.disabled = preset.value !== ''; });

  const devMode = h('select', { name: 'devmode' },
    h('option', { value: 'pick' }, 'Pick on the cluster picture'),
    h('option', { value: 'gpus' }, 'Any N whole GPUs'),
    h('option', { value: 'mig' }, 'Any one MIG instance of a profile'),
    h('option', { value: 'none' }, 'No GPU'));
  const count = h('input', { name: 'count', type: 'number', min: 1, max: 64, value: 1 });
  const models = () => live.models();
  const profiles = () => live.profiles();
  const model = h('select', { name: 'model' }, h('option', { value: '' }, 'any model'), models().map((m) => h('option', { value: m }, m)));
  const migProfile = h('select', { name: 'mig_profile' }, profiles().map((p) => h('option', { value: p }, p)));
  const pickedText = h('p', { class: 'picked-list', id: 'picked', 'aria-live': 'polite' }, 'Nothing picked: click free GPUs or MIG slices below.');
  const devicesField = h('input', { name: 'devices', type: 'hidden' });
  // What each picked device is, kept at pick time: on a large fleet its node may no
  // longer be followed when the list is written.
  const pickedLabel = new Map();
  const picker = clusterView(live, {
    me: me.user.name,
    admin: me.user.role === 'admin',
    entitled: entitledTo(mine.entitlements),
    picked,
    onPick: (d) => {
      if (picked.has(d.uuid)) picked.delete(d.uuid); else picked.add(d.uuid);
      pickedLabel.set(d.uuid, `${d.node} GPU ${d.index}${d.profile ? ` ${d.profile}` : ''}${freeUntil(d.uuid)}`);
      pickedText.textContent = picked.size
        ? `Picked: ${[...picked].map((u) => pickedLabel.get(u) || u).join(', ')}`
        : 'Nothing picked: click free GPUs or MIG slices below.';
      picker.refresh();
    },
  });
  const pickBox = h('div', { class: 'pick-box' }, pickedText, picker);
  const gpusBox = h('div', { class: 'row', hidden: true }, field('How many GPUs', count), field('Model', model));
  // When nothing fitting is free: fail at once, or wait in the fair queue.
  const wait = h('select', { name: 'wait' },
    h('option', { value: '' }, 'Tell me at once'),
    h('option', { value: '1h' }, 'Wait up to 1 hour'),
    h('option', { value: '4h' }, 'Wait up to 4 hours'),
    h('option', { value: '1d' }, 'Wait up to 1 day'));
  const migBox = h('div', { class: 'row', hidden: true }, field('MIG profile', migProfile), field('Model', model.cloneNode(true)));
  migBox.querySelector('select[name=model]').name = 'mig_model';
  devMode.addEventListener('change', () => {
    pickBox.hidden = devMode.value !== 'pick';
    gpusBox.hidden = devMode.value !== 'gpus';
    migBox.hidden = devMode.value !== 'mig';
  });

  const images = settings.images;
  const exact = (images.allowed || []).filter((p) => !p.includes('*'));
  const custom = (images.allowed || []).some((p) => p.includes('*'));
  const image = h('select', { name: 'image' },
    images.default ? h('option', { value: images.default }, `${images.default} (default)`) : h('option', { value: '' }, 'default'),
    exact.filter((i) => i !== images.default).map((i) => h('option', { value: i }, i)),
    custom ? h('option', { value: '__custom' }, 'Other image…') : null);
  const customImage = h('input', { name: 'custom_image', hidden: true, placeholder: (images.allowed || []).join(', ') });
  image.addEventListener('change', () => { customImage.hidden = image.value !== '__custom'; });
  const command = h('input', { name: 'command', placeholder: 'program and arguments (custom profile)', disabled: true });
  const args = h('input', { name: 'args', placeholder: 'extra arguments, space-separated' });
  profile.addEventListener('change', () => {
    const p = ides[profile.value] || {};
    command.disabled = !p.user_command;
    command.value = p.command && p.command.length ? p.command.join(' ') : '';
  });

  const volumes = h('fieldset', { class: 'volumes', name: 'volumes' }, h('legend', {}, 'Volumes and shares to mount'),
    storage.available
      ? [...storage.volumes.map((v) => h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'vol', value: `volume:${v.name}` }), ` volume ${v.name} (${bytes(v.size_bytes)})`)),
        ...storage.shares.map((s) => h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'vol', value: `share:${s.name}` }), ` share ${s.name}${s.read_only ? ' (read-only)' : ''}`))]
      : h('span', { class: 'muted' }, 'Storage is not available on this aggregator.'));
  if (storage.available && !storage.volumes.length && !storage.shares.length) volumes.append(h('span', { class: 'muted' }, 'No volumes yet (create one under Storage).'));

  const q = mine.effective_quota;
  const mineNow = [...live.servers.values()].filter((s) => s.owner === me.user.name);
  const quota = h('p', { class: 'quota', id: 'quota' },
    `Quota: servers ${mineNow.length} of ${q.servers ?? '∞'} · devices ${mine.devices_held} of ${q.gpus ?? '∞'} · CPU ${q.cpu_millis ? q.cpu_millis / 1000 : '∞'} · memory ${q.memory_bytes ? bytes(q.memory_bytes) : '∞'}`);
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Create server');
  form.append(
    h('div', { class: 'row' }, field('Name', name, 'lowercase letters, digits and -'), field('IDE', profile)),
    h('div', { class: 'row' }, field('Size', preset), field('CPU', cpu), field('Memory', memory)),
    h('div', { class: 'row' }, field('Image', image), field('Custom image', customImage)),
    h('div', { class: 'row' }, field('Command', command), field('Arguments', args)),
    volumes,
    h('fieldset', { class: 'devices' }, h('legend', {}, 'GPUs'), h('div', { class: 'row' }, field('How to choose', devMode), field('If none is free', wait)), devicesField, gpusBox, migBox, pickBox),
    quota,
    h('p', { class: 'form-error', role: 'alert' }),
    h('div', { class: 'row' }, submit));
  form.querySelector('input[name=devices]').id = 'devices-field';
  form.querySelector('.devices').prepend(h('span', { class: 'field-error', id: 'devices-field-err', role: 'alert' }));

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = { name: name.value.trim() };
    if (preset.value) body.preset = preset.value;
    else { body.cpu = cpu.value.trim(); body.memory = memory.value.trim(); }
    if (devMode.value === 'pick' && picked.size) body.devices = [...picked];
    if (devMode.value === 'gpus') body.gpu_request = { count: Number(count.value), model: model.value || undefined };
    if (devMode.value === 'mig') body.gpu_request = { mig_profile: migProfile.value, model: migBox.querySelector('select').value || undefined };
    const img = image.value === '__custom' ? customImage.value.trim() : image.value;
    if (img && img !== images.default) body.image = img;
    body.profile = profile.value;
    if ((ides[profile.value] || {}).user_command) body.command = words(command.value);
    if (args.value.trim()) body.args = words(args.value);
    const vols = [...form.querySelectorAll('input[name=vol]:checked')].map((c) => {
      const [kind, n] = c.value.split(':');
      return kind === 'volume' ? { volume: n } : { share: n };
    });
    if (vols.length) body.volumes = vols;
    if (wait.value && (body.devices || body.gpu_request)) body.wait = { max: wait.value };
    submit.disabled = true;
    try {
      const s = await api('POST', `/api/v1/users/${enc(me.user.name)}/servers`, body);
      if (s.status === 'queued') {
        toast(`Server ${s.name} is queued (#${s.queue_position ?? '?'}); it starts when its GPUs free up`);
        if ('Notification' in window && Notification.permission === 'default') Notification.requestPermission();
      } else {
        toast(`Server ${s.name} created`);
      }
      location.hash = '#/servers';
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      showError(form, err, fieldFor);
    } finally {
      submit.disabled = false;
    }
  });
  return h('div', {}, h('h2', {}, 'New server'), form);
}

async function loadMountables(user) {
  try {
    const [volumes, shares] = await Promise.all([
      api('GET', `/api/v1/users/${enc(user)}/volumes`),
      api('GET', '/api/v1/shares'),
    ]);
    return { available: true, volumes, shares };
  } catch (_) {
    return { available: false, volumes: [], shares: [] };
  }
}

// The phases a starting server goes through, derived from its status and events.
const PHASES = ['scheduled', 'pulling image', 'starting', 'ready'];
function phaseIndex(s) {
  if (s.status === 'running') return 4;
  if (s.status !== 'pending') return -1;
  const r = (s.reason || '').toLowerCase();
  if (r.includes('pull')) return 1;
  if (r.includes('schedul')) return 0;
  return 2;
}

function progress(s) {
  const at = phaseIndex(s);
  if (at < 0) return null;
  return h('ol', { class: 'phases', 'aria-label': 'progress' },
    PHASES.map((p, i) => h('li', { class: i < at ? 'done' : i === at ? 'now' : '' }, p)));
}

// Open: a server is served on its owner's origin, never the portal's. The owner's link
// goes through the portal, which sends the browser there with a one-time code. An
// admin opening someone else's server confirms first (audited): the API hands out the
// one-time link only for that.
function openControl(s, ctx) {
  if (s.status !== 'running') return h('span', { class: 'button disabled', 'aria-disabled': 'true' }, 'Open');
  if (s.owner === ctx.me.user.name) {
    return h('a', { class: 'button primary', href: s.url, target: '_blank', rel: 'noopener noreferrer', 'aria-label': `Open ${s.name}` }, 'Open');
  }
  const open = async () => {
    const ok = await confirmDialog(
      `Open ${s.owner}/${s.name} as an admin? You will act inside another user's server; this is recorded in the audit log.`,
      'Open as admin');
    if (!ok) return;
    try {
      const { url } = await api('POST', `/api/v1/users/${enc(s.owner)}/servers/${enc(s.name)}/open`, { as_admin: true });
      window.open(url, '_blank', 'noopener,noreferrer');
    } catch (e) { toast(e.message, 'error'); }
  };
  return h('button', { type: 'button', class: 'primary', onclick: open, 'aria-label': `Open ${s.owner}/${s.name}` }, 'Open');
}

function serverCard(s, ctx, showOwner) {
  const logs = h('pre', { class: 'logs', hidden: true, tabindex: 0 });
  const events = h('ol', { class: 'events', hidden: true });
  const toggleLogs = async () => {
    logs.hidden = !logs.hidden;
    if (!logs.hidden) logs.textContent = await api('GET', `/api/v1/users/${enc(s.owner)}/servers/${enc(s.name)}/logs?tail=200`).catch((e) => e.message);
  };
  const toggleEvents = async () => {
    events.hidden = !events.hidden;
    if (!events.hidden) {
      const list = await api('GET', `/api/v1/users/${enc(s.owner)}/servers/${enc(s.name)}/events`).catch(() => []);
      events.replaceChildren(...list.map((e) => h('li', {}, `${new Date(e.at_ms).toLocaleTimeString()} ${e.kind}: ${e.message}`)));
    }
  };
  const del = async () => {
    if (!(await confirmDialog(`Delete server ${s.owner}/${s.name}? Its devices go back to the pool.`))) return;
    try {
      await api('DELETE', `/api/v1/users/${enc(s.owner)}/servers/${enc(s.name)}`);
      toast(`Server ${s.name} deleted`);
    } catch (e) { toast(e.message, 'error'); }
  };
  // The answer to an idle-GPU warning: the server stays; the idle window starts over.
  const keep = async () => {
    try {
      await api('POST', `/api/v1/users/${enc(s.owner)}/servers/${enc(s.name)}/keep`);
      toast(`Server ${s.name} kept`);
    } catch (e) { toast(e.message, 'error'); }
  };
  const devs = s.devices.map((u) => {
    const d = ctx.live.device(u);
    return d ? `${d.node} GPU ${d.index}${d.profile ? ` ${d.profile}` : ''}` : u;
  });
  const charts = h('div', { class: 'charts server-charts', hidden: !s.devices.length });
  return h('article', { class: `server ${s.status}`, dataset: { server: s.name, owner: s.owner, status: s.status } },
    h('header', { class: 'server-head' },
      h('h3', {}, showOwner ? `${s.owner}/${s.name}` : s.name),
      h('span', { class: `badge status-${s.status}` }, s.status),
      s.reason ? h('span', { class: 'muted' }, s.reason) : null),
    progress(s),
    s.status === 'queued' ? h('p', { class: 'queue-place', role: 'status' },
      `Queued: #${s.queue_position ?? '?'} in line · expected start ${s.estimated_start_ms ? new Date(s.estimated_start_ms).toLocaleString() : 'unknown'} · waits until ${new Date(s.wait_until_ms).toLocaleString()}`) : null,
    s.ends_at_ms ? h('p', { class: 'ends-at warning', role: 'status' },
      `Will be stopped at ${new Date(s.ends_at_ms).toLocaleString()}: ${s.ends_because}. Volumes are kept.`,
      s.ends_reason === 'gpu_idle' && s.owner === ctx.me.user.name
        ? [' ', h('button', { type: 'button', class: 'keep', onclick: keep, 'aria-label': `Keep ${s.name}` }, 'Keep')]
        : null) : null,
    h('dl', { class: 'facts' },
      h('dt', {}, 'Devices'), h('dd', {}, devs.length ? devs.join(', ') : 'none'),
      h('dt', {}, 'Resources'), h('dd', {}, `${s.cpu_millis / 1000} CPUs · ${bytes(s.memory_bytes)}`),
      h('dt', {}, 'Image'), h('dd', {}, s.image || 'default'),
      s.volumes && s.volumes.length ? [h('dt', {}, 'Volumes'), h('dd', {}, s.volumes.map((v) => `${v.volume || v.share} → ${v.mount_path}`).join(', '))] : null,
      h('dt', {}, 'Age'), h('dd', {}, age(s.created_at_ms)),
      h('dt', {}, 'Last activity'), h('dd', {}, `${age(s.last_activity_ms)} ago`)),
    charts,
    h('div', { class: 'row actions' },
      openControl(s, ctx),
      h('button', { type: 'button', onclick: toggleLogs }, 'Logs'),
      h('button', { type: 'button', onclick: toggleEvents }, 'Events'),
      h('button', { type: 'button', class: 'danger', onclick: del, 'aria-label': `Delete ${s.name}` }, 'Delete')),
    logs, events);
}

// A server's GPUs over time (since the page opened): utilization and memory of each
// whole GPU; a MIG slice shows its own memory and its GPU's utilization (NVML has no
// per-slice utilization).
function serverCharts(s, live) {
  const out = [];
  for (const u of s.devices) {
    const d = live.device(u);
    if (!d) continue;
    const gpu = d.parent_uuid || d.uuid;
    const util = (live.history.get(`gpu:${gpu}`) || []).map((x) => x.v);
    const mem = (live.history.get(`mem:${u}`) || []).map((x) => x.v);
    const what = d.profile ? `GPU ${d.index} ${d.profile}` : `GPU ${d.index}`;
    out.push(chart(util, 100, `${what} utilization %${d.profile ? ' (whole GPU)' : ''}`), chart(mem, 100, `${what} memory used %`));
  }
  return out;
}

// A live list of servers: `filter` picks which (mine, or all for admins).
export function serverList(ctx, filter, showOwner) {
  const box = h('div', { class: 'servers' });
  const render = () => {
    const list = [...ctx.live.servers.values()].filter(filter).sort((a, b) => b.created_at_ms - a.created_at_ms);
    // Keep open logs/events panels: only re-render cards whose server changed.
    const old = new Map([...box.querySelectorAll('article.server')].map((el) => [`${el.dataset.owner}/${el.dataset.server}`, el]));
    const cards = list.map((s) => {
      const key = `${s.owner}/${s.name}`;
      const json = JSON.stringify(s);
      const prev = old.get(key);
      if (prev && prev.json === json) return prev;
      const card = serverCard(s, ctx, showOwner);
      card.json = json;
      return card;
    });
    box.replaceChildren(...(cards.length ? cards : [h('p', { class: 'muted' }, 'No servers.')]));
    // On a large fleet, follow the nodes these servers run on (for their charts). Only
    // from a complete list: between a reset and `synced` the servers are not all back,
    // and following fewer nodes would reconnect, reset, and so on.
    if (ctx.live.mode === 'fleet' && ctx.live.synced) ctx.live.follow([...new Set(list.map((x) => x.node).filter(Boolean))].slice(0, 100));
    drawCharts();
  };
  const drawCharts = () => {
    for (const card of box.querySelectorAll('article.server')) {
      const s = ctx.live.servers.get(`${card.dataset.owner}/${card.dataset.server}`);
      const slot = card.querySelector('.server-charts');
      if (s && slot && !slot.hidden) slot.replaceChildren(...serverCharts(s, ctx.live));
    }
  };
  const onChange = (e) => {
    if (!box.isConnected) { e.currentTarget.removeEventListener('change', onChange); return; }
    if (e.detail.servers || e.detail.reset) render();
    else if (e.detail.nodes.size) drawCharts();
  };
  ctx.live.addEventListener('change', onChange);
  render();
  return box;
}

export function serversPage(ctx) {
  const me = ctx.me.user.name;
  return h('div', {},
    h('div', { class: 'row spread' }, h('h2', {}, 'My servers'), h('a', { class: 'button primary', href: '#/new' }, 'New server')),
    serverList(ctx, (s) => s.owner === me, false));
}
