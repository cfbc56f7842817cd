"""Layers without cycles: the import graph of difftrain's modules has no cycle.

The graph tool is reusable: `import_graph(src / "difftrain")` maps each module to the difftrain modules it
imports, `find_cycles(graph)` lists cycles as module chains; `python tests/unit/test_layers.py` prints them.

What counts as an import (every `import` / `from ... import` in the file, at any depth, including inside
functions, because those run too, just later):
- `import difftrain.a.b` -> difftrain.a.b;  `from difftrain.a import b` -> difftrain.a.b when b is a
  submodule or subpackage, else difftrain.a (a package is its __init__);  relative imports likewise.
- Parent packages that Python also runs (difftrain.a for difftrain.a.b) are not edges: a package's
  __init__ re-exporting its own submodules would otherwise make every such package a "cycle".
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "src" / "difftrain"


def _module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under package_dir (a package is named by its __init__.py)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _known_prefix(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `dotted` that is a module (`difftrain.a.func` -> `difftrain.a`)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in modules:
            return name
    return None


def _imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that the file at `path` (module `name`) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(_known_prefix(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `from . import x` in a package's __init__ is relative to the package itself.
                package = name.split(".") if is_package else name.split(".")[:-1]
                keep = len(package) - (node.level - 1)
                if keep <= 0:
                    raise ValueError(f"{path}: relative import beyond the top-level package (level {node.level})")
                base = ".".join(package[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else _known_prefix(base, modules))
    targets.discard(None)
    targets.discard(name)
    return targets


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (see the module docstring for the rules)."""
    modules = _module_names(package_dir)
    return {name: _imports_of(name, path, modules) for name, path in modules.items()}


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit on deep graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _shortest_cycle_through(start: str, graph: dict[str, set[str]], within: set[str]) -> list[str]:
    """Breadth-first: the shortest chain start -> ... -> start using only modules in `within`."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & within):
            if child == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(came_from[chain[-1]])
                return [*reversed(chain), start]
            if child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")  # cannot happen


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles as chains [a, b, a]: the shortest one through each module that is on any cycle,
    each listed once (rotated to start at its smallest name). Empty when the graph has no cycle."""
    cycles: set[tuple[str, ...]] = set()
    for component in _strongly_connected(graph):
        if len(component) == 1 and next(iter(component)) not in graph[next(iter(component))]:
            continue
        for module in component:
            ring = _shortest_cycle_through(module, graph, component)[:-1]
            first = ring.index(min(ring))
            ring = ring[first:] + ring[:first]
            cycles.add((*ring, ring[0]))
    return [list(cycle) for cycle in sorted(cycles)]


def layer_graph(graph: dict[str, set[str]], depth: int = 2) -> dict[str, set[str]]:
    """The graph between layers: each module counts as its dotted prefix of `depth` parts (difftrain.sampling.app
    -> difftrain.sampling, difftrain.pipeline stays itself); imports inside one layer are dropped."""
    def layer(module: str) -> str:
        return ".".join(module.split(".")[:depth])

    layers: dict[str, set[str]] = {}
    for module, targets in graph.items():
        layers.setdefault(layer(module), set()).update(layer(t) for t in targets if layer(t) != layer(module))
    return layers


def format_cycles(cycles: list[list[str]]) -> str:
    return "\n".join("  " + " -> ".join(cycle) for cycle in cycles)


# ----------------------------------------------------------------------------------------------
# The tool on a small made-up package, so a green layer test means "no cycle", not "saw no imports"


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_graph_reads_every_kind_of_import(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "from pkg.a import thing\n",
        "a.py": "import os\nthing = 1\n",
        "b.py": "def later():\n    from pkg import sub\n    import pkg.sub.leaf\n",
        "c.py": "from . import a\nfrom .sub import leaf_name\nfrom pkg.a import thing\n",
        "sub/__init__.py": "from . import leaf\nfrom .. import a\nfrom ..b import later\n",
        "sub/leaf.py": "from pkg import c\n",
    })
    assert import_graph(package) == {
        "pkg": {"pkg.a"},
        "pkg.a": set(),
        "pkg.b": {"pkg.sub", "pkg.sub.leaf"},
        "pkg.c": {"pkg.a", "pkg.sub"},
        "pkg.sub": {"pkg.sub.leaf", "pkg.a", "pkg.b"},
        "pkg.sub.leaf": {"pkg.c"},
    }


def test_cycles_are_reported_as_chains(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "def f():\n    from pkg.a import x\n",
        "c.py": "from pkg.d import y\n",
        "d.py": "from pkg.e import z\n",
        "e.py": "import pkg.c\n",
        "f.py": "import pkg.a\n",
    })
    assert find_cycles(import_graph(package)) == [
        ["pkg.a", "pkg.b", "pkg.a"],
        ["pkg.c", "pkg.d", "pkg.e", "pkg.c"],
    ]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


def test_layer_graph_folds_modules_into_their_subpackage(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "",
        "top.py": "from pkg.low import helper\n",
        "low/__init__.py": "",
        "low/helper.py": "from pkg.low import other\n",
        "low/other.py": "def f():\n    import pkg.top\n",
    })
    layers = layer_graph(import_graph(package))
    assert layers == {"pkg": set(), "pkg.top": {"pkg.low"}, "pkg.low": {"pkg.top"}}
    assert find_cycles(import_graph(package)) == [["pkg.low.helper", "pkg.low.other", "pkg.top", "pkg.low.helper"]]
    assert find_cycles(layers) == [["pkg.low", "pkg.top", "pkg.low"]]


def test_difftrain_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert "difftrain.config.schema" in graph and "difftrain.cli" in graph  # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles among difftrain modules ({len(cycles)}):\n{format_cycles(cycles)}"



def test_difftrain_layers_import_each_other_without_cycles():
    """One level up: the subpackages and top-level modules of difftrain (config, data, models, sampling,
    pipeline, training, evaluation, ...) form layers, and no layer reaches back into one that imports it
    (issue 17: no back-arrows such as sampling <-> pipeline or evaluation <-> training)."""
    graph = import_graph()
    cycles = find_cycles(layer_graph(graph))
    # Name the module imports behind each arrow of each cycle, so the message says what to move.
    arrows = sorted({(a, b) for cycle in cycles for a, b in zip(cycle, cycle[1:])})
    behind = [f"  {a} -> {b}: " + ", ".join(f"{m} imports {t}" for m, t in _imports_between(graph, a, b))
              for a, b in arrows]
    assert not cycles, (f"import cycles among difftrain's layers ({len(cycles)}):\n{format_cycles(cycles)}\n"
                        "made by:\n" + "\n".join(behind))


def _imports_between(graph: dict[str, set[str]], layer_a: str, layer_b: str) -> list[tuple[str, str]]:
    def inside(module: str, layer: str) -> bool:
        return module == layer or module.startswith(layer + ".")

    return sorted((m, t) for m, targets in graph.items() if inside(m, layer_a) for t in targets if inside(t, layer_b))


if __name__ == "__main__":
    graph = import_graph()
    found = {"modules": find_cycles(graph), "layers": find_cycles(layer_graph(graph))}
    for level, cycles in found.items():
        print(f"import cycles between {level}:", ("\n" + format_cycles(cycles)) if cycles else "none")
    sys.exit(1 if any(found.values()) else 0)
