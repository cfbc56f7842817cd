"""Named tensors computed once (frozen text-encoder states, VAE latents) kept on disk and memory-mapped.

A store is a folder `<root>/<kind>/<key>/` (root: `cache_root()`, i.e. $DIFFTRAIN_CACHE or ~/.cache/difftrain)
holding one `.npy` file per named tensor and `manifest.json`. The key is a hash of everything the values depend on
(`store_key`: the producing module's weights through `module_fingerprint`, its inputs, settings), so a changed
encoder, VAE, caption list or resolution gets a new folder and a matching one is reused by later runs.

Why `.npy` and not safetensors: `np.load(mmap_mode=...)` maps the file and `torch.from_numpy` wraps that mapping
without a copy, so a tensor larger than RAM costs only the pages a step touches (the kernel reads them in and drops
them under pressure; they are clean file pages). safetensors maps its file too, but `get_tensor`/`get_slice`
copy what they return into fresh memory, which is the RAM cost this cache exists to avoid. The copy-on-write
mapping (mode 'c', as data/disk_cache.py) gives a writable array, so torch does not warn, and nothing is ever
written back to the file. bfloat16 (no numpy dtype) is stored as its uint16 bits and viewed back.

Building (`cached_store`):
- one builder: the first process to miss takes a file lock (flock, `.<key>.lock` beside the folder); the ranks of
  a run, or two runs, that miss together wait on it and then open what it built;
- atomic: the build writes into a temporary folder `.<key>.tmp-<pid>`, rows in chunks through `TensorWriter`,
  then `manifest.json` last, fsyncs, and renames the folder into place, so a killed or failed build leaves no
  folder that `open_store` accepts (its temporary is removed on failure, or by the next builder);
- checked: every tensor's rows must all have been written (a build that stops early is an error, not a half
  cache), the folder must take the estimated size before anything is computed (writes.check_writable), and
  opening checks each file's size, so a truncated store is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from difftrain.cache import cache_root
from difftrain.processes import usable_cpus
from difftrain.writes import check_writable, fsync_dir, remove_path, writing

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
MANIFEST = "manifest.json"

# torch dtype -> (numpy dtype of the file, name in the manifest). bfloat16 is kept as its raw uint16 bits.
_DTYPES: dict[torch.dtype, tuple[Any, str]] = {
    torch.float32: (np.float32, "float32"), torch.float16: (np.float16, "float16"),
    torch.bfloat16: (np.uint16, "bfloat16"), torch.float64: (np.float64, "float64"),
    torch.int64: (np.int64, "int64"), torch.int32: (np.int32, "int32"), torch.uint8: (np.uint8, "uint8"),
    torch.bool: (np.bool_, "bool"),
}
_BY_NAME = {name: (torch_dtype, np_dtype) for torch_dtype, (np_dtype, name) in _DTYPES.items()}


# -- keys ---------------------------------------------------------------------------------------------------------

def _hasher() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=16)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of `tensor` (on the CPU, contiguous), whatever its dtype (bfloat16 has no numpy type)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def tensor_digest(tensor: torch.Tensor) -> str:
    """blake2b of a tensor's dtype, shape and bytes."""
    h = _hasher()
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(_tensor_bytes(tensor))
    return h.hexdigest()


def rows_digest(tensor: torch.Tensor, chunk_bytes: int = 16 * 2**20) -> str:
    """`tensor_digest` for a large tensor (a data set's images, perhaps memory-mapped): chunks of whole rows (about
    `chunk_bytes` each) hashed on a few threads (hashlib releases the GIL), then their digests in order, with the
    dtype and shape. Another value than tensor_digest's for the same tensor."""
    rows = int(tensor.shape[0]) if tensor.dim() else 0
    row_bytes = max(1, tensor[:1].numel() * tensor.element_size())
    step = max(1, chunk_bytes // row_bytes)

    def one(start: int) -> bytes:
        h = _hasher()
        h.update(_tensor_bytes(tensor[start:start + step]))
        return h.digest()

    with ThreadPoolExecutor(max_workers=_hash_threads()) as pool:
        digests = list(pool.map(one, range(0, rows, step)))
    h = _hasher()
    h.update(f"rows{step}|{tensor.dtype}{tuple(tensor.shape)}".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


def strings_digest(texts: Iterable[str]) -> str:
    """blake2b of a sequence of strings, in order (each length-prefixed, so no two sequences collide by joining)."""
    h = _hasher()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _hash_threads() -> int:
    return max(1, min(usable_cpus(), 8))


def module_fingerprint(module: torch.nn.Module) -> str:
    """blake2b of a module's state_dict (each entry's name, dtype, shape and bytes, in order): what a frozen
    encoder's or VAE's outputs depend on besides their inputs. Tensors are copied to the CPU one at a time and
    hashed on a few threads (hashlib releases the GIL): a 123M-parameter fp32 CLIP text encoder (492 MB) took
    0.83 s on one thread and 0.71 s on two of a 2-core AMD EPYC VM (0.43 s in bf16), so SDXL's two encoders
    (817M parameters) take a few seconds, once per run."""
    entries = [(name, t) for name, t in module.state_dict().items() if torch.is_tensor(t)]

    def one(entry: tuple[str, torch.Tensor]) -> bytes:
        name, t = entry
        h = _hasher()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
        return h.digest()

    with ThreadPoolExecutor(max_workers=_hash_threads()) as pool:
        digests = list(pool.map(one, entries))
    h = _hasher()
    h.update(type(module).__name__.encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


def store_key(kind: str, parts: Mapping[str, Any]) -> str:
    """The folder name for `kind` with these key parts: blake2b of their canonical JSON (sorted keys). Parts must be
    JSON values; pass large inputs as digests (`tensor_digest`, `strings_digest`, `module_fingerprint`). The torch
    version is part of every key: another version's kernels may round the stored outputs differently."""
    text = json.dumps({"format": STORE_FORMAT, "kind": kind, "torch": torch.__version__, "parts": parts},
                      sort_keys=True, allow_nan=False)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# -- reading ------------------------------------------------------------------------------------------------------

@dataclass
class TensorStore:
    """A built store: its tensors memory-mapped (CPU, copy-on-write: writes stay in this process), and the JSON
    `meta` the build recorded."""

    folder: Path
    key: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)


def store_folder(kind: str, key: str, root: Optional[Path] = None) -> Path:
    return Path(root if root is not None else cache_root()) / kind / key


def _map(path: Path, dtype_name: str, shape: Sequence[int]) -> torch.Tensor:
    torch_dtype, np_dtype = _BY_NAME[dtype_name]
    shape = tuple(int(s) for s in shape)
    if 0 in shape:  # an empty file cannot be mapped
        return torch.empty(shape, dtype=torch_dtype)
    array = np.load(path, mmap_mode="c")
    if array.shape != shape or array.dtype != np.dtype(np_dtype):
        raise ValueError(f"{path.name}: {array.dtype}{array.shape}, the manifest says {dtype_name}{shape}")
    tensor = torch.from_numpy(array)
    return tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor


def open_store(kind: str, key: str, root: Optional[Path] = None) -> Optional[TensorStore]:
    """The complete store of `key`, memory-mapped, or None (missing, another format or key, a file cut short)."""
    folder = store_folder(kind, key, root)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != STORE_FORMAT or manifest.get("key") != key:
        return None
    try:
        tensors = {name: _map(folder / entry["file"], entry["dtype"], entry["shape"])
                   for name, entry in manifest["tensors"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a truncated or damaged file: build it again
        logger.warning("tensor cache %s is damaged (%s); building it again", folder, exc)
        return None
    return TensorStore(folder, key, tensors, manifest.get("meta", {}))


# -- writing ------------------------------------------------------------------------------------------------------

class TensorWriter:
    """What a build function fills: `create` a named tensor, `write` its rows in chunks (the chunk goes straight to
    the file; nothing is held in RAM), or `put` a whole small one; `meta` (JSON values) goes into the manifest.
    Every row of every created tensor must be written before the build returns."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta: dict[str, Any] = {}
        self._arrays: dict[str, np.memmap] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._written: dict[str, np.ndarray] = {}

    def create(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> None:
        if name in self._entries:
            raise ValueError(f"tensor {name!r} created twice")
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} is not one the cache stores ({sorted(_BY_NAME)})")
        np_dtype, dtype_name = _DTYPES[dtype]
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise ValueError(f"tensor {name!r}: give it at least one dimension (rows); keep scalars in `meta`")
        file = f"{len(self._entries)}.npy"
        self._entries[name] = {"file": file, "dtype": dtype_name, "shape": list(shape)}
        self._written[name] = np.zeros(shape[0], dtype=bool)
        if 0 not in shape:
            self._arrays[name] = np.lib.format.open_memmap(self.folder / file, mode="w+", dtype=np_dtype, shape=shape)
        else:
            np.save(self.folder / file, np.empty(shape, dtype=np_dtype))

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Rows `start : start + len(values)` of tensor `name` (any device; converted to its dtype)."""
        entry = self._entries[name]
        torch_dtype = _BY_NAME[entry["dtype"]][0]
        stop = start + len(values)
        if values.dim() == 0 or start < 0 or stop > entry["shape"][0] or list(values.shape[1:]) != entry["shape"][1:]:
            raise ValueError(f"tensor {name!r} {entry['shape']}: cannot write {tuple(values.shape)} at row {start}")
        if name in self._arrays:  # (a tensor with no elements has no file to map)
            cpu = values.detach().to(device="cpu", dtype=torch_dtype).contiguous()
            self._arrays[name][start:stop] = (cpu.view(torch.uint16) if torch_dtype == torch.bfloat16 else cpu).numpy()
        self._written[name][start:stop] = True

    def put(self, name: str, values: torch.Tensor) -> None:
        """Create tensor `name` with `values`' shape and dtype and write it whole."""
        self.create(name, tuple(values.shape), values.dtype)
        self.write(name, 0, values)

    def _finish(self, key: str, kind: str, parts: Mapping[str, Any]) -> None:
        missing = {name: int((~done).sum()) for name, done in self._written.items() if not done.all()}
        if missing:
            raise RuntimeError(f"tensor cache build returned with rows not written: {missing}")
        for name, array in self._arrays.items():
            array.flush()
            with open(self.folder / self._entries[name]["file"], "rb+") as f:
                os.fsync(f.fileno())
        self._arrays.clear()
        manifest = {"format": STORE_FORMAT, "key": key, "kind": kind, "parts": parts, "tensors": self._entries,
                    "meta": self.meta}
        path = self.folder / MANIFEST  # last: a folder without it is never opened
        with open(path, "w") as f:
            f.write(json.dumps(manifest, sort_keys=True, indent=1))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.folder)

    def _close(self) -> None:
        self._arrays.clear()


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on the file `path` (created if missing), as data/disk_cache.py's builder does: the
    processes that miss one cache together build it once. A file system without locks builds unguarded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def cached_store(kind: str, parts: Mapping[str, Any], build: Callable[[TensorWriter], None], *,
                 estimate_bytes: int, what: str, root: Optional[Path] = None) -> TensorStore:
    """The store of `kind` keyed by `parts` (see `store_key`): opened when built before (by this or an earlier run,
    or by another process while this one waited on the lock), else built once by `build(writer)` and opened.

    Args:
        build: fills a `TensorWriter` (create / write rows in chunks / put; meta). Any exception it raises leaves no
            store behind and propagates.
        estimate_bytes: about what the tensors take, checked against the free space before `build` runs.
        what: for messages ("frozen text-encoder states of 12,000 captions").
        root: the folder holding the kinds; `cache_root()` by default.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", kind):
        raise ValueError(f"tensor cache kind {kind!r}: use letters, digits, '_', '.', '-'")
    key = store_key(kind, parts)
    folder = store_folder(kind, key, root)
    store = open_store(kind, key, root)
    if store is not None:
        logger.info("tensor cache: reusing %s (%s)", folder, what)
        return store
    check_writable(folder.parent, estimate_bytes, what,
                   hint="Free some space, or point $DIFFTRAIN_CACHE at a disk with room.")
    with build_lock(folder.parent / f".{key}.lock"):
        store = open_store(kind, key, root)  # built while this process waited for the lock
        if store is not None:
            logger.info("tensor cache: reusing %s (%s), built by another process", folder, what)
            return store
        for stale in folder.parent.glob(f".{key}.tmp-*"):  # a killed build's temporary (we hold the lock)
            remove_path(stale)
        if folder.exists():  # damaged (open_store said why): replaced whole
            remove_path(folder)
        tmp = folder.parent / f".{key}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        writer = TensorWriter(tmp)
        with writing(what, folder, [tmp]):
            try:
                build(writer)
                writer._finish(key, kind, dict(parts))
            finally:
                writer._close()
            try:
                tmp.rename(folder)
            except OSError:  # another builder won (a file system without locks): use its store, drop ours
                if open_store(kind, key, root) is None:
                    raise
                remove_path(tmp)
            fsync_dir(folder.parent)
        logger.info("tensor cache: wrote %s into %s in %.1f s", what, folder, time.perf_counter() - start)
    store = open_store(kind, key, root)
    if store is None:  # cannot happen unless the folder was removed under us
        raise RuntimeError(f"tensor cache {folder} was built but cannot be opened")
    return store
