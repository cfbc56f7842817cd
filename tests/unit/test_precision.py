"""`train.mixed_precision: auto`: the probe, its cache, the choice rule, and resumed runs keeping their choice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from difftrain.config import RunConfig, TrainConfig, dump_config, load_config
from difftrain.training import precision
from difftrain.training.resume_check import config_changes, read_saved_config


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3)


def test_choice_needs_a_clear_gain():
    assert precision.choose_precision({"no": 100.0, "bf16": 95.0}) == "no"  # 5%: not worth the numerics
    assert precision.choose_precision({"no": 100.0, "bf16": 50.0}) == "bf16"
    assert precision.choose_precision({"no": 50.0, "bf16": 300.0}) == "no"
    assert precision.choose_precision({"no": 10.0}) == "no"


def test_cpu_candidates_follow_native_bf16_support():
    expected = ["no", "bf16"] if precision.cpu_has_native_bf16() else ["no"]
    assert precision.precision_candidates(torch.device("cpu")) == expected


def test_probe_times_each_candidate_once_then_reads_the_cache():
    built = []

    def build():
        built.append(1)
        return _tiny_unet()

    cpu = torch.device("cpu")
    config = dict(_tiny_unet().config)
    first = precision.measure_precision(build, config, cpu, 4, None, ["no", "bf16"])  # bf16 autocast runs on CPU
    assert first["source"] == "probe" and set(first["ms_per_step"]) == {"no", "bf16"}
    assert first["choice"] == precision.choose_precision(first["ms_per_step"])
    second = precision.measure_precision(build, config, cpu, 4, None, ["no", "bf16"])
    assert second["source"].startswith("cache ") and second["choice"] == first["choice"]
    assert second["ms_per_step"] == first["ms_per_step"]
    assert len(built) == 1  # a cache hit builds no model
    other_batch = precision.measure_precision(build, config, cpu, 2, None, ["no", "bf16"])
    assert other_batch["source"] == "probe"  # the key includes the micro-batch


def test_probe_inputs_match_the_model_conditioning():
    x, t, cond = precision.probe_inputs(_tiny_unet(), 3, None, torch.device("cpu"))
    assert x.shape == (3, 1, 8, 8) and t.shape == (3,) and cond.shape == (3,)


def test_probe_times_a_transformer_step():
    from difftrain.models.backbone import Conditioning, plan_network
    from difftrain.models.unet import COND_UNET_PRESETS
    from difftrain.config import RunConfig

    model = RunConfig().model
    model.backbone, model.size = "dit", "tiny"
    for condition, text_length in ((Conditioning("class", 3), None), (Conditioning("text", text_dim=16), 5)):
        plan, problems = plan_network(model, 8, 1, condition, COND_UNET_PRESETS)
        network = plan.build()
        inputs = precision.probe_inputs(network, 2, text_length, torch.device("cpu"))
        assert precision.time_step_ms(network, inputs, torch.device("cpu"), "no", warmup_steps=1, timed_steps=1) > 0


def test_auto_resolves_without_a_probe_where_there_is_nothing_to_gain():
    shared = []

    def share(values):
        shared.append(values)
        return values

    choice = precision.resolve_auto_precision(_tiny_unet, dict(_tiny_unet().config), torch.device("cpu"), 4, None,
                                              True, share)
    assert choice in precision.precision_candidates(torch.device("cpu")) and shared  # every rank takes part


def test_resumed_auto_run_keeps_its_resolved_precision(tmp_path: Path):
    def resolve(cfg: RunConfig) -> RunConfig:
        # A run that resolved before never times anything, so no family or process state is needed here.
        return precision.resolve_mixed_precision(cfg, None, None, read_saved_config(tmp_path))

    auto = RunConfig(output_dir=str(tmp_path), train=TrainConfig(mixed_precision="auto"))
    assert precision.resolved_before(read_saved_config(tmp_path)) is None  # nothing saved yet: resolve afresh
    saved = dataclasses.replace(auto, train=dataclasses.replace(auto.train, mixed_precision="bf16"))
    (tmp_path / "config.yaml").write_text(dump_config(saved))
    assert resolve(auto).train.mixed_precision == "bf16"
    assert config_changes(saved.to_dict(), auto) == []  # "auto" against the choice it resolved to is no change
    forced = load_config("tiny/digits-class", ["train.mixed_precision='no'"])
    assert resolve(forced).train.mixed_precision == "no"  # an explicit value wins
    # A run that resolved to fp32 saved `mixed_precision: no`, which YAML 1.1 reads back as false.
    (tmp_path / "config.yaml").write_text(dump_config(saved).replace("mixed_precision: bf16", "mixed_precision: no"))
    assert resolve(auto).train.mixed_precision == "no"


@pytest.mark.parametrize("value", ["auto", "no", "bf16"])
def test_config_accepts_precision_values(value):
    assert load_config("tiny/digits-class", [f"train.mixed_precision={value}"]).train.mixed_precision == value



def test_loaded_ema_state_follows_the_device_of_the_weights():
    # accelerate loads checkpoints on the CPU; the EMA of a GPU run must stay on the GPU after a resume
    # (seen on an H100: the first EMA update after resuming mixed cuda and cpu tensors). The meta device
    # stands in for the GPU here.
    from difftrain.training.setup import DeviceEMAModel

    weights = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    ema = DeviceEMAModel(weights, decay=0.9)
    saved = DeviceEMAModel([torch.nn.Parameter(torch.ones(3))], decay=0.9).state_dict()
    ema.load_state_dict(saved)
    assert all(p.device.type == "meta" for p in ema.shadow_params)
