"""Captions for text-to-image training: class-label templates, sidecar .txt files, metadata.jsonl/CSV
next to the images, or a caption column of a `datasets` data set.

`resolve_captions` returns one caption (or None when missing/empty) per item; the data set then skips
captionless items and names each one, as it does for unreadable images. An image with several captions (a list in
metadata.jsonl or a column, or the lines of a sidecar .txt with data.caption_lines = 'choose') gets them joined by
caption_recipe.CHOICE_SEPARATOR; the step draws one (data/caption_recipe.py).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

from difftrain.config import DataConfig
from difftrain.data.caption_recipe import CHOICE_SEPARATOR
from difftrain.data.sources import ImageSource

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_KEYS = ("text", "caption", "prompt")


def _metadata_path(root: Path) -> Optional[Path]:
    for name in METADATA_FILES:
        if (root / name).is_file():
            return root / name
    return None


def read_metadata(path: Path, caption_key: Optional[str]) -> dict[str, Any]:
    """file_name (relative to the metadata file's folder) -> caption, from JSON lines or CSV."""
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    keys = set().union(*(row.keys() for row in rows))
    if "file_name" not in keys:
        raise ValueError(f"{path}: needs a 'file_name' column (found {sorted(keys)})")
    key = caption_key or next((k for k in CAPTION_KEYS if k in keys), None)
    if key is None or key not in keys:
        wanted = caption_key or " or ".join(CAPTION_KEYS)
        raise ValueError(f"{path}: no caption column {wanted!r} (found {sorted(keys)}); set data.caption_column")
    return {str(row["file_name"]): (row.get(key) or "") for row in rows}  # a JSON list: several captions


def _clean(caption: Any) -> Optional[str]:
    """One caption with its whitespace collapsed, or several (a list: metadata.jsonl, a `datasets` column) joined
    by CHOICE_SEPARATOR; None when empty."""
    if caption is None:
        return None
    if isinstance(caption, (list, tuple)):
        choices = [c for c in (_clean(item) for item in caption) if c]
        return CHOICE_SEPARATOR.join(choices) or None
    caption = " ".join(str(caption).split())
    return caption or None


def _sidecar(text: str, lines: str) -> Optional[str]:
    """A sidecar .txt: one caption ('join'), or one per non-empty line ('choose')."""
    return _clean(text.splitlines() if lines == "choose" else text)


def resolve_captions(source: ImageSource, cfg: DataConfig) -> list[Optional[str]]:
    """One caption per item of `source` (None where missing or empty)."""
    root = source.root
    mode = cfg.captions
    if mode == "auto":
        if cfg.caption_template:
            mode = "template"
        elif source.captions is not None:
            mode = "column"
        elif root is not None and _metadata_path(root) is not None:
            mode = "metadata"
        elif root is not None and any(Path(n).with_suffix(".txt").is_file() for n in source.names[:50]):
            mode = "sidecar"
        else:
            raise ValueError(
                f"model.conditioning = 'text' needs captions for {source.description}: set data.caption_template "
                "(e.g. 'a photo of a {label}'), data.caption_column, put metadata.jsonl/metadata.csv "
                "(file_name + text) in the folder, or a .txt file next to each image"
            )
    if mode == "template":
        if source.labels is None:
            raise ValueError(f"data.caption_template needs class labels, but {source.description} has none")
        names = source.class_names or [str(i) for i in range(max(source.labels) + 1)]
        return [cfg.caption_template.format(label=names[label]) for label in source.labels]
    if mode == "column":
        if source.captions is None:
            raise ValueError(f"data.captions = 'column', but {source.description} has no caption column "
                             f"(data.caption_column = {cfg.caption_column!r})")
        return [_clean(c) for c in source.captions]
    if root is None:
        raise ValueError(f"data.captions = {mode!r} needs an image folder; {source.description} is not one")
    if mode == "metadata":
        path = _metadata_path(root)
        if path is None:
            raise FileNotFoundError(f"data.captions = 'metadata': no {' or '.join(METADATA_FILES)} in {root}")
        table = read_metadata(path, cfg.caption_column)
        return [_clean(table.get(Path(n).relative_to(root).as_posix())) for n in source.names]
    # sidecar: image.png -> image.txt
    captions = []
    for name in source.names:
        txt = Path(name).with_suffix(".txt")
        captions.append(_sidecar(txt.read_text(errors="replace"), cfg.caption_lines) if txt.is_file() else None)
    return captions
