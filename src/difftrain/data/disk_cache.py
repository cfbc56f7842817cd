"""Decoded data on disk, for sets larger than the memory budget (`data.max_memory_gb`).

The images are decoded, converted, resized and cropped once, by worker processes, into one uint8 file at the
training resolution, which every later run and resume memory-maps instead of decoding again. Steps index it
exactly as they index the in-RAM tensor, so both paths give bit-identical batches.

A cache folder is named by a hash of the source (its item names, each file's size and modification time, labels,
captions) and the decode settings, so a changed set or setting builds a new one. The build is resumable: items
are decoded in chunks, each chunk recorded in `chunks/` once its rows are written, and `manifest.json` is
written last; a killed build continues with the chunks it has not recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from difftrain.cache import cache_root
from difftrain.config import DataConfig
from difftrain.writes import atomic_write_text, check_writable

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
CHUNK_ITEMS = 512
MANIFEST = "manifest.json"
IMAGES = "images.u8"
RAW = "raw.u8"  # the build's file: one slot per source item, compacted to IMAGES when items were skipped


def memory_budget_bytes(cfg: DataConfig) -> int:
    """`data.max_memory_gb`, or a quarter of the machine's RAM."""
    if cfg.max_memory_gb is not None:
        return int(cfg.max_memory_gb * 2**30)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX): a budget most machines have
        return 8 * 2**30


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "data"


def _file_stats(names: list[str], root: Optional[Path]) -> list:
    stats = []
    for name in names:
        try:
            st = os.stat(name)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)  # not a file (digits[3], a hub row): the name alone identifies it
    if root is not None and Path(root).is_dir():  # sources read from a few files (MNIST IDX)
        stats.append(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).iterdir()
                            if p.is_file()))
    return stats


def cache_key(source: Any, cfg: DataConfig, count: int, captions: Optional[list]) -> str:
    described = {
        "format": CACHE_FORMAT, "description": source.description, "count": count, "names": source.names[:count],
        "files": _file_stats(source.names[:count], getattr(source, "root", None)),
        "labels": None if source.labels is None else list(source.labels[:count]),
        "captions": None if captions is None else [bool(c) for c in captions[:count]],
        "decode": {"resolution": cfg.resolution, "channels": cfg.channels, "center_crop": cfg.center_crop,
                   "max_image_pixels": cfg.max_image_pixels},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


# The worker processes' view of the build, set before they fork (so the source is never pickled).
_BUILD: dict[str, Any] = {}


def _decode_chunk(chunk: int) -> tuple[int, list[int], list[tuple[str, str]]]:
    """Decode one chunk into the raw file; returns (chunk, source indices decoded, skipped (name, reason))."""
    b = _BUILD
    raw = np.memmap(b["raw"], dtype=np.uint8, mode="r+", shape=b["shape"])
    start, stop = chunk * CHUNK_ITEMS, min((chunk + 1) * CHUNK_ITEMS, b["shape"][0])
    ok, skipped = [], []
    for i in range(start, stop):
        if b["captions"] is not None and not b["captions"][i]:
            skipped.append((b["names"][i], "missing or empty caption"))
            continue
        try:
            raw[i] = b["decode"](i)
            ok.append(i)
        except Exception as exc:  # any decoder failure means "not a readable image", as in the RAM path
            skipped.append((b["names"][i], f"{type(exc).__name__}: {exc}"))
    raw.flush()
    del raw
    return chunk, ok, skipped


def _open(folder: Path, rows: int, shape: tuple[int, ...]) -> torch.Tensor:
    # Copy-on-write: writable to numpy (so torch does not warn), and nothing ever goes back to the file.
    return torch.from_numpy(np.memmap(folder / IMAGES, dtype=np.uint8, mode="c", shape=(rows, *shape)))


def _read_manifest(folder: Path, key: str, item_shape: tuple[int, ...]) -> Optional[dict]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    rows = len(manifest.get("keep", []))
    expected = rows * int(np.prod(item_shape))
    if manifest.get("key") != key or not (folder / IMAGES).is_file():
        return None
    if (folder / IMAGES).stat().st_size != expected:
        logger.warning("decoded-data cache %s is truncated (%d of %d bytes); rebuilding it", folder,
                       (folder / IMAGES).stat().st_size, expected)
        return None
    return manifest


def decode_to_disk(source: Any, cfg: DataConfig, count: int, captions: Optional[list],
                   decode: Callable[[int], np.ndarray]) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """The decoded items of `source` as a memory-mapped uint8 tensor (built once, then reused): returns it, the
    source indices it holds (in order) and the skipped (name, reason) pairs."""
    item_shape = (cfg.channels, cfg.resolution, cfg.resolution)
    key = cache_key(source, cfg, count, captions)
    folder = cache_dir(cfg) / key
    manifest = _read_manifest(folder, key, item_shape)
    if manifest is not None:
        logger.info("decoded data: reusing the disk cache %s (%d images)", folder, len(manifest["keep"]))
        return _open(folder, len(manifest["keep"]), item_shape), manifest["keep"], \
            [tuple(s) for s in manifest["skipped"]]
    size = count * int(np.prod(item_shape))
    check_writable(folder, size, f"the decoded-data cache of {source.description}", hint=(
        "Set data.cache_dir to a folder with room, or raise data.max_memory_gb to decode into RAM instead."))
    (folder / "chunks").mkdir(parents=True, exist_ok=True)
    raw_path = folder / RAW
    if not raw_path.is_file() or raw_path.stat().st_size != size:
        np.memmap(raw_path, dtype=np.uint8, mode="w+", shape=(count, *item_shape)).flush()
        for marker in (folder / "chunks").glob("*.json"):  # rows of a raw file of another size are gone
            marker.unlink()
    chunks = range((count + CHUNK_ITEMS - 1) // CHUNK_ITEMS)
    done = {int(p.stem) for p in (folder / "chunks").glob("*.json")}
    todo = [c for c in chunks if c not in done]
    start = time.perf_counter()
    logger.info("decoded data: %s is %.1f GB at %d px, over the memory budget (data.max_memory_gb); decoding it "
                "once into %s with %d processes (%d of %d chunks already there)", source.description, size / 1e9,
                cfg.resolution, folder, cfg.decode_workers, len(done), len(chunks))
    _BUILD.update(raw=str(raw_path), shape=(count, *item_shape), names=source.names, captions=captions,
                  decode=decode)
    try:
        with ProcessPoolExecutor(max_workers=cfg.decode_workers, mp_context=multiprocessing.get_context("fork")) as pool, \
                tqdm(total=count, initial=min(len(done) * CHUNK_ITEMS, count), desc="decode", unit="img",
                     dynamic_ncols=True, mininterval=1.0) as bar:
            for future in as_completed([pool.submit(_decode_chunk, c) for c in todo]):
                chunk, ok, skipped = future.result()
                atomic_write_text(folder / "chunks" / f"{chunk}.json", json.dumps({"ok": ok, "skipped": skipped}),
                                  "a decoded-data cache record")
                bar.update(len(ok) + len(skipped))
    finally:
        _BUILD.clear()
    keep: list[int] = []
    skipped_all: list[tuple[str, str]] = []
    for chunk in chunks:
        record = json.loads((folder / "chunks" / f"{chunk}.json").read_text())
        keep += record["ok"]
        skipped_all += [tuple(s) for s in record["skipped"]]
    keep.sort()
    if len(keep) == count:
        raw_path.replace(folder / IMAGES)
    else:  # compact the decoded rows, a chunk at a time, so memory stays bounded
        raw = np.memmap(raw_path, dtype=np.uint8, mode="r", shape=(count, *item_shape))
        images = np.memmap(folder / IMAGES, dtype=np.uint8, mode="w+", shape=(max(len(keep), 1), *item_shape))
        for at in range(0, len(keep), CHUNK_ITEMS):
            images[at:at + CHUNK_ITEMS] = raw[keep[at:at + CHUNK_ITEMS]]
        images.flush()
        del raw, images
        raw_path.unlink()
    atomic_write_text(folder / MANIFEST, json.dumps({"key": key, "shape": list(item_shape), "keep": keep,
                                                     "skipped": skipped_all}), "the decoded-data cache manifest")
    logger.info("decoded data: %d images into %s in %.1f s", len(keep), folder, time.perf_counter() - start)
    return _open(folder, len(keep), item_shape), keep, sorted(skipped_all)
