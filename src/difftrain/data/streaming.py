"""Streamed training data: webdataset-style tar shards, parquet files, or a hub data set's parquet files.

Nothing is decoded up front. The set is a list of pieces (a tar shard, or a parquet row group) with their sample
counts; a sample's id is its piece's start plus its index in the piece. The order is a pure function of
(seed, position), so resume and multi-process runs read exactly what an uninterrupted single run would: epoch
`e = position // N` visits the pieces in a permutation seeded by (seed, e), and each piece's samples in a
permutation seeded by (seed, e, piece). Consecutive positions stay inside one piece, so a reader keeps one or two
shards open at a time; the main process holds O(pieces), never a per-sample list.

Samples are read and decoded in `gather` (in data-loader worker processes), with the transforms of the in-memory
path (data/dataset.py decode_item). A sample that does not decode is named in a warning and replaced by the next
one of its piece that does, so a micro-batch keeps its size and the order stays a pure function.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from difftrain.config import DataConfig
from difftrain.data.batches import MicroBatch
from difftrain.data.dataset import decode_item
from difftrain.data.order import _mix
from difftrain.data.shard_index import index_shards, list_shards
from difftrain.data.shards import LastUsed, ParquetReader, TarReader, label_lookup
from difftrain.data.sources import ImageSource, streamed_kind

logger = logging.getLogger(__name__)

_PIECE_STREAM = 0x5EED_0011
_SAMPLE_STREAM = 0x5EED_0012


def _permutation(count: int, seed: int) -> np.ndarray:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).numpy()


def decode_image_bytes(data: bytes, name: str, cfg: DataConfig) -> np.ndarray:
    """An encoded image's bytes -> uint8 (C, H, W) at the training resolution, exactly as the in-memory path."""
    source = ImageSource(name, [name], lambda _: Image.open(io.BytesIO(data)))
    return decode_item(source, 0, cfg)[0]


class StreamingSet:
    """A streamed training set (data/batches.py TrainingData); see the module docstring for the order."""

    in_memory = False

    def __init__(self, kind: str, fs: Any, files: list[str], pieces: list[tuple[int, int, int]], cfg: DataConfig,
                 description: str, class_names: list[str], label_map: Optional[dict[int, int]],
                 labels_available: bool, skipped: list[tuple[str, str]]) -> None:
        """`pieces`: (file index, row group (0 for a tar shard), sample count) in id order."""
        self.kind = kind
        self.fs = fs
        self.files = files
        self.cfg = cfg
        self.description = description
        self.class_names = class_names
        self.labels_available = labels_available
        self.skipped = skipped
        """(shard, reason) of every shard that could not be indexed."""
        self._label_map = label_map
        self._piece_file = np.array([p[0] for p in pieces], dtype=np.int64)
        self._piece_group = np.array([p[1] for p in pieces], dtype=np.int64)
        self._counts = np.array([p[2] for p in pieces], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
        self._epochs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._pid: Optional[int] = None
        self._threads: Any = None  # threading.local of this process, holding each thread's readers
        self._warned: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_pieces(self) -> int:
        return len(self._counts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getstate__(self) -> dict:  # for spawned workers: open files stay with the process that opened them
        state = dict(self.__dict__)
        state.update(_epochs={}, _pid=None, _threads=None, _warned=set())  # _reader opens afresh
        return state

    # -- order -----------------------------------------------------------------------------------------------------

    def _epoch(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(pieces in epoch order, cumulative sample counts in that order)."""
        key = (seed, epoch)
        if key not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(next(iter(self._epochs)))
            order = _permutation(self.num_pieces, _mix(_PIECE_STREAM, seed, epoch))
            self._epochs[key] = order, np.cumsum(self._counts[order])
        return self._epochs[key]

    def rows(self, num_items: int, seed: int, position: int, count: int) -> torch.Tensor:
        """Sample ids at positions [position, position+count) of the endless stream (every id once per epoch)."""
        total = len(self)
        if num_items != total:
            raise ValueError(f"a streamed set reads all of its {total} samples, not the first {num_items}")
        out = []
        while count > 0:
            epoch, offset = divmod(position, total)
            order, ends = self._epoch(seed, epoch)
            at = int(np.searchsorted(ends, offset, side="right"))
            piece = int(order[at])
            size = int(self._counts[piece])
            within = offset - (int(ends[at]) - size)
            take = min(count, size - within)
            samples = _in_piece_order(size, seed, epoch, piece)[within:within + take]
            out.append(torch.from_numpy(samples + self._starts[piece]))
            position += take
            count -= take
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    # -- reading ---------------------------------------------------------------------------------------------------

    def _locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < len(self):
            raise IndexError(f"sample id {row} is outside the streamed set (0..{len(self) - 1})")
        piece = int(np.searchsorted(self._starts, row, side="right")) - 1
        return piece, row - int(self._starts[piece])

    def _reader(self, piece: int) -> Any:
        """This process's reader of the piece's file (opened when first needed; a fork starts afresh)."""
        if self._pid != os.getpid():
            self._pid, self._threads, self._warned = os.getpid(), threading.local(), set()
        readers = getattr(self._threads, "readers", None)
        if readers is None:  # per thread too: a reader's seek + read must not interleave with another's
            readers = self._threads.readers = LastUsed(2)
        index = int(self._piece_file[piece])
        path = self.files[index]
        label_column = (self.cfg.label_column or "label") if self.labels_available else None

        def open_reader() -> Any:
            try:
                if self.kind == "webdataset":
                    return TarReader(self.fs, path)
                return ParquetReader(self.fs, path, self.cfg.image_column, label_column, self.cfg.caption_column)
            except Exception as exc:  # it indexed at start-up: changed or removed since
                raise ValueError(f"streamed shard {path} no longer reads ({type(exc).__name__}: {exc}); "
                                 "was it changed or removed during the run?") from exc

        return readers.get_or_make(index, open_reader)

    def _call(self, piece: int, method: str, index: int) -> Any:
        reader = self._reader(piece)
        if self.kind == "webdataset":
            return getattr(reader, method)(index)
        return getattr(reader, method)(int(self._piece_group[piece]), index)

    def _sample_name(self, piece: int, index: int) -> str:
        path = self.files[int(self._piece_file[piece])]
        if self.kind == "webdataset":
            return f"{path}:{self._reader(piece).key(index)}"
        offset = self._reader(piece).row_offset(int(self._piece_group[piece]))
        return f"{path}[row {offset + index}]"

    def _piece_name(self, piece: int) -> str:
        path = self.files[int(self._piece_file[piece])]
        return path if self.kind == "webdataset" else f"{path} (row group {int(self._piece_group[piece])})"

    def _read(self, row: int) -> tuple[int, np.ndarray, Optional[int]]:
        """(id actually read, image, class index): the sample, or the next one of its piece that decodes."""
        piece, local = self._locate(row)
        size = int(self._counts[piece])
        self._reader(piece)  # a shard that no longer opens is an error of its own, not one per sample
        first_problem = None
        for step in range(size):
            index = (local + step) % size
            try:
                image = decode_image_bytes(self._call(piece, "image_bytes", index), "", self.cfg)
                label = self._call(piece, "label", index) if self.labels_available else None
            except Exception as exc:  # any failure to read or decode means "not a usable sample"
                first_problem = first_problem or f"{type(exc).__name__}: {exc}"
                if (piece, index) not in self._warned:  # once per sample and process
                    self._warned.add((piece, index))
                    logger.warning("skipped sample %s (%s); the next sample of its shard that decodes takes "
                                   "its place", self._sample_name(piece, index), f"{type(exc).__name__}: {exc}")
                continue
            if label is not None and self._label_map is not None:
                label = self._label_map[label]
            return int(self._starts[piece]) + index, image, label
        raise ValueError(f"no sample of {self._piece_name(piece)} decodes (first problem: {first_problem})")

    def gather(self, rows: torch.Tensor) -> MicroBatch:
        """Read and decode these samples; `rows` of the result names the samples read (a replacement's own id)."""
        read = [self._read(int(r)) for r in rows.tolist()]
        images = torch.from_numpy(np.stack([image for _, image, _ in read]))
        labels = torch.tensor([label for _, _, label in read], dtype=torch.long) if self.labels_available else None
        return MicroBatch(torch.tensor([r for r, _, _ in read], dtype=torch.long), images, labels)

    def row_names(self, rows: Sequence[int]) -> list[str]:
        return [self._sample_name(*self._locate(int(r))) for r in rows]

    def captions(self, rows: Sequence[int]) -> list[Optional[str]]:
        """Captions of these samples (tar `txt` or json "caption"; parquet `data.caption_column`), None if absent."""
        out = []
        for row in rows:
            piece, index = self._locate(int(row))
            out.append(self._call(piece, "caption", index))
        return out

    def write_skipped_to(self, handler: Optional[logging.Handler]) -> None:
        """Replay the `skipped shard PATH (reason)` lines into `handler` alone (train.log, attached later)."""
        if handler is not None:
            for path, reason in self.skipped:
                handler.handle(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "skipped shard %s (%s)",
                                                 (path, reason), None))


_IN_PIECE: dict[tuple[int, int, int, int], np.ndarray] = {}


def _in_piece_order(size: int, seed: int, epoch: int, piece: int) -> np.ndarray:
    """The piece's samples in epoch order (the last few kept: a micro-batch mostly stays in one piece)."""
    key = (size, seed, epoch, piece)
    if key not in _IN_PIECE:
        if len(_IN_PIECE) >= 8:
            _IN_PIECE.pop(next(iter(_IN_PIECE)))
        _IN_PIECE[key] = _permutation(size, _mix(_SAMPLE_STREAM, seed, epoch, piece))
    return _IN_PIECE[key]


def open_streaming_set(cfg: DataConfig, want_labels: bool) -> Optional[StreamingSet]:
    """The streamed set `cfg` names (index built or reused), or None when `cfg.path` is not read as a stream."""
    kind = streamed_kind(cfg.path, cfg.source, cfg.streaming)
    if kind is None:
        if cfg.streaming:
            raise ValueError(f"data.streaming = true needs a hub id ('owner/name'), a folder of .tar or .parquet files "
                             f"or a glob of them; data.path = {cfg.path!r} is none of these")
        return None
    fs, files, where = list_shards(cfg, kind)
    label_column = (cfg.label_column or "label") if want_labels and kind != "webdataset" else None
    records, skipped, summary = index_shards(fs, files, "webdataset" if kind == "webdataset" else "parquet", cfg,
                                    want_labels, label_column)
    kept = [path for path in files if path in records]
    if not kept:
        raise ValueError(f"data.path = {cfg.path!r} ({where}) has no usable shard (of {len(files)}; first problem: "
                         f"{skipped[0][0]}: {skipped[0][1]})")
    pieces = [(i, group, count) for i, path in enumerate(kept) for group, count in enumerate(records[path]["pieces"])
              if count > 0]
    if cfg.max_images is not None:
        pieces = _first_samples(pieces, cfg.max_images)
    if not pieces:
        raise ValueError(f"data.path = {cfg.path!r} ({where}) holds no samples with an image")
    class_names: list[str] = []
    label_map = None
    if want_labels:
        class_names, label_map = _labels(cfg, [(path, records[path]) for path in kept], where)
    total = sum(count for _, _, count in pieces)
    parts = f"{len(kept)} shards" if kind == "webdataset" else f"{len(kept)} files, {len(pieces)} row groups"
    description = f"{where} ({parts}), streamed"
    logger.info("streamed data: %s: %d samples; %s", description, total, summary)
    return StreamingSet("webdataset" if kind == "webdataset" else "parquet", fs, kept, pieces, cfg, description,
                        class_names, label_map, want_labels, skipped)


def _first_samples(pieces: list[tuple[int, int, int]], limit: int) -> list[tuple[int, int, int]]:
    """`data.max_images`: the first `limit` samples in id order (whole pieces, then the start of one more)."""
    out = []
    for file, group, count in pieces:
        if limit <= 0:
            break
        out.append((file, group, min(count, limit)))
        limit -= count
    return out


def _labels(cfg: DataConfig, records: list[tuple[str, dict]], where: str) -> tuple[list[str], Optional[dict[int, int]]]:
    """Class names and raw-label mapping of the whole set; every sample must carry a label."""
    for path, record in records:
        if record["unlabelled"]:
            raise ValueError(f"model.conditioning = 'class' needs labels, but {record['unlabelled']} samples of "
                             f"{path} have none (tar shards: a .cls member or .json {{\"label\": int}}; parquet: a "
                             f"non-null data.label_column)")
    named = [(path, record["class_names"]) for path, record in records if record["class_names"] is not None]
    for path, names in named[1:]:
        if names != named[0][1]:
            raise ValueError(f"{where}: {path} and {named[0][0]} name their classes differently "
                             f"({names[:5]} vs {named[0][1][:5]})")
    distinct = sorted({label for _, record in records for label in record["labels"]})
    class_names, label_map = label_lookup(distinct, named[0][1] if named else None)
    if named and distinct and not 0 <= distinct[0] <= distinct[-1] < len(class_names):
        raise ValueError(f"{where}: labels run {distinct[0]}..{distinct[-1]} but the data names "
                         f"{len(class_names)} classes")
    return class_names, label_map
