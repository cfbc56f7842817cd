"""Frozen text-encoder outputs in the disk cache (text_encoder.cache_to_disk): the same values as the RAM cache,
reused, keyed by the encoder and the captions; the config refuses it where nothing would be cached."""

from __future__ import annotations

import pytest
import torch

from difftrain.config import TextEncoderConfig
from difftrain.models.conditioning import TextConditioner, caption_vocabulary
from difftrain.models.text import build_caption_tokenizer, build_scratch_text_encoder

CAPTIONS = [f"A handwritten digit {d}" for d in range(10)] + ["a red square", "two blue circles"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "cache"))


def _encoder(seed: int = 0, max_length: int = 8):
    tokenizer = build_caption_tokenizer(CAPTIONS, max_length)
    torch.manual_seed(seed)
    encoder = build_scratch_text_encoder(tokenizer, TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                                      max_length=max_length)).eval()
    return tokenizer, encoder


@pytest.mark.parametrize("with_mask", [False, True])
def test_disk_text_cache_gives_the_ram_cache_values_and_is_reused(tmp_path, with_mask):
    tokenizer, encoder = _encoder()
    vocab, ids = caption_vocabulary(CAPTIONS * 3)
    ram = TextConditioner(tokenizer, encoder, vocab, 8, trainable=False, with_mask=with_mask)
    ram.precompute(batch_size=5)
    disk = TextConditioner(tokenizer, encoder, vocab, 8, trainable=False, with_mask=with_mask)
    disk.precompute(batch_size=5, disk=True)
    assert torch.equal(disk.cache, ram.cache)
    batch = ids[torch.tensor([0, 5, 5, 17, 30])]
    out_ram, out_disk = ram(batch), disk(batch)
    for a, b in zip(out_ram if with_mask else [out_ram], out_disk if with_mask else [out_disk]):
        assert torch.equal(a, b)
    folders = list((tmp_path / "cache" / "text-states").iterdir())

    seen = []
    handle = encoder.register_forward_hook(lambda *args: seen.append(1))
    again = TextConditioner(tokenizer, encoder, vocab, 8, trainable=False, with_mask=with_mask)
    again.precompute(batch_size=5, disk=True)
    handle.remove()
    assert seen == [] and torch.equal(again.cache, ram.cache)  # read from disk, the encoder never ran

    _, other = _encoder(seed=1)
    TextConditioner(tokenizer, other, vocab, 8, trainable=False, with_mask=with_mask).precompute(5, disk=True)
    TextConditioner(tokenizer, encoder, vocab[1:], 8, trainable=False, with_mask=with_mask).precompute(5, disk=True)
    assert len(list((tmp_path / "cache" / "text-states").iterdir())) == len(folders) + 4  # 2 folders + 2 locks


def test_a_trained_encoder_is_never_cached_on_disk(tmp_path):
    tokenizer, encoder = _encoder()
    vocab, _ = caption_vocabulary(CAPTIONS)
    conditioner = TextConditioner(tokenizer, encoder.train(), vocab, 8, trainable=True)
    conditioner.precompute(disk=True)
    assert conditioner.cache is None and not (tmp_path / "cache" / "text-states").exists()


def test_sdxl_disk_text_cache_gives_the_ram_cache_values(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from difftrain.models.sdxl_text import DualTextConditioner
    from tests.tiny_sdxl import byte_level_clip_tokenizer

    tokenizer = byte_level_clip_tokenizer(max_length=12)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=12, projection_dim=16,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    encoders = [CLIPTextModel(config).eval(), CLIPTextModelWithProjection(config).eval()]
    vocab, ids = caption_vocabulary(CAPTIONS)
    ram = DualTextConditioner([tokenizer, tokenizer], encoders, vocab, trainable=False)
    ram.precompute(batch_size=4)
    disk = DualTextConditioner([tokenizer, tokenizer], encoders, vocab, trainable=False)
    disk.precompute(batch_size=4, disk=True)
    assert torch.equal(disk.cache[0], ram.cache[0]) and torch.equal(disk.cache[1], ram.cache[1])
    for a, b in zip(ram(ids[:6]), disk(ids[:6])):
        assert torch.equal(a, b)
    assert len(list((tmp_path / "cache" / "sdxl-text").glob("[0-9a-f]*"))) == 1


DREAMBOOTH = ["model.pretrained=runs/sd", "data.instance_dir=photos"]


@pytest.mark.parametrize("preset, overrides, fragment", [
    ("digits", [], "needs 'model.conditioning' = 'text'"),
    ("tiny/digits-text", [], "a from-scratch encoder"),
    ("tiny/digits-text", ["text_encoder.pretrained=some/clip", "text_encoder.train=true"], "'text_encoder.train' = true"),
    ("dreambooth-lora", [*DREAMBOOTH, "lora.train_text_encoder=true"], "'lora.train_text_encoder' = true"),
    ("dreambooth-lora", [*DREAMBOOTH, "data.shuffle_tags=true"], "'data.shuffle_tags' or 'data.tag_dropout'"),
])
def test_cache_to_disk_where_nothing_is_cached_is_refused(preset, overrides, fragment):
    from difftrain.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(preset, ["text_encoder.cache_to_disk=true", *overrides])
    assert fragment in str(info.value)


def test_cache_to_disk_with_a_frozen_encoder_is_accepted():
    from difftrain.config import load_config

    assert load_config("dreambooth-lora", [*DREAMBOOTH, "text_encoder.cache_to_disk=true"]).text_encoder.cache_to_disk
    assert load_config("tiny/digits-text", ["text_encoder.cache_to_disk=true",
                                            "text_encoder.pretrained=some/clip"]).text_encoder.cache_to_disk
