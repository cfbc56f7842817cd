// #/compare?ids=a,b : the chosen runs' curves overlaid on shared axes (loss, lr, and every eval metric all of
// them have) and their latest preview grids side by side; refreshed every 2 s, redrawn only when a run's
// metrics moved.

import {fileUrl, getJSON, runHash} from './api.js';
import {chartBox, chartTitle, draw, orderSeries, whenPlotly} from './charts.js';
import {el, section, setText} from './dom.js';
import {poller} from './poll.js';

const MAX_POINTS = 2000;

export function startCompare(view, ids) {
  const links = el('span', {class: 'compare-runs'});
  const errors = el('div', {testid: 'compare-errors'});
  const charts = el('div', {class: 'charts', testid: 'compare-charts'}, el('p', {class: 'muted chart-wait'}, 'Loading charts\u2026'));
  const grids = el('div', {class: 'compare-grids', testid: 'compare-grids'});
  view.append(
    el('div', {class: 'toolbar'}, el('h1', {}, 'Compare'), links),
    errors,
    section('Curves', 'compare-curves', charts),
    section('Latest preview grids', 'compare-grids-panel', grids));

  if (!ids.length) {
    errors.append(el('p', {class: 'error'}, 'No runs to compare: pick two or more on the ', el('a', {href: '#/'}, 'runs list'), '.'));
    return () => {};
  }

  // Per run: its details, the last metrics answer and its version; a run that fails to load is shown as an error.
  const runs = ids.map((id) => ({id, name: id, details: null, series: null, version: null, error: null}));
  const boxes = new Map();
  let closed = false;

  function renderHeader() {
    const key = JSON.stringify(runs.map((r) => [r.name, r.error]));
    if (links.dataset.key === key) return;
    links.dataset.key = key;
    links.replaceChildren(...runs.flatMap((r, i) => [i ? ' vs ' : '', el('a', {href: runHash(r.id)}, r.name)]));
    errors.replaceChildren(...runs.filter((r) => r.error).map((r) => el('p', {class: 'error'}, `${r.id}: ${r.error}`)));
  }

  function latestGrid(r) {
    const list = (r.details && r.details.grids) || [];
    return list.reduce((a, g) => (!a || g.step > a.step ? g : a), null);
  }

  // Rebuilt only when a run's newest grid changed: a rebuild every 2 s would reload every image.
  function renderGrids() {
    const key = JSON.stringify(runs.map((r) => [r.name, latestGrid(r)]));
    if (grids.dataset.key === key) return;
    grids.dataset.key = key;
    grids.replaceChildren(...runs.map((r) => {
      const last = latestGrid(r);
      return el('figure', {class: 'compare-grid', testid: 'compare-grid', dataset: {runId: r.id}},
        el('figcaption', {}, el('a', {href: runHash(r.id)}, r.name), last ? ` \u00B7 step ${last.step}` : ''),
        last ? el('a', {href: fileUrl(last.path), target: '_blank', rel: 'noopener'}, el('img', {src: fileUrl(last.path), alt: `${r.name} step ${last.step}`}))
          : el('p', {class: 'muted'}, 'no preview grid yet'));
    }));
  }

  // Which charts: loss and lr, then the eval metrics common to every loaded run.
  function chartNames() {
    const loaded = runs.filter((r) => r.series);
    if (!loaded.length) return [];
    const common = loaded.map((r) => new Set(Object.keys(r.series)))
      .reduce((a, b) => new Set([...a].filter((n) => b.has(n))));
    const wanted = [...common].filter((n) => n === 'loss' || n === 'lr' || n.startsWith('eval/'));
    return orderSeries(wanted);
  }

  async function drawCharts() {
    const Plotly = await whenPlotly();
    if (closed) return;
    const names = chartNames();
    if (!names.length) {
      setText(charts, 'No common metrics yet.');
      boxes.clear();
      return;
    }
    if (!boxes.size) charts.replaceChildren();
    for (const name of names) {
      if (!boxes.has(name)) {
        const box = chartBox(name, `compare-chart-${name}`);
        boxes.set(name, box);
        charts.append(box);
      }
      const traces = runs.filter((r) => r.series && r.series[name]).map((r) => ({name: r.name, x: r.series[name].x, y: r.series[name].y}));
      await draw(Plotly, boxes.get(name), chartTitle(name), traces);
    }
    if (!charts.dataset.drawn) {
      charts.dataset.drawn = '1';
      performance.mark('difftrain:compare-drawn');
    }
  }

  const poll = poller(async () => {
    let moved = false;
    // plotly.js loads while the runs are fetched (see charts.js); a failure is reported when drawing.
    whenPlotly().catch(() => {});
    await Promise.all(runs.map(async (r) => {
      try {
        const details = await getJSON('/api/run', {id: r.id});
        r.details = details;
        r.name = details.run.name || r.id;
        const answer = await getJSON('/api/metrics', {id: r.id, max_points: MAX_POINTS, version: r.version});
        if (!answer.unchanged) {
          r.series = answer.series || {};
          r.version = answer.version;
          moved = true;
        }
        r.error = null;
      } catch (err) {
        r.error = err.message;
      }
    }));
    if (closed) return;
    renderHeader();
    renderGrids();
    if (moved) {
      try {
        await drawCharts();
      } catch (err) {
        setText(charts, err.message);
        boxes.clear();
      }
    }
  });

  return () => {
    closed = true;
    poll.stop();
    for (const box of boxes.values()) if (window.Plotly) window.Plotly.purge(box.plot);
  };
}
