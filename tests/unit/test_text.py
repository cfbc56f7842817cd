"""Text encoders: caption tokenizer, truncation, local pretrained loading, the embedding cache, caption dropout."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from difftrain.config import DiffusionConfig, TextEncoderConfig
from difftrain.diffusion.loss import denoising_loss
from difftrain.diffusion.schedule import build_noise_scheduler
from difftrain.models.conditioning import TextConditioner, caption_vocabulary, drop_captions
from difftrain.models.text import (
    build_caption_tokenizer,
    build_scratch_text_encoder,
    encode_prompts,
    load_pretrained_text_encoder,
    tokenize,
)

CAPTIONS = [f"A handwritten digit {d}" for d in range(10)]


def _encoder(max_length: int = 8):
    tokenizer = build_caption_tokenizer(CAPTIONS, max_length)
    torch.manual_seed(0)
    encoder = build_scratch_text_encoder(tokenizer, TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                                      max_length=max_length)).eval()
    return tokenizer, encoder


def test_tokenizer_is_deterministic_and_reloads(tmp_path: Path):
    a, b = build_caption_tokenizer(CAPTIONS, 8), build_caption_tokenizer(list(reversed(CAPTIONS)), 8)
    assert a.get_vocab() == b.get_vocab()
    ids = tokenize(a, ["A handwritten digit 7"], 8)
    assert ids.shape == (1, 8)
    assert ids[0, 0] == a.bos_token_id and a.eos_token_id in ids[0].tolist() and ids[0, -1] == a.pad_token_id
    a.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert torch.equal(tokenize(again, ["A handwritten digit 7"], 8), ids)
    unknown = tokenize(a, ["a zebra"], 8)[0].tolist()
    assert a.unk_token_id in unknown


def test_long_prompt_is_truncated_with_a_warning(caplog):
    tokenizer, encoder = _encoder(max_length=6)
    with caplog.at_level(logging.WARNING):
        states = encode_prompts(tokenizer, encoder, ["A handwritten digit 7 written very neatly"], 6)
    assert states.shape == (1, 6, 16)
    assert "truncated to text_encoder.max_length = 6" in caplog.text


def test_unknown_tokenizer_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        load_pretrained_text_encoder(str(tmp_path / "no-such-dir"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="could not load a tokenizer"):
        load_pretrained_text_encoder(str(empty))


@pytest.mark.parametrize("layout", ["flat", "pipeline"])
def test_pretrained_encoder_from_a_local_directory(tmp_path: Path, layout: str):
    tokenizer, encoder = _encoder()
    if layout == "flat":
        tokenizer.save_pretrained(tmp_path)
        encoder.save_pretrained(tmp_path)
    else:
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        encoder.save_pretrained(tmp_path / "text_encoder")
    tok2, enc2 = load_pretrained_text_encoder(str(tmp_path))
    assert type(enc2).__name__ == "CLIPTextModel"
    expected = encode_prompts(tokenizer, encoder, CAPTIONS[:3], 8)
    torch.testing.assert_close(encode_prompts(tok2, enc2.eval(), CAPTIONS[:3], 8), expected)


def test_caption_vocabulary_puts_the_empty_prompt_last():
    vocab, ids = caption_vocabulary(["b", "a", "b", ""])
    assert vocab == ["a", "b", ""]
    assert ids.tolist() == [1, 0, 1, 2]


def test_caption_dropout_rate():
    ids = torch.zeros(100_000, dtype=torch.long)
    dropped = drop_captions(ids, null_index=9, probability=0.3, generator=torch.Generator().manual_seed(0))
    rate = (dropped == 9).float().mean().item()
    assert abs(rate - 0.3) < 0.01
    assert torch.equal(drop_captions(ids, 9, 0.0, torch.Generator()), ids)


def test_cached_states_give_the_same_loss_as_uncached():
    tokenizer, encoder = _encoder()
    vocab, _ = caption_vocabulary(CAPTIONS)
    cached = TextConditioner(tokenizer, encoder, vocab, 8, trainable=False)
    cached.precompute()
    uncached = TextConditioner(tokenizer, encoder, vocab, 8, trainable=False)
    assert cached.cache is not None and uncached.cache is None
    ids = torch.tensor([0, 3, 3, 10, 7, 0])  # 10 = the empty prompt
    torch.testing.assert_close(cached(ids), uncached(ids))

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                attention_head_dim=4, cross_attention_dim=16)
    sched = build_noise_scheduler(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    losses = [denoising_loss(lambda x, ts: unet(x, ts, encoder_hidden_states=c(ids)).sample, sched, x0, noise, t)
              for c in (cached, uncached)]
    torch.testing.assert_close(losses[0], losses[1])


def test_trained_encoder_runs_once_per_distinct_caption():
    tokenizer, encoder = _encoder()
    vocab, _ = caption_vocabulary(CAPTIONS)
    conditioner = TextConditioner(tokenizer, encoder.train(), vocab, 8, trainable=True)
    seen = []
    handle = encoder.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    ids = torch.arange(512) % 10
    states = conditioner(ids)
    handle.remove()
    assert seen == [10]
    assert states.shape == (512, 8, 16) and states.requires_grad
    torch.testing.assert_close(states[13], states[3])


def test_image_sampler_samples_text_in_eval_mode_and_restores_the_mode():
    """The sampling entry point of previews, evaluation and `difftrain evaluate`, on the pooled-text UNet
    that the mnist-text preset uses (addition_embed_type "text")."""
    from diffusers import UNet2DConditionModel

    from difftrain.sampling.generate import ImageSampler, generate_from_text
    from difftrain.sampling.schedulers import make_scheduler

    tokenizer, encoder = _encoder()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                attention_head_dim=4, cross_attention_dim=16, addition_embed_type="text",
                                addition_embed_type_num_heads=2).eval()
    sched = make_scheduler("dpm++", build_noise_scheduler(DiffusionConfig()).config)
    prompts = [CAPTIONS[3], CAPTIONS[7]]
    encoder.train()  # as during training: dropout on
    images = ImageSampler(unet, tokenizer, encoder).generate(sched, [0, 1], num_inference_steps=3, prompts=prompts,
                                                             guidance_scale=2.0)
    assert encoder.training
    assert images.shape == (2, 1, 8, 8) and images.dtype == torch.uint8
    expected = generate_from_text(unet, sched, tokenizer, encoder.eval(), prompts, [0, 1], num_inference_steps=3,
                                  guidance_scale=2.0)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs prompts"):
        ImageSampler(unet, tokenizer, encoder).generate(sched, [0], num_inference_steps=3)
