// Usage: normalized GPU-hours per day this month (mine), and for admins the top users
// and the split by model; each as CSV too.
import { api, enc } from './api.js';
import { h, chart } from './dom.js';

const fmt = (x) => (x >= 100 ? Math.round(x).toLocaleString() : x >= 1 || x === 0 ? x.toFixed(2) : x.toPrecision(3));

function table(caption, rows, keyName) {
  return h('table', { class: 'usage-table' },
    h('caption', {}, caption),
    h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, keyName), h('th', { scope: 'col', class: 'num' }, 'GPU-hours'))),
    h('tbody', {}, rows.length
      ? rows.map((r) => h('tr', {}, h('th', { scope: 'row' }, r.key), h('td', { class: 'num' }, `${fmt(r.gpu_hours)}${r.recovered ? ' *' : ''}`)))
      : h('tr', {}, h('td', { colspan: 2, class: 'muted' }, 'No usage yet.'))));
}

// The waste report: held against used GPU-hours per user, and what idle reclaim took.
function wasteTable(rows) {
  const pct = (a, b) => (b > 0 ? `${Math.round((100 * a) / b)} %` : '–');
  const cols = ['User', 'Held', 'Measured', 'Used', 'Used of measured', 'Idle', 'Reclaimed (servers)'];
  return h('table', { class: 'usage-table waste' },
    h('caption', {}, 'Allocated versus used GPU-hours this month'),
    h('thead', {}, h('tr', {}, cols.map((c, i) => h('th', { scope: 'col', class: i ? 'num' : null }, c)))),
    h('tbody', {}, rows.length
      ? rows.map((r) => h('tr', {},
        h('th', { scope: 'row' }, r.user),
        h('td', { class: 'num' }, fmt(r.gpu_hours)),
        h('td', { class: 'num' }, fmt(r.measured_gpu_hours)),
        h('td', { class: 'num' }, fmt(r.used_gpu_hours)),
        h('td', { class: 'num' }, pct(r.used_gpu_hours, r.measured_gpu_hours)),
        h('td', { class: 'num' }, fmt(r.idle_gpu_hours)),
        h('td', { class: 'num' }, `${fmt(r.reclaimed_gpu_hours)} (${r.reclaimed_servers})`)))
      : h('tr', {}, h('td', { colspan: cols.length, class: 'muted' }, 'No usage yet.'))));
}

export async function usagePage(ctx) {
  const me = ctx.me.user.name;
  const admin = ctx.me.user.role === 'admin';
  const [mine, profile] = await Promise.all([
    api('GET', `/api/v1/usage?group_by=day&user=${enc(me)}`),
    api('GET', '/api/v1/me').catch(() => null),
  ]);
  const limit = profile?.effective_quota?.gpu_hours_per_month;
  const total = mine.reduce((a, r) => a + r.gpu_hours, 0);
  // Every day of the month so far, zero where nothing ran.
  const now = new Date();
  const days = [];
  for (let d = 1; d <= now.getUTCDate(); d++) {
    const key = `${now.getUTCFullYear()}-${String(now.getUTCMonth() + 1).padStart(2, '0')}-${String(d).padStart(2, '0')}`;
    days.push((mine.find((r) => r.key === key) || { gpu_hours: 0 }).gpu_hours);
  }
  const page = h('div', {}, h('h2', {}, 'Usage'),
    h('p', { class: 'usage-total' }, `This month: ${fmt(total)}${limit != null ? ` of ${fmt(limit)}` : ''} GPU-hours (a whole GPU counts 1 per hour, a MIG slice its share of the GPU).`),
    limit != null ? h('progress', { max: Math.max(limit, 0.001), value: Math.min(total, limit), 'aria-label': 'GPU-hours used of the monthly quota' }) : null,
    chart(days, Math.max(1, ...days), 'My GPU-hours per day this month'),
    h('p', {}, h('a', { class: 'button', href: `/api/v1/usage?group_by=day&user=${enc(me)}&format=csv`, download: 'kcloud-usage.csv' }, 'Download CSV')));
  if (admin) {
    const [users, models, waste] = await Promise.all([
      api('GET', '/api/v1/usage?group_by=user'),
      api('GET', '/api/v1/usage?group_by=model'),
      api('GET', '/api/v1/usage/efficiency'),
    ]);
    users.sort((a, b) => b.gpu_hours - a.gpu_hours);
    waste.sort((a, b) => (b.gpu_hours - b.used_gpu_hours) - (a.gpu_hours - a.used_gpu_hours));
    page.append(
      h('div', { class: 'row' },
        table('Top users this month', users.slice(0, 20), 'User'),
        table('By model this month', models, 'Model')),
      wasteTable(waste.slice(0, 20)),
      h('p', { class: 'muted' }, 'Measured: held with a utilization reading (MIG slices need GPM, Hopper or newer). Used: weighted by how busy. Idle: under the idle threshold. Reclaimed: idle time of servers stopped for idle GPUs.'),
      h('p', {}, h('a', { class: 'button', href: '/api/v1/usage/efficiency?format=csv', download: 'kcloud-efficiency.csv' }, 'Waste report as CSV')),
      h('p', { class: 'muted' }, '* includes time closed at a restart (an upper bound by at most 10 s).'),
      h('p', {}, h('a', { class: 'button', href: '/api/v1/usage?group_by=user&format=csv', download: 'kcloud-usage-users.csv' }, 'All users as CSV')));
  }
  return page;
}
