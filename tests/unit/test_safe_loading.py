"""Source audit: nothing difftrain reads (checkpoints, configs, hub repositories) is executed.

The checks parse every module under src/difftrain, so a new unsafe call fails here with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "difftrain"


def _calls() -> list[tuple[str, int, ast.Call]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                found.append((str(path.relative_to(SRC)), node.lineno, node))
    return found


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_source_tree_is_found():
    assert len(_calls()) > 500  # guards against the audit silently scanning nothing


def test_every_torch_load_is_weights_only():
    bad = [f"{path}:{line}" for path, line, call in _calls()
           if _name(call.func) == "torch.load" and _keyword(call, "weights_only") is not True]
    assert bad == [], f"torch.load without weights_only=True: {bad}"


# The one process difftrain starts itself: the UI's training queue runs `python -m difftrain train ...` from a
# checked argument list (ui/launch_request.py), never through a shell.
TRAINER_LAUNCHERS = {("ui/launcher.py", "subprocess.Popen")}
SAFE_YAML_LOADERS = {"SafeLoader", "yaml.SafeLoader", "yaml.CSafeLoader"}


def _allowed(path: str, call: ast.Call) -> bool:
    name = _name(call.func)
    if (path, name) in TRAINER_LAUNCHERS:
        return all(kw.arg != "shell" for kw in call.keywords) and isinstance(call.args[0], (ast.Call, ast.List))
    if name == "yaml.load":  # libyaml's safe loader is much faster than yaml.safe_load's pure-Python one
        loader = next((kw.value for kw in call.keywords if kw.arg == "Loader"), None)
        return loader is not None and _name(loader) in SAFE_YAML_LOADERS
    return False


def test_no_eval_exec_shell_or_pickle():
    banned = {"eval", "exec", "compile", "os.system", "os.popen", "pickle.load", "pickle.loads", "yaml.load",
              "yaml.unsafe_load", "subprocess.call", "subprocess.run", "subprocess.Popen", "subprocess.check_output"}
    bad = [f"{path}:{line} {_name(call.func)}" for path, line, call in _calls()
           if _name(call.func) in banned and not _allowed(path, call)]
    assert bad == [], f"calls that could execute data: {bad}"


def test_trust_remote_code_is_never_on():
    bad = [f"{path}:{line}" for path, line, call in _calls()
           if any(kw.arg == "trust_remote_code" for kw in call.keywords) and _keyword(call, "trust_remote_code") is not False]
    assert bad == [], f"trust_remote_code not literally False: {bad}"
    custom = [f"{path}:{line}" for path, line, call in _calls() if any(kw.arg == "custom_pipeline" for kw in call.keywords)]
    assert custom == [], f"custom_pipeline loads code from a repository: {custom}"


def test_checkpoints_are_verified_before_accelerate_loads_them():
    # accelerate reads registered custom state (the EMA) with torch.load(weights_only=False); every
    # load_state must sit right behind verify_checkpoint, which reads each file weights-only first.
    sites = [(path, line) for path, line, call in _calls() if _name(call.func).endswith("load_state")
             and _name(call.func).startswith("accelerator")]
    assert sites and {path for path, _ in sites} == {"training/resume_check.py"}, sites
    text = (SRC / "training" / "resume_check.py").read_text()
    assert text.index("ckpt.verify_checkpoint(path)") < text.index("accelerator.load_state(")
