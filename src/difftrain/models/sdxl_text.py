"""SDXL's text conditioning: two CLIP text encoders whose penultimate hidden states are concatenated (the UNet's
cross-attention states) and the second encoder's pooled, projected embedding, plus the six size/crop ids of each
image (micro-conditioning). `encode_sdxl` is the one place prompts become these, for training and sampling, as
diffusers' StableDiffusionXLPipeline.encode_prompt computes them.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from difftrain.models.conditioning import cached_rows, disk_text_cache, encoding_parts
from difftrain.models.pretrained import resolve
from difftrain.models.text import tokenize

logger = logging.getLogger(__name__)

MAX_CACHE_BYTES = 2 * 1024**3


def load_sdxl_text_encoders(path: str) -> tuple[list, list[torch.nn.Module]]:
    """([tokenizer, tokenizer_2], [text_encoder, text_encoder_2]) of an SDXL pipeline folder or hub id: CLIPTextModel
    and CLIPTextModelWithProjection, as the pipeline's model_index.json names them."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    source = resolve(path)
    tokenizers = [AutoTokenizer.from_pretrained(source, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2")]
    return tokenizers, encoders


def zeros_for_empty_prompt(path: str) -> bool:
    """The base pipeline's `force_zeros_for_empty_prompt` (model_index.json; True, as SDXL-base, when not said)."""
    from diffusers import DiffusionPipeline

    return bool(DiffusionPipeline.load_config(resolve(path)).get("force_zeros_for_empty_prompt", True))


def token_ids(tokenizers: Sequence, prompts: Sequence[str], warn: bool = True) -> list[torch.Tensor]:
    """Each tokenizer's ids (B, its model_max_length) for `prompts`."""
    return [tokenize(tok, prompts, int(tok.model_max_length), warn=warn) for tok in tokenizers]


def encode_sdxl(encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (B, L, D1 + D2), pooled (B, P)): each encoder's penultimate hidden states, concatenated, and the last
    encoder's first output (CLIPTextModelWithProjection's text_embeds), as StableDiffusionXLPipeline.encode_prompt."""
    states, pooled = [], None
    for encoder, encoder_ids in zip(encoders, ids):
        out = encoder(encoder_ids.to(encoder.device), output_hidden_states=True)
        pooled = out[0]
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


def sdxl_time_ids(original_sizes: Optional[torch.Tensor], crops_top_left: Optional[torch.Tensor],
                  target_hw: tuple[int, int], batch_size: int, device: torch.device) -> torch.Tensor:
    """(B, 6) float32 ids: original (h, w), crop (top, left), target (h, w) in pixels. Without recorded sizes the
    image is taken as uncropped at the target size (what the pipelines pass by default)."""
    target = torch.tensor(target_hw, dtype=torch.float32).expand(batch_size, 2)
    original = target if original_sizes is None else original_sizes.float()
    crops = torch.zeros(batch_size, 2) if crops_top_left is None else crops_top_left.float()
    return torch.cat([original, crops, target], dim=1).to(device)


class DualTextConditioner:
    """Caption ids (B,) into a vocabulary of distinct captions, or caption texts made by the step, to (states,
    pooled). Frozen encoders run once per distinct caption and are cached; trained ones (LoRA on the encoders) run
    on the distinct captions of each batch.

    With `zero_empty` the empty prompt (a dropped caption) is zeros, not the encoders' output for "": what SDXL's
    pipelines feed as the empty negative prompt (`force_zeros_for_empty_prompt`) and how its base model dropped
    captions, so the unconditional branch trained here is the one guidance uses."""

    def __init__(self, tokenizers: Sequence, encoders: Sequence[torch.nn.Module], vocab: list[str], trainable: bool,
                 zero_empty: bool = True):
        self.tokenizers, self.encoders, self.vocab, self.trainable = list(tokenizers), list(encoders), vocab, trainable
        self.zero_empty = zero_empty
        self.null_index = len(vocab) - 1
        self.ids = token_ids(self.tokenizers, vocab)
        self.cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def to(self, device: torch.device) -> "DualTextConditioner":
        self.ids = [i.to(device) for i in self.ids]
        return self

    @torch.no_grad()
    def precompute(self, batch_size: int = 64, disk: bool = False) -> None:
        """Encode every distinct caption once (frozen encoders only): into RAM while under MAX_CACHE_BYTES, or with
        `disk` into the memory-mapped disk cache (models/conditioning.py, TextConditioner.precompute)."""
        if self.trainable:
            return
        states, pooled = encode_sdxl(self.encoders, [i[:1] for i in self.ids])
        size = len(self.vocab) * (states[0].numel() + pooled[0].numel()) * 4
        if disk:
            parts = encoding_parts(self.encoders, self.tokenizers, self.vocab, self.ids, batch_size)

            def encode(rows: slice) -> dict[str, torch.Tensor]:
                states, pooled = encode_sdxl(self.encoders, [i[rows] for i in self.ids])
                return {"states": states, "pooled": pooled}

            store = disk_text_cache("sdxl-text", parts, len(self.vocab), batch_size, encode, size)
            self.cache = (store["states"], store["pooled"])
            logger.info("frozen SDXL text states of %d distinct captions memory-mapped from %s (%.1f GiB)",
                        len(self.vocab), store.folder, size / 2**30)
            return
        if size > MAX_CACHE_BYTES:
            logger.info("not caching text states: %d distinct captions would take %.1f GiB", len(self.vocab),
                        size / 2**30)
            return
        parts = [encode_sdxl(self.encoders, [i[s : s + batch_size] for i in self.ids])
                 for s in range(0, len(self.vocab), batch_size)]
        self.cache = (torch.cat([p[0].float() for p in parts]), torch.cat([p[1].float() for p in parts]))
        logger.info("cached frozen SDXL text states for %d distinct captions", len(self.vocab))

    def __call__(self, condition: torch.Tensor | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled, empty = self._encode(condition)
        if not self.zero_empty:
            return states, pooled
        keep = ~empty.to(states.device)
        return states * keep[:, None, None].to(states.dtype), pooled * keep[:, None].to(pooled.dtype)

    def _encode(self, condition: torch.Tensor | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states, pooled, which rows are the empty prompt)."""
        if not isinstance(condition, torch.Tensor):  # texts made by the step
            texts = list(condition)
            ids = token_ids(self.tokenizers, texts, warn=False)
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                return (*encode_sdxl(self.encoders, ids), torch.tensor([t == "" for t in texts]))
        empty = condition == self.null_index
        if self.cache is not None:
            return cached_rows(self.cache[0], condition), cached_rows(self.cache[1], condition), empty
        unique, inverse = torch.unique(condition, return_inverse=True)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            states, pooled = encode_sdxl(self.encoders, [i[unique] for i in self.ids])
        return states[inverse], pooled[inverse], empty
