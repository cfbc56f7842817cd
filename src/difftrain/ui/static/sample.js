// The sample panel of a run page: POST /api/sample, then poll the job and show its images as they appear.
// Empty fields are sent as null: the run's own defaults apply, as with `difftrain sample`.

import {fileUrl, getJSON, postJSON} from './api.js';
import {el, setText} from './dom.js';

const SCHEDULERS = ['ddpm', 'ddim', 'dpm++', 'unipc', 'euler', 'euler-a', 'heun'];
const JOB_POLL_MS = 1000;

function field(label, input, hint) {
  return el('label', {class: 'field'}, el('span', {class: 'label'}, label), input,
    hint ? el('span', {class: 'hint'}, hint) : null);
}

function blankToNull(value) {
  const text = value.trim();
  return text === '' ? null : text;
}

function integerOrNull(input) {
  const text = input.value.trim();
  if (text === '') return null;
  // Anything but a whole number goes to the server as typed, whose 400 names the value and what is allowed.
  return /^\d+$/.test(text) ? Number(text) : text;
}

export function samplePanel(runId) {
  const source = el('select', {testid: 'sample-source'});
  const labels = el('input', {type: 'text', testid: 'sample-labels', placeholder: 'e.g. 0,3 (class-conditional runs)'});
  const prompts = el('textarea', {testid: 'sample-prompts', rows: '3', placeholder: 'one prompt per line (text-conditional runs)'});
  const negative = el('input', {type: 'text', testid: 'sample-negative', placeholder: 'the empty prompt'});
  const scheduler = el('select', {testid: 'sample-scheduler'}, el('option', {value: ''}, "the run's default"),
    SCHEDULERS.map((name) => el('option', {value: name}, name)));
  const steps = el('input', {type: 'number', min: '1', testid: 'sample-steps', placeholder: 'default'});
  const guidance = el('input', {type: 'text', testid: 'sample-guidance', placeholder: 'e.g. 3, or 1,3,5 (a sweep)'});
  const seeds = el('input', {type: 'text', testid: 'sample-seeds', placeholder: 'e.g. 0'});
  const count = el('input', {type: 'number', min: '1', testid: 'sample-count', placeholder: 'default'});
  const labelsField = field('Class labels', labels, 'comma-separated');
  const promptsField = field('Prompts', prompts, 'one per line');
  const negativeField = field('Negative prompt', negative);
  const submit = el('button', {type: 'submit', testid: 'sample-submit'}, 'Sample');
  const error = el('p', {class: 'error', testid: 'sample-error', hidden: true});
  const stateLine = el('p', {class: 'muted', testid: 'sample-state'});
  const command = el('code', {testid: 'sample-command'});
  const copy = el('button', {type: 'button', testid: 'sample-copy', onclick: () => copyCommand()}, 'Copy');
  const commandRow = el('div', {class: 'command', hidden: true}, command, copy);
  const images = el('div', {class: 'sample-images', testid: 'sample-images'});
  const form = el('form', {class: 'sample-form', testid: 'sample-form', onsubmit: (e) => {
    e.preventDefault();
    start();
  }},
  el('div', {class: 'fields'},
    field('Source', source),
    labelsField,
    promptsField,
    negativeField,
    field('Scheduler', scheduler),
    field('Steps', steps),
    field('Guidance scale', guidance, 'a comma list is a sweep'),
    field('Seeds', seeds),
    field('Images', count)),
  el('div', {class: 'actions'}, submit), error);
  const node = el('div', {testid: 'sample-panel'}, form, stateLine, commandRow, images);

  let job = null;
  let timer = null;
  let closed = false;
  const shown = new Set();

  function showError(message) {
    setText(error, message);
    error.hidden = !message;
  }

  async function start() {
    showError('');
    const prompted = prompts.value.split('\n').map((line) => line.trim()).filter(Boolean);
    const body = {
      run: runId,
      source: source.value || null,
      class_labels: blankToNull(labels.value),
      prompts: prompted.length ? prompted : null,
      negative_prompt: blankToNull(negative.value),
      scheduler: scheduler.value || null,
      num_inference_steps: integerOrNull(steps),
      guidance_scale: blankToNull(guidance.value),
      seed: blankToNull(seeds.value),
      num_images: integerOrNull(count),
    };
    submit.disabled = true;
    try {
      const answer = await postJSON('/api/sample', body);
      clearTimeout(timer);
      job = answer.job;
      images.replaceChildren();
      shown.clear();
      render();
      follow();
    } catch (err) {
      showError(err.message);
    } finally {
      submit.disabled = false;
    }
  }

  function follow() {
    if (closed || !job || job.state === 'done' || job.state === 'failed') return;
    const id = job.id;
    timer = setTimeout(async () => {
      try {
        const answer = await getJSON(`/api/sample/${encodeURIComponent(id)}`);
        if (job && job.id === id) job = answer.job;
        render();
      } catch (err) {
        showError(err.message);
        if (err.status === 404) return; // the job is gone (server restarted): nothing more to wait for
      }
      follow();
    }, JOB_POLL_MS);
  }

  function addImage(path, testid, label) {
    if (shown.has(path)) return;
    shown.add(path);
    const url = fileUrl(path);
    const name = path.split('/').pop();
    images.append(el('figure', {class: 'sample', testid},
      el('a', {href: url, target: '_blank', rel: 'noopener'}, el('img', {src: url, alt: label || name})),
      el('figcaption', {}, el('a', {href: url, download: name, testid: 'sample-download'}, label ? `${label} (${name})` : name))));
  }

  function render() {
    if (!job) return;
    const total = job.total ? ` (${(job.images || []).length} of ${job.total})` : '';
    setText(stateLine, `job ${job.id}: ${job.state}${total}`);
    stateLine.dataset.state = job.state;
    if (job.state === 'failed' && job.error) showError(job.error);
    setText(command, job.command || '');
    commandRow.hidden = !job.command;
    for (const path of job.images || []) addImage(path, 'sample-image');
    if (job.grid) addImage(job.grid, 'sample-grid', 'grid');
  }

  async function copyCommand() {
    const text = command.textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      // No clipboard API outside a secure context (a --host address over plain http): select the text instead,
      // so Ctrl-C copies it.
      const range = document.createRange();
      range.selectNodeContents(command);
      const selection = getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      setText(copy, 'Selected: press Ctrl-C');
      return;
    }
    setText(copy, 'Copied');
    setTimeout(() => setText(copy, 'Copy'), 1500);
  }

  return {
    node,
    /** The run's sample sources (export, best, checkpoints); keeps the chosen one while it still exists. */
    setSources(sources) {
      const chosen = source.value;
      const key = JSON.stringify(sources || []);
      if (source.dataset.key === key) return;
      source.dataset.key = key;
      source.replaceChildren(...(sources || []).map((s) => el('option', {value: s.name}, s.label || s.name)));
      if ((sources || []).some((s) => s.name === chosen)) source.value = chosen;
      submit.disabled = !(sources || []).length;
      submit.title = submit.disabled ? 'nothing to sample from yet: no export or checkpoint' : '';
    },
    /**
     * Show the fields the run's kind takes (RunInfo.kind is its model family: pixel-class, latent-text,
     * stable-diffusion, ...); an unknown kind shows them all. Hidden fields are sent as null.
     */
    setKind(kind) {
      const known = typeof kind === 'string' && kind !== '';
      const classes = !known || kind.includes('class');
      const text = !known || kind.includes('text') || kind.includes('stable-diffusion');
      labelsField.hidden = !classes;
      promptsField.hidden = !text;
      negativeField.hidden = !text;
      if (!classes) labels.value = '';
      if (!text) {
        prompts.value = '';
        negative.value = '';
      }
    },
    destroy() {
      closed = true;
      clearTimeout(timer);
    },
  };
}
