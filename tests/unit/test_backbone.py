"""Transformer backbones in the families and samplers: a class DiT drops labels to class 1000, and difftrain's
text sampler feeds a PixArt transformer exactly as diffusers' PixArtSigmaPipeline does (states and attention mask)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

from difftrain.config import TextEncoderConfig, load_config
from difftrain.data.batches import MicroBatch
from difftrain.families import family_for
from difftrain.models.backbone import unread_backbone_settings
from difftrain.models.text import build_caption_tokenizer, build_scratch_text_encoder, encode_prompts
from difftrain.sampling.generate import network_denoiser
from difftrain.sampling.sample import sample


def test_a_class_dit_drops_labels_to_class_1000_and_keeps_its_own_label_dropout_off():
    family = family_for(load_config("tiny/digits-class", ["model.backbone=dit", "model.size=tiny",
                                                          "train.condition_dropout=0.5"]))
    family.load_data()
    family.plan()
    plan = family.network_plan
    assert plan.null_class == 1000 and plan.kwargs["num_embeds_ada_norm"] == 1000
    labels = torch.arange(10).repeat(20)
    micro = MicroBatch(rows=torch.arange(200), images=torch.zeros(200, 1, 8, 8, dtype=torch.uint8), labels=labels)
    dropped = family.condition(micro, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(dropped[dropped != labels].tolist()) == {1000} and 0 < int((dropped == 1000).sum()) < 200
    network = plan.build()
    assert all(m.dropout_prob == 0.0 for m in network.modules() if hasattr(m, "dropout_prob"))


def test_difftrain_samples_a_pixart_transformer_as_pixart_sigma_pipeline_does():
    torch.manual_seed(0)
    captions = ["a photo of a 3", "a photo of a 7"]
    tokenizer = build_caption_tokenizer(captions, 8)
    encoder = build_scratch_text_encoder(tokenizer, TextEncoderConfig(max_length=8, hidden_size=16, num_layers=1,
                                                                      num_heads=2)).eval()
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                           num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
                                           caption_channels=16, use_additional_conditions=False).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    theirs = pipe("a photo of a 3", num_inference_steps=3, guidance_scale=1.0, max_sequence_length=8,
                  use_resolution_binning=False, clean_caption=False, output_type="latent",
                  generator=torch.Generator().manual_seed(5)).images
    with torch.no_grad():
        states, mask = encode_prompts(tokenizer, encoder, ["a photo of a 3"], 8, with_mask=True)
        assert mask.sum() < mask.numel()  # padding is masked: the test would not tell otherwise
        ours = sample(network_denoiser(transformer, (states, mask)), DDIMScheduler(num_train_timesteps=100, clip_sample=False),
                      (4, 8, 8), [5], num_inference_steps=3, cond=torch.tensor([0]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, unread", [
    (["model.backbone=dit"], ["unet"]),  # the mnist-text preset's UNet settings, with a DiT asked for
    ([], []),
    (["model.depth=4", "model.patch_size=2"], ["patch_size", "depth"]),
])
def test_settings_of_the_other_backbone_are_named_as_unread(overrides: list[str], unread: list[str]):
    cfg = load_config("mnist-text", ["data.path=unused", *overrides], output_dir="unused")
    assert unread_backbone_settings(cfg.model) == unread
