// Live updates by polling (docs/ui.md): one request at a time (the next waits for the last answer, so a slow
// server is never flooded), paused while the tab is hidden, stopped when the view goes away.

export const REFRESH_MS = 2000;

export function poller(fn, intervalMs = REFRESH_MS) {
  let timer = null;
  let stopped = false;
  let running = false;

  async function tick() {
    timer = null;
    if (stopped || running) return;
    if (document.hidden) {
      document.addEventListener('visibilitychange', tick, {once: true});
      return;
    }
    running = true;
    try {
      await fn();
    } catch (err) {
      // Each view shows its own errors; one failed refresh must not end the updates.
      console.warn(err);
    } finally {
      running = false;
    }
    if (!stopped) timer = setTimeout(tick, intervalMs);
  }

  tick();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      document.removeEventListener('visibilitychange', tick);
    },
    /** Refresh now (after an action), unless a refresh is already on its way. */
    now() {
      if (stopped || running) return;
      clearTimeout(timer);
      tick();
    },
  };
}
