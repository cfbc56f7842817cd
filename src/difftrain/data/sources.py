"""Where training images come from: scikit-learn digits, MNIST IDX files, image folders, `datasets`.

Each source returns an :class:`ImageSource`: a list of items that can each be opened as a PIL image,
with optional integer labels and class names. Decoding and resizing happen in `dataset.py`.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
STREAMED_EXTENSIONS = {".tar": "webdataset", ".parquet": "parquet"}
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class ImageSource:
    """A data set before decoding: `open(i)` returns item i as a PIL image."""

    description: str
    names: list[str]
    """One name per item for messages: a file path or 'source[index]'."""
    open: Callable[[int], Image.Image]
    labels: Optional[list[int]] = None
    class_names: list[str] = field(default_factory=list)
    captions: Optional[list[Optional[str]]] = None
    """Per-item captions when the source carries them (a `datasets` caption column)."""
    root: Optional[Path] = None
    """The image folder, for folder sources (where sidecar captions and metadata files are looked up)."""
    dangling_links: list[tuple[str, str]] = field(default_factory=list)
    """(path, target) of links with an image extension that point nowhere (folder sources): not items,
    but skipped by name, so a broken link is never dropped silently."""

    def __len__(self) -> int:
        return len(self.names)


def digits_source() -> ImageSource:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16), shipped inside scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # (N, 8, 8)
    return ImageSource(
        description="scikit-learn digits (8x8)",
        names=[f"digits[{i}]" for i in range(len(pixels))],
        open=lambda i: Image.fromarray(pixels[i]),
        labels=[int(x) for x in bunch.target],
        class_names=[str(i) for i in range(10)],
    )


def _find_idx_file(folder: Path, stem: str) -> Optional[Path]:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    # Some mirrors use 'train-images.idx3-ubyte'.
    alt = stem.replace("-idx", ".idx")
    for candidate in (folder / alt, folder / f"{alt}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """The array in an IDX file (MNIST's format; raw or .gz) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if body.size != expected:
        raise ValueError(f"{path}: IDX header says {shape} ({expected} bytes) but holds {body.size} bytes")
    return body.reshape(shape)


def is_mnist_folder(folder: Path) -> bool:
    return folder.is_dir() and any(_find_idx_file(folder, s) for pair in MNIST_FILES.values() for s in pair)


def mnist_source(folder: Path, split: str) -> ImageSource:
    """MNIST-layout IDX files (raw or .gz) in `folder`; `split` is 'train' or 'test'."""
    if split not in MNIST_FILES:
        raise ValueError(f"data.split = {split!r}: MNIST has splits {list(MNIST_FILES)}")
    image_stem, label_stem = MNIST_FILES[split]
    image_path, label_path = _find_idx_file(folder, image_stem), _find_idx_file(folder, label_stem)
    if image_path is None or label_path is None:
        missing = image_stem if image_path is None else label_stem
        raise FileNotFoundError(f"MNIST folder {folder} has no {missing}[.gz] for split {split!r}")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{image_path} / {label_path}: shapes {images.shape} and {labels.shape} do not match")
    return ImageSource(
        description=f"MNIST {split} ({folder})",
        names=[f"{image_path.name}[{i}]" for i in range(len(images))],
        open=lambda i: Image.fromarray(images[i]),
        labels=[int(x) for x in labels],
        class_names=[str(i) for i in range(10)],
    )


def _true(test: Callable[[], bool]) -> bool:
    """A DirEntry test, False where following a link fails (a loop), as for Path.is_file."""
    try:
        return test()
    except OSError:
        return False


def folder_prefix(folder: str) -> str:
    """What joins `folder` and an entry's name into the path str(Path(folder) / name) would give."""
    return {".": "", "/": "/"}.get(folder, folder + os.sep)


MASK_SUFFIX = ".mask.png"
"""A file NAME.mask.png beside NAME.ext is that image's loss mask (data.mask_dir: a folder of them instead)."""


def scan_entries(folder: str) -> Iterator[tuple[str, os.DirEntry]]:
    """The entries of `folder` a listing cares about, in directory order, each as ('dir', entry) for a subfolder
    (not hidden; links followed, like Path.is_dir), ('image', entry) for an image file (Path.suffix's rule on the
    extension) or ('dangling', entry) for a link with an image extension that points nowhere (or loops).

    os.scandir reads a file's type from the directory entry itself, so this costs no stat per file (only links
    are followed); the one rule for `_scan` (a listing) and folder_summary (a pass that keeps nothing).
    """
    base = folder_prefix(folder)
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            dot = name.rfind(".")
            if _true(entry.is_dir):
                if not name.startswith("."):
                    yield "dir", entry
            elif 0 < dot < len(name) - 1 and name[dot:].lower() in IMAGE_EXTENSIONS:
                if name.lower().endswith(MASK_SUFFIX):  # NAME.mask.png: the loss mask of NAME.ext, not an image
                    continue
                if _true(entry.is_file):
                    yield "image", entry
                elif entry.is_symlink() and not os.path.exists(base + name):
                    yield "dangling", entry


def link_target(path: str) -> str:
    return str(Path(os.readlink(path)))


def mixed_layout_error(folder: Path, class_dirs: list[str]) -> ValueError:
    """A folder with images beside class subfolders (names of the first ones in `class_dirs`)."""
    return ValueError(f"{folder} holds both images and class subfolders ({', '.join(class_dirs[:3])}...); "
                      "use one layout: flat (unconditional) or one subfolder per class")


def _scan(folder: Path) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """One pass over `folder`: its image files, its dangling links (path, target) and its subfolders, as paths
    under `folder` (strings: about 4x less memory than Path objects), each sorted by name."""
    base = folder_prefix(str(folder))
    found: dict[str, list[str]] = {"dir": [], "image": [], "dangling": []}
    for kind, entry in scan_entries(str(folder)):
        found[kind].append(base + entry.name)
    # One prefix for all: sorting the paths sorts the names (what sorting Path objects did).
    return (sorted(found["image"]), [(path, link_target(path)) for path in sorted(found["dangling"])],
            sorted(found["dir"]))


def dangling_links(folder: Path) -> list[tuple[str, str]]:
    """(path, target) of each link in `folder` with an image extension whose target does not exist (or loops).

    They are not files, so they are not items; this names them instead.
    """
    return _scan(folder)[1]


def dangling_link_message(target: str) -> str:
    """What is wrong with a dangling link, for the training log and `difftrain check`."""
    return f"it points to {target}, which does not exist"


def folder_source(folder: Path) -> ImageSource:
    """Images directly in `folder` (unlabelled), or one subfolder per class (labelled by folder name)."""
    flat, links, subdirs = _scan(folder)
    scanned = {d: _scan(Path(d)) for d in subdirs}
    class_dirs = [d for d in subdirs if scanned[d][0]]
    if flat and class_dirs:
        raise mixed_layout_error(folder, [Path(d).name for d in class_dirs])
    if flat:
        return ImageSource(
            description=f"image folder {folder}",
            names=flat,
            open=lambda i: Image.open(flat[i]),
            root=folder,
            dangling_links=links,
        )
    files: list[str] = []
    labels: list[int] = []
    for label, d in enumerate(class_dirs):
        files += scanned[d][0]
        labels += [label] * len(scanned[d][0])
    return ImageSource(
        description=f"class folders {folder} ({len(class_dirs)} classes)",
        names=files,
        open=lambda i: Image.open(files[i]),
        labels=labels,
        class_names=[Path(d).name for d in class_dirs],
        root=folder,
        # Every subfolder may be a class (one holding only broken links is one), and links beside them too.
        dangling_links=links + [link for d in subdirs for link in scanned[d][1]],
    )


def is_saved_datasets_dir(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def hub_source(path: str, split: str, image_column: str, label_column: Optional[str], want_labels: bool,
               caption_column: Optional[str] = None) -> ImageSource:
    """A Hugging Face `datasets` data set: a hub id, a local data-set script/dir, or a `save_to_disk` dir."""
    import datasets

    local = Path(path)
    try:
        if local.is_dir() and is_saved_datasets_dir(local):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{path}: no split {split!r}; splits are {list(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, split=split)
    except (ConnectionError, OSError) as exc:
        raise FileNotFoundError(
            f"could not load data set {path!r} (split {split!r}): {exc}. Offline, point data.path at a local "
            "folder or a dataset saved with `save_to_disk`."
        ) from exc
    if image_column not in ds.column_names:
        raise ValueError(f"data set {path!r} has no image column {image_column!r}; columns: {ds.column_names}")
    label_name = label_column or ("label" if want_labels and "label" in ds.column_names else None)
    labels = None
    class_names: list[str] = []
    if label_name is not None:
        if label_name not in ds.column_names:
            raise ValueError(f"data set {path!r} has no label column {label_name!r}; columns: {ds.column_names}")
        raw = list(ds[label_name])
        feature = ds.features[label_name]
        if hasattr(feature, "names"):
            class_names = list(feature.names)
            labels = [int(x) for x in raw]
        else:
            distinct = set(raw)
            # Integer labels keep numeric order (2 before 10); anything else sorts as text.
            ordered = sorted(distinct) if all(isinstance(x, int) for x in distinct) else sorted(distinct, key=str)
            class_names = [str(x) for x in ordered]
            index = {name: i for i, name in enumerate(class_names)}
            labels = [index[str(x)] for x in raw]
    captions = None
    if caption_column is not None:
        if caption_column not in ds.column_names:
            raise ValueError(f"data set {path!r} has no caption column {caption_column!r}; columns: {ds.column_names}")
        captions = [None if c is None else str(c) for c in ds[caption_column]]
    images = ds.select_columns([image_column])

    def open_item(i: int) -> Image.Image:
        item = images[i][image_column]
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, dict) and item.get("bytes") is not None:
            import io

            return Image.open(io.BytesIO(item["bytes"]))
        if isinstance(item, dict) and item.get("path"):
            return Image.open(item["path"])
        return Image.fromarray(np.asarray(item))

    return ImageSource(
        description=f"datasets {path} [{split}]",
        names=[f"{path}[{i}]" for i in range(len(ds))],
        open=open_item,
        labels=labels,
        class_names=class_names,
        captions=captions,
    )


def streamed_kind(path: str, source: str, streaming: bool = False) -> Optional[str]:
    """'webdataset', 'parquet' or 'hub' (a hub id's parquet files) when `data.path` is read as a stream of shards
    (data/streaming.py), else None.

    `data.source: auto` streams a folder holding only .tar (or only .parquet) files, a single such file, or a
    glob ending in .tar / .parquet; a hub id streams with `data.streaming: true`.
    """
    if source in ("webdataset", "parquet"):
        return source
    if source not in ("auto", "hub"):
        return None
    local = Path(path).expanduser()
    if source == "auto":
        if any(c in path for c in "*?["):
            return STREAMED_EXTENSIONS.get(Path(path).suffix.lower())
        if local.is_file():
            return STREAMED_EXTENSIONS.get(local.suffix.lower())
        if local.is_dir():
            kinds = set()
            for p in local.iterdir():  # stops at the first other entry: an image folder costs one look
                if p.name.startswith("."):
                    continue
                kind = STREAMED_EXTENSIONS.get(p.suffix.lower())
                if kind is None or (kinds and kind not in kinds) or p.is_dir():
                    return None
                kinds.add(kind)
            if kinds:
                return kinds.pop()
    if streaming and is_hub_id(path):
        return "hub"
    return None


def is_hub_id(path: str) -> bool:
    """'owner/name' that is not a local path."""
    return not Path(path).expanduser().exists() and not path.startswith((".", "/", "~")) and path.count("/") == 1


def open_source(path: str, source: str, split: str, image_column: str, label_column: Optional[str],
                want_labels: bool, caption_column: Optional[str] = None) -> ImageSource:
    """Pick and open the source for `data.path` (see DataConfig.source)."""
    kind = streamed_kind(path, source)
    if kind is not None:
        raise ValueError(f"data.path = {path!r} is a set of {kind} shards: it is streamed while training "
                         "(data/streaming.py), not opened as a list of images")
    local = Path(path).expanduser()
    path = str(local) if path.startswith("~") else path
    if source == "auto":
        if path == "digits":
            source = "digits"
        elif local.is_dir():
            if is_saved_datasets_dir(local):
                source = "hub"
            elif is_mnist_folder(local):
                source = "mnist"
            else:
                source = "folder"
        elif local.exists():
            raise ValueError(f"data.path = {path!r} is a file; expected a folder, 'digits' or a hub id")
        elif not is_hub_id(path):
            raise FileNotFoundError(f"data.path = {path!r}: no such folder (and it is not a hub id 'owner/name')")
        else:
            source = "hub"
    if source == "digits":
        return digits_source()
    if source in ("mnist", "folder") and not local.is_dir():
        raise FileNotFoundError(f"data.path = {path!r}: no such folder")
    if source == "mnist":
        return mnist_source(local, split)
    if source == "folder":
        return folder_source(local)
    return hub_source(path, split, image_column, label_column, want_labels, caption_column)
