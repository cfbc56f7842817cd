"""A tiny StableDiffusionXLPipeline folder built from configs, with no download: the base model of the SDXL tests
and of benchmarks/memory.py.

Its parts have SDXL's structure at toy sizes: a UNet with `addition_embed_type="text_time"` (pooled text embedding
plus six size/crop ids), CLIPTextModel and CLIPTextModelWithProjection whose penultimate states are concatenated,
byte-level CLIP tokenizers written here (every byte a token, no merges), and a two-level AutoencoderKL
(downsampling 2, so 32 px images are 16 x 16 latents).
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_WIDTH = 32
"""Hidden size of each text encoder; the UNet's cross-attention width is the two together."""
TIME_EMBED_WIDTH = 8


def byte_level_clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer whose vocabulary is the 256 byte-level symbols (each also as a word end), no merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[], model_max_length=max_length)


def build_tiny_sdxl(folder: Path, seed: int = 0, text_encoder_2: bool = True) -> Path:
    """Write a tiny SDXL pipeline folder (random weights from `seed`); without `text_encoder_2`, one whose
    model_index.json lacks the second encoder (the bad-input test)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * TEXT_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_WIDTH,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_WIDTH + TEXT_WIDTH, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        norm_num_groups=32, scaling_factor=0.13025, force_upcast=True,
    )
    tokenizer = byte_level_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
                projection_dim=TEXT_WIDTH)
    encoder = CLIPTextModel(CLIPTextConfig(**text))
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text)) if text_encoder_2 else None
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoder, text_encoder_2=encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer if text_encoder_2 else None, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(folder))
    return folder
