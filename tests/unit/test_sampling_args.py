"""`sample` / `evaluate` arguments: counts and steps >= 1, guidance finite and >= 0, checked before any model
loads and never replaced by a default."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from difftrain.commands.evaluate import evaluate_run
from difftrain.commands.sample import parse_guidance_scales, sample_run
from difftrain.sampling.args import count_problem, scale_problem


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """An exported unconditional run: 8 px, one channel, 10 training timesteps."""
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    run = tmp_path / "run"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(str(run))
    return run


def test_count_and_scale_checks():
    assert count_problem("--num-images", None) is None and count_problem("--num-images", 1) is None
    assert count_problem("--num-images", 0) == "--num-images 0: must be an integer >= 1"
    assert count_problem("--num-samples", 1, minimum=2) == "--num-samples 1: must be an integer >= 2"
    assert count_problem("--batch-size", True) == "--batch-size True: must be an integer >= 1"
    assert count_problem("--batch-size", 2.0) == "--batch-size 2.0: must be an integer >= 1"
    assert scale_problem("--guidance-scale", None) is None and scale_problem("--guidance-scale", 0) is None
    for bad in (float("nan"), float("inf"), -1.0):
        assert scale_problem("--guidance-scale", bad) == \
            f"--guidance-scale {bad!r}: must be a finite number >= 0 (1 = no guidance)"


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "0,nan,5", "2,-inf"])
def test_guidance_scales_and_sweeps_must_be_finite_and_non_negative(text: str):
    with pytest.raises(ValueError, match=r"--guidance-scale .*expected finite numbers >= 0"):
        parse_guidance_scales(text)
    assert parse_guidance_scales("0,5,10") == [0.0, 5.0, 10.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images": 0}, "--num-images 0: must be an integer >= 1"),
    ({"num_images": -2}, "--num-images -2: must be an integer >= 1"),
    ({"num_inference_steps": 0}, "--num-inference-steps 0: must be an integer >= 1"),
    ({"batch_size": 0}, "--batch-size 0: must be an integer >= 1"),
    ({"guidance_scale": "nan"}, "--guidance-scale 'nan': expected finite numbers >= 0"),
    ({"guidance_scale": "1,-3"}, "--guidance-scale '1,-3': expected finite numbers >= 0"),
    ({"num_images": 0, "num_inference_steps": -1},
     "--num-inference-steps -1: must be an integer >= 1; --num-images 0: must be an integer >= 1"),
])
def test_sample_run_refuses_bad_arguments_before_loading_or_writing(tiny_run: Path, tmp_path: Path, kwargs, message):
    before = sorted(p.name for p in tiny_run.rglob("*"))
    with pytest.raises(ValueError) as info:
        sample_run(tiny_run, device="cpu", out=tmp_path / "grid.png", **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not (tmp_path / "grid.png").exists() and sorted(p.name for p in tiny_run.rglob("*")) == before
    # Checked before the run is opened: a missing folder still gets the argument's message.
    with pytest.raises(ValueError, match=message.split(":")[0]):
        sample_run(tmp_path / "missing", device="cpu", **kwargs)


def test_sample_run_uses_exactly_the_counts_it_is_given(tiny_run: Path, tmp_path: Path):
    from PIL import Image

    out = sample_run(tiny_run, device="cpu", num_images=1, num_inference_steps=1, batch_size=1, out=tmp_path / "g.png",
                     out_dir=tmp_path / "single")
    assert Image.open(out).size[0] > 0 and len(list((tmp_path / "single").glob("*.png"))) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 0}, "--num-samples 0: must be an integer >= 2"),
    ({"num_samples": -5}, "--num-samples -5: must be an integer >= 2"),
    ({"num_reference": 1}, "--num-reference 1: must be an integer >= 2"),
    ({"num_inference_steps": 0}, "--num-inference-steps 0: must be an integer >= 1"),
    ({"batch_size": -1}, "--batch-size -1: must be an integer >= 1"),
    ({"guidance_scale": float("nan")}, "--guidance-scale nan: must be a finite number >= 0"),
    ({"guidance_scale": float("inf")}, "--guidance-scale inf: must be a finite number >= 0"),
])
def test_evaluate_run_refuses_bad_arguments_before_reading_the_run(tmp_path: Path, kwargs, message):
    # The folder does not exist: the argument is checked first, so its message comes, not "no config.yaml".
    with pytest.raises(ValueError) as info:
        evaluate_run(tmp_path / "missing", device="cpu", **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("class_name", ["NoSuchPipeline", "UNet2DModel", ["pipeline", "MyPipeline"], ""])
def test_an_unknown_pipeline_class_names_the_class_and_the_folder(tiny_run: Path, tmp_path: Path, class_name):
    import json

    index = json.loads((tiny_run / "model_index.json").read_text())
    (tiny_run / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    with pytest.raises(ValueError) as info:
        sample_run(tiny_run, device="cpu", out=tmp_path / "grid.png")
    assert str(info.value).startswith(f"{tiny_run}: model_index.json names the pipeline class {class_name!r}, "
                                      "which is not a pipeline class of diffusers")
    assert not (tmp_path / "grid.png").exists()
