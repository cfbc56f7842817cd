"""The HTTP side of `difftrain ui`: routes, the token check and the path checks (docs/ui.md lists the API).

Every route is thin: it checks the request, calls runs.py / metrics.py / sampling.py / launcher.py, and turns
their errors into one-line JSON answers (400 a bad value, 403 a refused path or token, 404 nothing there).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import secrets
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from difftrain.ui import launcher, runs, sampling
from difftrain.ui.metrics import MetricsCache
from difftrain.ui.paths import OutsideRunsDir, inside_runs_dir

STATIC_DIR = Path(__file__).parent / "static"
TOKEN_COOKIE = "difftrain_token"
# Hosts a browser names when it talks to a loopback server; anything else reaching a server bound to
# 127.0.0.1 without a token is a DNS-rebinding page and is refused.
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_POINTS_LIMIT = 20_000


@dataclasses.dataclass
class UiState:
    """What the routes share: the folder, the token (None on loopback), and the job runners."""

    runs_dir: Path
    token: Optional[str]
    metrics: MetricsCache
    samples: sampling.SampleJobs
    queue: launcher.TrainingQueue

    def close(self) -> None:
        self.samples.close()
        self.queue.close()


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _json_body(data: Any, what: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def create_app(runs_dir: Path, token: Optional[str] = None, max_running: int = 1) -> FastAPI:
    """The app over `runs_dir`. With `token`, every request must carry it (query, cookie or bearer header)."""
    runs_dir = Path(runs_dir).resolve()
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"RUNS_DIR {runs_dir} is not a folder; give the folder that holds your runs")
    state = UiState(runs_dir, token, MetricsCache(), sampling.SampleJobs(runs_dir),
                    launcher.TrainingQueue(runs_dir, max_running=max_running))
    app = FastAPI(title="difftrain ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = state
    app.router.add_event_handler("shutdown", state.close)

    @app.exception_handler(OutsideRunsDir)
    async def outside(request: Request, exc: OutsideRunsDir) -> JSONResponse:
        return _error(403, str(exc))

    @app.exception_handler(FileNotFoundError)
    async def missing(request: Request, exc: FileNotFoundError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return _error(400, str(exc))

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        refusal = _refusal(request, state.token)
        if refusal is not None:
            return refusal
        if state.token is not None and request.query_params.get("token") is not None and request.url.path == "/":
            # The printed URL carries the token once; the cookie carries it afterwards, off the address bar.
            response: Response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, state.token, httponly=True, samesite="strict")
            return response
        return await call_next(request)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/plotly.min.js")
    def plotly_js() -> Response:
        return Response(_plotly_js(), media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/files/{rel_path:path}")
    def files(rel_path: str) -> FileResponse:
        path = inside_runs_dir(runs_dir, rel_path)
        if not path.is_file():
            raise FileNotFoundError(f"{rel_path}: no such file under {runs_dir}")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    @app.get("/api/runs")
    def list_runs() -> dict:
        return {"runs_dir": str(runs_dir), "runs": [info.to_json() for info in runs.find_runs(runs_dir)]}

    @app.get("/api/run")
    def run_page(id: str) -> dict:
        return runs.run_details(runs_dir, _run_id(runs_dir, id))

    @app.get("/api/metrics")
    def metrics(id: str, max_points: int = 2000, version: Optional[str] = None) -> dict:
        if not 2 <= max_points <= MAX_POINTS_LIMIT:
            raise ValueError(f"max_points = {max_points}: expected 2 to {MAX_POINTS_LIMIT}")
        run_dir = runs.resolve_run(runs_dir, _run_id(runs_dir, id))
        return state.metrics.series(run_dir / "metrics.jsonl", max_points=max_points, version=version)

    @app.post("/api/sample")
    async def sample(request: Request) -> dict:
        body = _json_body(await _read_json(request), "the sample request")
        if isinstance(body.get("run"), str):
            _run_id(runs_dir, body["run"])  # 403 before anything else looks at it
        job = state.samples.submit(sampling.SampleRequest.from_json(body))
        return {"job": job}

    @app.get("/api/sample/{job_id}")
    def sample_job(job_id: str) -> dict:
        return {"job": state.samples.get(job_id)}

    @app.get("/api/presets")
    def presets() -> dict:
        return {"presets": launcher.preset_list()}

    @app.post("/api/launch/validate")
    async def launch_validate(request: Request) -> dict:
        body = _json_body(await _read_json(request), "the launch request")
        launch = launcher.LaunchRequest.from_json(body)
        problems = state.queue.validate(launch)  # the CLI's checks, and a run already queued or training
        return {"ok": not problems, "problems": problems, "run_id": launch.name}

    @app.post("/api/launch")
    async def launch(request: Request) -> Response:
        body = _json_body(await _read_json(request), "the launch request")
        launch = launcher.LaunchRequest.from_json(body)
        problems = state.queue.validate(launch)
        if problems:
            return JSONResponse({"error": "\n".join(problems), "problems": problems}, status_code=400)
        return JSONResponse({"job": state.queue.submit(launch)})

    @app.get("/api/queue")
    def queue() -> dict:
        return {"jobs": state.queue.jobs()}

    @app.post("/api/stop")
    def stop(id: str) -> dict:
        return {"job": state.queue.stop(_run_id(runs_dir, id))}

    @app.post("/api/resume")
    def resume(id: str) -> dict:
        return {"job": state.queue.resume(_run_id(runs_dir, id))}

    return app


async def _read_json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:  # JSONDecodeError and bad encodings
        raise ValueError(f"the request body is not JSON ({exc})") from None


def _run_id(runs_dir: Path, run_id: str) -> str:
    """A run id, checked to stay inside RUNS_DIR before any module sees it (403 otherwise)."""
    inside_runs_dir(runs_dir, run_id)
    return run_id


def _refusal(request: Request, token: Optional[str]) -> Optional[Response]:
    """Why this request is refused (a 403 answer), or None."""
    if token is None:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if not is_loopback(host):
            return _error(403, f"Host {host!r} refused: this server answers only 127.0.0.1/localhost "
                               "(start it with --host and a token to serve other addresses)")
    else:
        given = (request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
                 or _bearer(request.headers.get("authorization")))
        if given is None or not secrets.compare_digest(given, token):
            return _error(403, "a token is needed: open the URL `difftrain ui` printed (…/?token=…)")
    if request.method not in ("GET", "HEAD"):
        # A page on another site may send a POST to this server through the user's browser; refuse it.
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return _error(403, f"Origin {origin!r} refused: only pages of this server may start jobs")
    return None


def _bearer(header: Optional[str]) -> Optional[str]:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


@functools.lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()
