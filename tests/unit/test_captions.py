"""Caption sources: class-label templates, sidecar .txt, metadata.jsonl/CSV, datasets columns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftrain.config import DataConfig
from difftrain.data.captions import resolve_captions
from difftrain.data.dataset import load_image_dataset
from difftrain.data.sources import digits_source, folder_source


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((6, 6, 3), 20 * i, np.uint8)).save(folder / name)


def test_template_over_class_labels_and_folder_names(tmp_path: Path):
    captions = resolve_captions(digits_source(), DataConfig(caption_template="A handwritten digit {label}"))
    assert captions[:3] == [f"A handwritten digit {d}" for d in digits_source().labels[:3]]
    _images(tmp_path / "daisy", ["a.png"])
    _images(tmp_path / "iris", ["b.png"])
    captions = resolve_captions(folder_source(tmp_path), DataConfig(caption_template="a photo of a {label}"))
    assert captions == ["a photo of a daisy", "a photo of a iris"]


def test_template_needs_labels(tmp_path: Path):
    _images(tmp_path, ["a.png"])
    with pytest.raises(ValueError, match="needs class labels"):
        resolve_captions(folder_source(tmp_path), DataConfig(caption_template="x {label}"))


def test_sidecar_txt_files_and_missing_ones_are_skipped_by_name(tmp_path: Path, caplog):
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "a.txt").write_text("a red  square\n")
    (tmp_path / "b.txt").write_text("   \n")  # empty
    cfg = DataConfig(path=str(tmp_path), resolution=8)
    assert resolve_captions(folder_source(tmp_path), cfg) == ["a red square", None, None]
    with caplog.at_level(logging.WARNING):
        dataset = load_image_dataset(cfg, want_labels=False, want_captions=True)
    assert dataset.captions == ["a red square"] and len(dataset) == 1
    skipped = dict(dataset.skipped)
    assert skipped == {str(tmp_path / "b.png"): "missing or empty caption", str(tmp_path / "c.png"): "missing or empty caption"}
    assert str(tmp_path / "c.png") in caplog.text


def test_metadata_jsonl_and_csv(tmp_path: Path):
    _images(tmp_path / "sub", ["a.png", "b.png"])
    root = tmp_path / "sub"
    rows = [{"file_name": "a.png", "text": "first"}, {"file_name": "b.png", "text": "second"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert resolve_captions(folder_source(root), DataConfig()) == ["first", "second"]
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_text("file_name,description\na.png,one\nb.png,two\n")
    assert resolve_captions(folder_source(root), DataConfig(caption_column="description")) == ["one", "two"]
    with pytest.raises(ValueError, match="no caption column"):
        resolve_captions(folder_source(root), DataConfig())


def test_metadata_without_file_name_and_bad_json(tmp_path: Path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "metadata.jsonl").write_text('{"name": "a.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="'file_name'"):
        resolve_captions(folder_source(tmp_path), DataConfig())
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": \n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: not valid JSON"):
        resolve_captions(folder_source(tmp_path), DataConfig())


def test_datasets_caption_column(tmp_path: Path):
    import datasets

    images = [Image.new("RGB", (5, 5), (i, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "caption": ["one", "", "three"]},
                                    features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(path=str(tmp_path / "ds"), caption_column="caption", resolution=8)
    dataset = load_image_dataset(cfg, want_labels=False, want_captions=True)
    assert dataset.captions == ["one", "three"]
    assert dataset.skipped == [(f"{tmp_path / 'ds'}[1]", "missing or empty caption")]
    with pytest.raises(ValueError, match="no caption column 'text'"):
        load_image_dataset(DataConfig(path=str(tmp_path / "ds"), caption_column="text"), False, True)


def test_no_caption_source_is_explained(tmp_path: Path):
    _images(tmp_path, ["a.png"])
    with pytest.raises(ValueError, match="needs captions.*caption_template.*metadata.jsonl"):
        resolve_captions(folder_source(tmp_path), DataConfig())
