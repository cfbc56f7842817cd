"""The web UI's sample request (docs/ui.md: SampleRequest): its fields checked one by one, the `difftrain sample`
line that samples the same images, and the `sample_run` arguments of it."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import PurePosixPath
from typing import Any, Optional

from difftrain.commands.sample import BEST, parse_guidance_scales
from difftrain.sampling.schedulers import SCHEDULERS

EXPORT, CHECKPOINT_PREFIX = "export", "checkpoint:"
MAX_NUM_IMAGES = 64
"""Images per row a request may ask for (a web form's bound; the command line has none)."""
MAX_STEPS = 1000
MAX_IMAGES_PER_JOB = 256
"""Images of one job in all (rows x images per row x guidance scales), so one request cannot hold the worker for
hours."""
MAX_PROMPTS = 16


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """What to sample; None means the run's default, as an option left out of `difftrain sample`."""

    run: str
    source: str = EXPORT
    class_labels: Optional[str] = None
    prompts: Optional[tuple[str, ...]] = None
    negative_prompt: Optional[str] = None
    scheduler: Optional[str] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[str] = None
    seed: Optional[str] = None
    num_images: Optional[int] = None

    @property
    def checkpoint(self) -> Optional[str]:
        """The checkpoint name of a `checkpoint:NAME` source, else None."""
        return self.source[len(CHECKPOINT_PREFIX):] if self.source.startswith(CHECKPOINT_PREFIX) else None

    @classmethod
    def from_json(cls, data: Any) -> "SampleRequest":
        """A request from its JSON object; ValueError naming the first bad field and what it allows."""
        if not isinstance(data, dict):
            raise ValueError(f"a sample request is a JSON object, got {type(data).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; a sample request has "
                             f"{', '.join(fields)}")
        run = data.get("run")
        if not isinstance(run, str) or not run.strip():
            raise ValueError(f"run {run!r}: expected a run id (its folder relative to RUNS_DIR, '.' for RUNS_DIR)")
        return cls(
            run=run, source=_source(data.get("source")), class_labels=_class_labels(data.get("class_labels")),
            prompts=_prompts(data.get("prompts")), negative_prompt=_text("negative_prompt", data.get("negative_prompt")),
            scheduler=_scheduler(data.get("scheduler")),
            num_inference_steps=_count("num_inference_steps", data.get("num_inference_steps"), MAX_STEPS),
            guidance_scale=_guidance(data.get("guidance_scale")), seed=_seed(data.get("seed")),
            num_images=_count("num_images", data.get("num_images"), MAX_NUM_IMAGES),
        )


def _source(value: Any) -> str:
    if value is None:
        return EXPORT
    if isinstance(value, str) and (value in (EXPORT, BEST) or
                                   (value.startswith(CHECKPOINT_PREFIX) and value[len(CHECKPOINT_PREFIX):].strip())):
        return value
    raise ValueError(f"source {value!r}: expected 'export', 'best' or 'checkpoint:NAME' (e.g. checkpoint:step-000200, "
                     "checkpoint:latest)")


def _text(name: str, value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{name} {value!r}: expected a string or null")


def _class_labels(value: Any) -> Optional[str]:
    """'0,3', 'daisy', 3 or [0, 'daisy'] -> '0,3' style text, as --class-label takes it; '' or [] is null."""
    if isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"class_labels {value!r}: expected class indices or names like '0,3', or null for every class")
    return value if value and value.strip() else None


def _prompts(value: Any) -> Optional[tuple[str, ...]]:
    if isinstance(value, str):
        value = [value]
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"prompts {value!r}: expected a list of non-empty strings, or null for the run's")
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"prompts: {len(value)} given; at most {MAX_PROMPTS} (one grid row each)")
    return tuple(value)


def _scheduler(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, str) and value.lower() in SCHEDULERS):
        return value
    raise ValueError(f"scheduler {value!r}: expected one of {', '.join(SCHEDULERS)}, or null for the run's")


def _count(name: str, value: Any, most: int) -> Optional[int]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most):
        return value
    raise ValueError(f"{name} {value!r}: expected an integer from 1 to {most}, or null for the run's")


def _guidance(value: Any) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = f"{value:g}"
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    message = (f"guidance_scale {value!r}: expected a number >= 0 (1 = no guidance) or a sweep like '1,3,5', or "
               "null for the run's")
    if not isinstance(value, str):
        raise ValueError(message)
    try:
        parse_guidance_scales(value)
    except ValueError:
        raise ValueError(message) from None
    return value


def _seed(value: Any) -> Optional[str]:
    """'0' (first seed, the next images count up), '0-15' or '3,7' (one per image), as --seed takes it."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    message = f"seed {value!r}: expected a seed >= 0, or one per image like '0-15' or '3,7'"
    if not isinstance(value, str):
        raise ValueError(message)
    count = 0
    for part in (p.strip() for p in value.split(",") if p.strip()):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(message)
        count += int(high) - int(low) + 1 if high else 1  # counted, never expanded: '0-999999999' is refused cheaply
        if count > MAX_IMAGES_PER_JOB or (high and int(high) < int(low)):
            raise ValueError(f"{message} (at most {MAX_IMAGES_PER_JOB} seeds, each range low-high)")
    if count == 0:
        raise ValueError(message)
    return value


def _option(name: str, value: str) -> list[str]:
    # A value that starts with '-' would read as an option: `--prompt=-x` keeps it a value.
    return [f"{name}={value}"] if value.startswith("-") else [name, value]


def sample_arguments(run_dir_rel: str, request: SampleRequest) -> list[str]:
    """The `difftrain sample` arguments (after `sample`) of a request, with RUNS_DIR as the working folder."""
    run = PurePosixPath(run_dir_rel)
    args = [str(run / BEST) if request.source == BEST else str(run)]
    if request.checkpoint is not None:
        args += _option("--checkpoint", request.checkpoint)
    for prompt in request.prompts or ():
        args += _option("--prompt", prompt)
    options = [("--class-label", request.class_labels), ("--negative-prompt", request.negative_prompt),
               ("--scheduler", request.scheduler), ("--num-inference-steps", request.num_inference_steps),
               ("--guidance-scale", request.guidance_scale), ("--seed", request.seed),
               ("--num-images", request.num_images)]
    for name, value in options:
        if value is not None:
            args += _option(name, str(value))
    return args


def command_line(run_dir_rel: str, request: SampleRequest) -> str:
    """The `difftrain sample ...` line, run from RUNS_DIR, that samples the same images as the request (its grid goes
    to the CLI's default path, RUN/samples/sample.png or sample-step-N.png; add --out-dir for the single images)."""
    return shlex.join(["difftrain", "sample", *sample_arguments(run_dir_rel, request)])


def sample_kwargs(request: SampleRequest) -> dict[str, Any]:
    """`sample_run`'s arguments of a request: what `cmd_sample` passes for `sample_arguments` (same defaults)."""
    return dict(checkpoint=request.checkpoint, scheduler=request.scheduler,
                num_inference_steps=request.num_inference_steps, seed=request.seed or "0",
                num_images=request.num_images, class_label=request.class_labels,
                prompts=list(request.prompts) if request.prompts else None, negative_prompt=request.negative_prompt,
                guidance_scale=request.guidance_scale)
