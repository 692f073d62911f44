// Small DOM helpers. Text always goes in through textContent (never innerHTML), so
// names from the API cannot inject markup.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    // Through the CSSOM: the CSP refuses style attributes.
    else if (k === 'style') Object.assign(el.style, v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

// The SVG namespace is a name, not a URL anything is loaded from.
const SVG = 'http://www.w3.org/2000/svg';
export function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

export function bytes(n) {
  if (n === undefined || n === null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

export function age(ms) {
  if (!ms) return '–';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d`;
}

// A sparkline of recent values (0..max) as a small inline SVG.
export function sparkline(values, max, label, kind = '') {
  const w = 80, ht = 20;
  const s = svg('svg', { width: w, height: ht, viewBox: `0 0 ${w} ${ht}`, class: `spark ${kind}`, role: 'img', 'aria-label': label });
  if (values.length > 1) {
    const step = w / (values.length - 1);
    const pts = values.map((v, i) => `${(i * step).toFixed(1)},${(ht - 1 - (Math.min(v, max) / max) * (ht - 2)).toFixed(1)}`);
    s.append(svg('polyline', { points: pts.join(' '), fill: 'none', stroke: 'currentColor', 'stroke-width': 1.5 }));
  }
  return s;
}

// A small line chart of values (0..max), oldest first: the area under the line, the
// scale and the latest value. Drawn as SVG by hand: a few dozen points need no
// charting library, and nothing is loaded from elsewhere.
export function chart(values, max, label) {
  const w = 260, ht = 70, pad = 2;
  const last = values.length ? values[values.length - 1] : null;
  const box = h('figure', { class: 'chart' },
    h('figcaption', {}, label, h('span', { class: 'chart-last' }, last === null ? ' –' : ` ${Math.round(last)}`)));
  const s = svg('svg', { width: w, height: ht, viewBox: `0 0 ${w} ${ht}`, role: 'img', 'aria-label': `${label}: ${values.length} samples, latest ${last === null ? 'none' : Math.round(last)}` });
  s.append(svg('line', { x1: 0, y1: ht - pad, x2: w, y2: ht - pad, class: 'axis' }));
  if (values.length > 1) {
    const step = w / (values.length - 1);
    const y = (v) => (ht - pad - (Math.max(0, Math.min(v, max)) / max) * (ht - 2 * pad)).toFixed(1);
    const pts = values.map((v, i) => `${(i * step).toFixed(1)},${y(v)}`);
    s.append(svg('polygon', { points: `0,${ht - pad} ${pts.join(' ')} ${w},${ht - pad}`, class: 'area' }));
    s.append(svg('polyline', { points: pts.join(' '), class: 'line' }));
  } else {
    const t = svg('text', { x: w / 2, y: ht / 2, 'text-anchor': 'middle', class: 'empty' });
    t.textContent = 'collecting…';
    s.append(t);
  }
  box.append(s);
  return box;
}

let toastTimer;
export function toast(msg, kind = 'info') {
  const t = document.getElementById('toast');
  t.textContent = msg;
  t.className = `show ${kind}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.className = ''; }, 5000);
}

// A modal confirmation using <dialog>; resolves true when confirmed.
export function confirmDialog(text, action = 'Delete') {
  return new Promise((resolve) => {
    const d = h('dialog', { class: 'confirm', 'aria-label': 'Confirm' },
      h('p', {}, text),
      h('form', { method: 'dialog', class: 'row' },
        h('button', { value: 'cancel', type: 'submit' }, 'Cancel'),
        h('button', { value: 'ok', type: 'submit', class: 'danger' }, action)));
    d.addEventListener('close', () => { resolve(d.returnValue === 'ok'); d.remove(); });
    document.body.append(d);
    d.showModal();
  });
}

// A labelled form field; `input` is the control element.
export function field(label, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = id;
  const err = h('span', { class: 'field-error', id: `${id}-err`, role: 'alert' });
  input.setAttribute('aria-describedby', `${id}-err`);
  // A message about the old value must not stay under a corrected one.
  input.addEventListener('input', () => { err.textContent = ''; });
  return h('div', { class: 'field', dataset: { field: input.name || '' } },
    h('label', { for: id }, label), input, hint ? h('small', { class: 'muted' }, hint) : null, err);
}

// Shows an API error next to the field it concerns (by form control name), else in
// the form's summary line.
export function showError(form, err, fieldFor) {
  for (const e of form.querySelectorAll('.field-error')) e.textContent = '';
  const name = fieldFor ? fieldFor(err) : null;
  const slot = name && form.querySelector(`[name="${name}"]`);
  const target = slot ? form.querySelector(`#${slot.id}-err`) : form.querySelector('.form-error');
  if (target) target.textContent = err.message;
  if (slot) slot.focus();
}
