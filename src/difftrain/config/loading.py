"""Loading a run configuration: presets, YAML files, dotted overrides, type checks, then the cross-field checks.

A config is built from a preset name (a YAML file shipped in ``configs/``) or a YAML path, then
``key.sub=value`` overrides from the command line. Every problem (unknown key, wrong type, bad
combination) is collected and reported at once by :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from difftrain.config.checks import check_config
from difftrain.config.schema import ConfigError, RunConfig


# ----------------------------------------------------------------------------------------------
# Presets


def presets_dir() -> Path:
    """Where preset YAMLs live: inside the installed package, or `configs/` of a source checkout."""
    package = Path(__file__).resolve().parents[1]  # difftrain/ (this file is difftrain/config/loading.py)
    # Installed: hatch force-includes configs/ as difftrain/configs. Checkout: src/difftrain -> repo root.
    candidates = (package / "configs", package.parents[1] / "configs")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no presets directory; looked in {', '.join(str(c) for c in candidates)}")


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def resolve_config_source(name_or_path: str) -> Path:
    """A YAML path as given, or the preset of that name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {name_or_path}")
        return path
    preset = presets_dir() / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = list_presets()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        [f"'{name_or_path}' is neither a YAML file nor a preset; presets are: {', '.join(names)}.{hint}"]
    )


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, coerced value) for a YAML value against a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, coerced = _check_value(value, arg)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):
            return True, "no"  # YAML 1.1 reads an unquoted `no` (mixed_precision=no) as false
        if value is False and "off" in typing.get_args(tp):
            return True, "off"  # and an unquoted `off` (data.buckets=off) too
        # type() equality keeps True from matching Literal[1, 3].
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp)), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    if tp is list or origin is list:
        return isinstance(value, (list, tuple)), list(value) if isinstance(value, (list, tuple)) else value
    raise TypeError(f"unsupported annotation {tp!r}")  # internal: schema uses only the types above


def _build(cls: type, values: Any, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    obj = cls()
    if values is None:
        return obj
    if not isinstance(values, dict):
        problems.append(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {values!r}")
        return obj
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            problems.append(f"unknown key '{dotted}'{hint} (allowed: {', '.join(fields)})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            setattr(obj, key, _build(tp, value, f"{dotted}.", problems))
            continue
        ok, coerced = _check_value(value, tp)
        if not ok and _accepts_float(tp) and _nonfinite_text(value):
            problems.append(f"'{dotted}' = {value!r}: {NON_FINITE}")  # `lr=nan` on the command line
            continue
        if not ok:
            problems.append(f"'{dotted}' = {value!r}: expected {_type_name(tp)}")
            continue
        nonfinite = _first_nonfinite(coerced)
        if nonfinite is not None:  # YAML `.nan` / `.inf` / `1e999`, also inside model.unet kwargs or lists
            problems.append(f"'{dotted}{nonfinite[0]}' = {nonfinite[1]!r}: {NON_FINITE}")
            continue
        setattr(obj, key, coerced)
    return obj


NON_FINITE = "must be a finite number (not NaN or infinity)"


def _accepts_float(tp: Any) -> bool:
    if tp is float:
        return True
    return typing.get_origin(tp) in (Union, types.UnionType) and any(_accepts_float(a) for a in typing.get_args(tp))


def _nonfinite_text(value: Any) -> bool:
    """'nan', 'inf', '-Infinity' ...: what float() reads as non-finite (YAML 1.1 only knows `.nan` / `.inf`)."""
    if not isinstance(value, str):
        return False
    try:
        return not math.isfinite(float(value))
    except ValueError:
        return False


def _first_nonfinite(value: Any) -> Optional[tuple[str, float]]:
    """('', x) when `value` is a non-finite float x, ('.key' / '[i]', x) for the first one inside it, else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else ("", value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        inner = _first_nonfinite(v)
        if inner is not None:
            return (f".{k}" if isinstance(value, dict) else f"[{k}]") + inner[0], inner[1]
    return None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """Turn ['train.lr=1e-4', ...] into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    problems: list[str] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"expected key=value, got {item!r}")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = _fix_yaml_floats(yaml.safe_load(raw)) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if not key:
            problems.append(f"override '{item}' has an empty key")
            continue
        _set_dotted(tree, key, value)
    return tree, problems


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "unet":
            out[key] = _deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _fix_yaml_floats(node: Any) -> Any:
    """PyYAML (YAML 1.1) reads '1e-4' as a string; turn such strings back into floats."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str):
        try:
            if "e" in node.lower() and not node.strip().isalpha():
                return float(node)
        except ValueError:
            return node
    return node


def load_config(name_or_path: str, overrides: list[str] | None = None, output_dir: str | None = None) -> RunConfig:
    """Load a preset or YAML file, apply dotted overrides, then validate.

    Raises:
        ConfigError: listing every problem found (unknown keys, wrong types, bad combinations).
        FileNotFoundError: if a YAML path does not exist.
    """
    source = resolve_config_source(name_or_path)
    try:
        text = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:  # a binary file, or text in another encoding
        raise ConfigError([f"{source}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                           "a config is a YAML file"], source=str(source)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"], source=str(source)) from exc
    raw = {} if raw is None else raw  # an empty file is an empty config
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: top level must be a mapping of sections (data:, model:, train: ...), "
                           f"got a {type(raw).__name__}"], source=str(source))
    raw = _fix_yaml_floats(raw)
    override_tree, problems = parse_overrides(overrides or [])
    merged = _deep_merge(raw, override_tree)
    if output_dir is not None:
        merged["output_dir"] = output_dir
    cfg = _build(RunConfig, merged, "", problems)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems, source=str(source))
    return cfg


def config_from_dict(values: dict) -> RunConfig:
    """Build and validate a config from a nested dict (e.g. a saved config.yaml)."""
    problems: list[str] = []
    cfg = _build(RunConfig, _fix_yaml_floats(values), "", problems)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def section_from_dict(name: str, values: Any) -> Any:
    """One top-level section (e.g. "train") of a saved config as the schema reads it, without the
    cross-field checks of a whole config; ConfigError names any key or value it does not allow."""
    hints = typing.get_type_hints(RunConfig)
    if name not in hints or not dataclasses.is_dataclass(hints[name]):
        raise ValueError(f"{name!r} is not a config section (sections: {', '.join(hints)})")
    problems: list[str] = []
    section = _build(hints[name], _fix_yaml_floats(values), f"{name}.", problems)
    if problems:
        raise ConfigError(problems)
    return section


def validate(cfg: RunConfig) -> list[str]:
    """Cross-field checks; returns every problem found (empty list when valid)."""
    return check_config(cfg)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(dump_config(cfg))
