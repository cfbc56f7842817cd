// Talking to the back end (docs/ui.md "HTTP API"): JSON in and out, errors as ApiError carrying the server's
// one-line `error`, and the hash/file URLs the views link to. The token (when the server needs one) travels in
// the cookie the server set when the printed URL was opened, so fetch adds nothing.

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

const connectionListeners = new Set();
let connected = true;

/** Called with true/false when the server stops or starts answering (a header line shows it). */
export function onConnection(listener) {
  connectionListeners.add(listener);
}

function setConnected(value) {
  if (value === connected) return;
  connected = value;
  for (const listener of connectionListeners) listener(value);
}

async function request(url, options) {
  let response;
  try {
    response = await fetch(url, {...options, headers: {Accept: 'application/json', ...(options?.headers || {})}});
  } catch (err) {
    setConnected(false);
    throw new ApiError(0, `the server did not answer (${err.message}); retrying`, null);
  }
  setConnected(true);
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body && typeof body.error === 'string' ? body.error : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message, body);
  }
  return body;
}

export function getJSON(path, params) {
  return request(path + query(params));
}

export function postJSON(path, body, params) {
  return request(path + query(params), {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

/** "?a=1&b=x%2Fy" from an object, skipping null/undefined values. */
export function query(params) {
  if (!params) return '';
  const parts = Object.entries(params)
    .filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
  return parts.length ? `?${parts.join('&')}` : '';
}

// Run ids and file paths are '/'-separated and relative to RUNS_DIR; each segment is encoded on its own so the
// slashes stay readable in the address bar and a '#', '?' or '%' in a folder name cannot change the URL's meaning.
function encodePath(path) {
  return String(path).split('/').map(encodeURIComponent).join('/');
}

export function fileUrl(path) {
  return `/files/${encodePath(path)}`;
}

export function runHash(id) {
  return `#/run/${encodePath(id)}`;
}

export function compareHash(ids) {
  return `#/compare?ids=${ids.map(encodeURIComponent).join(',')}`;
}

export function decodePath(encoded) {
  return encoded.split('/').map(decodeURIComponent).join('/');
}
