"""The kind of run is decided in one place: only the model families (families/) and the config checks (config/)
branch on the config keys that say what kind of run it is. Everywhere else calls the family or objective."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "difftrain"
RUN_KIND_KEYS = {"conditioning", "space", "finetune", "pretrained", "prior_preservation", "num_prior_images"}
ALLOWED = ("families", "config")


def _decisions(tree: ast.AST):
    """Expressions that decide something: if/while/ternary/assert tests and comprehension filters."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            yield node.test
        elif isinstance(node, ast.comprehension):
            yield from node.ifs
        elif isinstance(node, ast.match_case) and node.guard is not None:
            yield node.guard


def test_only_families_and_config_checks_branch_on_the_kind_of_run():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC)
        if relative.parts[0] in ALLOWED:
            continue
        for test in _decisions(ast.parse(path.read_text(), str(path))):
            for node in ast.walk(test):
                if isinstance(node, ast.Attribute) and node.attr in RUN_KIND_KEYS:
                    found.append(f"{relative}:{node.lineno}: {ast.unparse(test)}")
    assert not found, "branches on the kind of run outside families/ and config/:\n" + "\n".join(found)
