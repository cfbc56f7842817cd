// #/ : the runs list. Sort order and the picked runs live at module level, so they survive the 2 s refresh and
// a visit to another page.

import {compareHash, getJSON, runHash} from './api.js';
import {el, setText, syncRows} from './dom.js';
import * as fmt from './format.js';
import {poller} from './poll.js';

const COLUMNS = [
  {key: 'name', label: 'Run', value: (r) => r.name},
  {key: 'kind', label: 'Kind', value: (r) => r.kind},
  {key: 'preset', label: 'Preset', value: (r) => r.preset},
  {key: 'status', label: 'Status', value: (r) => r.status},
  {key: 'step', label: 'Step', value: (r) => r.step, numeric: true},
  {key: 'last_loss', label: 'Last loss', value: (r) => r.last_loss, numeric: true},
  {key: 'best', label: 'Best', value: (r) => (r.best ? r.best.value : null), numeric: true},
  {key: 'wall_seconds', label: 'Wall time', value: (r) => r.wall_seconds, numeric: true},
  {key: 'updated', label: 'Updated', value: (r) => r.updated, numeric: true},
];

const state = {sortKey: 'updated', descending: true, selected: new Set()};

function compareRuns(a, b) {
  const column = COLUMNS.find((c) => c.key === state.sortKey);
  const va = column.value(a);
  const vb = column.value(b);
  // Empty values go last in either direction: a run without a loss yet is never "the lowest loss".
  const emptyA = va === null || va === undefined || va === '';
  const emptyB = vb === null || vb === undefined || vb === '';
  if (emptyA || emptyB) return emptyA === emptyB ? a.id.localeCompare(b.id) : emptyA ? 1 : -1;
  const order = column.numeric ? va - vb : String(va).localeCompare(String(vb), undefined, {numeric: true});
  return (state.descending ? -order : order) || a.id.localeCompare(b.id);
}

export function startRuns(view) {
  const tbody = el('tbody');
  const headers = COLUMNS.map((column) =>
    el('th', {scope: 'col', dataset: {sortKey: column.key}, class: column.numeric ? 'num sortable' : 'sortable',
      tabindex: '0', title: 'sort by this column',
      onclick: () => sortBy(column.key),
      onkeydown: (e) => (e.key === 'Enter' || e.key === ' ') && (e.preventDefault(), sortBy(column.key))},
    column.label, el('span', {class: 'sort-mark', 'aria-hidden': 'true'})));
  const compareButton = el('button', {type: 'button', testid: 'compare-button', disabled: true,
    onclick: () => {
      location.hash = compareHash(visibleSelection());
    }}, 'Compare');
  const runsDir = el('span', {class: 'muted', testid: 'runs-dir'});
  const message = el('p', {class: 'error', testid: 'runs-error', hidden: true});
  const empty = el('p', {class: 'muted', testid: 'runs-empty', hidden: true},
    'No runs here yet: start one on the ', el('a', {href: '#/launch'}, 'Launch'), ' page, or with ',
    el('code', {}, 'difftrain train PRESET --output-dir RUNS_DIR/NAME'), '.');
  view.append(
    el('div', {class: 'toolbar'}, el('h1', {}, 'Runs'), runsDir, el('span', {class: 'spacer'}), compareButton),
    message,
    el('table', {class: 'data runs', testid: 'runs-table'},
      el('thead', {}, el('tr', {}, el('th', {class: 'pick'}, el('span', {class: 'sr-only'}, 'pick')), headers)),
      tbody),
    empty);

  let runs = [];

  function visibleSelection() {
    return runs.filter((r) => state.selected.has(r.id)).map((r) => r.id);
  }

  function updateCompare() {
    const n = visibleSelection().length;
    compareButton.disabled = n < 2;
    setText(compareButton, n ? `Compare (${n})` : 'Compare');
    compareButton.title = n < 2 ? 'pick two or more runs to compare' : '';
  }

  function sortBy(key) {
    // A new column starts ascending (lowest loss first), except Updated: the newest run first.
    state.descending = state.sortKey === key ? !state.descending : key === 'updated';
    state.sortKey = key;
    render();
  }

  function createRow(run) {
    const pick = el('input', {type: 'checkbox', testid: 'run-select', onchange: (e) => {
      if (e.target.checked) state.selected.add(run.id);
      else state.selected.delete(run.id);
      updateCompare();
    }});
    const cells = {};
    for (const column of COLUMNS) cells[column.key] = el('td', {dataset: {col: column.key}, class: column.numeric ? 'num' : ''});
    const link = el('a', {testid: 'run-link'});
    cells.name.append(link, el('div', {class: 'muted small run-id'}));
    cells.status.append(el('span', {class: 'badge'}), el('div', {class: 'reason small', testid: 'run-reason'}));
    const row = el('tr', {testid: 'run-row', dataset: {runId: run.id}}, el('td', {class: 'pick'}, pick),
      COLUMNS.map((c) => cells[c.key]));
    row.cells_ = cells;
    row.pick = pick;
    return row;
  }

  function updateRow(row, run) {
    const c = row.cells_;
    const link = c.name.firstChild;
    link.href = runHash(run.id);
    setText(link, run.name || run.id);
    setText(c.name.lastChild, run.id !== run.name ? run.id : '');
    row.pick.checked = state.selected.has(run.id);
    row.pick.setAttribute('aria-label', `pick ${run.name || run.id} to compare`);
    setText(c.kind, run.kind ?? fmt.DASH);
    setText(c.preset, run.preset ?? fmt.DASH);
    const badge = c.status.firstChild;
    setText(badge, run.status);
    badge.className = `badge status-${run.status}`;
    setText(c.status.lastChild, run.error || '');
    row.dataset.status = run.status;
    setText(c.step, fmt.steps(run.step, run.max_steps));
    setText(c.last_loss, fmt.number(run.last_loss));
    setText(c.best, fmt.best(run.best));
    setText(c.wall_seconds, fmt.duration(run.wall_seconds));
    setText(c.updated, fmt.ago(run.updated));
    c.updated.title = fmt.localTime(run.updated);
  }

  function render() {
    for (const th of headers) {
      const active = th.dataset.sortKey === state.sortKey;
      th.setAttribute('aria-sort', active ? (state.descending ? 'descending' : 'ascending') : 'none');
      setText(th.lastChild, active ? (state.descending ? ' \u25BC' : ' \u25B2') : '');
    }
    syncRows(tbody, [...runs].sort(compareRuns), (r) => r.id, createRow, updateRow);
    empty.hidden = runs.length > 0;
    updateCompare();
  }

  render();
  const poll = poller(async () => {
    try {
      const answer = await getJSON('/api/runs');
      runs = answer.runs || [];
      setText(runsDir, answer.runs_dir);
      message.hidden = true;
      render();
    } catch (err) {
      setText(message, err.message);
      message.hidden = false;
    }
  });
  return () => poll.stop();
}
