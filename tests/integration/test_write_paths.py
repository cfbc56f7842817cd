"""Write paths against a read-only folder and a full disk: `difftrain sample --out/--out-dir`, export,
evaluation reports, class images and a rerun of `train`. Each failure is one line naming the path, with
no traceback and no temporary left behind; a failed export is completed by running the command again.

One tiny class-conditional run (scikit-learn digits, 8 px, 4 steps) is trained once for the module.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from difftrain import cli, writes
from difftrain.errors import DiskSpaceError, WriteError
from difftrain.pipeline import load_pipeline
from difftrain.families.export import save_pipeline_atomically
from tests.conftest import REPO
from tests.filesystems import fill, full_folder, mount_tmpfs, read_only_folder, tree, unmount

pytestmark = pytest.mark.integration

CONFIG = str(REPO / "configs" / "tiny" / "digits-class.yaml")
TEMPORARY_MARKS = (".export-tmp", ".tmp-", ".old-", ".tmp", ".lora-tmp", ".merged-tmp", ".difftrain-write-probe-")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    from difftrain.config import load_config
    from difftrain.training.loop import train

    run = tmp_path_factory.mktemp("write-paths") / "run"
    train(load_config(CONFIG, [], output_dir=str(run)))
    assert (run / "unet").is_dir() and (run / "checkpoints" / "step-000004").is_dir()
    return run


@pytest.fixture
def unexported_run(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the run as it is after its last step and before its export (what a failed export leaves)."""
    run = tmp_path / "unexported"
    shutil.copytree(trained_run, run)
    for name in ("model_index.json", "unet", "scheduler", "README.md", "plots"):  # what this run's export wrote
        writes.remove_path(run / name)
    return run


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch):
    """A folder on a real full file system (small tmpfs), else one behind a free-space probe that says 0 bytes."""
    path = tmp_path / "full"
    path.mkdir()
    if mount_tmpfs(path, "size=1m") is None:
        try:
            fill(path / ".filler")
            yield path
        finally:
            unmount(path)
    else:
        monkeypatch.setattr(writes, "free_bytes", lambda where: 0)
        yield path


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.startswith(TEMPORARY_MARKS) or p.name.endswith(".tmp")]


def one_error_line(err: str, command: str) -> str:
    """The stderr of a failed command holds exactly one error line, last, and no traceback; returns it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if f"difftrain {command}: error:" in line]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_sample_out_to_read_only_folder_fails_before_sampling(trained_run: Path, tmp_path: Path):
    """The command as a user types it (a subprocess): exit 1, one line naming the file, nothing sampled."""
    with read_only_folder(tmp_path / "ro") as ro:
        done = subprocess.run(
            [sys.executable, "-m", "difftrain", "sample", str(trained_run), "--out", str(ro / "grids" / "g.png"),
             "--num-inference-steps", "2"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "DIFFTRAIN_DEBUG": ""},
        )
        assert done.returncode == 1, done.stderr
        line = one_error_line(done.stderr, "sample")
        assert f"cannot write the sample grid to {ro}/grids/g.png: {ro} is not writable (" in line
        assert "sampling" not in done.stderr  # refused before the (possibly long) sampling started
        assert list(ro.iterdir()) == []


def test_sample_out_dir_read_only_and_out_on_full_disk(trained_run: Path, tmp_path: Path, full_disk: Path, capsys):
    with read_only_folder(tmp_path / "ro") as ro:
        code = cli.main(["sample", str(trained_run), "--out", str(tmp_path / "g.png"), "--out-dir", str(ro / "images"),
                         "--num-inference-steps", "2"])
        assert code == 1
        assert f"cannot write 80 sample images to {ro}/images: {ro} is not writable (" in \
            one_error_line(capsys.readouterr().err, "sample")
        assert list(ro.iterdir()) == [] and not (tmp_path / "g.png").exists()

    code = cli.main(["sample", str(trained_run), "--out", str(full_disk / "g.png"), "--num-inference-steps", "2"])
    assert code == 1
    line = one_error_line(capsys.readouterr().err, "sample")
    assert re.search(rf"not enough disk space for the sample grid at {full_disk}/g\.png: 0\.0 MiB free, about "
                     r"[\d.]+ MiB needed", line), line
    assert not (full_disk / "g.png").exists() and temporaries(full_disk) == []


def test_export_to_read_only_folder_and_full_disk(trained_run: Path, tmp_path: Path, full_disk: Path):
    pipe = load_pipeline(trained_run, device="cpu")
    with read_only_folder(tmp_path / "ro", fill_from=trained_run) as ro:
        before = tree(ro)
        with pytest.raises(WriteError, match=rf"cannot write the exported pipeline to {ro}: {ro} is not writable"):
            save_pipeline_atomically(pipe, ro)
        assert tree(ro) == before
    with pytest.raises(DiskSpaceError, match=rf"not enough disk space for the exported pipeline in {full_disk}/export"):
        save_pipeline_atomically(pipe, full_disk / "export")
    assert not (full_disk / "export").exists() and temporaries(full_disk) == []


@pytest.mark.parametrize("failure", ["safetensors", "oserror"])
def test_export_failing_mid_write_is_cleaned_up_and_the_rerun_completes(unexported_run: Path, monkeypatch, capsys,
                                                                         failure: str):
    """ENOSPC while the weights are being written: one line, no .export-tmp, and the same command finishes."""
    real_save = safetensors.torch.save_file

    def disk_fills_up(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file reached the disk
        if failure == "safetensors":  # what safetensors raises on a full disk
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        raise OSError(errno.ENOSPC, "No space left on device")

    args = ["train", CONFIG, "--output-dir", str(unexported_run)]
    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_up)
    assert cli.main(args) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"writing the exported pipeline to {unexported_run} failed: No space left on device" in line
    assert temporaries(unexported_run) == []
    assert not (unexported_run / "unet").exists() and not (unexported_run / "model_index.json").exists()

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert cli.main(args) == 0
    assert temporaries(unexported_run) == []
    pipe = load_pipeline(unexported_run, device="cpu")
    assert sum(p.numel() for p in pipe.unet.parameters()) > 0 and (unexported_run / "README.md").is_file()


def test_train_on_read_only_run_folder_is_one_line(unexported_run: Path, tmp_path: Path, capsys):
    with read_only_folder(tmp_path / "ro", fill_from=unexported_run) as ro:
        before = tree(ro)
        assert cli.main(["train", CONFIG, "--output-dir", str(ro)]) == 1
        line = one_error_line(capsys.readouterr().err, "train")
        assert str(ro) in line, line  # names the file or folder that could not be written
        assert tree(ro) == before


def test_train_on_full_disk_is_refused_before_writing(unexported_run: Path, tmp_path: Path, capsys):
    with full_folder(tmp_path / "full", fill_from=unexported_run) as full:
        lock = Path(".difftrain") / "lock"  # the folder's lock names its new holder (a rewrite of its one block)
        before = {name: data for name, data in tree(full).items() if name != str(lock)}
        assert cli.main(["train", CONFIG, "--output-dir", str(full)]) == 1
        line = one_error_line(capsys.readouterr().err, "train")
        assert "not enough disk space for" in line and str(full) in line, line
        assert {name: data for name, data in tree(full).items() if name != str(lock)} == before
        assert temporaries(full) == []


def test_run_without_room_for_its_first_checkpoint_stops_before_step_1(tmp_path: Path, monkeypatch, capsys):
    """Room for the run record but not for a checkpoint and the export: refused before config.yaml or any step."""
    from difftrain.writes import required_bytes

    monkeypatch.setattr(writes, "free_bytes", lambda path: required_bytes(64 * 1024))
    run = tmp_path / "run"
    assert cli.main(["train", CONFIG, "--output-dir", str(run)]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"not enough disk space for the run's next checkpoint and its export in {run}" in line, line
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_evaluation_report_to_read_only_folder_fails_before_sampling(trained_run: Path, tmp_path: Path, capsys):
    with read_only_folder(tmp_path / "ro") as ro:
        code = cli.main(["evaluate", str(trained_run), "--out", str(ro / "report.json"), "--no-inception",
                         "--num-samples", "4", "--num-inference-steps", "1"])
        assert code == 1
        line = one_error_line(capsys.readouterr().err, "evaluate")
        assert f"cannot write the evaluation report to {ro}/report.json: {ro} is not writable (" in line


def test_class_images_into_read_only_folder_fail_before_loading_the_base_model(tmp_path: Path):
    from difftrain.config import load_config
    from difftrain.families.class_images import ensure_class_images

    with read_only_folder(tmp_path / "ro") as ro:
        # The base model does not exist: the check must come before it is loaded.
        cfg = load_config(str(REPO / "configs" / "tiny" / "dreambooth-lora.yaml"),
                          [f"model.pretrained={tmp_path / 'no-such-base'}", f"data.instance_dir={tmp_path}",
                           f"data.class_dir={ro / 'class'}"], output_dir=str(tmp_path / "run"))
        with pytest.raises(WriteError, match=rf"cannot write 4 class images to {ro}/class: {ro} is not writable"):
            ensure_class_images(cfg, torch.device("cpu"))
