// #/run/ID : one run, refreshed every 2 s: its status and actions, charts, preview grids, the sample panel,
// evaluations, checkpoints, skipped files, the resolved config and the model card.

import {fileUrl, getJSON, postJSON} from './api.js';
import {chartBox, chartTitle, draw, orderSeries, whenPlotly} from './charts.js';
import {el, section, setText, table} from './dom.js';
import * as fmt from './format.js';
import {gridViewer} from './grids.js';
import {poller} from './poll.js';
import {samplePanel} from './sample.js';

const MAX_POINTS = 2000; // per series: a 100k-row metrics file is thinned by the server, not drawn point by point

export function startRun(view, runId) {
  const title = el('h1', {testid: 'run-title'}, runId);
  const status = el('span', {class: 'badge', testid: 'run-status'});
  const step = el('span', {testid: 'run-step'});
  const meta = el('span', {class: 'muted', testid: 'run-meta'});
  const reason = el('p', {class: 'error', testid: 'run-error', hidden: true});
  const actionError = el('p', {class: 'error', testid: 'run-action-error', hidden: true});
  const stopButton = el('button', {type: 'button', testid: 'stop-button', disabled: true, onclick: () => act('stop')}, 'Stop');
  const resumeButton = el('button', {type: 'button', testid: 'resume-button', disabled: true, onclick: () => act('resume')}, 'Resume');
  const consoleLink = el('a', {testid: 'console-log-link', target: '_blank', rel: 'noopener', hidden: true}, 'console log');
  const pageError = el('p', {class: 'error', testid: 'run-page-error', hidden: true});

  const charts = el('div', {class: 'charts', testid: 'charts'}, el('p', {class: 'muted chart-wait'}, 'Loading charts\u2026'));
  const grids = gridViewer();
  const sampler = samplePanel(runId);
  const evaluations = table('evaluations-table', ['Evaluation', 'Results']);
  const checkpoints = table('checkpoints-table', ['Checkpoint', 'Step', 'Size']);
  const skipped = el('p', {testid: 'skipped'});
  const configText = el('pre', {testid: 'config-yaml'});
  const cardText = el('pre', {testid: 'model-card'});

  view.append(
    el('div', {class: 'run-head'},
      el('div', {class: 'toolbar'}, title, status, step, el('span', {class: 'spacer'}), consoleLink, stopButton, resumeButton),
      meta, reason, actionError),
    pageError,
    section('Charts', 'charts-panel', charts),
    section('Preview grids', 'grids-panel', grids.node),
    section('Sample', 'sample-section', sampler.node),
    el('div', {class: 'two-col'},
      section('Evaluations', 'evaluations-panel', evaluations.node),
      section('Checkpoints', 'checkpoints-panel', checkpoints.node)),
    section('Skipped files', 'skipped-panel', skipped),
    el('details', {class: 'panel', testid: 'config-panel'}, el('summary', {}, 'Resolved config'), configText),
    el('details', {class: 'panel', testid: 'card-panel'}, el('summary', {}, 'Model card'), cardText));

  let run = null;
  let version = null;
  let closed = false;
  const boxes = new Map();

  async function act(action) {
    actionError.hidden = true;
    try {
      await postJSON(`/api/${action}`, undefined, {id: runId});
    } catch (err) {
      setText(actionError, err.message);
      actionError.hidden = false;
    }
    poll.now();
  }

  function showDetails(d) {
    run = d.run;
    setText(title, run.name || run.id);
    document.title = `${run.name || run.id} \u2013 difftrain`;
    setText(status, run.status);
    status.className = `badge status-${run.status}`;
    setText(step, `step ${fmt.steps(run.step, run.max_steps)}`);
    const parts = [run.kind, run.preset && `preset ${run.preset}`, run.started && `started ${new Date(run.started).toLocaleString()}`,
      run.wall_seconds != null && `wall time ${fmt.duration(run.wall_seconds)}`, run.last_loss != null && `loss ${fmt.number(run.last_loss)}`,
      run.best && `best ${fmt.best(run.best)}`];
    setText(meta, parts.filter(Boolean).join(' \u00B7 '));
    setText(reason, run.error || '');
    reason.hidden = !run.error;
    stopButton.disabled = run.status !== 'training';
    resumeButton.disabled = !['interrupted', 'failed'].includes(run.status);
    if (d.console_log) consoleLink.href = fileUrl(d.console_log);
    consoleLink.hidden = !d.console_log;

    grids.update(d.grids);
    sampler.setSources(d.sources);
    sampler.setKind(run.kind);

    evaluations.tbody.replaceChildren(...(d.evaluations || []).map((e) => el('tr', {},
      el('td', {}, e.path ? el('a', {href: fileUrl(e.path), target: '_blank', rel: 'noopener'}, e.name) : e.name),
      el('td', {class: 'small'}, reportText(e.report)))));
    if (!(d.evaluations || []).length) evaluations.tbody.append(emptyRow(2, 'none'));
    checkpoints.tbody.replaceChildren(...(d.checkpoints || []).map((c) => el('tr', {},
      el('td', {}, c.name), el('td', {class: 'num'}, String(c.step)), el('td', {class: 'num'}, fmt.bytes(c.bytes)))));
    if (!(d.checkpoints || []).length) checkpoints.tbody.append(emptyRow(3, 'none'));
    const s = d.skipped || {count: null};
    if (s.count === null || s.count === undefined) {
      skipped.replaceChildren('Not known yet (train.log names them when the data is loaded).');
    } else if (s.count) {
      skipped.replaceChildren(`${s.count} file${s.count === 1 ? '' : 's'} skipped while loading the data`,
        ...(s.path ? [': ', el('a', {href: fileUrl(s.path), target: '_blank', rel: 'noopener'}, 'the list')] : []), '.');
    } else {
      skipped.replaceChildren('No files skipped.');
    }
    setText(configText, d.config_yaml || '');
    setText(cardText, d.model_card || '(no model card yet: it is written with the export)');
  }

  async function refreshMetrics() {
    // plotly.js loads while the metrics are fetched; the details above are on screen already.
    const plotly = whenPlotly();
    plotly.catch(() => {}); // reported below when it is awaited
    const answer = await getJSON('/api/metrics', {id: runId, max_points: MAX_POINTS, version});
    if (answer.unchanged) return;
    const Plotly = await plotly;
    if (closed) return;
    const series = answer.series || {};
    const names = orderSeries(Object.keys(series));
    if (!names.length) {
      setText(charts, 'No metrics yet (metrics.jsonl is written from the first logged step).');
      version = answer.version;
      return;
    }
    if (!boxes.size) charts.replaceChildren();
    for (const name of names) {
      if (!boxes.has(name)) {
        const box = chartBox(name, `chart-${name}`);
        boxes.set(name, box);
        charts.append(box);
      }
      await draw(Plotly, boxes.get(name), chartTitle(name), [{name, x: series[name].x, y: series[name].y}]);
    }
    version = answer.version;
    if (!charts.dataset.drawn) {
      charts.dataset.drawn = '1';
      performance.mark('difftrain:charts-drawn');
    }
  }

  const poll = poller(async () => {
    try {
      const details = await getJSON('/api/run', {id: runId});
      if (closed) return;
      pageError.hidden = true;
      showDetails(details);
      if (!grids.node.dataset.marked) {
        grids.node.dataset.marked = '1';
        performance.mark('difftrain:grids-drawn');
      }
    } catch (err) {
      setText(pageError, err.message);
      pageError.hidden = false;
      if (err.status === 404 || err.status === 403) return;
    }
    try {
      await refreshMetrics();
    } catch (err) {
      setText(charts, err.message);
      boxes.clear();
      version = null;
    }
  });

  return () => {
    closed = true;
    poll.stop();
    grids.destroy();
    sampler.destroy();
    for (const box of boxes.values()) if (window.Plotly) window.Plotly.purge(box.plot);
  };
}

function reportText(report) {
  if (!report || typeof report !== 'object') return fmt.DASH;
  return Object.entries(report).filter(([, v]) => typeof v !== 'object').map(([k, v]) => `${k} ${fmt.number(v)}`).join(', ');
}

function emptyRow(span, text) {
  return el('tr', {}, el('td', {colspan: String(span), class: 'muted'}, text));
}
