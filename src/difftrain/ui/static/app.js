// The page's router: hash routes (#/, #/run/ID, #/compare?ids=a,b, #/launch). Each view is a function
// start(container, ...) that returns its stop(); the stop ends its polling before the next view starts.

import {decodePath, onConnection} from './api.js';
import {el} from './dom.js';
import {startCompare} from './compare.js';
import {startLaunch} from './launch.js';
import {startRun} from './run.js';
import {startRuns} from './runs.js';

const view = document.getElementById('view');
const connection = document.getElementById('connection');
let stopView = null;

function parseHash() {
  const hash = location.hash.replace(/^#/, '') || '/';
  const q = hash.indexOf('?');
  const path = q < 0 ? hash : hash.slice(0, q);
  const params = new Map();
  if (q >= 0) {
    for (const part of hash.slice(q + 1).split('&')) {
      const eq = part.indexOf('=');
      if (eq > 0) params.set(part.slice(0, eq), part.slice(eq + 1)); // values decoded by their reader
    }
  }
  return {path, params};
}

function route() {
  if (stopView) stopView();
  stopView = null;
  view.replaceChildren();
  window.scrollTo(0, 0); // a new page starts at its top, not where the last one was scrolled to
  document.title = 'difftrain';
  const {path, params} = parseHash();
  let active = 'runs';
  try {
    if (path === '/' || path === '') {
      stopView = startRuns(view);
    } else if (path.startsWith('/run/')) {
      stopView = startRun(view, decodePath(path.slice('/run/'.length)));
    } else if (path === '/compare') {
      // Each id is encoded on its own, so a ',' inside a folder name stays part of its id.
      const ids = (params.get('ids') || '').split(',').filter(Boolean).map(decodeURIComponent);
      stopView = startCompare(view, ids);
      active = 'compare';
    } else if (path === '/launch') {
      stopView = startLaunch(view);
      active = 'launch';
    } else {
      view.append(el('p', {class: 'error'}, `No page ${path}: `, el('a', {href: '#/'}, 'back to the runs'), '.'));
    }
  } catch (err) {
    view.append(el('p', {class: 'error'}, `This page failed: ${err.message}`));
  }
  for (const link of document.querySelectorAll('nav a')) link.classList.toggle('active', link.dataset.nav === active);
}

onConnection((up) => {
  connection.hidden = up;
});
window.addEventListener('hashchange', route);
route();
