// DOM helpers. Everything that comes from a run (names, prompts, config, errors) is user data: it only ever
// reaches the page as text nodes or attribute values set here, never through innerHTML.

/** el('td', {class: 'num', testid: 'run-step'}, 'text', childNode, [more]) → an element. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'testid') node.dataset.testid = value;
    else if (key === 'class') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
    else if (key === 'value' || key === 'checked' || key === 'disabled' || key === 'selected') node[key] = value;
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace a node's children with text, only when it differs (keeps a reader's text selection otherwise). */
export function setText(node, text) {
  const value = text === null || text === undefined ? '' : String(text);
  if (node.textContent !== value) node.textContent = value;
}

/**
 * Keep a tbody's rows in the order of `items`, reusing the row of each key: a refresh moves and updates rows
 * instead of rebuilding them, so a checkbox or button the user is pressing is never swapped away under the pointer.
 */
export function syncRows(tbody, items, keyOf, create, update) {
  const rows = tbody._rows || (tbody._rows = new Map());
  const seen = new Set();
  let previous = null;
  for (const item of items) {
    const key = keyOf(item);
    seen.add(key);
    let row = rows.get(key);
    if (!row) {
      row = create(item);
      rows.set(key, row);
    }
    update(row, item);
    const wanted = previous ? previous.nextSibling : tbody.firstChild;
    if (wanted !== row) tbody.insertBefore(row, wanted);
    previous = row;
  }
  for (const [key, row] of rows) {
    if (!seen.has(key)) {
      row.remove();
      rows.delete(key);
    }
  }
}

/** A small table: headers and a tbody to fill. */
export function table(testid, headers) {
  const tbody = el('tbody');
  const node = el('table', {class: 'data', testid},
    el('thead', {}, el('tr', {}, headers.map((h) => el('th', {scope: 'col'}, h)))), tbody);
  return {node, tbody};
}

/** A titled section of a page. */
export function section(title, testid, ...children) {
  return el('section', {class: 'panel', testid}, el('h2', {}, title), ...children);
}
