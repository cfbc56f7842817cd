"""Low-memory training: gradient checkpointing gives the same loss and gradients, 8-bit AdamW is refused with one
line where it cannot run, and the step's peak memory is measured."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difftrain.models.lora import add_lora
from difftrain.training.setup import enable_gradient_checkpointing

REPO = Path(__file__).resolve().parents[2]


def _models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, layers_per_block=1, attention_head_dim=4)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=8, bos_token_id=1,
                                           eos_token_id=2, pad_token_id=0))
    return unet, encoder


def _loss_and_grads(unet, encoder) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unet.train()
    encoder.train()
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    states = encoder(torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0], [1, 7, 2, 0, 0, 0, 0, 0]])).last_hidden_state
    loss = torch.nn.functional.mse_loss(unet(x, torch.tensor([10, 700]), encoder_hidden_states=states).sample, noise)
    loss.backward()
    grads = {f"{tag}.{n}": p.grad.clone() for tag, m in (("unet", unet), ("te", encoder))
             for n, p in m.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora: bool):
    unet, encoder = _models()
    if lora:  # frozen bases, adapters on both: the inputs of the checkpointed blocks need no gradient
        add_lora(unet, 2, None, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], "lora.unet_target_modules")
        add_lora(encoder, 2, None, 0.0, ["q_proj", "v_proj"], "lora.text_encoder_target_modules")
        with torch.no_grad():
            for n, p in list(unet.named_parameters()) + list(encoder.named_parameters()):
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(2))
    plain = _loss_and_grads(copy.deepcopy(unet), copy.deepcopy(encoder))
    assert enable_gradient_checkpointing([unet, encoder]) == []
    assert unet.is_gradient_checkpointing and encoder.is_gradient_checkpointing
    checkpointed = _loss_and_grads(unet, encoder)
    torch.testing.assert_close(checkpointed[0], plain[0])
    assert checkpointed[1].keys() == plain[1].keys() and plain[1]
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_module_without_gradient_checkpointing_is_named():
    assert enable_gradient_checkpointing([torch.nn.Linear(2, 2)]) == ["Linear"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("command", ["train", "check"])
def test_8bit_adamw_is_refused_on_cpu_with_one_line_before_any_model_loads(command: str, tmp_path: Path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "difftrain", command, str(REPO / "configs/tiny/digits-class.yaml"),
                             "--output-dir", str(run), "train.optimizer=adamw_8bit"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in text.splitlines() if "'train.optimizer' = 'adamw_8bit' needs a CUDA GPU" in line]
    assert len(lines) == 1, text
    assert not run.exists()  # nothing written, no model built
    if command == "check":
        assert "step:" not in text and "check: FAILED (1 error(s)" in text


def test_8bit_adamw_without_bitsandbytes_names_the_install(monkeypatch):
    import importlib.util

    from difftrain.config import ConfigError, load_config
    from difftrain.training import setup

    cfg = load_config(str(REPO / "configs/tiny/digits-class.yaml"), ["train.optimizer=adamw_8bit"])
    monkeypatch.setattr(setup.torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(setup.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        setup.check_optimizer(cfg)


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.cuda.is_available(), reason="CPU peak from /proc")
def test_measure_peak_on_cpu_sees_the_work_s_own_allocation():
    from difftrain.training.memory import measure_peak, reset_resident_peak

    if not reset_resident_peak():
        pytest.skip("this kernel does not let a process reset its VmHWM")
    size = 256 * 2 ** 20

    def work() -> int:
        block = torch.ones(size, dtype=torch.uint8)  # touched, so resident
        return int(block[::4096].sum())

    peak = measure_peak(work, "cpu")
    assert peak.device == "cpu" and peak.result == size // 4096
    assert peak.increase_bytes >= 0.9 * size, peak.describe()
    small = measure_peak(lambda: None, "cpu")  # the reset: the earlier peak is not carried over
    assert small.increase_bytes < 0.5 * size, small.describe()
    assert "MiB before the step" in small.describe()


def test_measure_peak_says_not_measured_where_the_reset_is_refused(monkeypatch, tmp_path: Path):
    from difftrain.training import memory

    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    peak = memory.measure_peak(lambda: 7, "cpu")
    assert peak.result == 7 and not peak.measured and peak.increase_bytes is None
    assert peak.describe().startswith("peak memory not measured")
