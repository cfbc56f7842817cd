"""The write checks (difftrain.writes) on their own: up-front refusal with the path, cleanup of a failed
write, and the CLI's one-line report of I/O failures."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from difftrain import cli, writes
from difftrain.errors import DiskSpaceError, WriteError
from difftrain.sampling.grid import save_png_atomic
from difftrain.training import checkpoint as ckpt
from difftrain.training.plots import write_plots
from tests.filesystems import full_folder, read_only_folder

ENOSPC_FROM_SAFETENSORS = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                           'message: "No space left on device" })')


@pytest.fixture
def no_free_space(monkeypatch):
    """The free-space probe reports a full disk (the issue allows this where no small tmpfs can be mounted)."""
    monkeypatch.setattr(writes, "free_bytes", lambda path: 0)


def test_check_of_a_missing_folder_writes_nothing(tmp_path: Path):
    writes.check_writable(tmp_path / "a" / "b", 1024, "the exported pipeline")
    assert list(tmp_path.iterdir()) == []  # neither the folders nor the probe file


def test_full_disk_is_refused_up_front_naming_path_and_sizes(tmp_path: Path, no_free_space):
    target = tmp_path / "run" / "unet"
    with pytest.raises(DiskSpaceError) as caught:
        writes.check_writable(target, 50 * 2**20, "the exported pipeline")
    message = str(caught.value)
    assert f"not enough disk space for the exported pipeline in {target}: 0.0 MiB free, about 63.0 MiB needed" in message
    assert isinstance(caught.value, OSError) and isinstance(caught.value, ValueError)  # the CLI's one-line errors
    with pytest.raises(DiskSpaceError, match=r"for the sample grid at .*g\.png: 0\.0 MiB free"):
        writes.check_file_writable(tmp_path / "g.png", 10, "the sample grid")
    assert not (tmp_path / "run").exists()


def test_room_for_a_run_is_checked_before_it_writes(tmp_path: Path, monkeypatch):
    model = torch.nn.Linear(100, 100)  # 10100 trained float32 parameters
    assert ckpt.training_state_bytes([model]) == 10100 * 4 * 4
    ckpt.ensure_room_for_run(tmp_path / "run", [model])  # room: nothing raised, nothing created
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(writes, "free_bytes", lambda path: 2**20)
    with pytest.raises(DiskSpaceError, match=r"the run's next checkpoint and its export in .*/run: 1\.0 MiB free"):
        ckpt.ensure_room_for_run(tmp_path / "run", [model])


def test_a_file_in_the_way_is_named(tmp_path: Path):
    (tmp_path / "samples").write_text("not a folder")
    with pytest.raises(WriteError, match=r"cannot write the sample grid to .*samples/g\.png: .*samples is a file"):
        writes.check_file_writable(tmp_path / "samples" / "g.png", 10, "the sample grid")
    (tmp_path / "out.png").mkdir()
    with pytest.raises(WriteError, match=r"out\.png: it is a folder"):
        writes.check_file_writable(tmp_path / "out.png", 10, "the sample grid")


def test_read_only_folder_is_refused_with_the_reason(tmp_path: Path):
    with read_only_folder(tmp_path / "ro") as ro:
        with pytest.raises(WriteError, match=rf"cannot write plots to {ro}/plots: {ro} is not writable \("):
            writes.check_writable(ro / "plots", 10, "plots")
        # The checkpoint check is the same mechanism: a read-only run folder is refused before any write.
        with pytest.raises(WriteError, match=r"checkpoint step-000002 to .*checkpoints: .* is not writable"):
            ckpt.ensure_free_space(ro / "checkpoints", 10, "checkpoint step-000002")


def test_real_full_disk_is_refused(tmp_path: Path):
    with full_folder(tmp_path / "full", size="1m") as full:
        with pytest.raises(DiskSpaceError, match=r"0\.0 MiB free"):
            save_png_atomic(Image.new("RGB", (8, 8)), full / "samples" / "g.png", "the sample grid")
        assert sorted(p.name for p in full.iterdir()) == [".filler"]


def test_failed_write_removes_its_temporaries_and_names_the_path(tmp_path: Path):
    tmp = tmp_path / ".export-tmp"
    for failure in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError(ENOSPC_FROM_SAFETENSORS)):
        tmp.mkdir()
        (tmp / "half.safetensors").write_bytes(b"\0" * 100)
        with pytest.raises(WriteError, match=rf"writing the exported pipeline to {tmp_path} failed: No space left on "
                                             "device; its temporary files were removed") as caught:
            with writes.writing("the exported pipeline", tmp_path, [tmp]):
                raise failure
        assert caught.value.__cause__ is failure
        assert not tmp.exists()
    tmp.mkdir()
    with pytest.raises(KeyboardInterrupt):  # not an I/O failure: passed on, but still cleaned up
        with writes.writing("the exported pipeline", tmp_path, [tmp]):
            raise KeyboardInterrupt
    assert not tmp.exists()


def test_png_and_text_writes_leave_nothing_on_failure(tmp_path: Path, monkeypatch):
    def no_space(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")  # part of the file reached the disk, then the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    with pytest.raises(WriteError, match=r"writing the sample grid to .*g\.png failed: No space left on device"):
        save_png_atomic(Image.new("RGB", (8, 8)), tmp_path / "samples" / "g.png", "the sample grid")
    assert list((tmp_path / "samples").iterdir()) == []


def test_text_write_refused_on_full_disk_keeps_the_old_file(tmp_path: Path, no_free_space):
    report = tmp_path / "evaluation.json"
    report.write_text("{}\n")
    with pytest.raises(DiskSpaceError, match="the evaluation report"):
        writes.atomic_write_text(report, '{"fid": 1.0}\n', "the evaluation report")
    assert report.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == ["evaluation.json"]


def test_plots_into_a_read_only_folder(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    with read_only_folder(tmp_path / "ro") as ro:
        with pytest.raises(WriteError, match=rf"cannot write plots to {ro}/plots"):
            write_plots(metrics, ro / "plots")


def test_cache_writes_are_best_effort(tmp_path: Path, caplog):
    tmp = tmp_path / ".features.pt.tmp"
    with caplog.at_level(logging.WARNING, logger="difftrain"):
        with writes.best_effort("the reference-feature cache", tmp_path / "features.pt", [tmp]):
            torch.save(torch.ones(3), tmp)
            raise OSError(errno.EROFS, "Read-only file system")
    assert not tmp.exists()
    assert "could not write the reference-feature cache to" in caplog.text and "Read-only file system" in caplog.text
    with pytest.raises(RuntimeError):
        with writes.best_effort("the cache", tmp_path / "x", []):
            raise RuntimeError("a bug is not swallowed")


def test_state_bytes_counts_parameters_and_buffers():
    model = torch.nn.BatchNorm1d(10)  # 20 parameters, 20 running statistics, one int64 counter
    assert writes.state_bytes([model, "not a module", None]) == 40 * 4 + 8


@pytest.mark.parametrize("failure", [PermissionError(errno.EACCES, "Permission denied", "/data/runs/x/train.log"),
                                     SafetensorError(ENOSPC_FROM_SAFETENSORS),
                                     WriteError("cannot write the sample grid to /x/g.png: /x is not writable")])
def test_cli_prints_io_failures_as_one_line(failure, monkeypatch, capsys):
    def command(args):
        raise failure

    monkeypatch.setitem(cli.COMMANDS, "presets", command)
    monkeypatch.delenv("DIFFTRAIN_DEBUG", raising=False)
    assert cli.main(["presets"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("difftrain presets: error: ")
    if isinstance(failure, PermissionError):
        assert "PermissionError: [Errno 13] Permission denied: '/data/runs/x/train.log'" in err

    # --debug (before the command) or DIFFTRAIN_DEBUG=1 adds the traceback; the exit code stays.
    assert cli.main(["--debug", "presets"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.rstrip().splitlines()[-1].startswith("difftrain presets: error: ")
    monkeypatch.setenv("DIFFTRAIN_DEBUG", "1")
    assert cli.main(["presets"]) == 1
    assert capsys.readouterr().err.startswith("Traceback")


def test_lora_weights_checked_and_cleaned_up(tmp_path: Path, monkeypatch):
    import safetensors.torch
    from diffusers import UNet2DConditionModel

    from difftrain.models.lora import LORA_WEIGHTS_NAME, add_lora, save_lora_weights

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, layers_per_block=1, attention_head_dim=4)
    add_lora(unet, 2, None, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], "lora.unet_target_modules")
    with read_only_folder(tmp_path / "ro") as ro:
        with pytest.raises(WriteError, match=rf"cannot write the LoRA weights to {ro}: {ro} is not writable"):
            save_lora_weights(ro, unet)

    real_save = safetensors.torch.save_file

    def disk_fills_up(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError(ENOSPC_FROM_SAFETENSORS)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_up)
    with pytest.raises(WriteError, match=rf"writing the LoRA weights to .*{LORA_WEIGHTS_NAME} failed: No space left"):
        save_lora_weights(tmp_path / "run", unet)
    assert list((tmp_path / "run").iterdir()) == []  # no .lora-tmp, no half file
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert save_lora_weights(tmp_path / "run", unet)["diffusers"].is_file()  # the rerun completes
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LORA_WEIGHTS_NAME]
