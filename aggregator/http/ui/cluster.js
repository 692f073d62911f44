// The cluster picture: every node, every GPU, its MIG instances as slices. Also the
// device picker of the new-server form (same picture, free devices selectable).
import { h, bytes, age, sparkline } from './dom.js';

// Compute slices of a MIG profile ("3g.40gb" -> 3), for the slice's width.
function slices(profile) {
  const m = /^(\d+)g\./.exec(profile || '');
  return m ? Number(m[1]) : 1;
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
  const text = stateText(d, ctx.me, ctx.admin);
  const picked = !!(ctx.picked && ctx.picked.has(d.uuid));
  const what = d.kind === 'mig' ? `MIG ${d.profile}` : `GPU ${d.index} ${d.model}`;
  btn.className = `dev ${st}${picked ? ' picked' : ''}${d.kind === 'gpu' ? ' whole' : ''}`;
  btn.dataset.state = st;
  if (ctx.picked) btn.setAttribute('aria-pressed', String(picked));
  btn.setAttribute('aria-label', `${what} on ${d.node}: ${text}`);
  btn.title = `${what}\n${d.uuid}\n${text}`;
  btn.disabled = !!(ctx.picked && st !== 'free' && !picked);
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
  const facts = [
    g.memory_total_bytes !== undefined ? `${bytes(g.memory_used_bytes)} / ${bytes(g.memory_total_bytes)}` : null,
    util !== undefined ? `${util}% util` : null,
    g.temperature_celsius !== undefined ? `${g.temperature_celsius} °C` : null,
    g.power_watts !== undefined ? `${Math.round(g.power_watts)} W` : null,
  ].filter(Boolean);
  return h('div', { class: 'gpu-facts muted' }, facts.join(' · '),
    hist && hist.length > 1 ? sparkline(hist.map((x) => x.v), 100, `GPU ${g.index} utilization history`) : null);
}

function gpuCard(g, migs, ctx, live) {
  const body = g.mig_enabled
    ? h('div', { class: 'slices', role: 'group', 'aria-label': `MIG instances of GPU ${g.index}` },
      migs.length ? migs.map((m) => deviceButton(m, ctx)) : h('span', { class: 'muted' }, 'MIG on, no instances'))
    : h('div', { class: 'slices' }, deviceButton(g, ctx));
  return h('div', { class: `gpu${g.stale ? ' stale' : ''}`, dataset: { uuid: g.uuid } },
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

// A live cluster view. `ctx`: {me, admin, picked?: Set, onPick?: fn}. Only nodes
// that changed are re-rendered.
export function clusterView(live, ctx) {
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
  const view = h('div', { class: 'cluster' }, summary, list);
  // Repaints every node in place (the picker's selection changed).
  view.refresh = () => { for (const name of cards.keys()) renderNode(name); };
  return view;
}
