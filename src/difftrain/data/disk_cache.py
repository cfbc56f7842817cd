"""Decoded data on disk, for sets larger than the memory budget (`data.max_memory_gb`).

The images are decoded, converted, resized and cropped once, by worker processes, into one uint8 file at the
training resolution (`images.u8`), which every later run and resume opens instead of decoding again. The loader
(data/loader.py) reads the rows of each micro-batch from it in its worker processes; they are the bytes the
in-RAM tensor would hold, so both paths give bit-identical batches.

A cache folder is named by a hash of the source (its item names, each file's size and modification time, labels,
captions) and the decode settings, so a changed set or setting builds a new one. The build is resumable: items
are decoded in chunks, each chunk recorded in `chunks/` once its rows are written, and `manifest.json` is
written last; a killed build continues with the chunks it has not recorded.

Start-up with a built cache reads no per-row data: the manifest is small (no per-image list), and the per-row
files (`rows.npy`: the source index of each row; `crc32.npy`: its checksum; `labels.npy`; `names.bin` with
`name_offsets.npy`: its name, for messages) are memory-mapped and read when a row is asked for. For a whole image
folder the key is found without listing the folder into memory (data/folder_summary.py): one streaming pass, one
stat per file, memory independent of the number of files.

Checksums: zlib.crc32 of each row's bytes, computed by the decode workers. CRC-32 detects every burst error up to
32 bits and misses other corruption with probability 2^-32, which is what a disk fault or a torn write needs (the
cache is not a defence against tampering, so a cryptographic hash would buy nothing), and it runs at about twice
sha256's speed here (2.4 against 1.3 GB/s). Checking the whole cache at every start would read 60 GB before step
1, so instead `check` verifies the rows of every micro-batch as it is gathered (about 3 us per 16 px row here,
what normalising it costs; 2.4 GB/s for large rows): no byte is read that the batch does not need, nothing is
remembered between calls (so forked loader workers need no shared state), and a row corrupted mid-run is caught
too. A row that fails sends its whole chunk (CHUNK_ITEMS rows) to be checked; the failing rows are decoded again
from the source, written back in place, and named in one warning line (a read-only cache keeps them in the
process's memory instead). A torn write-back fails its checksum at the next read and is repaired again; two
workers repairing the same rows write the same bytes. Rows are read with pread, never through the mapping, so a
file cut short during a run reads as failing rows, not as SIGBUS. A truncated `images.u8` is found at start-up
from its size alone, and the cache is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from difftrain.cache import cache_root
from difftrain.config import DataConfig
from difftrain.data.folder_summary import FolderSummary, fingerprint_source
from difftrain.errors import DiskSpaceError, WriteError
from difftrain.processes import launched_local_size, total_memory_bytes
from difftrain.writes import atomic_write_text, check_writable

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
CHUNK_ITEMS = 512
MANIFEST = "manifest.json"
LOCK = ".build.lock"
IMAGES = "images.u8"
ROWS = "rows.npy"  # int64: the source index of each row of IMAGES
CHECKSUMS = "crc32.npy"  # uint32: zlib.crc32 of each row of IMAGES
LABELS = "labels.npy"  # int64: the label of each row (labelled sources)
NAMES = "names.bin"  # the name of each row (os.fsencode), end to end
NAME_OFFSETS = "name_offsets.npy"  # int64: where each row's name starts in NAMES, then the end
RAW = "raw.u8"  # the build's file: one slot per source item, compacted to IMAGES when items were skipped


def memory_budget_bytes(cfg: DataConfig) -> int:
    """`data.max_memory_gb`, or a quarter of the machine's RAM shared by this machine's training processes (each
    holds its own copy of a set in RAM)."""
    if cfg.max_memory_gb is not None:
        return int(cfg.max_memory_gb * 2**30)
    local_processes = max(launched_local_size(1), 1)
    total = total_memory_bytes()
    if total is None:  # no sysconf (not POSIX): a budget most machines have
        return 8 * 2**30 // local_processes
    return total // 4 // local_processes


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "data"


def _key(description: str, count: int, items: str, cfg: DataConfig) -> str:
    described = {"format": CACHE_FORMAT, "description": description, "count": count, "items": items,
                 "decode": {"resolution": cfg.resolution, "channels": cfg.channels, "center_crop": cfg.center_crop,
                            "max_image_pixels": cfg.max_image_pixels}}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def folder_cache_key(summary: FolderSummary, cfg: DataConfig) -> str:
    """The key of a whole image folder without captions, from its summary (no listing kept)."""
    return _key(summary.description, summary.count, summary.fingerprint, cfg)


def cache_key(source: Any, cfg: DataConfig, count: int, captions: Optional[list]) -> str:
    """A hash of the source's first `count` items (name, file size and mtime, label, has-caption) and the
    decode settings. A whole image folder without captions is hashed as `folder_cache_key` hashes it, so a warm
    start finds it without listing; other sources are fed to sha256 one item at a time."""
    if captions is None and count == len(source.names):
        fingerprint = fingerprint_source(source)
        if fingerprint is not None:
            return _key(source.description, count, fingerprint, cfg)
    digest = hashlib.sha256()
    names, labels = source.names, source.labels
    any_file = False
    for i in range(count):
        name = names[i]
        try:
            st = os.stat(name)
            stat, any_file = f"{st.st_size}:{st.st_mtime_ns}", True
        except OSError:
            stat = "-"  # not a file (digits[3], a hub row): the name alone identifies it
        label = "-" if labels is None else labels[i]
        caption = "-" if captions is None else int(bool(captions[i]))
        digest.update(f"{name}\t{stat}\t{label}\t{caption}\n".encode())
    root = getattr(source, "root", None)
    if not any_file and root is not None and Path(root).is_dir():  # items read from a few files (MNIST IDX)
        with os.scandir(root) as entries:
            files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file())
        digest.update(json.dumps(files).encode())
    return _key(source.description, count, digest.hexdigest(), cfg)


class RowNames(Sequence):
    """The names of a cache's rows, read from its NAMES file when asked (no per-row list is built)."""

    def __init__(self, folder: Path, rows: int):
        self.offsets = np.load(folder / NAME_OFFSETS, mmap_mode="r")
        self.text = np.memmap(folder / NAMES, dtype=np.uint8, mode="r") if (folder / NAMES).stat().st_size \
            else np.zeros(0, dtype=np.uint8)
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: Union[int, slice]) -> Any:
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(self.rows))]
        if not -self.rows <= row < self.rows:
            raise IndexError(f"row {row} of {self.rows}")
        row %= self.rows
        return os.fsdecode(self.text[int(self.offsets[row]):int(self.offsets[row + 1])].tobytes())


def _save_names(folder: Path, names: Sequence[str], keep: list[int]) -> None:
    offsets = np.lib.format.open_memmap(folder / NAME_OFFSETS, mode="w+", dtype=np.int64, shape=(len(keep) + 1,))
    at = 0
    with open(folder / NAMES, "wb") as f:
        for row, i in enumerate(keep):
            offsets[row] = at
            at += f.write(os.fsencode(names[i]))
    offsets[len(keep)] = at
    offsets.flush()
    del offsets


class DiskCache:
    """A built cache: its images (memory-mapped), the source index, checksum, name and label of each row (read
    from files when asked), and the skipped items."""

    def __init__(self, folder: Path, item_shape: tuple[int, ...], skipped: list[tuple[str, str]],
                 decode: Callable[[int], np.ndarray]):
        self.folder, self.item_shape, self.skipped = folder, item_shape, skipped
        self.rows = np.load(folder / ROWS, mmap_mode="r")
        self.checksums = np.load(folder / CHECKSUMS, mmap_mode="r")
        # Copy-on-write: writable to numpy (so torch does not warn), and nothing ever goes back to the file.
        self.images = torch.from_numpy(np.memmap(folder / IMAGES, dtype=np.uint8, mode="c",
                                                 shape=(len(self.rows), *item_shape))) if len(self.rows) \
            else torch.empty((0, *item_shape), dtype=torch.uint8)  # nothing to map (no readable image)
        self.labels = torch.from_numpy(np.load(folder / LABELS, mmap_mode="c")) \
            if (folder / LABELS).is_file() and len(self.rows) else None
        self.names, self._decode = RowNames(folder, len(self.rows)), decode
        self._file: tuple[int, int] = (-1, -1)  # (pid, descriptor): each process opens its own
        self._patched: dict[int, np.ndarray] = {}  # rows repaired but not written back (a read-only cache)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of `images`, read with pread rather than through the mapping: the kernel maps pages around each
        touched one into the process (64 KB per fault), so reading a whole epoch through the mapping would
        count the whole file in the process's RSS; read this way, the file stays in the page cache only."""
        out = torch.empty((len(rows), *self.item_shape), dtype=torch.uint8)
        if self._file[0] != os.getpid():
            self._file = (os.getpid(), os.open(self.folder / IMAGES, os.O_RDONLY))
        batch, row_bytes = out.numpy().reshape(len(rows), -1), int(np.prod(self.item_shape))
        for j, row in enumerate(rows.tolist()):
            if not 0 <= row < len(self.rows):
                raise IndexError(f"row {row} of a data set of {len(self.rows)}")
            if row in self._patched:
                batch[j] = self._patched[row].reshape(-1)
            elif os.preadv(self._file[1], [batch[j]], row * row_bytes) != row_bytes:
                batch[j] = 0  # the file was cut short since start-up: the checksum check repairs the row
        return out

    def check(self, rows: torch.Tensor, images: torch.Tensor) -> None:
        """Verify gathered `images` (of cache rows `rows`) against their checksums; a row that fails has its
        chunk repaired (see the module docstring) and is replaced in `images` by the repaired pixels."""
        batch = images.numpy()
        repaired: dict[int, np.ndarray] = {}
        chunks_done: set[int] = set()
        for j, row in enumerate(rows.tolist()):
            if zlib.crc32(batch[j]) != self.checksums[row]:
                if row // CHUNK_ITEMS not in chunks_done:
                    repaired.update(self._repair_chunk(row // CHUNK_ITEMS))
                    chunks_done.add(row // CHUNK_ITEMS)
                # (a row another process repaired meanwhile is read again)
                batch[j] = repaired[row] if row in repaired else self.read(rows[j:j + 1])[0].numpy()

    def _repair_chunk(self, chunk: int) -> dict[int, np.ndarray]:
        start, stop = chunk * CHUNK_ITEMS, min((chunk + 1) * CHUNK_ITEMS, len(self.rows))
        path = self.folder / IMAGES
        row_bytes = int(np.prod(self.item_shape))
        bad = []
        for at in range(start, stop, 16):  # read as gather reads (never through the mapping: a cut file would
            rows = torch.arange(at, min(at + 16, stop))  # raise SIGBUS there), 16 rows at a time
            bad += [int(r) for r, pixels in zip(rows, self.read(rows).numpy())
                    if zlib.crc32(pixels) != self.checksums[int(r)]]
        if not bad:
            return {}
        problem, repaired = "", {}
        for row in bad:
            pixels = np.ascontiguousarray(self._decode(int(self.rows[row])), dtype=np.uint8)
            if zlib.crc32(pixels) != self.checksums[row]:
                raise ValueError(
                    f"decoded-data cache {path}: row {row} ({self.names[row]}) fails its checksum, and decoding "
                    f"it again gives other pixels: the source changed since the cache was built. Start the run "
                    f"again (a changed source gets a new cache) or delete {self.folder}")
            repaired[row] = pixels
            try:
                with open(path, "r+b") as f:
                    os.pwrite(f.fileno(), pixels.tobytes(), row * row_bytes)
            except OSError as exc:  # a read-only cache: this process keeps the repaired row in memory
                problem = f"; could not write them back ({exc.strerror or exc}), so this process keeps them in memory"
                self._patched[row] = pixels
        logger.warning("decoded-data cache %s: %d of rows %d-%d failed their checksum (first %s); decoded them "
                       "again from the source%s", path, len(bad), start, stop - 1, self.names[bad[0]], problem)
        return repaired


def _read_manifest(folder: Path, key: str, item_shape: tuple[int, ...]) -> Optional[dict]:
    """The manifest of a complete cache for `key` in `folder`, else None; reads no per-row data."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        rows = int(manifest["rows"])
        sizes = {name: (folder / name).stat().st_size for name in (IMAGES, ROWS, CHECKSUMS, NAMES, NAME_OFFSETS)}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if manifest.get("key") != key or manifest.get("format") != CACHE_FORMAT:
        return None
    expected = rows * int(np.prod(item_shape))
    if sizes[IMAGES] != expected:
        logger.warning("decoded-data cache %s is truncated (%d of %d bytes); rebuilding it", folder,
                       sizes[IMAGES], expected)
        return None
    if sizes[ROWS] < 8 * rows or sizes[CHECKSUMS] < 4 * rows or sizes[NAME_OFFSETS] < 8 * (rows + 1):
        logger.warning("decoded-data cache %s: a per-row file is truncated; rebuilding it", folder)
        return None  # (.npy files: a header, then the values)
    return manifest


# The worker processes' view of the build, set before they fork (so the source is never pickled).
_BUILD: dict[str, Any] = {}


def _decode_chunk(chunk: int) -> tuple[int, list[int], list[int], list[tuple[str, str]]]:
    """Decode one chunk into the raw file; returns (chunk, source indices decoded, their crc32s, skipped
    (name, reason))."""
    b = _BUILD
    raw = np.memmap(b["raw"], dtype=np.uint8, mode="r+", shape=b["shape"])
    start, stop = chunk * CHUNK_ITEMS, min((chunk + 1) * CHUNK_ITEMS, b["shape"][0])
    ok, crcs, skipped = [], [], []
    for i in range(start, stop):
        if b["captions"] is not None and not b["captions"][i]:
            skipped.append((b["names"][i], "missing or empty caption"))
            continue
        try:
            pixels = np.ascontiguousarray(b["decode"](i), dtype=np.uint8)
        except Exception as exc:  # any decoder failure means "not a readable image", as in the RAM path
            skipped.append((b["names"][i], f"{type(exc).__name__}: {exc}"))
            continue
        raw[i] = pixels
        ok.append(i)
        crcs.append(zlib.crc32(pixels))
    raw.flush()
    del raw
    return chunk, ok, crcs, skipped


def _writable(cfg: DataConfig, folder: Path, size: int, description: str) -> None:
    """Refuse, before anything is written, a cache folder that cannot take the cache, naming data.cache_dir."""
    hint = "Set data.cache_dir to a folder with room, or raise data.max_memory_gb to decode into RAM instead."
    try:
        check_writable(folder, size, f"the decoded-data cache of {description}", hint=hint)
    except DiskSpaceError:
        raise
    except WriteError as exc:
        raise WriteError(f"{exc} (data.cache_dir = {str(cache_dir(cfg))!r}; or raise data.max_memory_gb to decode "
                         "into RAM instead)") from None


def _save_array(path: Path, values: list[int], dtype: Any) -> None:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(len(values),))
    array[:] = values
    array.flush()
    del array


def decode_to_disk(source: Any, cfg: DataConfig, count: int, captions: Optional[list],
                   decode: Callable[[int], np.ndarray]) -> DiskCache:
    """The decoded items of `source` as a memory-mapped cache (built once, then reused)."""
    item_shape = (cfg.channels, cfg.resolution, cfg.resolution)
    key = cache_key(source, cfg, count, captions)
    folder = cache_dir(cfg) / key
    built = open_cache(cfg, key, decode)
    if built is not None:
        return built
    size = count * int(np.prod(item_shape))
    _writable(cfg, folder, size, source.description)
    (folder / "chunks").mkdir(parents=True, exist_ok=True)
    with _one_builder(folder):
        built = open_cache(cfg, key, decode)  # built by the process that held the lock before this one
        if built is not None:
            return built
        return _build(source, cfg, count, captions, decode, key, folder, item_shape, size)


@contextlib.contextmanager
def _one_builder(folder: Path) -> Iterator[None]:
    """Hold the cache folder's build lock: the ranks of a multi-process run (or two runs on one data set) reach
    the same missing cache together; one builds it, the others wait and then reuse it."""
    with open(folder / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): build unguarded, as before
            pass
        yield


def _build(source: Any, cfg: DataConfig, count: int, captions: Optional[list], decode: Callable[[int], np.ndarray],
           key: str, folder: Path, item_shape: tuple[int, ...], size: int) -> DiskCache:
    (folder / MANIFEST).unlink(missing_ok=True)  # a rebuild: the old manifest must not vouch for new files
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
                chunk, ok, crcs, skipped = future.result()
                atomic_write_text(folder / "chunks" / f"{chunk}.json",
                                  json.dumps({"ok": ok, "crc32": crcs, "skipped": skipped}),
                                  "a decoded-data cache record")
                bar.update(len(ok) + len(skipped))
    finally:
        _BUILD.clear()
    keep: list[int] = []
    checksums: list[int] = []
    skipped_all: list[tuple[str, str]] = []
    for chunk in chunks:  # in order, each chunk's rows ascending: keep comes out sorted
        record = json.loads((folder / "chunks" / f"{chunk}.json").read_text())
        keep += record["ok"]
        checksums += record["crc32"]
        skipped_all += [tuple(s) for s in record["skipped"]]
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
        if not keep:  # the one-row placeholder (np.memmap cannot map an empty file) holds no image
            os.truncate(folder / IMAGES, 0)
    _save_array(folder / ROWS, keep, np.int64)
    _save_array(folder / CHECKSUMS, checksums, np.uint32)
    _save_names(folder, source.names, keep)
    (folder / LABELS).unlink(missing_ok=True)
    if source.labels is not None:
        _save_array(folder / LABELS, [source.labels[i] for i in keep], np.int64)
    manifest = {"format": CACHE_FORMAT, "key": key, "shape": list(item_shape), "rows": len(keep),
                "checksum": f"zlib.crc32 of each row, in {CHECKSUMS}", "skipped": sorted(skipped_all)}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest), "the decoded-data cache manifest")
    logger.info("decoded data: %d images into %s in %.1f s", len(keep), folder, time.perf_counter() - start)
    return DiskCache(folder, item_shape, sorted(skipped_all), decode)


def open_cache(cfg: DataConfig, key: str, decode: Callable[[int], np.ndarray]) -> Optional[DiskCache]:
    """The built cache of `key` in data.cache_dir, or None; reads no per-row data."""
    folder = cache_dir(cfg) / key
    item_shape = (cfg.channels, cfg.resolution, cfg.resolution)
    manifest = _read_manifest(folder, key, item_shape)
    if manifest is None:
        return None
    logger.info("decoded data: reusing the disk cache %s (%d images)", folder, manifest["rows"])
    return DiskCache(folder, item_shape, [tuple(s) for s in manifest["skipped"]], decode)
