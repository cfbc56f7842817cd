"""What the UI may launch: a LaunchRequest checked against RUNS_DIR, then by the same code as `difftrain train`.

The UI starts `python -m difftrain train CONFIG OVERRIDES --output-dir RUNS_DIR/NAME`. Before that command is
built, three things the command line never needs to check are checked here, because a web request, unlike a
shell user, must not reach outside RUNS_DIR: the config is a shipped preset or a `.yaml`/`.yml` file whose
real path lies under RUNS_DIR, no override can turn into a command-line option, and the run folder is a
plain name. Then the command's own checks run in-process (config loading, the run folder policy) and their
failures come back as the lines `difftrain train` would print on stderr.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Optional, Sequence

from difftrain.config import ConfigError, load_config, presets_dir
from difftrain.errors import describe_error, override_words_problem
from difftrain.training.run_dir import check_before_claim, check_run_dir

PREFIX = "difftrain train"  # how the CLI starts every error line of `train` (cli.main)
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")
CONFIG_SUFFIXES = (".yaml", ".yml")
# Shipped YAMLs that are not run configs: accelerate launch configs (docs/distributed.md).
NOT_PRESETS = ("accelerate",)


class LaunchError(ValueError):
    """A launch refused; `problems` holds every line (the CLI's lines for config and folder errors)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclasses.dataclass(frozen=True)
class LaunchRequest:
    """A preset name or a YAML path under RUNS_DIR, `key=value` overrides, and the run folder's name."""

    config: str
    overrides: tuple[str, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))  # a list given by a caller, kept immutable

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LaunchRequest":
        """From the JSON body of `/api/launch`; ValueError names a missing, unknown or mistyped field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a launch request is a JSON object, got {type(data).__name__}")
        allowed = ("config", "overrides", "name")
        unknown = [key for key in data if key not in allowed]
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r} in the launch request (allowed: {', '.join(allowed)})")
        for key in ("config", "name"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"launch request field {key!r} = {data.get(key)!r}: expected a string")
        overrides = data.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
            raise ValueError(f"launch request field 'overrides' = {overrides!r}: expected a list of 'key=value' strings")
        return cls(config=data["config"], overrides=tuple(overrides), name=data["name"])

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "overrides": list(self.overrides), "name": self.name}


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """A checked request: the run folder and the trainer's argument list."""

    run_id: str
    output_dir: Path
    config: str  # as requested (shown in the job)
    config_argument: str  # as passed to the trainer: a preset name or the YAML's resolved path
    overrides: tuple[str, ...]

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "difftrain", "train", self.config_argument, *self.overrides,
                "--output-dir", str(self.output_dir)]

    def command(self) -> str:
        """The equivalent command line, for display (the trainer is started from `argv()`, never a shell)."""
        return shlex.join(["difftrain", "train", self.config_argument, *self.overrides,
                           "--output-dir", str(self.output_dir)])


def shipped_presets() -> list[str]:
    """Every run config shipped with difftrain, by the name `difftrain train` takes (`digits`, `tiny/digits-class`)."""
    root = presets_dir()
    names = []
    for path in root.rglob("*.yaml"):
        rel = path.relative_to(root).with_suffix("")
        if rel.parts[0] not in NOT_PRESETS:
            names.append(rel.as_posix())
    return sorted(names)


def preset_list() -> list[dict[str, str]]:
    """`[{name, description}]` for `/api/presets`: the description is the preset's first comment line, as in
    `difftrain presets`."""
    root = presets_dir()
    out = []
    for name in shipped_presets():
        lines = (root / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
        out.append({"name": name, "description": lines[0].lstrip("# ").strip() if lines else ""})
    return out


def resolve_runs_dir(runs_dir: Path | str) -> Path:
    path = Path(runs_dir).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"RUNS_DIR {path} is not a folder")
    return path


def name_problems(name: str) -> list[str]:
    """Why `name` is not a plain run folder name (empty when it is)."""
    if not RUN_NAME.fullmatch(name) or name in (".", "..") or name.startswith("."):
        return [f"run name {name!r} refused: a run name is one plain folder name of letters, digits, '.', '_' and "
                "'-' (not hidden, no '/'), created under RUNS_DIR"]
    return []


def run_folder(runs_dir: Path, run_id: str) -> Path:
    """The folder of run id `run_id` (`flowers/run1`, `.` for RUNS_DIR itself), resolved; ValueError when the id
    is not a plain relative path that stays under RUNS_DIR. `runs_dir` must be resolved."""
    pure = PurePosixPath(run_id)
    if (not run_id or "\x00" in run_id or "\\" in run_id or pure.is_absolute() or ".." in pure.parts):
        raise ValueError(f"run id {run_id!r} refused: a run id is a folder relative to RUNS_DIR, without '..'")
    folder = (runs_dir / pure).resolve()
    if folder != runs_dir and not folder.is_relative_to(runs_dir):
        raise ValueError(f"run id {run_id!r} refused: it leads outside RUNS_DIR ({runs_dir})")
    return folder


def config_argument(runs_dir: Path, config: str) -> tuple[Optional[str], list[str]]:
    """(what to pass to the trainer as its config, problems): a shipped preset's name, or the resolved path of a
    `.yaml`/`.yml` file under RUNS_DIR (relative to RUNS_DIR, or absolute). `runs_dir` must be resolved.

    An unknown preset name is passed on (None problems) so that the CLI's own message names it and lists the
    presets, unless that name would make the CLI read a file instead.
    """
    if not config or config.startswith("-") or "\x00" in config:
        return None, [f"config {config!r} refused: expected a preset name or a .yaml/.yml file under RUNS_DIR"]
    if Path(config).suffix in CONFIG_SUFFIXES:
        path = (runs_dir / config).resolve()  # an absolute `config` stays as it is
        if not path.is_relative_to(runs_dir):
            return None, [f"config {config!r} refused: it resolves to {path}, outside RUNS_DIR ({runs_dir}); "
                          "a config file must lie under RUNS_DIR (or use a preset name)"]
        return str(path), []
    # `difftrain train NAME` reads NAME as a file when one exists relative to the working folder, before any
    # preset: such a name would load a file the checks above never saw.
    if Path(config).is_file():
        return None, [f"config {config!r} refused: it names a file relative to the UI's working folder, "
                      "which `difftrain train` would read instead of a preset; use a preset name or a .yaml/.yml "
                      "file under RUNS_DIR"]
    root = presets_dir().resolve()
    if config not in shipped_presets():
        candidate = (root / f"{config}.yaml").resolve()
        if candidate.exists() or not candidate.is_relative_to(root):
            return None, [f"config {config!r} refused: not a preset (presets: {', '.join(shipped_presets())}) "
                          "and not a .yaml/.yml file under RUNS_DIR"]
    return config, []


def cli_problems(config_arg: str, overrides: Sequence[str], output_dir: Optional[Path]) -> list[str]:
    """The stderr lines of `difftrain train CONFIG_ARG OVERRIDES --output-dir OUTPUT_DIR` when it stops before
    training (a malformed override, a config error, a run folder refused or in use); empty when it would start.

    Reuses the CLI's steps in its order (cli.main, cli.cmd_train) and its line texts (difftrain.errors); the UI
    does not import the CLI (the CLI imports the UI), and tests compare the two. Without `output_dir` the
    folder checks are skipped.
    """
    problem = override_words_problem(list(overrides))
    if problem:
        return [f"{PREFIX}: error: {problem}"]
    try:
        cfg = load_config(config_arg, list(overrides), output_dir=None if output_dir is None else str(output_dir))
        if output_dir is not None:
            check_before_claim(Path(cfg.output_dir))
    except ConfigError as exc:
        return f"{PREFIX}: {exc}".splitlines()
    except (ValueError, OSError) as exc:
        return f"{PREFIX}: error: {describe_error(exc)}".splitlines()
    return []


def plan_launch(runs_dir: Path, request: LaunchRequest, resume: bool = False,
                ) -> tuple[Optional[LaunchPlan], list[str]]:
    """(the launch, []) or (None, problems). `runs_dir` must be resolved.

    resume: `request.name` is a run id (nested ids allowed) of an existing run, as for `/api/resume`.
    """
    problems: list[str] = []
    output_dir: Optional[Path] = None
    if resume:
        try:
            output_dir = run_folder(runs_dir, request.name)
            if check_run_dir(output_dir) == "new":
                problems.append(f"run {request.name!r}: no difftrain run in {output_dir} to resume")
                output_dir = None
        except ValueError as exc:
            problems.append(str(exc))
            output_dir = None
    else:
        problems += name_problems(request.name)
        if not problems:
            output_dir = runs_dir / request.name
            if output_dir.is_symlink():
                # The folder a run id names must be the folder trained in (the runs list finds it there).
                problems.append(f"run name {request.name!r} refused: {output_dir} is a symbolic link; "
                                "choose a new name")
                output_dir = None
    config_arg, config_problems = config_argument(runs_dir, request.config)
    problems += config_problems
    options = [word for word in request.overrides if word.startswith("-") or "\x00" in word]
    if options:
        # The trainer's argument parser would read these as options (--output-dir, --num-processes ...).
        problems.append(f"override {options[0]!r} refused: overrides are key=value words, not command-line options")
    if config_arg is None or options:
        return None, problems
    problems += cli_problems(config_arg, request.overrides, output_dir)
    if problems or output_dir is None:
        return None, problems
    run_id = output_dir.relative_to(runs_dir).as_posix() if output_dir != runs_dir else "."
    return LaunchPlan(run_id, output_dir, request.config, config_arg, tuple(request.overrides)), []


def validate(runs_dir: Path | str, request: LaunchRequest) -> list[str]:
    """Every problem with launching `request` under `runs_dir` (empty: it may start): the refusals of the UI's
    own path rules, then exactly the lines `difftrain train` would print for the same config and overrides.

    Runs queued in a TrainingQueue are not seen here; `TrainingQueue.validate` adds them.
    """
    return plan_launch(resolve_runs_dir(runs_dir), request)[1]
