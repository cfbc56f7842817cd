// The preview grids of a run: one large image, a slider over the steps, and a filmstrip of thumbnails.
// A long run has hundreds of grids (each can be megabytes), so a thumbnail gets its `src` only when it scrolls
// near the strip's visible part (an IntersectionObserver on the strip; loading="lazy" alone still loads every
// thumbnail within a few thousand pixels of the window).

import {fileUrl} from './api.js';
import {el, setText} from './dom.js';

export function gridViewer() {
  const image = el('img', {testid: 'grid-image', alt: 'preview grid', class: 'grid-image', decoding: 'async'});
  const link = el('a', {target: '_blank', rel: 'noopener'}, image);
  const caption = el('span', {testid: 'grid-step', class: 'grid-step'});
  const slider = el('input', {type: 'range', min: '0', max: '0', value: '0', step: '1', testid: 'grid-slider',
    'aria-label': 'preview grid step', oninput: () => show(Number(slider.value), false)});
  const strip = el('div', {class: 'filmstrip', testid: 'filmstrip'});
  const none = el('p', {class: 'muted', testid: 'grids-none'}, 'No preview grids yet (train.sample_every_steps writes them).');
  const body = el('div', {class: 'grids', hidden: true}, el('div', {class: 'grid-main'}, link),
    el('div', {class: 'slider-row'}, slider, caption), strip);
  const node = el('div', {testid: 'grids'}, none, body);

  let grids = [];
  let index = -1;
  const thumbs = [];
  const observer = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      const img = entry.target;
      img.src = img.dataset.src;
      observer.unobserve(img);
    }
  }, {root: strip, rootMargin: '0px 300px'});

  function show(i, scroll = true) {
    if (!grids.length) return;
    index = Math.max(0, Math.min(grids.length - 1, i));
    const grid = grids[index];
    const url = fileUrl(grid.path);
    if (image.getAttribute('src') !== url) image.src = url;
    link.href = url;
    slider.value = String(index);
    setText(caption, `step ${grid.step}  (${index + 1} of ${grids.length})`);
    thumbs.forEach((t, j) => t.classList.toggle('current', j === index));
    if (scroll) reveal(thumbs[index]);
    else revealIfHidden(thumbs[index]);
  }

  // Scroll the strip (never the page) so the current thumbnail is in view.
  function reveal(thumb) {
    strip.scrollLeft = thumb.offsetLeft - strip.clientWidth / 2 + thumb.offsetWidth / 2;
  }

  function revealIfHidden(thumb) {
    const left = thumb.offsetLeft;
    if (left < strip.scrollLeft || left + thumb.offsetWidth > strip.scrollLeft + strip.clientWidth) reveal(thumb);
  }

  function addThumb(grid, i) {
    const img = el('img', {loading: 'lazy', alt: `step ${grid.step}`, dataset: {src: fileUrl(grid.path)}, width: '72', height: '72'});
    const button = el('button', {type: 'button', class: 'thumb', testid: 'thumb', title: `step ${grid.step}`,
      onclick: () => show(i)}, img, el('span', {}, String(grid.step)));
    thumbs.push(button);
    strip.append(button);
    observer.observe(img);
  }

  return {
    node,
    /** New grid list from the run's details; a viewer left on the newest grid follows new ones. */
    update(list) {
      const sorted = [...(list || [])].sort((a, b) => a.step - b.step);
      const same = sorted.length === grids.length && sorted.every((g, i) => g.path === grids[i].path);
      if (same) return;
      const following = index === grids.length - 1;
      // Grids only get added while a run trains; anything else (a checkpoint limit pruning grids, a new run in the
      // folder) rebuilds the strip.
      const appended = sorted.length > grids.length && grids.every((g, i) => g.path === sorted[i].path);
      if (!appended) {
        strip.replaceChildren();
        thumbs.length = 0;
        observer.disconnect();
        index = -1;
      }
      const start = appended ? grids.length : 0;
      grids = sorted;
      for (let i = start; i < grids.length; i++) addThumb(grids[i], i);
      slider.max = String(Math.max(0, grids.length - 1));
      none.hidden = grids.length > 0;
      body.hidden = grids.length === 0;
      if (grids.length) show(following || index < 0 ? grids.length - 1 : index);
      node.dataset.ready = '1';
    },
    destroy() {
      observer.disconnect();
    },
  };
}
