// Reservations: a week's timeline per GPU of a node (running servers, reservations,
// maintenance), booking by selecting a span on it, my reservations, and my queue.
import { api, enc, ApiError } from './api.js';
import { h, toast, confirmDialog, field, showError } from './dom.js';

const HOUR = 3_600_000;
const SPAN = 7 * 24 * HOUR;
const SNAP = HOUR / 2;

// datetime-local wants local time without a zone.
function localInput(ms) {
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}
const when = (ms) => new Date(ms).toLocaleString([], { weekday: 'short', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });

function fieldFor(err) {
  const m = err.message || '';
  if (/^start|past/.test(m)) return 'start';
  if (/^end|long/.test(m)) return 'end';
  if (/^note/.test(m)) return 'note';
  return 'devices';
}

export async function reservationsPage(ctx) {
  const me = ctx.me.user.name;
  const admin = ctx.me.user.role === 'admin';
  const page = h('div', {}, h('h2', {}, 'Reservations'));
  const nodeNames = () => [...ctx.live.rows.keys(), ...ctx.live.nodes.keys()].filter((v, i, a) => a.indexOf(v) === i).sort();
  const list = h('datalist', { id: 'res-nodes' }, nodeNames().map((n) => h('option', { value: n })));
  const node = h('input', { name: 'node', list: 'res-nodes', value: nodeNames()[0] || '', autocomplete: 'off' });
  const timeline = h('div', { class: 'timeline', role: 'region', 'aria-label': 'Timeline of the next 7 days' });
  const mine = h('div', { class: 'my-reservations' });
  const queue = h('div', { class: 'my-queue' });

  const devices = h('input', { name: 'devices', placeholder: 'GPU-… or MIG-… (select a span on the timeline)' });
  const start = h('input', { name: 'start', type: 'datetime-local' });
  const end = h('input', { name: 'end', type: 'datetime-local' });
  const note = h('input', { name: 'note', maxlength: 500, placeholder: 'what for (only you and admins see it)' });
  const form = h('form', { class: 'book', novalidate: true, 'aria-label': 'Book devices' },
    h('h3', {}, 'Book'),
    h('div', { class: 'row' }, field('Devices', devices, 'space-separated UUIDs, all on one node'), field('From', start), field('Until', end)),
    h('div', { class: 'row' }, field('Note', note)),
    h('p', { class: 'form-error', role: 'alert' }),
    h('div', { class: 'row' }, h('button', { type: 'submit', class: 'primary' }, 'Book')));
  const t0 = Math.ceil(Date.now() / SNAP) * SNAP;
  start.value = localInput(t0 + HOUR);
  end.value = localInput(t0 + 3 * HOUR);

  let windows = [];
  // Not redrawn under a drag; readings (every second) do not change the timeline.
  let dragging = false;
  const load = async () => {
    windows = await api('GET', `/api/v1/reservations?to=${encodeURIComponent(new Date(Date.now() + SPAN).toISOString())}`);
    drawTimeline();
    drawMine();
    const q = await api('GET', '/api/v1/queue').catch(() => []);
    queue.replaceChildren(h('h3', {}, admin ? 'Queue (everyone)' : 'My queue'),
      q.length ? h('ol', {}, q.map((e) => h('li', {},
        `${admin ? `${e.owner}/` : ''}${e.name}: #${e.queue_position ?? '?'} · expected ${e.estimated_start === 'unknown' ? 'unknown' : when(e.estimated_start_ms)}${e.fair_share !== undefined ? ` · fair share ${e.fair_share.toFixed(2)} GPU-h` : ''}`)))
        : h('p', { class: 'muted' }, 'Nothing waiting.'));
  };

  const drawMine = () => {
    const own = windows.filter((r) => r.mine);
    mine.replaceChildren(h('h3', {}, 'My reservations'),
      own.length ? h('ul', {}, own.map((r) => h('li', {},
        `${when(r.start_ms)} – ${when(r.end_ms)} · ${r.node} · ${r.devices.length} device${r.devices.length > 1 ? 's' : ''}${r.note ? ` · ${r.note}` : ''}${r.used ? ' · in use' : ''} `,
        h('button', { type: 'button', class: 'danger', 'aria-label': `Cancel reservation ${r.id}`, onclick: async () => {
          if (!(await confirmDialog(`Cancel the reservation from ${when(r.start_ms)}?`, 'Cancel reservation'))) return;
          try { await api('DELETE', `/api/v1/users/${enc(me)}/reservations/${enc(r.id)}`); toast('Reservation cancelled'); await load(); } catch (e) { toast(e.message, 'error'); }
        } }, 'Cancel'))))
        : h('p', { class: 'muted' }, 'None.'));
  };

  // One row per allocatable device of the node: its windows as bars over 7 days; a
  // running server's hold from now (to its scheduled end, if any). Drag to select.
  const drawTimeline = () => {
    const n = ctx.live.nodes.get(node.value);
    const now = Date.now();
    const x = (ms) => `${Math.max(0, Math.min(100, ((ms - now) / SPAN) * 100))}%`;
    const wd = (a, b) => `${Math.max(0.3, ((Math.min(b, now + SPAN) - Math.max(a, now)) / SPAN) * 100)}%`;
    if (!n) {
      timeline.replaceChildren(h('p', { class: 'muted' }, node.value ? `No details for node ${node.value} yet (it appears once the fleet view follows it).` : 'Choose a node.'));
      if (node.value && ctx.live.mode === 'fleet') ctx.live.follow([node.value]);
      return;
    }
    // What can be booked: whole GPUs not in MIG mode, and MIG instances.
    const devs = (n.devices || [])
      .filter((d) => d.kind === 'mig' || !d.mig_enabled)
      .map((d) => ({ uuid: d.uuid, label: `GPU ${d.index}${d.profile ? ` ${d.profile}` : ''}` }));
    const days = [...Array(7).keys()].map((i) => h('span', { class: 'tick', style: { left: x(now + i * 24 * HOUR) } }, new Date(now + i * 24 * HOUR).toLocaleDateString([], { weekday: 'short' })));
    const rows = devs.map((d) => {
      const lane = h('div', { class: 'lane', dataset: { uuid: d.uuid }, title: `${d.label}: drag to book` });
      const server = [...ctx.live.servers.values()].find((s) => s.devices.includes(d.uuid) && s.status !== 'queued');
      if (server) {
        lane.append(h('span', { class: `bar running${server.owner === me ? ' mine' : ''}`, style: { left: x(now), width: wd(now, server.ends_at_ms || now + SPAN) } },
          server.owner === me ? `${server.name}` : 'in use'));
      }
      for (const r of windows.filter((w) => w.devices.includes(d.uuid))) {
        lane.append(h('span', { class: `bar reserved${r.mine ? ' mine' : ''}${r.maintenance ? ' maintenance' : ''}`, style: { left: x(r.start_ms), width: wd(r.start_ms, r.end_ms) }, title: `${when(r.start_ms)} – ${when(r.end_ms)}` },
          r.maintenance ? 'maintenance' : r.mine ? (r.note || 'mine') : 'reserved'));
      }
      return h('div', { class: 'timeline-row' }, h('span', { class: 'lane-label' }, d.label), lane);
    });
    timeline.replaceChildren(h('div', { class: 'timeline-row head' }, h('span', { class: 'lane-label' }, node.value), h('div', { class: 'lane ticks' }, days)), ...rows);
  };
  // Selecting a span: delegated to the timeline, which outlives its redraws.
  let drag = null;
  const at = (ev, lane) => Date.now() + ((ev.clientX - lane.getBoundingClientRect().left) / lane.clientWidth) * SPAN;
  timeline.addEventListener('pointerdown', (ev) => {
    const lane = ev.target.closest('.lane[data-uuid]');
    if (!lane) return;
    ev.preventDefault();
    drag = { uuid: lane.dataset.uuid, lane, from: at(ev, lane) };
    dragging = true;
  });
  const onUp = (ev) => {
    if (!page.isConnected) { document.removeEventListener('pointerup', onUp); return; }
    if (!drag) return;
    const { uuid, lane, from } = drag;
    drag = null;
    dragging = false;
    if (!lane.isConnected) return;
    const to = at(ev, lane);
    let a = Math.round(Math.min(from, to) / SNAP) * SNAP;
    let b = Math.round(Math.max(from, to) / SNAP) * SNAP;
    a = Math.max(a, Math.ceil(Date.now() / 60_000) * 60_000);
    if (b - a < SNAP) b = a + HOUR;
    devices.value = uuid;
    start.value = localInput(a);
    end.value = localInput(b);
    devices.focus();
  };
  node.addEventListener('change', drawTimeline);
  const onChange = (e) => {
    if (!page.isConnected) { e.currentTarget.removeEventListener('change', onChange); return; }
    if (dragging) return;
    const first = e.detail.nodes.has(node.value) && !timeline.querySelector('.lane[data-uuid]');
    if (e.detail.servers || e.detail.reset || first) drawTimeline();
  };

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = {
      devices: devices.value.trim().split(/\s+/).filter(Boolean),
      start: new Date(start.value).toISOString(),
      end: new Date(end.value).toISOString(),
      note: note.value.trim(),
    };
    try {
      await api('POST', `/api/v1/users/${enc(me)}/reservations`, body);
      toast('Booked');
      await load();
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      showError(form, err, fieldFor);
    }
  });
  page.append(h('div', { class: 'row' }, field('Node', node), list), timeline, form, mine, queue);
  await load();
  // Only now: both drop themselves once the page is out of the document, and it is
  // not in it yet while the first load runs (a reading then would end them for good).
  // The shell puts the page in before any event can come (they come per frame).
  document.addEventListener('pointerup', onUp);
  ctx.live.addEventListener('change', onChange);
  return page;
}
