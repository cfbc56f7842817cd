"""constraints.txt (the tested set install.sh installs through) and scripts/lock.py, which writes it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli, which pytest itself needs there
    import tomli as tomllib


def _lock_module(repo: Path):
    spec = importlib.util.spec_from_file_location("difftrain_lock_script", repo / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_markers_follow_requires_python(repo: Path):
    marker = _lock_module(repo).python_marker
    assert marker(None) == "" and marker(">=3.8") == "" and marker(">=3.10") == ""
    assert marker(">=3.11") == 'python_full_version >= "3.11"'
    assert marker("!=3.14.1,>=3.11") == 'python_full_version != "3.14.1" and python_full_version >= "3.11"'
    assert marker(">=3.9,<3.14") == 'python_full_version < "3.14" and python_full_version >= "3.9"'


def test_constraints_pin_every_dependency_but_torch(repo: Path):
    lines = [line for line in (repo / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    pins = {}
    for line in lines:
        req = Requirement(line)
        (spec,) = req.specifier  # exactly one ==version each
        assert spec.operator == "==", line
        pins[canonicalize_name(req.name)] = req
    assert not {"torch", "difftrain", "pip", "setuptools", "triton"} & set(pins)
    assert not [name for name in pins if name.startswith("nvidia-")]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    missing = [r.name for r in declared if r.name != "torch" and canonicalize_name(r.name) not in pins]
    assert missing == []
    # The pins satisfy the declared ranges (a refresh cannot leave a floor behind).
    for r in declared:
        if r.name != "torch":
            version = next(iter(pins[canonicalize_name(r.name)].specifier)).version
            assert r.specifier.contains(version, prereleases=True), (r, version)
    # Markers only ever restrict by Python version, and this interpreter reads each one.
    for req in pins.values():
        if req.marker is not None:
            assert "python_full_version" in str(req.marker)
            req.marker.evaluate()
