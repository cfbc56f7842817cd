"""Data sources (digits, MNIST IDX, folders, saved `datasets`) and decoding into an ImageDataset."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.config import DataConfig
from difftrain.data.dataset import ImageDataset, decode_source, load_image_dataset
from difftrain.data.sources import folder_source, is_mnist_folder, mnist_source, open_source

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"

# ------------------------------------------------------------------------------------------------
# helpers


def _idx_images(images: np.ndarray, magic: int = 0x00000803) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", magic, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, magic: int = 0x00000801) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def _tiny_mnist_arrays(n: int = 5, h: int = 4, w: int = 3):
    images = (np.arange(n * h * w) * 7 % 256).astype(np.uint8).reshape(n, h, w)
    labels = np.array([(3 * i + 1) % 10 for i in range(n)], dtype=np.uint8)
    return images, labels


def _write_mnist(folder: Path, split: str = "train", gz: bool = False, n: int = 5):
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = _tiny_mnist_arrays(n)
    prefix = "train" if split == "train" else "t10k"
    for stem, payload in ((f"{prefix}-images-idx3-ubyte", _idx_images(images)),
                          (f"{prefix}-labels-idx1-ubyte", _idx_labels(labels))):
        if gz:
            with gzip.open(folder / f"{stem}.gz", "wb") as f:
                f.write(payload)
        else:
            (folder / stem).write_bytes(payload)
    return images, labels


def _save_png(path: Path, value: int | tuple, size=(12, 8), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _cfg(path, **kw) -> DataConfig:
    kw.setdefault("resolution", 8)
    kw.setdefault("decode_workers", 2)
    return DataConfig(path=str(path), **kw)


# ------------------------------------------------------------------------------------------------
# MNIST IDX


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_mnist_source_reads_shapes_labels_and_pixels(tmp_path, gz):
    images, labels = _write_mnist(tmp_path, "train", gz=gz)
    assert is_mnist_folder(tmp_path)
    source = mnist_source(tmp_path, "train")
    assert len(source) == 5
    assert source.labels == [int(x) for x in labels]
    assert source.class_names == [str(i) for i in range(10)]
    for i in range(len(source)):
        image = source.open(i)
        assert image.size == (3, 4)  # PIL size is (width, height)
        np.testing.assert_array_equal(np.asarray(image), images[i])
    assert source.names[0].startswith("train-images-idx3-ubyte")


def test_mnist_test_split_and_unknown_split(tmp_path):
    _write_mnist(tmp_path, "test", n=3)
    assert len(mnist_source(tmp_path, "test")) == 3
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        mnist_source(tmp_path, "train")
    with pytest.raises(ValueError, match="validation"):
        mnist_source(tmp_path, "validation")


def test_mnist_alternative_dot_file_names(tmp_path):
    images, labels = _tiny_mnist_arrays()
    (tmp_path / "train-images.idx3-ubyte").write_bytes(_idx_images(images))
    (tmp_path / "train-labels.idx1-ubyte").write_bytes(_idx_labels(labels))
    source = mnist_source(tmp_path, "train")
    assert source.labels == [int(x) for x in labels]


def test_mnist_bad_magic_raises_value_error_naming_the_file(tmp_path):
    images, labels = _tiny_mnist_arrays()
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(_idx_images(images, magic=0x12340803))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_labels(labels))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte") as info:
        mnist_source(tmp_path, "train")
    assert str(bad) in str(info.value)
    assert "magic" in str(info.value)


def test_mnist_truncated_body_raises_value_error(tmp_path):
    images, labels = _tiny_mnist_arrays()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_images(images)[:-1])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_labels(labels))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        mnist_source(tmp_path, "train")


def test_mnist_mismatched_counts_raise_value_error(tmp_path):
    images, labels = _tiny_mnist_arrays(n=5)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_images(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_labels(labels[:4]))
    with pytest.raises(ValueError, match="do not match"):
        mnist_source(tmp_path, "train")


def test_mnist_missing_labels_raises_file_not_found(tmp_path):
    images, _ = _tiny_mnist_arrays()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_images(images))
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        mnist_source(tmp_path, "train")


# ------------------------------------------------------------------------------------------------
# folders


def test_flat_folder_is_unlabelled_and_sorted(tmp_path):
    for name, value in (("b.png", (0, 0, 255)), ("a.jpg", (255, 0, 0)), ("c.BMP", (0, 255, 0))):
        _save_png(tmp_path / name, value)
    (tmp_path / "notes.txt").write_text("not an image")
    source = folder_source(tmp_path)
    assert source.labels is None
    assert source.class_names == []
    assert [Path(n).name for n in source.names] == ["a.jpg", "b.png", "c.BMP"]
    with source.open(1) as image:
        assert image.size == (12, 8)
        assert image.convert("RGB").getpixel((0, 0)) == (0, 0, 255)


def test_class_subfolders_give_labels_and_sorted_class_names(tmp_path):
    _save_png(tmp_path / "zebra" / "1.png", (0, 0, 0))
    _save_png(tmp_path / "apple" / "x.png", (255, 0, 0))
    _save_png(tmp_path / "apple" / "y.png", (250, 0, 0))
    _save_png(tmp_path / "mango" / "m.png", (255, 200, 0))
    (tmp_path / "empty").mkdir()  # no images: not a class
    _save_png(tmp_path / ".hidden" / "h.png", (1, 1, 1))  # hidden: not a class
    source = folder_source(tmp_path)
    assert source.class_names == ["apple", "mango", "zebra"]
    assert source.labels == [0, 0, 1, 2]
    assert [Path(n).parent.name for n in source.names] == ["apple", "apple", "mango", "zebra"]
    with source.open(3) as image:
        assert image.convert("RGB").getpixel((0, 0)) == (0, 0, 0)


def test_mixed_layout_raises_value_error(tmp_path):
    _save_png(tmp_path / "loose.png", (0, 0, 0))
    _save_png(tmp_path / "cats" / "c.png", (1, 2, 3))
    with pytest.raises(ValueError, match="both images and class subfolders"):
        folder_source(tmp_path)


# ------------------------------------------------------------------------------------------------
# open_source auto-detection


def _open(path, want_labels=False, split="train", source="auto"):
    return open_source(str(path), source, split, "image", None, want_labels)


def test_open_source_digits():
    source = _open("digits")
    assert len(source) == 1797
    assert source.class_names == [str(i) for i in range(10)]
    image = source.open(0)
    assert image.size == (8, 8) and image.mode == "L"
    assert 0 <= source.labels[0] <= 9


def test_open_source_detects_image_folder(tmp_path):
    _save_png(tmp_path / "a.png", (1, 2, 3))
    source = _open(tmp_path)
    assert source.description.startswith("image folder")
    assert len(source) == 1


def test_open_source_detects_mnist_folder(tmp_path):
    _, labels = _write_mnist(tmp_path, "train", gz=True)
    source = _open(tmp_path)
    assert source.description.startswith("MNIST train")
    assert source.labels == [int(x) for x in labels]


def test_open_source_detects_saved_datasets_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 10, 10)]
    pil_images = [Image.new("RGB", (6, 4), c) for c in colours]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "emu"])}
    )
    ds = datasets.Dataset.from_dict({"image": pil_images, "label": [2, 0, 1, 2]}, features=features)
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))

    source = _open(saved, want_labels=True)
    assert source.description.startswith("datasets")
    assert source.class_names == ["cat", "dog", "emu"]
    assert source.labels == [2, 0, 1, 2]
    assert len(source) == 4
    image = source.open(1)
    assert image.size == (6, 4)
    assert image.convert("RGB").getpixel((0, 0)) == (0, 255, 0)

    # Without want_labels the label column is not read.
    unlabelled = _open(saved, want_labels=False)
    assert unlabelled.labels is None and unlabelled.class_names == []

    # And through the full loader.
    dataset = load_image_dataset(_cfg(saved, resolution=4), want_labels=True)
    assert dataset.images.shape == (4, 3, 4, 4)
    assert dataset.labels.tolist() == [2, 0, 1, 2]
    assert dataset.num_classes == 3
    assert dataset.images[0, :, 0, 0].tolist() == [255, 0, 0]


def test_open_source_saved_dataset_dict_picks_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image()})
    make = lambda n: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [Image.new("L", (3, 3), i) for i in range(n)]}, features=features
    )
    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": make(3), "test": make(2)}).save_to_disk(str(saved))
    assert len(_open(saved, split="test")) == 2
    with pytest.raises(ValueError, match="no split 'validation'"):
        _open(saved, split="validation")


@pytest.mark.parametrize("relative", [False, True])
def test_open_source_missing_local_path_raises_file_not_found_naming_it(tmp_path, monkeypatch, relative):
    if relative:
        monkeypatch.chdir(tmp_path)
        path = "no_such_folder"
    else:
        path = str(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match="no_such_folder") as info:
        _open(path)
    assert path in str(info.value)


def test_open_source_rejects_a_plain_file(tmp_path):
    f = tmp_path / "image.png"
    _save_png(f, (0, 0, 0))
    with pytest.raises(ValueError, match="is a file"):
        _open(f)


def test_explicit_folder_source_on_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        _open(tmp_path / "missing", source="folder")


# ------------------------------------------------------------------------------------------------
# decoding (dataset.py)


def _folder_with_bad_files(folder: Path) -> tuple[Path, Path]:
    _save_png(folder / "good1.png", (255, 0, 0), size=(16, 12))
    _save_png(folder / "good2.jpg", (0, 0, 255), size=(10, 20))
    _save_png(folder / "good3.png", 128, size=(9, 9), mode="L")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "readme.jpg"
    text.write_text("this is just text, not a JPEG\n")
    return empty, text


def test_load_image_dataset_skips_unreadable_files(tmp_path, caplog):
    empty, text = _folder_with_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        dataset = load_image_dataset(_cfg(tmp_path), want_labels=False)
    assert isinstance(dataset, ImageDataset)
    assert len(dataset) == 3
    assert dataset.images.dtype == torch.uint8
    assert dataset.images.shape == (3, 3, 8, 8)
    assert dataset.labels is None
    # Sorted file order: good1 (red), good2 (blue), good3 (grey).
    assert dataset.images[0, :, 4, 4].tolist() == [255, 0, 0]
    assert dataset.images[1, 2, 4, 4] > 200 and dataset.images[1, 0, 4, 4] < 50
    assert dataset.images[2, :, 4, 4].tolist() == [128, 128, 128]

    skipped_names = {name for name, _ in dataset.skipped}
    assert skipped_names == {str(empty), str(text)}
    assert all(reason for _, reason in dataset.skipped)
    messages = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(empty) in messages and str(text) in messages
    assert "skipped 2 of 5" in messages


def test_decode_source_grayscale_and_max_images(tmp_path):
    _folder_with_bad_files(tmp_path)
    source = folder_source(tmp_path)
    # Sorted: empty.png, good1.png, good2.jpg, good3.png, readme.jpg -> first 3 include one bad file.
    dataset = decode_source(source, _cfg(tmp_path, channels=1, resolution=4, max_images=3))
    assert dataset.images.shape == (2, 1, 4, 4)
    assert [name for name, _ in dataset.skipped] == [str(tmp_path / "empty.png")]


def test_decode_keeps_labels_aligned_when_skipping(tmp_path):
    _save_png(tmp_path / "a" / "1.png", (255, 0, 0))
    (tmp_path / "a" / "2.png").write_bytes(b"")
    _save_png(tmp_path / "b" / "1.png", (0, 255, 0))
    dataset = load_image_dataset(_cfg(tmp_path, resolution=4), want_labels=True)
    assert dataset.labels.tolist() == [0, 1]
    assert dataset.labels.dtype == torch.long
    assert dataset.class_names == ["a", "b"]
    assert dataset.images[1, :, 0, 0].tolist() == [0, 255, 0]
    # Unconditional use of a labelled folder drops the labels.
    assert load_image_dataset(_cfg(tmp_path, resolution=4), want_labels=False).labels is None


def test_folder_of_only_bad_files_raises_value_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("nope")
    with pytest.raises(ValueError, match=r"no usable images.*a.png|no usable images.*b.jpg"):
        load_image_dataset(_cfg(tmp_path), want_labels=False)


def test_empty_folder_raises_value_error_naming_the_path(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(ValueError) as info:
        load_image_dataset(_cfg(empty), want_labels=False)
    assert str(empty) in str(info.value)


def test_want_labels_on_flat_folder_raises_value_error(tmp_path):
    _save_png(tmp_path / "a.png", (0, 0, 0))
    with pytest.raises(ValueError, match="needs labels"):
        load_image_dataset(_cfg(tmp_path), want_labels=True)


def test_load_tiny_mnist_folder(tmp_path):
    images, labels = _write_mnist(tmp_path, "train")
    dataset = load_image_dataset(_cfg(tmp_path, channels=1, resolution=4, center_crop=False), want_labels=True)
    assert dataset.images.shape == (5, 1, 4, 4)
    assert dataset.labels.tolist() == [int(x) for x in labels]
    assert dataset.num_classes == 10


# ------------------------------------------------------------------------------------------------
# the real MNIST files, when present


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"no MNIST at {MNIST_DIR}")
def test_real_mnist_splits():
    train = open_source(str(MNIST_DIR), "auto", "train", "image", None, True)
    assert len(train) == 60000
    assert train.class_names == [str(i) for i in range(10)]
    assert set(train.labels) == set(range(10))
    assert train.open(0).size == (28, 28)
    test = open_source(str(MNIST_DIR), "auto", "test", "image", None, True)
    assert len(test) == 10000
    assert set(test.labels) == set(range(10))


def test_integer_labels_without_classlabel_keep_numeric_order(tmp_path):
    import datasets
    from PIL import Image as PILImage

    from difftrain.data.sources import open_source

    images = [PILImage.new("RGB", (4, 4), (i, i, i)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [10, 2, 10]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    source = open_source(str(tmp_path / "ds"), "auto", "train", "image", None, want_labels=True)
    assert source.class_names == ["2", "10"]
    assert source.labels == [1, 0, 1]


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from difftrain.data.sources import open_source

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pics").mkdir()
    PILImage.new("RGB", (4, 4)).save(tmp_path / "pics" / "a.png")
    source = open_source("~/pics", "auto", "train", "image", None, want_labels=False)
    assert len(source) == 1


# ------------------------------------------------------------------------------------------------
# data safety: dangling links and the pixel limit (issue 16)


def _link(link: Path, target: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def test_dangling_links_are_named_and_skipped_not_dropped(tmp_path, caplog):
    _save_png(tmp_path / "good.png", (255, 0, 0))
    gone = _link(tmp_path / "gone.png", tmp_path / "moved" / "photo.png")
    loop = _link(tmp_path / "loop.jpg", tmp_path / "loop.jpg")  # points at itself: no target either
    _link(tmp_path / "notes.txt", tmp_path / "nowhere.txt")  # not an image name: not a data item
    source = folder_source(tmp_path)
    assert source.names == [str(tmp_path / "good.png")]
    assert source.dangling_links == [(str(gone), str(tmp_path / "moved" / "photo.png")),
                                     (str(loop), str(loop))]
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        dataset = load_image_dataset(_cfg(tmp_path), want_labels=False)
    assert len(dataset) == 1
    assert dataset.skipped == [
        (str(gone), f"dangling link: it points to {tmp_path / 'moved' / 'photo.png'}, which does not exist"),
        (str(loop), f"dangling link: it points to {loop}, which does not exist"),
    ]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert f"skipped {gone} (dangling link" in messages and f"skipped {loop} (dangling link" in messages
    assert "skipped 2 of 3 images" in messages


def test_check_reports_dangling_links_in_class_folders(tmp_path):
    from difftrain.data.check import scan_data

    _save_png(tmp_path / "a" / "1.png", (255, 0, 0))
    in_class = _link(tmp_path / "a" / "2.png", tmp_path / "deleted.png")
    only_link = _link(tmp_path / "b" / "1.png", tmp_path / "also-deleted.png")
    report = scan_data(_cfg(tmp_path), want_labels=True, want_captions=False)
    errors = {(f.path, f.kind) for f in report.errors}
    assert (str(in_class), "dangling link") in errors and (str(only_link), "dangling link") in errors
    assert (str(tmp_path / "b"), "empty label folder") in errors  # the class is left out, and said so
    assert report.scanned == 3 and report.usable == 1
    message = next(f.message for f in report.errors if f.path == str(in_class))
    assert message == f"it points to {tmp_path / 'deleted.png'}, which does not exist"
    # Training skips the same files by name.
    dataset = load_image_dataset(_cfg(tmp_path), want_labels=True)
    assert {name for name, _ in dataset.skipped} == {str(in_class), str(only_link)}


def test_a_folder_of_only_dangling_links_names_one(tmp_path):
    link = _link(tmp_path / "a.png", tmp_path / "gone.png")
    with pytest.raises(ValueError, match=f"holds no images; 1 dangling link.*{link}"):
        load_image_dataset(_cfg(tmp_path), want_labels=False)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height RGB but whose pixel data holds ~100 bytes: decoding it fails."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    return path


def test_an_image_over_max_image_pixels_is_refused_from_its_header(tmp_path):
    from difftrain.data.check import scan_data
    from difftrain.data.dataset import decode_item
    from difftrain.data.transforms import ImageTooLarge

    _save_png(tmp_path / "good.png", (0, 255, 0))
    big = _png_header_only(tmp_path / "big.png", 3000, 2000)
    source = folder_source(tmp_path)
    cfg = _cfg(tmp_path, max_image_pixels=5_000_000)
    with pytest.raises(ImageTooLarge) as info:
        decode_item(source, 0, cfg)
    assert str(info.value) == ("3000x2000 px = 6,000,000 pixels is over data.max_image_pixels = 5,000,000; "
                               "not decoded (raise data.max_image_pixels to use it)")
    # Its pixel data is cut short, so any decode fails: the refusal above came from the header alone.
    with pytest.raises(OSError, match="truncated|broken|incomplete"):
        decode_item(source, 0, _cfg(tmp_path, max_image_pixels=6_000_000))
    dataset = decode_source(source, cfg)
    assert len(dataset) == 1 and dataset.skipped == [(str(big), f"ImageTooLarge: {info.value}")]
    report = scan_data(cfg, want_labels=False, want_captions=False)
    assert [(f.path, f.kind, f.message) for f in report.errors] == [(str(big), "too large", str(info.value))]


def test_max_image_pixels_must_be_at_least_one():
    from difftrain.config import ConfigError, load_config

    assert load_config("digits").data.max_image_pixels == 50_000_000
    with pytest.raises(ConfigError, match=r"'data.max_image_pixels' = 0: must be >= 1"):
        load_config("digits", ["data.max_image_pixels=0"])


@pytest.mark.parametrize("layout", ["flat", "classes"])
def test_a_folder_summary_matches_the_listing_without_keeping_it(tmp_path, layout):
    from difftrain.data.folder_summary import fingerprint_source, summarize_folder

    where = (lambda i: tmp_path) if layout == "flat" else (lambda i: tmp_path / ("b", "a", "c")[i % 3])
    for i in range(7):
        _save_png(where(i) / f"{i}.{('png', 'JPG', 'bmp')[i % 3]}", (30 * i, 0, 0))
    (tmp_path / ".hidden").mkdir()
    _save_png(tmp_path / ".hidden" / "x.png", (1, 2, 3))
    (tmp_path / "empty").mkdir()
    _link(where(0) / "gone.png", tmp_path / "nowhere.png")
    _link(tmp_path / "empty" / "gone.png", tmp_path / "nowhere.png")  # a folder holding only a broken link
    (where(0) / "notes.txt").write_text("not an image")
    source, summary = folder_source(tmp_path), summarize_folder(tmp_path)
    assert (summary.description, summary.count, summary.class_names, summary.dangling_links) == \
        (source.description, len(source), source.class_names, source.dangling_links)
    assert summary.fingerprint == fingerprint_source(source)
    before = summary.fingerprint
    (where(1) / "1.JPG").write_bytes((where(1) / "1.JPG").read_bytes() + b"\0")  # one file changes size
    assert summarize_folder(tmp_path).fingerprint == fingerprint_source(source) != before


def test_a_folder_summary_refuses_both_layouts_as_the_listing_does(tmp_path):
    from difftrain.data.folder_summary import summarize_folder

    _save_png(tmp_path / "flat.png", (1, 2, 3))
    _save_png(tmp_path / "cls" / "a.png", (1, 2, 3))
    with pytest.raises(ValueError) as listing:
        folder_source(tmp_path)
    with pytest.raises(ValueError) as summary:
        summarize_folder(tmp_path)
    assert str(summary.value) == str(listing.value)
