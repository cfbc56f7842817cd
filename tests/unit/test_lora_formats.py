"""LoRA variants and export formats: the kohya-format file loads back through diffusers' `load_lora_weights` to the
same adapters as the diffusers-format file (SD and SDXL pipelines built from configs, no downloads), per-module
rank and alpha follow the patterns, DoRA exports and loads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.models.lora import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, add_lora, lora_layers, save_lora_weights

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, layers_per_block=1, attention_head_dim=4, **extra)


def _text_encoder(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=32, hidden_size=16 if not projection else 8, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8, projection_dim=8,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tokenizer():
    from difftrain.models.text import build_caption_tokenizer

    return build_caption_tokenizer(["a photo of a digit"], max_length=8)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, layers_per_block=1, sample_size=8)


def _trained_like(model: torch.nn.Module) -> None:
    """Give every adapter non-zero weights (lora_B starts at zero), as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def _sd_pipeline(unet, text_encoder):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=_tokenizer(), unet=unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _unet_out(unet, states: torch.Tensor, **kwargs) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=states.expand(2, -1, -1), **kwargs).sample


def _text_out(encoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0]])).last_hidden_state


def _adapted_sd(alpha=None, rank_pattern=None, alpha_pattern=None, use_dora=False):
    """(base unet, base text encoder, adapted copies) with trained-like adapters on both."""
    torch.manual_seed(0)
    unet, encoder = _unet(), _text_encoder()
    lora_unet, lora_encoder = copy.deepcopy(unet), copy.deepcopy(encoder)
    add_lora(lora_unet, 4, alpha, 0.0, UNET_TARGETS, "lora.unet_target_modules", use_dora=use_dora,
             rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    add_lora(lora_encoder, 2, alpha, 0.0, TEXT_TARGETS, "lora.text_encoder_target_modules", use_dora=use_dora,
             rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    _trained_like(lora_unet)
    _trained_like(lora_encoder)
    return unet, encoder, lora_unet, lora_encoder


def _loaded_sd(unet, encoder, folder: Path, weight_name: str):
    pipe = _sd_pipeline(copy.deepcopy(unet), copy.deepcopy(encoder))
    pipe.load_lora_weights(str(folder), weight_name=weight_name)
    return pipe


def test_kohya_file_loads_through_diffusers_to_the_same_adapters_as_the_diffusers_file(tmp_path: Path):
    # alpha != rank and a per-module rank and alpha: what diffusers' converter alone (alpha = rank) gets wrong
    unet, encoder, lora_unet, lora_encoder = _adapted_sd(alpha=3.0, rank_pattern={"attn2.to_q": 2},
                                                         alpha_pattern={"attn1.to_k": 8.0})
    paths = save_lora_weights(tmp_path, lora_unet, {"text_encoder": lora_encoder}, formats=("diffusers", "kohya"))
    assert paths == {"diffusers": tmp_path / LORA_WEIGHTS_NAME, "kohya": tmp_path / KOHYA_WEIGHTS_NAME}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME])

    kohya = load_file(str(paths["kohya"]))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya)  # SD 1.x: one encoder, lora_te_
    # one alpha per component (the most common); attn1.to_k's alpha 8 is folded into its lora_up (x 8/3)
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {3.0}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight"].shape[0] == 2

    states = _text_out(lora_encoder)
    expected_unet, expected_text = _unet_out(lora_unet, states), states
    assert not torch.allclose(expected_unet, _unet_out(unet, states), atol=1e-4)  # the adapters matter
    for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        pipe = _loaded_sd(unet, encoder, tmp_path, name)
        torch.testing.assert_close(_text_out(pipe.text_encoder), expected_text, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_unet_out(pipe.unet, states), expected_unet, rtol=1e-5, atol=1e-5)
    # the plain call still reads the diffusers file
    pipe = _sd_pipeline(copy.deepcopy(unet), copy.deepcopy(encoder))
    pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(_unet_out(pipe.unet, states), expected_unet, rtol=1e-5, atol=1e-5)


def test_rank_and_alpha_patterns_set_each_modules_shapes_and_scale(tmp_path: Path):
    _, _, lora_unet, _ = _adapted_sd(rank_pattern={"attn2.to_q": 2, r"mid_block\..*to_v": 6},
                                     alpha_pattern={"attn1.to_k": 8.0})
    layers = lora_layers(lora_unet)
    for name, (rank, alpha) in layers.items():
        want_rank = 2 if name.endswith("attn2.to_q") else 6 if name.startswith("mid_block") and name.endswith("to_v") else 4
        assert rank == want_rank, name
        assert alpha == (8.0 if name.endswith("attn1.to_k") else 4.0), name
    save_lora_weights(tmp_path, lora_unet)
    saved = load_file(str(tmp_path / LORA_WEIGHTS_NAME))
    down = {k: v for k, v in saved.items() if k.endswith("lora.down.weight") or k.endswith("lora_A.weight")}
    assert down
    for key, tensor in down.items():
        module = key.removeprefix("unet.").split(".lora")[0]
        assert tensor.shape[0] == layers[module][0], key


def test_dora_adapters_export_and_load_back(tmp_path: Path):
    unet, encoder, lora_unet, lora_encoder = _adapted_sd(use_dora=True)
    assert any("lora_magnitude_vector" in n for n, p in lora_unet.named_parameters() if p.requires_grad)
    save_lora_weights(tmp_path, lora_unet, {"text_encoder": lora_encoder})
    states = _text_out(lora_encoder)
    pipe = _loaded_sd(unet, encoder, tmp_path, LORA_WEIGHTS_NAME)
    torch.testing.assert_close(_text_out(pipe.text_encoder), states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_unet_out(pipe.unet, states), _unet_out(lora_unet, states), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="DoRA adapters have no kohya export"):
        save_lora_weights(tmp_path, lora_unet, formats=("kohya",))


def test_sdxl_pipeline_loads_both_formats_with_two_text_encoders(tmp_path: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    # SDXL's UNet: cross-attention on both encoders' states (16 + 8), text_time added conditioning
    unet = _unet(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    unet = type(unet).from_config({**unet.config, "cross_attention_dim": 24})
    encoder, encoder_2 = _text_encoder(), _text_encoder(projection=True)
    lora = [copy.deepcopy(m) for m in (unet, encoder, encoder_2)]
    add_lora(lora[0], 4, 2.0, 0.0, UNET_TARGETS, "lora.unet_target_modules", rank_pattern={"attn2.to_v": 2})
    add_lora(lora[1], 2, None, 0.0, TEXT_TARGETS, "lora.text_encoder_target_modules")
    add_lora(lora[2], 2, 1.0, 0.0, TEXT_TARGETS, "lora.text_encoder_target_modules")
    for model in lora:
        _trained_like(model)
    paths = save_lora_weights(tmp_path, lora[0], {"text_encoder": lora[1], "text_encoder_2": lora[2]},
                              pipeline_class=StableDiffusionXLPipeline, formats=("diffusers", "kohya"))
    kohya = load_file(str(paths["kohya"]))
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}

    with torch.no_grad():
        states = torch.cat([lora[1](torch.tensor([[1, 5, 2, 0, 0, 0, 0, 0]])).last_hidden_state,
                            lora[2](torch.tensor([[1, 5, 2, 0, 0, 0, 0, 0]])).last_hidden_state], dim=-1)
    added = {"text_embeds": torch.randn(2, 8, generator=torch.Generator().manual_seed(3)),
             "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)}
    expected = _unet_out(lora[0], states, added_cond_kwargs=added)
    for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
        pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=copy.deepcopy(encoder),
                                         text_encoder_2=copy.deepcopy(encoder_2), tokenizer=_tokenizer(),
                                         tokenizer_2=_tokenizer(), unet=copy.deepcopy(unet),
                                         scheduler=EulerDiscreteScheduler())
        pipe.load_lora_weights(str(tmp_path), weight_name=name)
        with torch.no_grad():
            got = torch.cat([pipe.text_encoder(torch.tensor([[1, 5, 2, 0, 0, 0, 0, 0]])).last_hidden_state,
                             pipe.text_encoder_2(torch.tensor([[1, 5, 2, 0, 0, 0, 0, 0]])).last_hidden_state], dim=-1)
        torch.testing.assert_close(got, states, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_unet_out(pipe.unet, states, added_cond_kwargs=added), expected,
                                   rtol=1e-5, atol=1e-5)
        images = pipe("a photo", num_inference_steps=1, height=16, width=16, output_type="np").images
        assert images.shape == (1, 16, 16, 3)


def test_lora_variant_config_errors_are_reported_together():
    from difftrain.config import ConfigError, load_config

    base = ["model.pretrained=base", "data.instance_dir=images"]
    cfg = load_config("tiny/dreambooth-lora", base + ["lora.rank_pattern={attn2.to_k: 8}", "lora.export_format=both",
                                                      "lora.alpha_pattern={'mid_block.*to_v': 2.5}"])
    assert cfg.lora.rank_pattern == {"attn2.to_k": 8} and cfg.lora.alpha_pattern == {"mid_block.*to_v": 2.5}
    with pytest.raises(ConfigError) as info:
        load_config("tiny/dreambooth-lora", base + ["lora.rank_pattern={'(bad': 2, to_q: 0}", "lora.use_dora=true",
                                                    "lora.export_format=kohya", "lora.alpha_pattern={to_v: x}"])
    text = str(info.value)
    assert "'lora.rank_pattern' key '(bad' is not a valid regular expression" in text
    assert "'lora.rank_pattern' = {'to_q': 0}: need a positive integer" in text
    assert "'lora.alpha_pattern' = {'to_v': 'x'}: need a positive number" in text
    assert "DoRA adapters export in the diffusers format only" in text
    with pytest.raises(ConfigError, match="'lora.export_format' needs 'model.finetune' = 'lora'"):
        load_config("tiny/mini-sd", ["lora.export_format=kohya"])
