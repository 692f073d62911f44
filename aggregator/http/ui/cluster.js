// The cluster picture. Small fleets: every node, every GPU, its MIG instances as
// slices. Large fleets: the summary and a filterable node list (only the rows on screen
// are drawn), and the picture of the one node opened from it. Also the device picker of
// the new-server form (same views, free devices selectable).
import { h, bytes, age, sparkline, chart } from './dom.js';
import { api, enc } from './api.js';

// Compute slices of a MIG profile ("3g.40gb" -> 3), for the slice's width.
function slices(profile) {
  const m = /^(\d+)g\./.exec(profile || '');
  return m ? Number(m[1]) : 1;
}

// Whether entitlements (from /api/v1/me: lists of names or * patterns, null = all)
// allow device `d`; admins' and unrestricted users' allow everything.
export function entitledTo(ent) {
  const escape = (x) => x.replace(/[.+?^$|()[\]{}\\]/g, '\\$&');
  const glob = (p) => new RegExp('^' + p.split('*').map(escape).join('.*') + '$');
  const allows = (list, value) => !list || list.some((p) => glob(p).test(value || ''));
  return (d) => allows(ent?.models, d.model) && (d.kind !== 'mig' || allows(ent?.mig_profiles, d.profile));
}

export function deviceState(d, me) {
  if (d.holder && d.holder.user === me) return 'mine';
  if (d.available) return 'free';
  if (d.in_use) return 'used';
  return 'unavailable';
}

function stateText(d, me, admin) {
  const st = deviceState(d, me);
  if (st === 'mine') return `mine (${d.holder.server})`;
  if (st === 'used') return admin && d.holder ? `${d.holder.user}/${d.holder.server}` : 'in use';
  if (st === 'free') return 'free';
  return d.stale ? 'stale' : d.lost ? 'lost' : 'unavailable';
}

// Sets what changes on a device button: state, labels, selectability.
function paintDevice(btn, d, ctx) {
  const st = deviceState(d, ctx.me);
  const denied = !!(ctx.entitled && !ctx.entitled(d));
  const text = `${stateText(d, ctx.me, ctx.admin)}${denied ? ' · not for your groups' : ''}`;
  const picked = !!(ctx.picked && ctx.picked.has(d.uuid));
  const what = d.kind === 'mig' ? `MIG ${d.profile}` : `GPU ${d.index} ${d.model}`;
  btn.className = `dev ${st}${picked ? ' picked' : ''}${d.kind === 'gpu' ? ' whole' : ''}${denied ? ' not-entitled' : ''}`;
  btn.dataset.state = st;
  if (ctx.picked) btn.setAttribute('aria-pressed', String(picked));
  btn.setAttribute('aria-label', `${what} on ${d.node}: ${text}`);
  btn.title = `${what}\n${d.uuid}\n${text}`;
  btn.disabled = !!(ctx.picked && (st !== 'free' || denied) && !picked);
  btn.lastChild.textContent = text;
}

function deviceButton(d, ctx) {
  const btn = h('button', {
    type: 'button',
    dataset: { uuid: d.uuid },
    onclick: ctx.onPick ? () => ctx.onPick(d) : undefined,
  },
  h('span', { class: 'dev-name' }, d.kind === 'mig' ? d.profile : 'whole GPU'),
  h('span', { class: 'dev-state' }));
  if (d.kind === 'mig') btn.style.flexGrow = String(slices(d.profile));
  paintDevice(btn, d, ctx);
  return btn;
}

function gpuFacts(g, live) {
  const util = g.utilization_gpu_percent;
  const hist = live.history.get(`gpu:${g.uuid}`);
  const mem = live.history.get(`mem:${g.uuid}`);
  const facts = [
    g.memory_total_bytes !== undefined ? `${bytes(g.memory_used_bytes)} / ${bytes(g.memory_total_bytes)}` : null,
    util !== undefined ? `${util}% util` : null,
    g.temperature_celsius !== undefined ? `${g.temperature_celsius} °C` : null,
    g.power_watts !== undefined ? `${Math.round(g.power_watts)} W` : null,
  ].filter(Boolean);
  return h('div', { class: 'gpu-facts muted' }, facts.join(' · '),
    hist && hist.length > 1 ? sparkline(hist.map((x) => x.v), 100, `GPU ${g.index} utilization history`) : null,
    mem && mem.length > 1 ? sparkline(mem.map((x) => x.v), 100, `GPU ${g.index} memory history`, 'mem') : null);
}

function gpuCard(g, migs, ctx, live) {
  const body = g.mig_enabled
    ? h('div', { class: 'slices', role: 'group', 'aria-label': `MIG instances of GPU ${g.index}` },
      migs.length ? migs.map((m) => deviceButton(m, ctx)) : h('span', { class: 'muted' }, 'MIG on, no instances'))
    : h('div', { class: 'slices' }, deviceButton(g, ctx));
  return h('div', { class: `gpu${g.stale ? ' stale' : ''}${g.mig_enabled ? ' mig' : ''}`, dataset: { uuid: g.uuid } },
    h('div', { class: 'gpu-head' },
      h('strong', {}, `GPU ${g.index}`), ' ', h('span', { class: 'muted' }, g.model),
      g.mig_enabled ? h('span', { class: 'badge' }, 'MIG') : null),
    gpuFacts(g, live),
    body);
}

function nodeHead(n, live) {
  const m = n.metrics || {};
  const cpu = m.cpu_utilization_ratio !== undefined && m.cpu_utilization_ratio !== null ? Math.round(m.cpu_utilization_ratio * 100) : null;
  const hist = live.history.get(`node:${n.name}`);
  return h('header', { class: 'node-head' },
      h('h3', {}, n.name),
      n.stale ? h('span', { class: 'badge warn' }, `stale (${age(n.last_seen_ms)} ago)`) : null,
      n.simulated ? h('span', { class: 'badge' }, 'simulated') : null,
      h('span', { class: 'muted' },
        `${m.cpu_count ?? '?'} CPUs${cpu !== null ? ` · ${cpu}%` : ''} · memory ${bytes(m.memory_used_bytes)} / ${bytes(m.memory_total_bytes)}`),
      hist && hist.length > 1 ? sparkline(hist.map((x) => x.v), 100, `${n.name} CPU history`) : null,
      h('span', { class: 'free-count' }, `${n.devices_free} of ${n.devices_total} free`));
}

const layoutOf = (n) => n.devices.map((d) => d.uuid).join(',');

export function nodeCard(n, ctx, live) {
  const gpus = n.devices.filter((d) => d.kind === 'gpu');
  const migsOf = (u) => n.devices.filter((d) => d.kind === 'mig' && d.parent_uuid === u);
  const card = h('section', { class: `node${n.stale ? ' stale' : ''}`, dataset: { node: n.name }, 'aria-label': `node ${n.name}` },
    nodeHead(n, live),
    h('div', { class: 'gpus' }, gpus.map((g) => gpuCard(g, migsOf(g.uuid), ctx, live))));
  card.layout = layoutOf(n);
  return card;
}

// Updates a drawn node in place when its device layout is unchanged (the common case:
// new readings, a device taken or freed), so a stream of updates touches only text
// and classes instead of rebuilding thousands of elements. False: rebuild it.
function patchNode(card, n, ctx, live) {
  if (card.layout !== layoutOf(n)) return false;
  card.classList.toggle('stale', n.stale);
  card.firstChild.replaceWith(nodeHead(n, live));
  const byUuid = new Map(n.devices.map((d) => [d.uuid, d]));
  for (const gpu of card.querySelectorAll('.gpu')) {
    const g = byUuid.get(gpu.dataset.uuid);
    gpu.classList.toggle('stale', g.stale);
    gpu.querySelector('.gpu-facts').replaceWith(gpuFacts(g, live));
  }
  for (const btn of card.querySelectorAll('.dev')) paintDevice(btn, byUuid.get(btn.dataset.uuid), ctx);
  return true;
}

// A live cluster view. `ctx`: {me, admin, picked?: Set, onPick?: fn}. Small fleets
// get every node drawn; large ones the fleet view. Switches when the stream knows.
export function clusterView(live, ctx) {
  const box = h('div', { class: 'cluster' });
  let mode;
  const build = () => {
    mode = live.mode;
    box.replaceChildren(mode === 'fleet' ? fleetView(live, ctx) : nodesView(live, ctx));
  };
  const onChange = () => {
    if (mode !== undefined && !box.isConnected) { live.removeEventListener('change', onChange); return; }
    if (live.mode !== mode) build();
  };
  live.addEventListener('change', onChange);
  build();
  // Repaints the devices in place (the picker's selection changed).
  box.refresh = () => { for (const v of box.querySelectorAll('.nodes-view')) v.refresh(); };
  return box;
}

// Every node in `live.nodes`, drawn whole. Only nodes that changed are re-rendered.
function nodesView(live, ctx) {
  const list = h('div', { class: 'nodes' });
  const summary = h('p', { class: 'muted', id: 'cluster-summary' });
  const cards = new Map();
  const renderSummary = () => {
    let free = 0, total = 0, stale = 0;
    for (const n of live.nodes.values()) { free += n.devices_free; total += n.devices_total; if (n.stale) stale++; }
    summary.textContent = `${live.nodes.size} node${live.nodes.size === 1 ? '' : 's'} · ${free} of ${total} devices free${stale ? ` · ${stale} stale` : ''}`;
  };
  const renderNode = (name) => {
    const n = live.nodes.get(name);
    const old = cards.get(name);
    if (!n) { if (old) old.remove(); cards.delete(name); return; }
    if (old && patchNode(old, n, ctx, live)) return;
    const card = nodeCard(n, ctx, live);
    if (old) old.replaceWith(card); else list.append(card);
    cards.set(name, card);
  };
  const renderAll = () => {
    list.replaceChildren();
    cards.clear();
    const names = [...live.nodes.keys()].sort();
    for (const name of names) renderNode(name);
    if (!names.length) list.append(h('p', { class: 'muted' }, live.synced ? 'No nodes have reported yet.' : 'Connecting…'));
    renderSummary();
  };
  const onChange = (e) => {
    if (!list.isConnected) { live.removeEventListener('change', onChange); return; }
    if (e.detail.reset) { renderAll(); return; }
    if (!e.detail.nodes.size) return;
    const fresh = [...e.detail.nodes].filter((n) => !cards.has(n));
    if (fresh.length) { renderAll(); return; }
    for (const name of e.detail.nodes) renderNode(name);
    renderSummary();
    list.dispatchEvent(new CustomEvent('rendered', { bubbles: true }));
  };
  live.addEventListener('change', onChange);
  renderAll();
  const view = h('div', { class: 'nodes-view' }, summary, list);
  view.refresh = () => { for (const name of cards.keys()) renderNode(name); };
  return view;
}

// --- the fleet view ----------------------------------------------------------------

const ROW_HEIGHT = 34;

function freeBar(free, total) {
  const pct = total ? Math.round((100 * free) / total) : 0;
  return h('span', { class: 'bar', role: 'img', 'aria-label': `${free} of ${total} free` },
    h('span', { class: 'bar-fill', style: { width: `${pct}%` } }));
}

function summaryView(live, onClass) {
  const box = h('section', { class: 'fleet-summary', id: 'fleet-summary', 'aria-label': 'Fleet summary' });
  box.render = () => {
    const s = live.summary;
    if (!s) { box.replaceChildren(h('p', { class: 'muted' }, 'Connecting…')); return; }
    const classes = h('table', { class: 'grid classes' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Model'), h('th', {}, 'Device'), h('th', { class: 'num' }, 'Free'), h('th', { class: 'num' }, 'Total'), h('th', {}, ''))),
      h('tbody', {}, s.classes.map((c) => h('tr', {},
        h('td', {}, h('button', { type: 'button', class: 'link', onclick: () => onClass(c) }, c.model)),
        h('td', {}, c.kind === 'mig' ? `MIG ${c.profile}` : 'whole GPU'),
        h('td', { class: 'num' }, String(c.free)), h('td', { class: 'num' }, String(c.total)),
        h('td', {}, freeBar(c.free, c.total))))));
    const grouped = s.groups.filter((g) => g.group).length > 0;
    box.replaceChildren(
      h('p', { class: 'fleet-totals' },
        h('strong', {}, `${s.nodes} nodes`), ` · ${s.devices_free} of ${s.devices_total} devices free`,
        s.stale ? h('span', { class: 'badge warn' }, `${s.stale} stale`) : null),
      classes,
      grouped ? h('table', { class: 'grid groups' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Node group'), h('th', { class: 'num' }, 'Nodes'), h('th', { class: 'num' }, 'Free'), h('th', { class: 'num' }, 'Total'), h('th', { class: 'num' }, 'Stale'))),
        h('tbody', {}, s.groups.map((g) => h('tr', {}, h('td', {}, g.group || '(none)'), h('td', { class: 'num' }, String(g.nodes)),
          h('td', { class: 'num' }, String(g.devices_free)), h('td', { class: 'num' }, String(g.devices_total)), h('td', { class: 'num' }, String(g.stale)))))) : '');
  };
  box.render();
  return box;
}

// The node list: filtered and sorted in memory, drawn a screenful at a time.
function nodeList(live, ctx, onOpen) {
  const search = h('input', { type: 'search', name: 'node-search', placeholder: 'node name contains…', autocomplete: 'off' });
  const model = h('select', { name: 'node-model' }, h('option', { value: '' }, 'any model'));
  const freeOnly = h('input', { type: 'checkbox', name: 'free-only', checked: !!ctx.picked });
  const staleSel = h('select', { name: 'node-stale' },
    h('option', { value: '' }, 'fresh and stale'), h('option', { value: 'fresh' }, 'fresh only'), h('option', { value: 'stale' }, 'stale only'));
  const count = h('span', { class: 'muted', id: 'fleet-count', 'aria-live': 'polite' });
  const spacer = h('div', { class: 'fleet-spacer' });
  const viewport = h('div', { class: 'fleet-list', role: 'list', 'aria-label': 'Nodes', tabindex: 0 }, spacer);
  let shown = [];
  let drawn = '';

  const fillModels = () => {
    const have = [...model.options].map((o) => o.value);
    const want = ['', ...live.models()];
    if (have.join('\n') === want.join('\n')) return;
    const v = model.value;
    model.replaceChildren(h('option', { value: '' }, 'any model'), ...live.models().map((m) => h('option', { value: m }, m)));
    model.value = want.includes(v) ? v : '';
  };
  const refilter = () => {
    const q = search.value.trim().toLowerCase();
    const m = model.value;
    const st = staleSel.value;
    shown = [];
    for (const r of live.rows.values()) {
      if (q && !r.name.toLowerCase().includes(q)) continue;
      if (m && !r.models.includes(m)) continue;
      if (freeOnly.checked && !r.devices_free) continue;
      if (st === 'fresh' && r.stale) continue;
      if (st === 'stale' && !r.stale) continue;
      shown.push(r.name);
    }
    shown.sort();
    count.textContent = `${shown.length} of ${live.rows.size} nodes`;
    drawn = '';
    draw();
  };
  const rowEl = (r, i) => h('div', {
    class: `fleet-row${r.stale ? ' stale' : ''}`, role: 'listitem', tabindex: 0,
    style: { transform: `translateY(${i * ROW_HEIGHT}px)` }, dataset: { node: r.name },
    'aria-label': `${r.name}: ${r.devices_free} of ${r.devices_total} free${r.stale ? ', stale' : ''}`,
    onclick: () => onOpen(r.name),
    onkeydown: (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); onOpen(r.name); } },
  },
  h('span', { class: 'fr-name' }, r.name),
  h('span', { class: 'fr-group muted' }, r.group || ''),
  h('span', { class: 'fr-models muted' }, `${r.gpus} × ${r.models.join(', ')}`),
  h('span', { class: 'fr-free' }, `${r.devices_free} / ${r.devices_total} free`),
  freeBar(r.devices_free, r.devices_total),
  r.stale ? h('span', { class: 'badge warn' }, 'stale') : null);
  // Draws the rows in view (and a few around them); nothing else exists in the DOM.
  function draw() {
    const top = viewport.scrollTop;
    const height = viewport.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW_HEIGHT) - 4);
    const last = Math.min(shown.length, Math.ceil((top + height) / ROW_HEIGHT) + 4);
    const key = `${first}:${last}:${shown.length}`;
    if (key === drawn) return;
    drawn = key;
    spacer.style.height = `${shown.length * ROW_HEIGHT}px`;
    const els = [];
    for (let i = first; i < last; i++) els.push(rowEl(live.rows.get(shown[i]), i));
    spacer.replaceChildren(...els);
  }
  let scheduled = false;
  viewport.addEventListener('scroll', () => {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => { scheduled = false; draw(); });
  });
  for (const el of [search, model, freeOnly, staleSel]) el.addEventListener('input', refilter);
  const box = h('section', { class: 'fleet-nodes', 'aria-label': 'Node list' },
    h('div', { class: 'row filters' },
      h('label', { class: 'field' }, h('span', {}, 'Node'), search),
      h('label', { class: 'field' }, h('span', {}, 'Model'), model),
      h('label', { class: 'check' }, freeOnly, ' with free devices'),
      h('label', { class: 'field' }, h('span', {}, 'Staleness'), staleSel),
      count),
    viewport);
  box.update = (rowsChanged) => { fillModels(); if (rowsChanged) refilter(); };
  box.filterModel = (m) => { model.value = m; freeOnly.checked = true; refilter(); };
  fillModels();
  refilter();
  // Its real height is known once attached.
  requestAnimationFrame(() => { drawn = ''; draw(); });
  return box;
}

// One node opened from the list: its picture and its charts.
function nodeDetail(live, ctx, name, onBack) {
  const charts = h('div', { class: 'charts', 'aria-label': `${name} over time` });
  const box = h('section', { class: 'fleet-detail', 'aria-label': `node ${name}` },
    h('div', { class: 'row spread' },
      h('button', { type: 'button', class: 'back', onclick: onBack }, '← All nodes'),
      h('span', { class: 'muted' }, 'Live: this node\'s devices and readings.')),
    charts,
    nodesView(live, ctx));
  const live24 = () => {
    const cpu = live.history.get(`node:${name}`) || [];
    const n = live.nodes.get(name);
    const gpus = n ? n.devices.filter((d) => d.kind === 'gpu') : [];
    const avg = (key) => {
      // Mean over the node's GPUs at each sample.
      const series = gpus.map((g) => live.history.get(`${key}:${g.uuid}`) || []);
      if (!series.length) return [];
      const len = Math.min(...series.map((x) => x.length), 40);
      return len > 0 ? Array.from({ length: len }, (_, i) => series.reduce((a, x) => a + x[x.length - len + i].v, 0) / series.length) : [];
    };
    return [
      ['CPU %', cpu.map((x) => x.v)],
      ['GPU utilization %', avg('gpu')],
      ['GPU memory used %', avg('mem')],
    ];
  };
  let history = null; // from Prometheus, when the aggregator has it
  const render = () => {
    const series = history || live24();
    charts.replaceChildren(...series.map(([label, values]) => chart(values, 100, label)),
      h('small', { class: 'muted chart-source' }, history ? 'last hour, from Prometheus' : 'since this page opened, from the agents'));
  };
  (async () => {
    try {
      const get = (m) => api('GET', `/api/v1/nodes/${enc(name)}/history?metric=${m}&range=1h`);
      const [cpu, gpu] = await Promise.all([get('cpu'), get('gpu_utilization')]);
      history = [['CPU %', cpu.points.map((p) => p[1] * 100)], ['GPU utilization %', gpu.points.map((p) => p[1])]];
    } catch (_) { history = null; /* no Prometheus: the live readings */ }
    render();
  })();
  box.update = render;
  render();
  return box;
}

function fleetView(live, ctx) {
  let list;
  const summary = summaryView(live, (c) => list.filterModel(c.model));
  const body = h('div', { class: 'fleet-body' });
  const view = h('div', { class: 'fleet' }, summary, body);
  let detail = null;
  const showList = () => {
    detail = null;
    live.follow([]);
    body.replaceChildren(list);
    list.update(true);
  };
  const open = (name) => {
    live.follow([name]);
    detail = nodeDetail(live, ctx, name, showList);
    body.replaceChildren(detail);
  };
  list = nodeList(live, ctx, open);
  const onChange = (e) => {
    if (!view.isConnected) { live.removeEventListener('change', onChange); return; }
    const d = e.detail;
    if (d.summary || d.reset) summary.render();
    if (!detail && (d.rows || d.reset)) list.update(true);
    if (detail && (d.nodes.size || d.reset)) detail.update();
  };
  live.addEventListener('change', onChange);
  showList();
  return view;
}
