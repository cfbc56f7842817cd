"""`difftrain sample --checkpoint`: a kept checkpoint sampled as the run's export would sample at that step, on tiny
real runs (a class-conditional UNet with an EMA and a best export; an SDXL LoRA), and `difftrain sample RUN/best`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from difftrain.cli import main
from difftrain.config import load_config
from difftrain.training import checkpoint as ckpt
from difftrain.training.export_checkpoint import SOURCE_FILE, export_checkpoint, exports_dir
from difftrain.training.loop import train
from difftrain.training.run_dir import acquire_lock

from ..instances import write_instance_images
from ..tiny_sdxl import build_tiny_sdxl

pytestmark = pytest.mark.integration

# Evaluation every 2 steps keeps the best export in best/ (the classifier is trained once per test session).
BEST_OVERRIDES = ["train.eval_every_steps=2", "train.eval_num_samples=10", "train.eval_inception=false",
                  "train.eval_num_reference=100", "train.keep_best_by=classifier_fid"]
SAMPLE = ["--class-label", "1,7", "--num-images", "2", "--seed", "3", "--num-inference-steps", "3", "--device", "cpu"]


def train_digits(folder: Path) -> Path:
    """tiny/digits-class for 4 steps: checkpoints step-000002 and step-000004 kept, EMA weights, best/ kept."""
    return train(load_config("tiny/digits-class", BEST_OVERRIDES, output_dir=str(folder)))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run = train_digits(tmp_path_factory.mktemp("digits") / "run")
    assert [path.name for _, path in ckpt.list_checkpoints(run / "checkpoints")] == ["step-000002", "step-000004"]
    return run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """An SDXL LoRA run (no EMA, checkpoints hold only the adapters) on a tiny SDXL base built from configs."""
    root = tmp_path_factory.mktemp("lora")
    overrides = [f"model.pretrained={build_tiny_sdxl(root / 'base')}",
                 f"data.instance_dir={write_instance_images(root / 'instance')}", "train.prior_preservation=false"]
    return train(load_config("tiny/dreambooth-sdxl-lora", overrides, output_dir=str(root / "run")))


def sample(source: Path, out: Path, *args: str) -> dict[str, bytes]:
    """`difftrain sample SOURCE ARGS --out OUT/grid.png --out-dir OUT`: the PNG bytes written, by file name."""
    assert main(["sample", str(source), *args, "--out", str(out / "grid.png"), "--out-dir", str(out)]) == 0
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_the_last_checkpoint_samples_as_the_export_and_an_earlier_one_differently(digits_run: Path, tmp_path: Path):
    exported = sample(digits_run, tmp_path / "export", *SAMPLE)
    latest = sample(digits_run, tmp_path / "latest", "--checkpoint", "latest", *SAMPLE)
    assert len(exported) == 5 and latest == exported  # the grid and 4 single images, byte for byte
    source = json.loads((exports_dir(digits_run) / "step-000004" / SOURCE_FILE).read_text())
    assert source["step"] == 4 and source["ema"] is True
    earlier = sample(digits_run, tmp_path / "earlier", "--checkpoint", "step-000002", *SAMPLE)
    assert earlier.keys() == exported.keys()
    assert all(earlier[name] != exported[name] for name in exported)


def test_the_export_is_reused_while_fresh_and_made_again_for_a_rewritten_checkpoint(digits_run: Path):
    # Left by earlier exports: one of a checkpoint rotated away since, a temporary of an exporter killed long ago.
    rotated, killed = exports_dir(digits_run) / "step-000001", exports_dir(digits_run) / ".tmp-step-000002-1-dead"
    for leftover in (rotated, killed):
        leftover.mkdir(parents=True)
        (leftover / "model_index.json").write_text("{}")
    os.utime(killed, (0, 0))
    shutil.rmtree(exports_dir(digits_run) / "step-000002", ignore_errors=True)
    folder = export_checkpoint(digits_run, "step-000002")
    assert not rotated.exists() and not killed.exists()
    stamp = (folder / SOURCE_FILE).stat().st_mtime_ns
    assert export_checkpoint(digits_run, "2") == folder and (folder / SOURCE_FILE).stat().st_mtime_ns == stamp
    progress = digits_run / "checkpoints" / "step-000002" / "progress.json"
    later = progress.stat().st_mtime_ns + 10**9
    os.utime(progress, ns=(later, later))  # as when training saves the same step again
    assert export_checkpoint(digits_run, "step-000002") == folder
    assert json.loads((folder / SOURCE_FILE).read_text())["progress_mtime_ns"] == later
    assert not [p.name for p in exports_dir(digits_run).iterdir() if p.name.startswith(".")]


def test_an_unknown_checkpoint_is_refused_with_the_kept_ones(digits_run: Path, tmp_path: Path, capsys):
    assert main(["sample", str(digits_run), "--checkpoint", "nope", "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"difftrain sample: error: checkpoint 'nope': not a checkpoint {digits_run} keeps; "
                   "kept: step-000002, step-000004 (or 'latest')"]
    assert not (tmp_path / "g.png").exists()
    assert main(["sample", str(digits_run / "best"), "--checkpoint", "latest"]) == 1
    assert capsys.readouterr().err.strip() == (f"difftrain sample: error: checkpoint 'latest': {digits_run / 'best'} "
                                               "keeps no checkpoints (no checkpoints/step-N/ with a progress.json)")


def _files(run: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run but its checkpoint exports: (size, mtime)."""
    skip = exports_dir(run)
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file() and skip not in p.parents}


def test_sampling_a_checkpoint_takes_no_lock_and_changes_nothing_else(digits_run: Path, tmp_path: Path):
    shutil.rmtree(exports_dir(digits_run) / "step-000002", ignore_errors=True)
    with acquire_lock(digits_run):  # as a live trainer holds it (and writes its pid into the lock file)
        before = _files(digits_run)
        sample(digits_run, tmp_path / "out", "--checkpoint", "step-000002", *SAMPLE)
        assert _files(digits_run) == before
    assert (exports_dir(digits_run) / "step-000002" / "model_index.json").is_file()


def test_a_checkpoint_rotated_away_while_it_is_read_is_one_clear_error(digits_run: Path, tmp_path: Path,
                                                                        monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run, ignore=shutil.ignore_patterns("exports"))
    doomed = run / "checkpoints" / "step-000002"
    verify = ckpt.verify_checkpoint

    def rotated_meanwhile(path: Path) -> None:
        shutil.rmtree(doomed)  # what the trainer's rotation does after writing a newer checkpoint
        verify(path)

    monkeypatch.setattr(ckpt, "verify_checkpoint", rotated_meanwhile)
    assert main(["sample", str(run), "--checkpoint", "step-000002", *SAMPLE]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"difftrain sample: error: checkpoint step-000002 of {run} was removed while it was read (the trainer keeps "
        "the newest train.checkpoints_total_limit checkpoints); kept: step-000004 (or 'latest')"]
    assert not exports_dir(run).exists() or list(exports_dir(run).iterdir()) == []
    assert not (run / "samples" / "sample-step-000002.png").exists()


def test_a_run_whose_data_moved_away_cannot_export_and_says_why_in_one_line(digits_run: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run, ignore=shutil.ignore_patterns("exports"))
    progress = run / "checkpoints" / "step-000004" / "progress.json"
    record = json.loads(progress.read_text())
    record["config"]["data"]["path"] = str(tmp_path / "moved")  # as a run trained on a folder since moved
    progress.write_text(json.dumps(record))
    assert main(["sample", str(run), "--checkpoint", "latest", *SAMPLE]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"difftrain sample: error: cannot export step-000004 of {run}: rebuilding its training setup from the "
        "checkpoint's config failed (") and str(tmp_path / "moved") in err[0], err
    assert not exports_dir(run).exists() or list(exports_dir(run).iterdir()) == []


def test_the_best_export_samples_as_its_checkpoint_with_the_runs_defaults(digits_run: Path, tmp_path: Path):
    best = json.loads((digits_run / "best" / "best.json").read_text())["step"]
    args = ["--num-images", "1", "--seed", "5", "--device", "cpu"]  # scheduler, steps, guidance: config.yaml's
    from_best = sample(digits_run / "best", tmp_path / "best", *args)
    from_checkpoint = sample(digits_run, tmp_path / "ckpt", "--checkpoint", ckpt.checkpoint_name(best), *args)
    assert len(from_best) == 11 and from_best == from_checkpoint  # every class, one image each, and the grid
    stepped = sample(digits_run / "best", tmp_path / "other", *args, "--num-inference-steps", "2")
    assert stepped["grid.png"] != from_best["grid.png"]  # so the 3 steps above were the run's, not a fallback


def test_single_images_are_written_as_their_batch_finishes(digits_run: Path, tmp_path: Path):
    from difftrain.commands.sample import sample_run
    from difftrain.pipeline import load_pipeline

    forwards: list[int] = []

    def load(folder: Path, device=None):  # the real pipeline, its network's calls counted
        pipe = load_pipeline(folder, device=device)
        pipe.unet.register_forward_hook(lambda *args: forwards.append(1))
        return pipe

    seen: list[tuple[int, int, bool]] = []
    totals: list[int] = []
    sample_run(digits_run, checkpoint="latest", class_label="0,1,2", num_images=2, batch_size=2, device="cpu",
               num_inference_steps=3, out=tmp_path / "grid.png", out_dir=tmp_path / "singles", load=load,
               on_start=totals.append, on_image=lambda i, path: seen.append((i, len(forwards), path.is_file())))
    assert totals == [6] and [i for i, _, _ in seen] == list(range(6)) and all(exists for _, _, exists in seen)
    # 3 steps of one guided forward per batch of 2: each batch's images arrive before the next batch is sampled.
    assert [calls for _, calls, _ in seen] == [3, 3, 6, 6, 9, 9]
    with pytest.raises(ValueError, match="pass out_dir too"):
        sample_run(digits_run, device="cpu", on_image=lambda i, path: None)


def test_a_lora_run_samples_from_its_checkpoints(lora_run: Path, tmp_path: Path):
    args = ["--prompt", "a photo of sks digit", "--num-images", "2", "--num-inference-steps", "2", "--device", "cpu"]
    exported = sample(lora_run, tmp_path / "export", *args)
    latest = sample(lora_run, tmp_path / "latest", "--checkpoint", "latest", *args)
    assert len(exported) == 3 and latest == exported
    folder = exports_dir(lora_run) / "step-000004"
    assert (folder / "pytorch_lora_weights.safetensors").is_file() and not (folder / "model_index.json").exists()
    earlier = sample(lora_run, tmp_path / "earlier", "--checkpoint", "step-000002", *args)
    assert earlier["grid.png"] != exported["grid.png"]
