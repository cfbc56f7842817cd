// #/launch : start a training run from a preset or a YAML file under RUNS_DIR, with overrides, and the queue of
// trainings this server started (Stop = a clean stop, as Ctrl-C; Resume = the same run again).

import {fileUrl, getJSON, postJSON, runHash} from './api.js';
import {el, section, setText, syncRows} from './dom.js';
import {poller} from './poll.js';

const STOPPABLE = ['queued', 'running'];
const RESUMABLE = ['stopped', 'failed'];

export function startLaunch(view) {
  const preset = el('select', {testid: 'launch-preset'}, el('option', {value: ''}, 'loading presets\u2026'));
  const yaml = el('input', {type: 'text', testid: 'launch-yaml', placeholder: 'configs/my-run.yaml'});
  const overrides = el('textarea', {testid: 'launch-overrides', rows: '4', placeholder: 'train.max_steps=2000\ndata.resolution=32'});
  const name = el('input', {type: 'text', testid: 'launch-name', placeholder: 'my-run'});
  const check = el('button', {type: 'button', testid: 'launch-check', onclick: () => validate()}, 'Check');
  const startButton = el('button', {type: 'submit', testid: 'launch-start'}, 'Start');
  const result = el('div', {class: 'launch-result', testid: 'launch-result'});
  const form = el('form', {class: 'launch-form', testid: 'launch-form', onsubmit: (e) => {
    e.preventDefault();
    launch();
  }, oninput: () => result.replaceChildren()},
  el('label', {class: 'field'}, el('span', {class: 'label'}, 'Preset'), preset),
  el('label', {class: 'field'}, el('span', {class: 'label'}, 'or a YAML file'), yaml,
    el('span', {class: 'hint'}, 'under RUNS_DIR; used instead of the preset when filled in')),
  el('label', {class: 'field wide'}, el('span', {class: 'label'}, 'Overrides'), overrides,
    el('span', {class: 'hint'}, 'one key=value per line, as on the command line')),
  el('label', {class: 'field'}, el('span', {class: 'label'}, 'Run name'), name,
    el('span', {class: 'hint'}, 'the run folder under RUNS_DIR')),
  el('div', {class: 'actions'}, check, startButton),
  result);

  const queueError = el('p', {class: 'error', testid: 'queue-error', hidden: true});
  const tbody = el('tbody');
  const queueEmpty = el('p', {class: 'muted', testid: 'queue-empty', hidden: true}, 'No trainings started from this page yet.');
  view.append(
    el('div', {class: 'toolbar'}, el('h1', {}, 'Launch')),
    section('New run', 'launch-panel', form),
    section('Queue', 'queue-panel', queueError,
      el('table', {class: 'data', testid: 'queue-table'},
        el('thead', {}, el('tr', {}, ['Run', 'Config', 'Overrides', 'State', 'PID', 'Exit', 'Log', ''].map((h) => el('th', {scope: 'col'}, h)))),
        tbody),
      queueEmpty));

  function request() {
    return {
      config: yaml.value.trim() || preset.value,
      overrides: overrides.value.split('\n').map((line) => line.trim()).filter(Boolean),
      name: name.value.trim(),
    };
  }

  // The server's problems are shown exactly as returned, one per line: they name the key and what is allowed.
  function showProblems(problems) {
    result.replaceChildren(el('ul', {class: 'problems error', testid: 'launch-problems'},
      problems.map((p) => el('li', {}, p))));
  }

  async function validate() {
    try {
      const answer = await postJSON('/api/launch/validate', request());
      if (answer.ok) {
        result.replaceChildren(el('p', {class: 'ok', testid: 'launch-ok'}, `OK: the run will be written to ${answer.run_id}`));
      } else {
        showProblems(answer.problems || []);
      }
    } catch (err) {
      showProblems([err.message]);
    }
  }

  async function launch() {
    startButton.disabled = true;
    try {
      const answer = await postJSON('/api/launch', request());
      result.replaceChildren(el('p', {class: 'ok', testid: 'launch-started'}, `Queued ${answer.job.run} (job ${answer.job.id}).`));
      poll.now();
    } catch (err) {
      showProblems(err.body && Array.isArray(err.body.problems) ? err.body.problems : [err.message]);
    } finally {
      startButton.disabled = false;
    }
  }

  async function act(action, runId) {
    queueError.hidden = true;
    try {
      await postJSON(`/api/${action}`, undefined, {id: runId});
    } catch (err) {
      setText(queueError, err.message);
      queueError.hidden = false;
    }
    poll.now();
  }

  function createRow(job) {
    const cells = Array.from({length: 7}, () => el('td'));
    const stop = el('button', {type: 'button', testid: 'queue-stop', onclick: () => act('stop', row.dataset.runId)}, 'Stop');
    const resume = el('button', {type: 'button', testid: 'queue-resume', onclick: () => act('resume', row.dataset.runId)}, 'Resume');
    const row = el('tr', {testid: 'queue-row', dataset: {jobId: job.id}}, cells, el('td', {class: 'actions'}, stop, resume));
    cells[3].append(el('span', {testid: 'queue-state'}), el('div', {class: 'reason small', testid: 'queue-job-error'}));
    row.cells_ = cells;
    row.stop = stop;
    row.resume = resume;
    return row;
  }

  function updateRow(row, job) {
    const [run, config, overrideCell, stateCell, pid, exit, log] = row.cells_;
    row.dataset.runId = job.run;
    row.dataset.state = job.state;
    if (run.dataset.key !== job.run) {
      run.dataset.key = job.run;
      run.replaceChildren(el('a', {href: runHash(job.run)}, job.run));
    }
    setText(config, job.config);
    setText(overrideCell, (job.overrides || []).join(' '));
    overrideCell.className = 'small';
    setText(stateCell.firstChild, job.state);
    stateCell.firstChild.className = `state-${job.state}`;
    setText(stateCell.lastChild, job.error || '');
    setText(pid, job.pid ?? '');
    setText(exit, job.returncode ?? '');
    if (log.dataset.key !== String(job.console_log)) {
      log.dataset.key = String(job.console_log);
      log.replaceChildren(job.console_log ? el('a', {href: fileUrl(job.console_log), target: '_blank', rel: 'noopener'}, 'console') : '');
    }
    row.title = job.command || '';
    row.stop.disabled = !STOPPABLE.includes(job.state);
    row.resume.disabled = !RESUMABLE.includes(job.state);
  }

  async function loadPresets() {
    try {
      const answer = await getJSON('/api/presets');
      preset.replaceChildren(...(answer.presets || []).map((p) =>
        el('option', {value: p.name, title: p.description || ''}, p.description ? `${p.name} \u2014 ${p.description}` : p.name)));
    } catch (err) {
      preset.replaceChildren(el('option', {value: ''}, `presets unavailable: ${err.message}`));
    }
  }

  loadPresets();
  const poll = poller(async () => {
    try {
      const answer = await getJSON('/api/queue');
      const jobs = answer.jobs || [];
      syncRows(tbody, jobs, (j) => j.id, createRow, updateRow);
      queueEmpty.hidden = jobs.length > 0;
    } catch (err) {
      setText(queueError, err.message);
      queueError.hidden = false;
    }
  });
  return () => poll.stop();
}
