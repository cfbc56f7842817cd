"""Checkpoint directories: the one writer (a real single-process Accelerator), discovery, rotation, crash
recovery, and the progress file's one reader and writer."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.errors import DiskSpaceError, WriteError
from difftrain.training import checkpoint as ckpt
from difftrain.training.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from difftrain.training.progress import PROGRESS_FILE, ProgressRecord, read_progress, write_progress
from tests.checkpoints import record, save, tiny_accelerator

STATE_FILES = {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}


@pytest.fixture
def accelerator():
    with tiny_accelerator() as accelerator:
        yield accelerator


def _names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def _weights(checkpoint: Path) -> torch.Tensor:
    return load_file(checkpoint / "model.safetensors")["weight"]


def _failing_save_state(accelerator, monkeypatch, exc: BaseException) -> None:
    """accelerate's save_state writes part of the state, then fails (a full disk, a crash of a library)."""
    def save_state(output_dir: str, **kwargs) -> None:
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise exc

    monkeypatch.setattr(accelerator, "save_state", save_state)


def test_checkpoint_name_is_zero_padded():
    assert checkpoint_name(7) == "step-000007"
    assert checkpoint_name(123456) == "step-123456"


def test_save_creates_a_complete_directory(tmp_path, accelerator):
    root = tmp_path / "checkpoints"  # created on demand
    path = save(accelerator, root, 500)
    assert path == root / "step-000500"
    assert _names(path) == STATE_FILES | {PROGRESS_FILE}
    assert torch.equal(_weights(path), accelerator._models[0].weight.detach())
    assert read_progress(path) == record(500)
    verify_checkpoint(path)
    # Nothing temporary left behind.
    assert _names(root) == {"step-000500"}
    assert not any(p.name.startswith(".") for p in path.rglob("*"))


def test_saved_state_loads_back(tmp_path, accelerator):
    path = save(accelerator, tmp_path, 2)
    model = accelerator._models[0]
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(path))
    assert torch.equal(model.weight.detach(), saved)


def test_progress_file_is_the_last_file_written(tmp_path, accelerator, monkeypatch):
    seen = []

    def spy(checkpoint_dir: Path, progress: ProgressRecord) -> Path:
        seen.append(_names(checkpoint_dir))  # the whole state is there, the progress file is not yet
        return write_progress(checkpoint_dir, progress)

    monkeypatch.setattr(ckpt, "write_progress", spy)
    path = save(accelerator, tmp_path, 4)
    assert seen == [STATE_FILES]
    assert _names(path) == STATE_FILES | {PROGRESS_FILE}


def test_list_and_latest_order_by_step_not_by_name_or_time(tmp_path, accelerator):
    assert list_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (20, 3, 1000000, 100):  # 1000000 has 7 digits: string order would put it first
        save(accelerator, tmp_path, step)
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == [3, 20, 100, 1000000]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1000000"


def test_incomplete_or_foreign_entries_are_ignored(tmp_path, accelerator):
    save(accelerator, tmp_path, 2)
    (tmp_path / "step-000009").mkdir()  # no progress.json: incomplete
    (tmp_path / "step-000010").write_text("a file, not a dir")
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / PROGRESS_FILE).write_text("{}")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"


def test_save_rotates_to_the_newest_keep(tmp_path, accelerator):
    for step in (2, 4, 6, 8):
        save(accelerator, tmp_path, step, keep=2)
    assert _names(tmp_path) == {"step-000006", "step-000008"}
    save(accelerator, tmp_path, 10, keep=None)  # None keeps all
    assert _names(tmp_path) == {"step-000006", "step-000008", "step-000010"}


def test_rotate_keeps_the_newest(tmp_path, accelerator):
    for step in (2, 4, 6, 8):
        save(accelerator, tmp_path, step)
    deleted = rotate_checkpoints(tmp_path, keep=2)
    assert {p.name for p in deleted} == {"step-000002", "step-000004"}
    assert _names(tmp_path) == {"step-000006", "step-000008"}
    assert rotate_checkpoints(tmp_path, keep=2) == []


def test_rotate_with_none_keeps_all(tmp_path, accelerator):
    for step in (2, 4, 6, 8):
        save(accelerator, tmp_path, step)
    assert rotate_checkpoints(tmp_path, keep=None) == []
    assert _names(tmp_path) == {"step-000002", "step-000004", "step-000006", "step-000008"}


def test_rotate_ignores_incomplete_directories(tmp_path, accelerator):
    save(accelerator, tmp_path, 2)
    save(accelerator, tmp_path, 4)
    (tmp_path / ".tmp-step-000006").mkdir()
    rotate_checkpoints(tmp_path, keep=1)
    assert _names(tmp_path) == {"step-000004", ".tmp-step-000006"}


def test_failed_save_state_leaves_no_temporary_and_no_step_folder(tmp_path, accelerator, monkeypatch):
    save(accelerator, tmp_path, 4)
    _failing_save_state(accelerator, monkeypatch, RuntimeError("library crash"))
    with pytest.raises(RuntimeError, match="library crash"):
        save(accelerator, tmp_path, 6)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000004"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    # A failed write removes its partial copy at once (it may be what filled the disk); a kill -9, which
    # runs no cleanup, leaves it to remove_stale_temporaries (test_save_replaces_stale_temporary_...).
    assert _names(tmp_path) == {"step-000004"}

    remove_stale_temporaries(tmp_path)
    assert _names(tmp_path) == {"step-000004"}
    assert read_progress(tmp_path / "step-000004").step == 4


def test_failed_resave_keeps_the_previous_copy_of_the_step(tmp_path, accelerator, monkeypatch):
    first = _weights(save(accelerator, tmp_path, 4))
    _failing_save_state(accelerator, monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(WriteError, match=r"writing checkpoint step-000004 to .*No space left on device"):
        save(accelerator, tmp_path, 4)
    assert _names(tmp_path) == {"step-000004"}
    assert torch.equal(_weights(tmp_path / "step-000004"), first)


def test_failed_progress_write_leaves_no_temporary_and_no_step_folder(tmp_path, accelerator, monkeypatch):
    def full_disk(checkpoint_dir: Path, progress: ProgressRecord) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_progress", full_disk)
    with pytest.raises(WriteError, match=r"checkpoint step-000002"):
        save(accelerator, tmp_path, 2)
    assert _names(tmp_path) == set()


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path, accelerator, monkeypatch):
    monkeypatch.setattr(accelerator, "save_state", lambda *a, **k: pytest.fail("save_state ran"))
    with pytest.raises(DiskSpaceError, match=r"checkpoint step-000002"):
        save(accelerator, tmp_path / "checkpoints", 2, needed_bytes=1 << 60)
    assert not any((tmp_path / "checkpoints").glob("*"))


def test_a_record_of_another_step_is_refused(tmp_path, accelerator):
    with pytest.raises(ValueError, match=r"checkpoint step 4 with a progress record of step 2"):
        save_checkpoint(accelerator, tmp_path, 4, record(2), 0, None)
    assert _names(tmp_path) == set()


def test_save_replaces_stale_temporary_of_the_same_step(tmp_path, accelerator):
    stale = tmp_path / ".tmp-step-000006"
    stale.mkdir()
    (stale / "garbage").write_text("x")
    path = save(accelerator, tmp_path, 6)
    assert not (path / "garbage").exists()
    assert _names(tmp_path) == {"step-000006"}


def test_resaving_a_step_replaces_it(tmp_path, accelerator):
    first = save(accelerator, tmp_path, 4)
    (first / "extra-old-file").write_text("only in the first save")
    with torch.no_grad():
        accelerator._models[0].weight.add_(1.0)
    path = save(accelerator, tmp_path, 4, numerics={"rollbacks": 1})
    assert torch.equal(_weights(path), accelerator._models[0].weight.detach())
    assert not (path / "extra-old-file").exists()
    assert read_progress(path) == record(4, numerics={"rollbacks": 1})
    assert _names(tmp_path) == {"step-000004"}


def test_leftover_old_copy_is_restored(tmp_path, accelerator):
    # A crash between "step -> .old-step" and ".tmp-step -> step" of a re-save.
    save(accelerator, tmp_path, 2)
    good = _weights(save(accelerator, tmp_path, 4))
    (tmp_path / "step-000004").rename(tmp_path / ".old-step-000004")
    half = tmp_path / ".tmp-step-000004"
    half.mkdir()
    (half / "model.safetensors").write_text("half")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"

    remove_stale_temporaries(tmp_path)
    assert _names(tmp_path) == {"step-000002", "step-000004"}
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000004"
    assert torch.equal(_weights(tmp_path / "step-000004"), good)


def test_old_copy_next_to_a_complete_checkpoint_is_deleted(tmp_path, accelerator):
    # A crash after the new copy was renamed into place but before the old one was deleted.
    new = _weights(save(accelerator, tmp_path, 4))
    old = tmp_path / ".old-step-000004"
    old.mkdir()
    (old / "model.safetensors").write_text("old")
    remove_stale_temporaries(tmp_path)
    assert _names(tmp_path) == {"step-000004"}
    assert torch.equal(_weights(tmp_path / "step-000004"), new)


def test_remove_stale_temporaries_on_missing_dir_is_a_no_op(tmp_path):
    remove_stale_temporaries(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


# The progress file's reader and writer.


def _write_json(folder: Path, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROGRESS_FILE).write_text(json.dumps(data) if not isinstance(data, str) else data)
    return folder


def test_progress_round_trips_with_the_key_names_of_every_version(tmp_path):
    written = record(4, numerics={"rollbacks": 1, "lr_scale": 0.5})
    write_progress(tmp_path, written)
    # Older difftrain versions read these names; their checkpoints have them too.
    assert set(json.loads((tmp_path / PROGRESS_FILE).read_text())) == {
        "step", "images_seen", "epoch", "num_processes", "difftrain_version", "config", "numerics"}
    assert read_progress(tmp_path) == written
    assert not (tmp_path / f".{PROGRESS_FILE}.tmp").exists()
    with pytest.raises(dataclasses.FrozenInstanceError):
        written.step = 5


def test_progress_of_an_earlier_version_reads_with_defaults(tmp_path):
    # What difftrain wrote before the non-finite policy: no "numerics"; epoch a whole number; and a key a
    # later version might add is ignored.
    _write_json(tmp_path, {"step": 8, "images_seen": 64, "epoch": 1, "num_processes": 2,
                           "difftrain_version": "0.1.0", "config": {"train": {}}, "added_later": [1]})
    progress = read_progress(tmp_path)
    assert progress == ProgressRecord(step=8, images_seen=64, epoch=1.0, num_processes=2,
                                      difftrain_version="0.1.0", config={"train": {}}, numerics={})
    assert isinstance(progress.epoch, float)


@pytest.mark.parametrize("damage, message", [
    ('{"step": 4, "images_se', r"not readable JSON"),
    (b"\xff\xfe\x00garbage", r"not readable JSON"),
    ("[1, 2]", r"holds a JSON list, not an object"),
    ({"step": 4}, r"key\(s\) images_seen, epoch, num_processes, difftrain_version, config missing"),
    ({**dataclasses.asdict(record(4)), "step": "4"}, r"key 'step' is '4' \(str\); expected int"),
    ({**dataclasses.asdict(record(4)), "step": True}, r"key 'step' is True \(bool\); expected int"),
    ({**dataclasses.asdict(record(4)), "epoch": None}, r"key 'epoch' is None \(NoneType\); expected int or float"),
    ({**dataclasses.asdict(record(4)), "config": []}, r"key 'config' is \[\] \(list\); expected dict"),
    ({**dataclasses.asdict(record(4)), "numerics": 0}, r"key 'numerics' is 0 \(int\); expected dict"),
])
def test_a_damaged_progress_file_is_refused_naming_it(tmp_path, damage, message):
    folder = tmp_path / "step-000004"
    folder.mkdir()
    if isinstance(damage, bytes):
        (folder / PROGRESS_FILE).write_bytes(damage)
    else:
        _write_json(folder, damage)
    with pytest.raises(ValueError, match=re.escape(f"{folder / PROGRESS_FILE}: ") + message):
        read_progress(folder)


def test_a_missing_progress_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_progress(tmp_path)


def test_verify_refuses_a_checkpoint_with_a_damaged_progress_file(tmp_path, accelerator):
    path = save(accelerator, tmp_path, 4)
    text = (path / PROGRESS_FILE).read_text()
    (path / PROGRESS_FILE).write_text(text[: len(text) // 2])
    assert latest_checkpoint(tmp_path) == path  # still listed: it is refused when verified before loading
    with pytest.raises(ValueError, match=re.escape(f"{path / PROGRESS_FILE}: not readable JSON")):
        verify_checkpoint(path)
