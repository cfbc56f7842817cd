"""`difftrain ui`: check the folder, the address and the port, then serve the app until Ctrl-C (cli.py calls `serve`)."""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)


def check_port_free(host: str, port: int) -> None:
    """Raise ValueError naming the port when it cannot be bound (in use, or not allowed), before any serving."""
    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: expected 1 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = "is in use (another `difftrain ui`?); choose another --port" if exc.errno == errno.EADDRINUSE \
                else f"cannot be bound ({exc.strerror})"
            raise ValueError(f"--host {host} --port {port}: the address {why}") from None


def serve(runs_dir: Path, host: str = "127.0.0.1", port: int = 7860, token: Optional[str] = None,
          max_running: int = 1) -> int:
    """Serve the UI over `runs_dir`; a non-loopback `host` gets a token (given, or made and printed)."""
    import uvicorn

    from difftrain.ui.app import create_app, is_loopback, new_token

    if max_running < 1:
        raise ValueError(f"--max-running {max_running}: expected 1 or more")
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"RUNS_DIR {runs_dir} is not a folder; give the folder that holds your runs "
                                "(it is created by `difftrain train --output-dir RUNS_DIR/NAME`)")
    if token is not None and not token.strip():
        raise ValueError("--token is empty; give a token or leave the option out")
    if token is None and not is_loopback(host):
        token = new_token()
    check_port_free(host, port)
    app = create_app(runs_dir, token=token, max_running=max_running)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"
    print(f"difftrain ui: the runs in {runs_dir.resolve()} at {url}" + (f"?token={token}" if token else ""), flush=True)
    if token:
        print("difftrain ui: anyone with this token can read the runs and start training; keep it private",
              flush=True)
    print("difftrain ui: Ctrl-C stops the server (trainings it started keep running)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
