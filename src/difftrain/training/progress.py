"""A checkpoint's progress file (`progress.json`): what training had done when the checkpoint was written.

`ProgressRecord` is its one typed form; `write_progress` and `read_progress` are its one writer and one
reader. The JSON keys are the record's field names, unchanged since difftrain 0.1.0, so checkpoints of
earlier runs stay readable and older difftrain versions read new ones (they ignore keys they do not know).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftrain.writes import replace_file

PROGRESS_FILE = "progress.json"


@dataclass(frozen=True)
class ProgressRecord:
    """Bookkeeping stored next to accelerate's `save_state` output in every checkpoint."""

    step: int  # optimizer steps done
    images_seen: int  # step x global batch (batch size x accumulation x processes)
    epoch: float  # images_seen / training images
    num_processes: int  # processes that wrote the checkpoint; a resume on another count is not exact
    difftrain_version: str  # also how a run folder made before run records is recognised (run_dir.py)
    config: dict[str, Any]  # the full config the run was trained with (resume_check.py compares against it)
    numerics: dict[str, Any] = field(default_factory=dict)  # the non-finite policy's state (numerics.py)


# Keys every difftrain version has written, with the JSON types each may hold; `numerics` came later
# (written since the non-finite policy, commit 3abb7f3), so a file without it reads as no remedy taken.
_REQUIRED: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "images_seen": (int,),
    "epoch": (int, float),
    "num_processes": (int,),
    "difftrain_version": (str,),
    "config": (dict,),
}
_OPTIONAL: dict[str, tuple[tuple[type, ...], Any]] = {
    "numerics": ((dict,), dict),  # (types, factory of the default)
}


def write_progress(checkpoint_dir: Path, record: ProgressRecord) -> Path:
    """Write `checkpoint_dir/progress.json` through a temporary name, fsynced: it marks the checkpoint whole."""
    text = json.dumps(dataclasses.asdict(record), indent=2)
    return replace_file(checkpoint_dir / PROGRESS_FILE, lambda tmp: tmp.write_text(text), "the checkpoint's progress file",
                        durable=True)


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _checked(path: Path, key: str, value: Any, types: tuple[type, ...]) -> Any:
    # JSON true/false load as bool, a subclass of int: never a step or a count.
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"{path}: key {key!r} is {value!r} ({type(value).__name__}); expected {_type_names(types)}")
    return value


def read_progress(checkpoint_dir: Path) -> ProgressRecord:
    """The progress record of a checkpoint; ValueError naming the file when it is not one difftrain wrote.

    A missing file raises FileNotFoundError. Keys added by later difftrain versions are ignored.
    """
    path = Path(checkpoint_dir) / PROGRESS_FILE
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc}); the checkpoint is damaged") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object with the keys "
                         f"{', '.join(_REQUIRED)}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ValueError(f"{path}: key(s) {', '.join(missing)} missing; a difftrain progress file has "
                         f"{', '.join(_REQUIRED)}")
    values = {key: _checked(path, key, data[key], types) for key, types in _REQUIRED.items()}
    for key, (types, default) in _OPTIONAL.items():
        values[key] = _checked(path, key, data[key], types) if key in data else default()
    values["epoch"] = float(values["epoch"])
    return ProgressRecord(**values)
