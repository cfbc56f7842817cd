"""Scan a data set for files training would skip or silently convert (`difftrain check`).

Every item goes through `decode_item`, the reader training uses, so what the scan calls unreadable is
exactly what training skips (and names in its log). Findings are errors (the file is skipped, or a
class disappears) or warnings (the image is converted or resized in a way worth knowing about).
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from PIL.Image import DecompressionBombError, UnidentifiedImageError

from difftrain.config import DataConfig
from difftrain.data.captions import resolve_captions
from difftrain.data.buckets import format_bucket
from difftrain.data.dataset import ImageFacts, bucket_sizes_of, decode_item
from difftrain.data.masks import MaskSizeError, mask_paths
from difftrain.data.sources import IMAGE_EXTENSIONS, ImageSource, dangling_link_message, open_source, streamed_kind
from difftrain.data.transforms import ImageTooLarge

# Beyond these an image costs seconds and hundreds of MB to decode for a few training pixels.
HUGE_SIDE = 8192
HUGE_PIXELS = 64_000_000


@dataclass
class Finding:
    path: str
    level: Literal["error", "warning"]
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper():7s} {self.path}: {self.kind}: {self.message}"


@dataclass
class ScanReport:
    description: str
    scanned: int
    usable: int
    findings: list[Finding] = field(default_factory=list)
    buckets: Optional[list[tuple[str, int]]] = None
    """data.buckets: ('WxH', usable images) of each bucket."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def summary(self) -> str:
        def counts(items: list[Finding]) -> str:
            by_kind = collections.Counter(f.kind for f in items)
            return ", ".join(f"{n} {kind}" for kind, n in sorted(by_kind.items()))

        text = (f"{self.scanned} items scanned in {self.description}: {self.usable} usable, "
                f"{len(self.errors)} error(s)")
        if self.errors:
            text += f" ({counts(self.errors)})"
        text += f", {len(self.warnings)} warning(s)"
        if self.warnings:
            text += f" ({counts(self.warnings)})"
        return text

    def bucket_lines(self) -> list[str]:
        """The bucket histogram (data.buckets), one line per bucket: `bucket WxH: N images`."""
        return [f"bucket {size}: {n} images" for size, n in self.buckets or [] if n]


def image_warnings(name: str, facts: ImageFacts, resolution: int) -> list[Finding]:
    """Conversions and sizes worth a warning; the image is still used."""
    found = []

    def warn(kind: str, message: str) -> None:
        found.append(Finding(name, "warning", kind, message))

    mode = facts.mode
    if mode == "CMYK":
        warn("CMYK", "CMYK image, converted to RGB/L (colours may shift)")
    if mode.startswith("I;16") or mode in ("I", "F"):
        warn("high bit depth", f"mode {mode} (16-bit or wider), scaled to 8 bits")
    if mode == "P":
        warn("palette", "palette image, converted" + (" (its transparency composited on white)" if facts.transparency else ""))
    elif mode in ("RGBA", "LA", "PA") or facts.transparency:
        warn("alpha", f"mode {mode} with transparency, composited on white")
    width, height = facts.size
    if min(width, height) < resolution:
        warn("tiny", f"{width}x{height} px is smaller than data.resolution = {resolution} (upscaled, blurry)")
    if max(width, height) > HUGE_SIDE or width * height > HUGE_PIXELS:
        warn("huge", f"{width}x{height} px: slow to decode and mostly thrown away at {resolution} px; resize it offline")
    return found


def _read_failure(name: str, exc: Exception) -> Finding:
    path = Path(name)
    if path.is_file() and path.stat().st_size == 0:
        return Finding(name, "error", "zero-byte file", "the file is empty")
    if isinstance(exc, ImageTooLarge):
        return Finding(name, "error", "too large", str(exc))
    if isinstance(exc, DecompressionBombError):
        return Finding(name, "error", "too large", f"PIL refuses it whatever data.max_image_pixels says: {exc}")
    if isinstance(exc, UnidentifiedImageError):
        return Finding(name, "error", "not an image",
                       f"content is not a readable image despite the {path.suffix or 'missing'} extension")
    text = str(exc)
    if "truncated" in text.lower() or isinstance(exc, (SyntaxError, EOFError)):
        return Finding(name, "error", "truncated", f"{type(exc).__name__}: {text}")
    return Finding(name, "error", "unreadable", f"{type(exc).__name__}: {text}")


def empty_label_folders(source: ImageSource) -> list[Finding]:
    """Class subfolders with no images: training leaves the class out (folder sources with labels only)."""
    if source.root is None or source.labels is None:
        return []
    found = []
    for folder in sorted(p for p in source.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not any(f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS for f in folder.iterdir()):
            found.append(Finding(str(folder), "error", "empty label folder",
                                 f"no images (extensions {', '.join(IMAGE_EXTENSIONS)}); this class is left out"))
    return found


def scan_data(cfg: DataConfig, want_labels: bool, want_captions: bool) -> ScanReport:
    """Open `cfg.path` as training does and report every problem, each with its path.

    Raises the same ValueError/FileNotFoundError as training when the data cannot be opened at all.
    """
    if streamed_kind(cfg.path, cfg.source, cfg.streaming) is not None:
        return scan_stream(cfg, want_labels)
    source = open_source(cfg.path, cfg.source, cfg.split, cfg.image_column, cfg.label_column,
                         want_labels or (want_captions and cfg.caption_template is not None), cfg.caption_column)
    count = len(source) if cfg.max_images is None else min(len(source), cfg.max_images)
    description = source.description + (f" (first {count} of {len(source)}: data.max_images)" if count < len(source) else "")
    findings = empty_label_folders(source)
    findings += [Finding(path, "error", "dangling link", dangling_link_message(target))
                 for path, target in source.dangling_links]
    if len(source) == 0:
        findings.append(Finding(cfg.path, "error", "no images", "the data set holds no images"))
        return ScanReport(description, len(source.dangling_links), 0, findings)
    captions: Optional[list[Optional[str]]] = resolve_captions(source, cfg) if want_captions else None
    per_item: list[list[Finding]] = [[] for _ in range(count)]
    usable = [False] * count
    masks = mask_paths(source, cfg, count)
    shapes: list[Optional[tuple[int, int]]] = [None] * count

    def work(i: int) -> None:
        name = source.names[i]
        try:
            array, facts = decode_item(source, i, cfg, masks[i] if masks else None)
        except MaskSizeError as exc:  # training refuses the run
            per_item[i].append(Finding(name, "error", "mask size", str(exc)))
            return
        except Exception as exc:  # the same failures training skips
            per_item[i].append(_read_failure(name, exc))
            return
        shapes[i] = (array.shape[2], array.shape[1])
        per_item[i].extend(image_warnings(name, facts, cfg.resolution))
        if captions is not None and not captions[i]:
            per_item[i].append(Finding(name, "error", "missing caption", "no caption, or an empty one"))
            return
        usable[i] = True

    with ThreadPoolExecutor(max_workers=cfg.decode_workers) as pool:
        list(pool.map(work, range(count)))
    for item in per_item:
        findings.extend(item)
    histogram = None
    if bucket_sizes_of(cfg) is not None:
        counted = collections.Counter(shapes[i] for i in range(count) if usable[i])
        histogram = [(format_bucket(size), counted[size]) for size in bucket_sizes_of(cfg)]
    return ScanReport(description, count + len(source.dangling_links), sum(usable), findings, histogram)


def scan_stream(cfg: DataConfig, want_labels: bool) -> ScanReport:
    """Streamed shards as training opens them: every shard indexed (or its index reused), the ones training skips
    named as errors. Samples are decoded while training reads them (a bad one is named then and replaced), so they
    are not decoded here; the timed step and the loader read the first micro-batches."""
    from difftrain.data.streaming import open_streaming_set

    stream = open_streaming_set(cfg, want_labels)
    assert stream is not None  # scan_data only calls this for a streamed path
    findings = [Finding(path, "error", "unreadable shard", f"{reason}; training skips this shard")
                for path, reason in stream.skipped]
    return ScanReport(stream.description, len(stream) + len(stream.skipped), len(stream), findings)
