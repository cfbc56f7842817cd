// Numbers, durations and times as the tables show them; null/undefined shows as an em dash.

const DASH = '\u2014';

export function number(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return DASH;
  if (typeof value !== 'number') return String(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  return abs !== 0 && (abs < 1e-3 || abs >= 1e5) ? value.toExponential(digits - 1) : String(Number(value.toPrecision(digits)));
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return DASH;
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  if (h) return `${h} h ${String(m).padStart(2, '0')} min`;
  if (m) return `${m} min ${String(rest).padStart(2, '0')} s`;
  return `${rest} s`;
}

/** "12 s ago" from a unix time; the exact local time goes in the cell's title. */
export function ago(unixSeconds) {
  if (!unixSeconds) return DASH;
  const delta = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (delta < 60) return `${Math.round(delta)} s ago`;
  if (delta < 3600) return `${Math.round(delta / 60)} min ago`;
  if (delta < 86400) return `${Math.round(delta / 3600)} h ago`;
  return `${Math.round(delta / 86400)} d ago`;
}

export function localTime(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : '';
}

export function bytes(n) {
  if (n === null || n === undefined) return DASH;
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

export function steps(step, maxSteps) {
  if (step === null || step === undefined) return maxSteps ? `${DASH} / ${maxSteps}` : DASH;
  return `${step} / ${maxSteps ?? '?'}`;
}

/** "fid 12.3 @ 400" for RunInfo.best. */
export function best(b) {
  return b ? `${b.metric} ${number(b.value)} @ ${b.step}` : DASH;
}

export {DASH};
