"""Step-level speed choices keep the math: fused AdamW, foreach EMA, the one-read non-finite check;
and the benchmark helpers that turn metrics.jsonl into images/s and training time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from difftrain.training.numerics import _grad_norm
from difftrain.training.setup import make_adamw

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import images_per_s_after, steady_images_per_s, train_seconds_at  # noqa: E402


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((4, 3), (7,), (2, 2, 3))]


def test_fused_adamw_matches_the_reference_update():
    fused, plain = _params(0), _params(0)
    opt_fused = make_adamw([{"params": fused, "lr": 1e-2}], 1e-2, (0.9, 0.999), 1e-8, 0.01)
    opt_plain = torch.optim.AdamW(plain, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, foreach=False)
    assert opt_fused.defaults["fused"]
    for step in range(5):
        grads = _params(100 + step)
        for p, q, g in zip(fused, plain, grads):
            p.grad, q.grad = g.detach().clone(), g.detach().clone()
        opt_fused.step()
        opt_plain.step()
    for p, q in zip(fused, plain):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_foreach_ema_matches_per_tensor_ema():
    params = _params(1)
    a = EMAModel(params, decay=0.9, foreach=True)
    b = EMAModel(params, decay=0.9, foreach=False)
    for step in range(3):
        with torch.no_grad():
            for p, g in zip(params, _params(200 + step)):
                p.add_(g)
        a.step(params)
        b.step(params)
    for x, y in zip(a.shadow_params, b.shadow_params):
        torch.testing.assert_close(x, y)


def test_grad_norm_is_the_global_l2_norm_and_sees_non_finite_gradients():
    params = _params(2)
    for p, g in zip(params, _params(3)):
        p.grad = g.detach()
    expected = torch.cat([p.grad.flatten() for p in params]).norm()
    torch.testing.assert_close(_grad_norm(params), expected)
    params[1].grad[0] = float("nan")
    assert not torch.isfinite(_grad_norm(params))
    assert _grad_norm([torch.nn.Parameter(torch.zeros(2))]) == 0


def test_benchmark_time_and_throughput_from_metrics_rows():
    # Steps 1-2 at 10 img/s (warm-up), then 3 steps at 20 and 40 img/s, batch 10: 1 s per warm-up step.
    rows = [{"step": 2, "images_per_s": 10.0}, {"step": 3, "images_per_s": 20.0}, {"step": 4, "images_per_s": 40.0}]
    assert train_seconds_at(rows, 10) == pytest.approx({2: 2.0, 3: 2.5, 4: 2.75})
    # Harmonic mean: 20 images in 0.5 + 0.25 s.
    assert steady_images_per_s(rows, skip_steps=2) == pytest.approx(20 / 0.75)
    with pytest.raises(ValueError, match="warm-up"):
        steady_images_per_s(rows, skip_steps=4)
    # A baseline's own step times: the first (warm-up) step is left out.
    assert images_per_s_after([9.0, 1.0, 3.0], batch_size=8, skip_steps=1) == pytest.approx(16 / 4)
    with pytest.raises(ValueError, match="warm-up"):
        images_per_s_after([1.0], batch_size=8, skip_steps=1)


def test_seed_baseline_mnist_item_is_torchvision_to_tensor_and_normalize(tmp_path: Path):
    import gzip

    from baselines.seed002_mnist_text import MNIST

    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28).astype(np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in (2, 28, 28)) + images.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([3, 7]))
    data = MNIST(tmp_path)
    x, label = data[1]
    assert label == 7 and x.shape == (1, 28, 28)
    torch.testing.assert_close(x[0], torch.from_numpy(images[1]).float() / 255 * 2 - 1)


def test_time_to_quality_flags_a_seed_accuracy_at_chance(capsys):
    from time_to_quality import summarize

    seed = [{"step": 30, "train_seconds": 1200.0, "guidance": 1.0, "accuracy": 0.12, "classifier_fid": 20.0}]
    ours = [{"step": s, "train_seconds": 6.0 * s, "accuracy": a, "classifier_fid": f}
            for s, a, f in [(25, 0.13, 30.0), (100, 0.15, 10.0), (200, 0.30, 4.0)]]
    summarize(seed, ours, num_samples=100, num_classes=10)
    out = capsys.readouterr().out
    # 0.12 < 0.10 + 2 * sqrt(0.1 * 0.9 / 100) = 0.16: matching it at step 25 is flagged as meaningless,
    # and the first evaluation above that bar (step 200, 1200 s / 1200 s = 1.0x) is named instead.
    assert "matched it at step 25" in out and "within noise of chance" in out
    assert "first above it at step 200 after 20.0 min (1.0x sooner" in out
    seed[0]["accuracy"] = 0.5
    summarize(seed, ours, num_samples=100, num_classes=10)
    assert "within noise of chance" not in capsys.readouterr().out


def test_unet_step_variants_times_a_preset_unet_and_rejects_unknown_variants():
    from common import flops_per_image
    from unet_step_variants import time_variant

    tiny = ["model.size=custom", "model.unet.block_out_channels=[8,16]", "model.unet.layers_per_block=1",
            "model.unet.down_block_types=[DownBlock2D,DownBlock2D]", "model.unet.up_block_types=[UpBlock2D,UpBlock2D]",
            "model.unet.norm_num_groups=4"]
    cpu = torch.device("cpu")
    result = time_variant("digits", tiny, "fp32+cl", 4, cpu, warmup_steps=1, steps=2)
    assert result["batch_size"] == 4 and result["images_per_s"] > 0 and result["peak_device_mib"] is None
    from unet_step_variants import build

    unet, noise_scheduler, text_tokens = build("digits", tiny)
    assert flops_per_image(unet) > 0 and text_tokens == 0
    assert noise_scheduler.config.beta_schedule == "squaredcos_cap_v2"  # the preset's, not a stand-in
    with pytest.raises(ValueError, match="fp8"):
        time_variant("digits", tiny, "fp8", 4, cpu, warmup_steps=1, steps=1)


def test_unet_step_variants_feeds_a_text_unet_encoder_states_of_the_encoders_width():
    from common import flops_per_image
    from unet_step_variants import build, time_variant

    tiny = ["text_encoder.hidden_size=16", "text_encoder.max_length=5"]
    unet, _, text_tokens = build("digits-text", tiny)
    assert text_tokens == 5 and unet.config.cross_attention_dim == 16
    # Cross-attention over 5 tokens costs more than over 1: the caption length is part of the count.
    assert flops_per_image(unet, text_tokens) > flops_per_image(unet, 1)
    result = time_variant("digits-text", tiny, "fp32", 2, torch.device("cpu"), warmup_steps=1, steps=1)
    assert result["images_per_s"] > 0


def test_run_children_runs_side_by_side_and_names_the_one_that_failed(tmp_path: Path):
    from common import run_children

    # Each child announces itself and waits for the other: run one after the other, the first would time out.
    meet = ("import sys, time, pathlib; d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); "
            "end = time.time() + 60\nwhile not (d / sys.argv[3]).exists():\n    time.sleep(0.05)\n"
            "    if time.time() > end: sys.exit(4)")
    pair = [[sys.executable, "-c", meet, str(tmp_path), me, other] for me, other in (("a", "b"), ("b", "a"))]
    usages = run_children(pair, [tmp_path / "a.log", tmp_path / "b.log"])
    assert len(usages) == 2 and all(u["peak_rss_mib"] > 0 and u["wall_seconds"] > 0 for u in usages)
    ok = [sys.executable, "-c", "pass"]
    bad = [sys.executable, "-c", "print('broken side'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match="exited with 3(.|\n)*broken side"):
        run_children([ok, bad], [tmp_path / "c.log", tmp_path / "d.log"])


def test_run_children_leaves_the_callers_other_children_alone(tmp_path: Path):
    from common import run_children

    # A child of the same process that ends first: waiting on any pid would reap it, and its own Popen would
    # then read 0 instead of its exit code (and run_children, in a test worker, fail on children it lost).
    other = subprocess.Popen([sys.executable, "-c", "raise SystemExit(5)"])
    slow = [sys.executable, "-c", "import time; time.sleep(1.0)"]
    usages = run_children([slow], [tmp_path / "slow.log"])
    assert usages[0]["wall_seconds"] >= 1.0
    assert other.wait(timeout=30) == 5


def test_time_to_quality_labels_difftrain_with_the_runs_sampler(capsys):
    from time_to_quality import sampler_label, summarize

    label = sampler_label({"scheduler": "unipc", "num_inference_steps": 10, "guidance_scale": 2.5})
    assert label == "unipc 10, guidance 2.5"
    seed = [{"step": 30, "train_seconds": 60.0, "guidance": 8.0, "accuracy": 0.5, "classifier_fid": 20.0}]
    ours = [{"step": 25, "train_seconds": 6.0, "accuracy": 0.6, "classifier_fid": 10.0}]
    summarize(seed, ours, sampler=label)
    assert "difftrain mnist-text (unipc 10, guidance 2.5)" in capsys.readouterr().out
