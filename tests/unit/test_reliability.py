"""Reliability pieces on their own: disk-space checks, checkpoint verification, resume config diffs,
the NaN test hook, learning-rate scaling and the data scan."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.config import DataConfig, load_config
from difftrain.data.check import scan_data
from difftrain.training import checkpoint as ckpt
from difftrain.training.numerics import NanInjector, scale_lr
from difftrain.training.resume_check import check_resume_config, config_changes, is_unsafe
from difftrain.training.run_files import trim_metrics
from tests.checkpoints import save, tiny_accelerator


def test_free_space_check_refuses_before_writing(tmp_path: Path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ckpt.DiskSpaceError, match=r"not enough disk space for checkpoint step-000004 in .*MiB free"):
        ckpt.ensure_free_space(tmp_path / "checkpoints", free * 2, "checkpoint step-000004")
    ckpt.ensure_free_space(tmp_path / "checkpoints", 1024, "checkpoint step-000004")  # plenty of room: no error


def test_size_estimate_is_the_previous_checkpoint(tmp_path: Path):
    root = tmp_path / "checkpoints"
    assert ckpt.estimate_checkpoint_bytes(root, 12345) == 12345  # no checkpoint yet: the model-size estimate
    with tiny_accelerator(features=32) as accelerator:
        path = save(accelerator, root, 2)
    size = ckpt.estimate_checkpoint_bytes(root, 12345)
    assert size == sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) and size > 32 * 33 * 4


def test_verify_refuses_truncated_and_code_carrying_files(tmp_path: Path):
    root = tmp_path / "checkpoints"
    with tiny_accelerator() as accelerator:
        good = save(accelerator, root, 2)
        truncated = save(accelerator, root, 4)
        evil = save(accelerator, root, 6)
    ckpt.verify_checkpoint(good)

    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot be read safely"):
        ckpt.verify_checkpoint(truncated)

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (evil / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match=r"custom_checkpoint_0.pkl: cannot be read safely"):
        ckpt.verify_checkpoint(evil)
    assert not marker.exists(), "verification must never run code from a checkpoint"


def _cfg(*overrides: str):
    return load_config("tiny/digits-class", list(overrides), output_dir="/tmp/x")


def test_resume_config_diff_refuses_shape_data_and_schedule_changes():
    saved = _cfg().to_dict()
    now = _cfg("model.unet.block_out_channels=[8,32]", "data.resolution=16", "diffusion.prediction_type=epsilon",
               "train.max_steps=40", "train.log_every_steps=5")
    with pytest.raises(ValueError) as info:
        check_resume_config(saved, now, Path("runs/x/checkpoints/step-000002"))
    text = str(info.value)
    assert "data.resolution: 8 -> 16" in text
    assert "diffusion.prediction_type: 'v_prediction' -> 'epsilon'" in text
    assert "model.unet:" in text and "[8, 16]" in text and "[8, 32]" in text
    assert "max_steps" not in text and "log_every_steps" not in text  # safe keys are not in the refusal


def test_resume_config_diff_allows_safe_changes():
    saved = _cfg().to_dict()
    now = _cfg("train.max_steps=40", "train.checkpoint_every_steps=10", "sample.num_inference_steps=5",
               "train.learning_rate=5e-4", "data.decode_workers=1")
    changes = check_resume_config(saved, now, Path("x"))
    assert {key for key, _, _ in changes} == {"train.max_steps", "train.checkpoint_every_steps",
                                              "sample.num_inference_steps", "train.learning_rate", "data.decode_workers"}
    assert ("train.max_steps", 4, 40) in changes
    assert is_unsafe("model", "anything") and is_unsafe("data", "path") and not is_unsafe("train", "max_steps")


def test_config_changes_fill_keys_missing_from_an_older_checkpoint():
    saved = _cfg().to_dict()
    del saved["train"]["nonfinite_max_skips"]  # a checkpoint written before the key existed
    assert config_changes(saved, _cfg()) == []


def test_trim_metrics_drops_a_row_cut_by_a_crash(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    trim_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'


def test_nan_injector_steps_and_times():
    loss = torch.tensor(0.5)
    always = NanInjector("3, 5", "")
    assert torch.isnan(always.poison(3, loss)) and torch.isnan(always.poison(3, loss))
    assert always.poison(4, loss) == loss
    once = NanInjector("3", "1")
    assert torch.isnan(once.poison(3, loss)) and once.poison(3, loss) == loss
    assert NanInjector("", "").steps == set()
    with pytest.raises(ValueError, match="DIFFTRAIN_INJECT_NAN_AT_STEPS"):
        NanInjector("three", "")


def test_scale_lr_changes_the_rest_of_the_schedule():
    from diffusers.optimization import get_scheduler

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10)
    optimizer.step()
    schedule.step()
    before = optimizer.param_groups[0]["lr"]
    scale_lr(optimizer, schedule, 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(before / 2)
    optimizer.step()
    schedule.step()
    reference_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    reference = get_scheduler("cosine", optimizer=reference_optimizer, num_warmup_steps=0, num_training_steps=10)
    for _ in range(2):
        reference_optimizer.step()
        reference.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0])
    assert schedule.state_dict()["base_lrs"] == [pytest.approx(5e-4)]  # checkpointed with the schedule


def test_scan_reports_missing_and_empty_captions(tmp_path: Path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a red square")
    (tmp_path / "b.txt").write_text("   \n")
    report = scan_data(DataConfig(path=str(tmp_path), resolution=16, captions="sidecar"), want_labels=False,
                       want_captions=True)
    missing = sorted(Path(f.path).name for f in report.findings if f.kind == "missing caption")
    assert missing == ["b.png", "c.png"]
    assert report.usable == 1 and report.scanned == 3 and len(report.errors) == 2


def test_check_lists_every_error_but_counts_repeated_warnings():
    from difftrain.training.preflight import WARNINGS_PER_KIND, run_check

    cfg = load_config("tiny/digits-class", ["data.resolution=16", "data.max_images=30"], output_dir="/nonexistent/run")
    lines: list[str] = []
    assert run_check(cfg, with_step=False, out=lines.append) == 0  # warnings alone pass
    tiny = [line for line in lines if line.startswith("WARNING digits[") and ": tiny: 8x8 px" in line]
    assert len(tiny) == WARNINGS_PER_KIND
    assert f"WARNING ... {30 - WARNINGS_PER_KIND} more 'tiny' warning(s) not listed (--all lists them)" in lines
    assert "30 usable, 0 error(s), 30 warning(s) (30 tiny)" in lines[-2]
    everything: list[str] = []
    run_check(cfg, with_step=False, show_all=True, out=everything.append)
    assert len([line for line in everything if ": tiny: " in line]) == 30


def test_nonfinite_policy_keys_are_validated():
    from difftrain.config import ConfigError

    with pytest.raises(ConfigError) as info:
        _cfg("train.nonfinite_max_skips=0", "train.nonfinite_max_rollbacks=-1", "train.nonfinite_lr_factor=1.5",
             "train.nonfinite_remedy=pray")
    problems = "\n".join(info.value.problems)
    assert "'train.nonfinite_max_skips' = 0: must be >= 1" in problems
    assert "'train.nonfinite_max_rollbacks' = -1: must be >= 0" in problems
    assert "'train.nonfinite_lr_factor' = 1.5: must be in (0, 1)" in problems
    assert "'train.nonfinite_remedy' = 'pray'" in problems


def test_more_processes_than_gpus_is_refused_before_launching(monkeypatch: pytest.MonkeyPatch):
    # Seen on a one-GPU machine: two ranks both asked NCCL for a GPU. The CPU test machine has none,
    # so the GPU count is patched; nothing is launched either way.
    from difftrain.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--num-processes 2: this machine has 1 CUDA GPU\(s\).*CUDA_VISIBLE_DEVICES="):
        distributed.launch_local(2, ["train", "digits"])
