// Charts with plotly.js, loaded only when a page first needs a chart. plotly.min.js is several MB: on a busy
// 2-core machine its execution blocks the page for 2-3 s. Loaded with `defer` from index.html it ran before the
// run page's first data was shown (the grid slider appeared after ~3 s instead of ~1 s) and it slowed the runs
// list, which draws no chart at all. So the views ask for it after their first data is on screen.

import {el} from './dom.js';

const PLOTLY_URL = '/static/plotly.min.js';
let plotlyReady = null;

export function whenPlotly() {
  if (!plotlyReady) {
    plotlyReady = new Promise((resolve, reject) => {
      if (window.Plotly) {
        resolve(window.Plotly);
        return;
      }
      const script = document.createElement('script');
      script.src = PLOTLY_URL;
      script.async = true;
      script.dataset.testid = 'plotly-js';
      script.addEventListener('load', () => {
        performance.mark('difftrain:plotly-ready');
        if (window.Plotly) resolve(window.Plotly);
        else reject(new Error('plotly.js loaded without defining Plotly'));
      });
      script.addEventListener('error', () => {
        script.remove();
        plotlyReady = null; // the next refresh tries again
        reject(new Error('plotly.js did not load: charts are unavailable until it does'));
      });
      document.head.append(script);
    });
  }
  return plotlyReady;
}

// Plotly reads a few HTML-like tags (<b>, <br>, <a>) and entities in titles, legends and hover text; a run name
// is user data, so its markup characters are turned into entities that plotly shows as plain characters.
export function plotlyText(text) {
  return String(text).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

const TITLES = {loss: 'loss', lr: 'learning rate', images_per_s: 'images/s'};

export function chartTitle(name) {
  return TITLES[name] || name.replace(/^eval\//, 'eval: ');
}

/** Series names in display order: loss, lr, images/s, then the eval metrics, then anything else. */
export function orderSeries(names) {
  const rank = (n) => (n === 'loss' ? 0 : n === 'lr' ? 1 : n === 'images_per_s' ? 2 : n.startsWith('eval/') ? 3 : 4);
  return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

/** A chart box (title + plot area) that `draw` fills; `key` names it for tests (data-chart). */
export function chartBox(key, testid) {
  const plot = el('div', {class: 'plot'});
  const box = el('div', {class: 'chart', testid, dataset: {chart: key}}, plot);
  box.plot = plot;
  return box;
}

/** Draw or update one chart: traces = [{name, x, y}]; Plotly.react redraws only what changed. */
export function draw(Plotly, box, title, traces) {
  const many = traces.length > 1;
  const data = traces.map((t) => ({
    type: 'scatter',
    mode: t.x.length > 1 ? 'lines' : 'markers',
    name: plotlyText(t.name),
    x: t.x,
    y: t.y,
    line: {width: 1.5},
    hovertemplate: `${many ? '%{fullData.name}<br>' : ''}step %{x}<br>%{y:.4g}<extra></extra>`,
  }));
  const layout = {
    title: {text: plotlyText(title), font: {size: 13}, x: 0.02, xanchor: 'left'},
    margin: {l: 48, r: 12, t: 30, b: 32},
    height: 240,
    showlegend: many,
    legend: {orientation: 'h', y: -0.2},
    // automargin: long tick labels (a learning rate of 0.0009999995) widen the margin instead of being cut off
    xaxis: {zeroline: false, automargin: true},
    yaxis: {zeroline: false, exponentformat: 'e', automargin: true},
    uirevision: 'keep', // keep the user's zoom across live updates
    paper_bgcolor: 'rgba(0,0,0,0)',
    plot_bgcolor: 'rgba(0,0,0,0)',
  };
  if (many) layout.height = 280;
  return Plotly.react(box.plot, data, layout, {displaylogo: false, responsive: true});
}
