"""Checkpoint directories: atomic writes, discovery, rotation and crash recovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difftrain.training.checkpoint import (
    PROGRESS_FILE,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    read_progress,
    remove_stale_temporaries,
    rotate_checkpoints,
    write_checkpoint,
)


def _saver(payload: str):
    def save_state(directory: Path) -> None:
        assert directory.is_dir()
        assert list(directory.iterdir()) == []  # an existing, empty directory
        (directory / "model.bin").write_text(payload)
        (directory / "sub").mkdir()
        (directory / "sub" / "optimizer.bin").write_text(payload * 2)

    return save_state


def _write(root: Path, step: int, payload: str | None = None) -> Path:
    return write_checkpoint(root, step, _saver(payload or f"state-{step}"), {"step": step, "images_seen": step * 8})


def _names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_checkpoint_name_is_zero_padded():
    assert checkpoint_name(7) == "step-000007"
    assert checkpoint_name(123456) == "step-123456"


def test_write_checkpoint_creates_complete_directory(tmp_path):
    root = tmp_path / "checkpoints"  # created on demand
    path = _write(root, 500)
    assert path == root / "step-000500"
    assert (path / "model.bin").read_text() == "state-500"
    assert (path / "sub" / "optimizer.bin").read_text() == "state-500state-500"
    assert read_progress(path) == {"step": 500, "images_seen": 4000}
    assert json.loads((path / PROGRESS_FILE).read_text())["step"] == 500
    # Nothing temporary left behind.
    assert _names(root) == {"step-000500"}
    assert not any(p.name.startswith(".") for p in path.rglob("*"))


def test_list_and_latest_order_by_step_not_by_name_or_time(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (20, 3, 1000000, 100):  # 1000000 has 7 digits: string order would put it first
        _write(tmp_path, step)
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == [3, 20, 100, 1000000]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1000000"


def test_incomplete_or_foreign_entries_are_ignored(tmp_path):
    _write(tmp_path, 2)
    (tmp_path / "step-000009").mkdir()  # no progress.json: incomplete
    (tmp_path / "step-000010").write_text("a file, not a dir")
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / PROGRESS_FILE).write_text("{}")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"


def test_rotate_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        _write(tmp_path, step)
    deleted = rotate_checkpoints(tmp_path, keep=2)
    assert {p.name for p in deleted} == {"step-000002", "step-000004"}
    assert _names(tmp_path) == {"step-000006", "step-000008"}
    assert rotate_checkpoints(tmp_path, keep=2) == []


def test_rotate_with_none_keeps_all(tmp_path):
    for step in (2, 4, 6, 8):
        _write(tmp_path, step)
    assert rotate_checkpoints(tmp_path, keep=None) == []
    assert _names(tmp_path) == {"step-000002", "step-000004", "step-000006", "step-000008"}


def test_rotate_after_each_write_like_the_training_loop(tmp_path):
    for step in (2, 4, 6, 8):
        _write(tmp_path, step)
        rotate_checkpoints(tmp_path, keep=2)
    assert _names(tmp_path) == {"step-000006", "step-000008"}


def test_rotate_ignores_incomplete_directories(tmp_path):
    _write(tmp_path, 2)
    _write(tmp_path, 4)
    (tmp_path / ".tmp-step-000006").mkdir()
    rotate_checkpoints(tmp_path, keep=1)
    assert _names(tmp_path) == {"step-000004", ".tmp-step-000006"}


def test_failed_save_leaves_previous_checkpoint_as_latest(tmp_path):
    _write(tmp_path, 4)

    def crashing_save(directory: Path) -> None:
        (directory / "model.bin").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tmp_path, 6, crashing_save, {"step": 6})
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000004"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert not (tmp_path / "step-000006").exists()
    # A failed write removes its partial copy at once (it may be what filled the disk); a kill -9, which
    # runs no cleanup, leaves it to remove_stale_temporaries (test_write_replaces_stale_temporary_...).
    assert not (tmp_path / ".tmp-step-000006").exists()

    remove_stale_temporaries(tmp_path)
    assert _names(tmp_path) == {"step-000004"}
    assert read_progress(tmp_path / "step-000004")["step"] == 4


def test_write_replaces_stale_temporary_of_the_same_step(tmp_path):
    stale = tmp_path / ".tmp-step-000006"
    stale.mkdir()
    (stale / "garbage").write_text("x")
    path = _write(tmp_path, 6)
    assert not (path / "garbage").exists()
    assert _names(tmp_path) == {"step-000006"}


def test_resaving_a_step_replaces_it(tmp_path):
    _write(tmp_path, 4, payload="first")
    (tmp_path / "step-000004" / "extra-old-file").write_text("only in the first save")
    path = write_checkpoint(tmp_path, 4, _saver("second"), {"step": 4, "resaved": True})
    assert (path / "model.bin").read_text() == "second"
    assert not (path / "extra-old-file").exists()
    assert read_progress(path) == {"step": 4, "resaved": True}
    assert _names(tmp_path) == {"step-000004"}


def test_leftover_old_copy_is_restored(tmp_path):
    # A crash between "step -> .old-step" and ".tmp-step -> step" of a re-save.
    _write(tmp_path, 2)
    _write(tmp_path, 4, payload="good")
    (tmp_path / "step-000004").rename(tmp_path / ".old-step-000004")
    half = tmp_path / ".tmp-step-000004"
    half.mkdir()
    (half / "model.bin").write_text("half")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"

    remove_stale_temporaries(tmp_path)
    assert _names(tmp_path) == {"step-000002", "step-000004"}
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000004"
    assert (tmp_path / "step-000004" / "model.bin").read_text() == "good"


def test_old_copy_next_to_a_complete_checkpoint_is_deleted(tmp_path):
    # A crash after the new copy was renamed into place but before the old one was deleted.
    _write(tmp_path, 4, payload="new")
    old = tmp_path / ".old-step-000004"
    old.mkdir()
    (old / "model.bin").write_text("old")
    remove_stale_temporaries(tmp_path)
    assert _names(tmp_path) == {"step-000004"}
    assert (tmp_path / "step-000004" / "model.bin").read_text() == "new"


def test_remove_stale_temporaries_on_missing_dir_is_a_no_op(tmp_path):
    remove_stale_temporaries(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
