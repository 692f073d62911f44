// The REST client and the live store fed by GET /api/v1/events.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function csrf() {
  const m = document.cookie.match(/(?:^|;\s*)(?:__Host-)?kcloud_csrf=([^;]*)/);
  return m ? m[1] : '';
}

async function errorOf(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return new ApiError(resp.status, body.error.code, body.error.message);
  } catch (_) { /* not JSON */ }
  return new ApiError(resp.status, 'http_' + resp.status, `${resp.status} ${resp.statusText}`);
}

let refreshing = null;
// Trades the refresh cookie for a new session (access cookie) once, shared by all
// callers that saw a 401 at the same time.
export function refreshSession() {
  if (!refreshing) {
    refreshing = fetch('/api/v1/auth/refresh', {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'X-CSRF-Token': csrf() },
    }).then((r) => r.ok).catch(() => false).finally(() => { refreshing = null; });
  }
  return refreshing;
}

// A JSON API call. Every non-GET carries the CSRF header; a 401 refreshes the session
// once and retries.
export async function api(method, path, body, { raw = false, retry = true } = {}) {
  const headers = {};
  if (method !== 'GET') headers['X-CSRF-Token'] = csrf();
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, {
    method,
    headers,
    credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401 && retry && !path.startsWith('/api/v1/auth/')) {
    if (await refreshSession()) return api(method, path, body, { raw, retry: false });
    window.dispatchEvent(new Event('kcloud:signedout'));
  }
  if (!resp.ok) throw await errorOf(resp);
  if (raw) return resp;
  if (resp.status === 204) return null;
  const type = resp.headers.get('content-type') || '';
  return type.includes('json') ? resp.json() : resp.text();
}

// Uploads a file as the raw request body with progress (fetch reports none).
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const x = new XMLHttpRequest();
    x.open('PUT', path);
    x.setRequestHeader('X-CSRF-Token', csrf());
    x.setRequestHeader('Content-Type', 'application/octet-stream');
    x.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    x.onerror = () => reject(new ApiError(0, 'network', 'upload failed: network error'));
    x.onload = () => {
      let body = null;
      try { body = JSON.parse(x.responseText); } catch (_) { /* empty */ }
      if (x.status >= 200 && x.status < 300) resolve(body);
      else reject(new ApiError(x.status, body?.error?.code || 'http', body?.error?.message || `upload failed (${x.status})`));
    };
    x.send(file);
  });
}

export const enc = encodeURIComponent;
// A path of several segments, each encoded, slashes kept.
export const encPath = (p) => p.split('/').filter(Boolean).map(enc).join('/');

// Fleets up to this many nodes are drawn whole (every node, every device); larger ones
// as a summary and a node list, with the devices of the nodes looked at.
export const SMALL_FLEET = 16;

// The live cluster and servers. Emits 'change' with {nodes: Set, servers: bool,
// rows: bool, summary: bool, reset: bool}, at most once per animation frame, so a
// burst of events costs one render.
//
// The stream follows the fleet summary and every node's line always, and the devices
// of the nodes in `following` ('*' for all: the mode of small fleets, chosen after the
// first snapshot).
export class Live extends EventTarget {
  constructor() {
    super();
    this.nodes = new Map();
    this.rows = new Map();
    this.summary = null;
    this.servers = new Map();
    // Servers that were queued when the stream was reset, until it is synced again.
    this.queuedBefore = new Set();
    this.synced = false;
    this.mode = null; // 'small' | 'fleet', known after the first snapshot
    this.following = [];
    this.history = new Map(); // gpu:uuid, mem:uuid or node:name -> recent values
    this.pending = { nodes: new Set(), servers: false, rows: false, summary: false, reset: false };
    this.frame = 0;
    this.source = null;
    this.closed = false;
  }

  // Follows the devices of `names` (an array, or '*'); reconnects when that changes.
  follow(names) {
    const key = (x) => (x === '*' ? '*' : [...x].sort().join(','));
    if (key(names) === key(this.following)) return;
    this.following = names === '*' ? '*' : [...names];
    if (this.source && !this.closed) { this.source.close(); this.start(); }
  }

  start() {
    this.closed = false;
    const nodes = this.following === '*' ? '*' : this.following.map(encodeURIComponent).join(',');
    const es = new EventSource(`/api/v1/events?summary=true&rows=true&nodes=${nodes}`);
    this.source = es;
    es.addEventListener('reset', (e) => {
      this.hello = JSON.parse(e.data);
      this.nodes.clear();
      this.rows.clear();
      // A reconnect (following other nodes, a dropped stream) must not lose "it was
      // queued": the server's next state may come in the new snapshot.
      for (const [k, s] of this.servers) if (s.status === 'queued') this.queuedBefore.add(k);
      this.servers.clear();
      this.synced = false;
      this.pending.reset = true;
      this.schedule();
    });
    es.addEventListener('summary', (e) => {
      this.summary = JSON.parse(e.data);
      this.pending.summary = true;
      this.schedule();
    });
    es.addEventListener('rows', (e) => {
      for (const r of JSON.parse(e.data)) this.rows.set(r.name, r);
      this.pending.rows = true;
      // A small fleet that grew: from now on, the fleet view (never back: no flapping).
      if (this.synced && this.mode === 'small' && this.rows.size > SMALL_FLEET) {
        this.mode = 'fleet';
        this.follow([]);
        return;
      }
      this.schedule();
    });
    es.addEventListener('node', (e) => {
      const n = JSON.parse(e.data);
      this.nodes.set(n.name, n);
      this.record(n);
      this.pending.nodes.add(n.name);
      this.schedule();
    });
    es.addEventListener('server', (e) => {
      const s = JSON.parse(e.data);
      const key = `${s.owner}/${s.name}`;
      const before = this.servers.get(key);
      const wasQueued = before ? before.status === 'queued' : this.queuedBefore.has(key);
      this.queuedBefore.delete(key);
      // A queued server that got its devices: the shell tells the user.
      if (wasQueued && s.status !== 'queued') {
        this.dispatchEvent(new CustomEvent('dequeued', { detail: s }));
      }
      this.servers.set(`${s.owner}/${s.name}`, s);
      this.pending.servers = true;
      this.schedule();
    });
    es.addEventListener('server_removed', (e) => {
      const s = JSON.parse(e.data);
      this.servers.delete(`${s.owner}/${s.name}`);
      this.pending.servers = true;
      this.schedule();
    });
    es.addEventListener('synced', () => {
      this.synced = true;
      this.queuedBefore.clear();
      if (!this.mode) {
        this.mode = this.rows.size <= SMALL_FLEET ? 'small' : 'fleet';
        if (this.mode === 'small') { this.follow('*'); return; }
      }
      this.pending.reset = true;
      this.schedule();
      this.status('live');
    });
    es.onerror = async () => {
      if (this.closed || es !== this.source) return;
      this.status('reconnecting…');
      if (es.readyState === EventSource.CLOSED) {
        // Refused (session expired): refresh the session, then follow again.
        const ok = await refreshSession();
        if (!ok) { window.dispatchEvent(new Event('kcloud:signedout')); return; }
        setTimeout(() => { if (!this.closed && es === this.source) this.start(); }, 500);
      }
    };
  }

  // Models and MIG profiles on the fleet, from the summary.
  models() {
    return [...new Set((this.summary?.classes || []).map((c) => c.model))].sort();
  }

  profiles() {
    return [...new Set((this.summary?.classes || []).filter((c) => c.profile).map((c) => c.profile))].sort();
  }

  // A change already scheduled for the next frame is dropped: pages listening to a
  // stopped store are gone, or about to be.
  stop() {
    this.closed = true;
    if (this.source) this.source.close();
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
  }

  status(text) {
    const el = document.getElementById('live');
    if (el) el.textContent = text;
  }

  // Keeps the last samples of node CPU and GPU utilization for sparklines.
  record(n) {
    const push = (key, v) => {
      if (v === undefined || v === null) return;
      let a = this.history.get(key);
      if (!a) { a = []; this.history.set(key, a); }
      if (a.length && a.at(-1).t === n.last_seen_ms) return;
      a.push({ t: n.last_seen_ms, v });
      if (a.length > 40) a.shift();
    };
    const cpu = n.metrics?.cpu_utilization_ratio;
    push(`node:${n.name}`, cpu === undefined || cpu === null ? undefined : cpu * 100);
    for (const d of n.devices) {
      if (d.kind === 'gpu') push(`gpu:${d.uuid}`, d.utilization_gpu_percent);
      if (d.memory_total_bytes) push(`mem:${d.uuid}`, (100 * d.memory_used_bytes) / d.memory_total_bytes);
    }
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      if (this.closed) return;
      const detail = this.pending;
      this.pending = { nodes: new Set(), servers: false, rows: false, summary: false, reset: false };
      this.dispatchEvent(new CustomEvent('change', { detail }));
    });
  }

  device(uuid) {
    for (const n of this.nodes.values()) {
      const d = n.devices.find((x) => x.uuid === uuid);
      if (d) return d;
    }
    return null;
  }
}
