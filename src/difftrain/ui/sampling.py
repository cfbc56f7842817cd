"""Sample jobs of the web UI (docs/ui.md: SampleRequest, SampleJob, `/api/sample`), on the code of `difftrain sample`.

A request names a run (its folder relative to RUNS_DIR) and a source: its export, its best export (`RUN/best`) or a
kept checkpoint (`checkpoint:step-000200`, exported on demand as `difftrain sample --checkpoint` does). `SampleJobs`
checks a request before queueing it, runs one job at a time on one worker thread through `sample_run`, and writes
`RUN/samples/ui/<job-id>/` (grid.png and one PNG per image, listed as each batch finishes). Each job carries the
`difftrain sample ...` line that gives the same images when run from RUNS_DIR.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from difftrain.commands.sample import BEST, parse_class_labels, parse_guidance_scales, run_sample_defaults, sample_run
from difftrain.pipeline import ADAPTER_BASE_FILE, load_pipeline
from difftrain.training.export_checkpoint import exports_dir, kept_checkpoints, resolve_checkpoint
from difftrain.training.run_dir import marker_path
from difftrain.ui.sample_request import (CHECKPOINT_PREFIX, EXPORT, MAX_IMAGES_PER_JOB, SampleRequest, command_line,
                                         sample_arguments, sample_kwargs)

__all__ = ["SampleJobs", "SampleRequest", "command_line", "sample_arguments", "resolve_source", "check_request"]

logger = logging.getLogger(__name__)

KEPT_JOBS = 200
"""Finished jobs remembered (oldest forgotten first); their files stay on disk."""


# What the pipeline class in a folder's model_index.json takes (sample_run decides on the loaded model; this is
# the same answer read from the folder, so a request is refused before it waits in the queue).
_KINDS = {"ClassConditionalPipeline": "class", "DiTPipeline": "class", "DDPMPipeline": "unconditional",
          "UnconditionalPipeline": "unconditional", "TextToImagePipeline": "text", "StableDiffusionPipeline": "text",
          "StableDiffusionXLPipeline": "text", "PixArtSigmaPipeline": "text", "PixArtAlphaPipeline": "text"}


@dataclasses.dataclass(frozen=True)
class _Source:
    """A request's source found on disk: the run folder, what `sample_run` opens, what the model takes."""

    run_dir: Path
    sample_dir: Path
    """The run folder (its export, or a checkpoint of it) or RUN/best."""
    kind: Optional[str]
    """'text', 'class' or 'unconditional'; None when it cannot be told before loading."""
    class_names: Optional[list[str]] = None


def _is_export(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / ADAPTER_BASE_FILE).is_file()


def _available(run_dir: Path) -> str:
    names = [EXPORT] if _is_export(run_dir) else []
    names += [BEST] if _is_export(run_dir / BEST) else []
    names += [f"{CHECKPOINT_PREFIX}{name}" for name in kept_checkpoints(run_dir)]
    return f"its sources: {', '.join(names)}" if names else "it has nothing to sample yet (no export, no checkpoint)"


def _folder_kind(folder: Path) -> tuple[Optional[str], Optional[list[str]]]:
    """The model kind and class names of an export folder, from its model_index.json (a LoRA folder: text)."""
    if not (folder / "model_index.json").is_file():
        return ("text", None) if (folder / ADAPTER_BASE_FILE).is_file() else (None, None)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(index, dict):
        return None, None
    names = index.get("class_names")
    return _KINDS.get(index.get("_class_name")), list(map(str, names)) if isinstance(names, list) else None


def _checkpoint_kind(run_dir: Path, checkpoint: Path) -> tuple[Optional[str], Optional[list[str]]]:
    """A checkpoint samples like any export of its run; with none yet, the family of its config says."""
    for folder in (exports_dir(run_dir) / checkpoint.name, run_dir, run_dir / BEST):
        kind, names = _folder_kind(folder)
        if kind is not None:
            return kind, names
    try:
        from difftrain.config import config_from_dict
        from difftrain.families import family_for
        from difftrain.training.progress import read_progress

        labels, captions = family_for(config_from_dict(read_progress(checkpoint).config)).data_wants()
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the job itself, in one line
        return None, None
    return ("text" if captions else "class" if labels else "unconditional"), None


def resolve_source(runs_dir: Path, request: SampleRequest) -> _Source:
    """The run folder and source of a request; FileNotFoundError for no such run under RUNS_DIR, ValueError for a
    source it does not have."""
    rel = PurePosixPath(request.run)
    run_dir = Path(runs_dir) / rel
    root = Path(runs_dir).resolve()
    inside = not rel.is_absolute() and ".." not in rel.parts and run_dir.resolve().is_relative_to(root)
    if not inside or not run_dir.is_dir() or not (marker_path(run_dir).is_file() or kept_checkpoints(run_dir)):
        raise FileNotFoundError(f"run {request.run!r}: no such run under RUNS_DIR (a run id is a run folder relative "
                                "to it)")
    if request.checkpoint is not None:
        try:
            checkpoint = resolve_checkpoint(run_dir, request.checkpoint)
        except (ValueError, FileNotFoundError):  # its message names the folder on the server; this one the run id
            raise ValueError(f"source {request.source!r}: not a checkpoint run {request.run!r} keeps "
                             f"('checkpoint:latest' is its newest); {_available(run_dir)}") from None
        return _Source(run_dir, run_dir, *_checkpoint_kind(run_dir, checkpoint))
    folder = run_dir / BEST if request.source == BEST else run_dir
    if not _is_export(folder):
        what = "no best export (train.keep_best_by writes best/)" if request.source == BEST else \
            "no export yet (training writes it when it finishes)"
        raise ValueError(f"source {request.source!r}: run {request.run!r} has {what}; {_available(run_dir)}")
    return _Source(run_dir, folder, *_folder_kind(folder))


def check_request(request: SampleRequest, source: _Source) -> None:
    """Refuse what the source's model does not take, as `difftrain sample` would after loading it (ValueError)."""
    kind, what = source.kind, f"run {request.run!r} ({request.source})"
    if kind is None:
        return
    needs = {"class_labels": ("class", request.class_labels), "prompts": ("text", request.prompts),
             "negative_prompt": ("text", request.negative_prompt)}
    for field, (wanted, value) in needs.items():
        if value is not None and kind != wanted:
            model = "class-conditional" if wanted == "class" else "text-to-image"
            raise ValueError(f"{field}: only a {model} model takes it, and {what} is a {kind} model")
    if kind == "text" and not request.prompts and not run_sample_defaults(source.sample_dir).get("prompts"):
        raise ValueError(f"prompts: {what} is a text-to-image model and its config has no sample.prompts; give at "
                         "least one prompt")
    if kind == "unconditional" and request.guidance_scale is not None and \
            parse_guidance_scales(request.guidance_scale) != [1.0]:
        raise ValueError(f"guidance_scale {request.guidance_scale!r}: {what} is unconditional (no guidance: null or 1)")
    if kind == "class" and request.class_labels is not None and source.class_names:
        try:
            parse_class_labels(request.class_labels, source.class_names, len(source.class_names))
        except ValueError as exc:
            raise ValueError(str(exc).replace("--class-label", "class_labels", 1)) from None


class _PipelineCache:
    """The last pipeline loaded, kept while its folder's files are unchanged (only one: sampling several sources in
    turn would otherwise hold several models in memory)."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.pipe: Any = None

    def load(self, folder: Path, device: Optional[str] = None) -> Any:
        key = (str(folder.resolve()), device, _folder_version(folder))
        if key != self.key:
            self.pipe, self.key = None, None  # the old model is released before the new one loads
            self.pipe, self.key = load_pipeline(folder, device=device), key
        return self.pipe


def _folder_version(folder: Path) -> tuple:
    """The modification times of what an export writes (any rewrite of the folder changes one of them)."""
    names = ("model_index.json", ADAPTER_BASE_FILE, "pytorch_lora_weights.safetensors", "exported_from.json")
    stamps = []
    for name in names:
        try:
            stamps.append((name, (folder / name).stat().st_mtime_ns))
        except OSError:
            continue
    return tuple(stamps)


class SampleJobs:
    """The sample jobs of one RUNS_DIR: checked at `submit`, run one at a time on one worker thread."""

    def __init__(self, runs_dir: Path, device: Optional[str] = None):
        self.runs_dir = Path(runs_dir)
        self.device = device
        """Where jobs sample (None: cuda if available, as `difftrain sample`)."""
        self._jobs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._queue: "queue.Queue[Optional[tuple[str, SampleRequest, _Source]]]" = queue.Queue()
        self._pipelines = _PipelineCache()
        self._worker = threading.Thread(target=self._work, name="difftrain-ui-sampling", daemon=True)
        self._worker.start()

    def submit(self, request: SampleRequest) -> dict[str, Any]:
        """Check the request against its run and source and queue it; returns its SampleJob (state 'queued').

        Raises FileNotFoundError for a run that is not under RUNS_DIR, ValueError for a source the run does not have
        or a field its model does not take (class labels of a text model, no prompt for a text model ...).
        """
        source = resolve_source(self.runs_dir, request)
        check_request(request, source)
        job_id = uuid.uuid4().hex[:12]
        with self._lock:
            self._jobs[job_id] = {"id": job_id, "run": request.run, "state": "queued", "images": [], "grid": None,
                                  "error": None, "command": command_line(request.run, request), "total": None}
            self._forget_old()
        self._queue.put((job_id, request, source))
        return self.get(job_id)

    def get(self, job_id: str) -> dict[str, Any]:
        """The SampleJob as it stands: images (paths relative to RUNS_DIR, in grid order) appear as they are written;
        `total` is known once the model is loaded. FileNotFoundError for an unknown id."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise FileNotFoundError(f"no sample job {job_id!r} (jobs are kept while the UI runs)")
            return {**job, "images": [path for _, path in sorted(job["images"])]}

    def close(self) -> None:
        """Stop the worker after the job under way; queued jobs are not run."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)

    def _forget_old(self) -> None:
        finished = [k for k, job in self._jobs.items() if job["state"] in ("done", "failed")]
        for key in finished[: max(0, len(finished) - KEPT_JOBS)]:
            del self._jobs[key]

    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            self._jobs[job_id].update(changes)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._run(*item)

    def _run(self, job_id: str, request: SampleRequest, source: _Source) -> None:
        out_dir = source.run_dir / "samples" / "ui" / job_id
        rel = PurePosixPath(request.run) / "samples" / "ui" / job_id
        self._update(job_id, state="running")

        def on_start(total: int) -> None:
            if total > MAX_IMAGES_PER_JOB:
                raise ValueError(f"{total} images asked for (rows x num_images x guidance scales); at most "
                                 f"{MAX_IMAGES_PER_JOB} per job")
            self._update(job_id, total=total)

        def on_image(index: int, path: Path) -> None:
            with self._lock:
                self._jobs[job_id]["images"].append((index, str(rel / path.name)))

        try:
            sample_run(source.sample_dir, out=out_dir / "grid.png", out_dir=out_dir, device=self.device,
                       on_start=on_start, on_image=on_image, load=self._pipelines.load, **sample_kwargs(request))
            self._update(job_id, state="done", grid=str(rel / "grid.png"))
        except Exception as exc:  # noqa: BLE001 - any failure is the job's one-line error; the worker goes on
            logger.warning("sample job %s failed: %s", job_id, exc, exc_info=not isinstance(exc, (ValueError, OSError)))
            self._update(job_id, state="failed", error=one_line(exc))


def one_line(exc: BaseException) -> str:
    """An error as one line: a user error's own text, anything else with its kind named (as the CLI prints them)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (ValueError, FileNotFoundError)) or type(exc).__module__.startswith("difftrain"):
        return text
    return f"{type(exc).__name__}: {text}"
