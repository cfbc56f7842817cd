"""Regenerate docs/config.md from the schema in src/difftrain/config/schema.py (field docstrings included).

    python scripts/gen_config_docs.py            # write docs/config.md
    python scripts/gen_config_docs.py --check    # exit 1 if docs/config.md is stale
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"RunConfig": "", "DataConfig": "data", "ModelConfig": "model", "TextEncoderConfig": "text_encoder", "VaeConfig": "vae", "LoraConfig": "lora", "DiffusionConfig": "diffusion",
            "TrainConfig": "train", "SampleConfig": "sample"}


def render() -> str:
    tree = ast.parse((ROOT / "src" / "difftrain" / "config" / "schema.py").read_text())
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/difftrain/config/schema.py` by `python scripts/gen_config_docs.py`; do not edit by hand.",
        "Set keys in a YAML file or on the command line as dotted overrides (`train.max_steps=200`).",
        "",
    ]
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name not in SECTIONS:
            continue
        section = SECTIONS[node.name]
        lines += [f"## `{section}`" if section else "## top level", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        body = node.body
        for i, item in enumerate(body):
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            name = item.target.id
            annotation = ast.unparse(item.annotation)
            if annotation.endswith("Config"):
                continue
            default = ast.unparse(item.value) if item.value is not None else ""
            if default.startswith("field("):
                if "lambda:" in default:
                    default = default.split("lambda:", 1)[1].strip()[:-1]
                else:
                    default = {"dict": "{}", "list": "[]"}.get(default.split("=")[-1].rstrip(")"), default)
            doc = ""
            if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) and isinstance(body[i + 1].value, ast.Constant):
                doc = " ".join(str(body[i + 1].value.value).split())
            key = f"{section}.{name}" if section else name
            annotation = " ".join(annotation.split()).replace("|", "\\|")
            lines.append(f"| `{key}` | `{annotation}` | `{default}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    path = ROOT / "docs" / "config.md"
    text = render()
    if "--check" in sys.argv:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is stale; run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
