"""Text conditioning during training: captions as ids into a vocabulary of distinct captions, or (captions that
vary per step: data/caption_recipe.py) as texts tokenized in the step.

A frozen encoder's states are computed once per distinct caption and cached; a trained encoder runs
once per distinct caption in each batch (MNIST batches hold 10 distinct captions, not 512). The
empty prompt is the last vocabulary entry, so caption dropout is an index swap.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from difftrain.models.text import text_hidden_size, tokenize_with_mask

logger = logging.getLogger(__name__)

# Cache frozen-encoder states only while they fit comfortably in memory.
MAX_CACHE_BYTES = 2 * 1024**3


def caption_vocabulary(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct captions (sorted, then the empty prompt last) and each item's index into them."""
    vocab = sorted(set(captions) - {""})
    vocab.append("")
    index = {caption: i for i, caption in enumerate(vocab)}
    return vocab, torch.tensor([index[c] for c in captions], dtype=torch.long)


class TextConditioner:
    """Maps caption ids (B,) to cross-attention states (B, L, D), or with `with_mask` to (states, attention mask
    (B, L)): the mask is the tokenizer's, given to the encoder and to the network (PixArt), as diffusers' PixArt
    pipelines do at sampling."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, vocab: list[str], max_length: int, trainable: bool,
                 with_mask: bool = False):
        self.text_encoder = text_encoder
        self.tokenizer, self.max_length = tokenizer, max_length
        self.vocab = vocab
        self.null_index = len(vocab) - 1
        self.trainable = trainable
        # Tokenised once: the step never calls the tokenizer.
        self.token_ids, mask = tokenize_with_mask(tokenizer, vocab, max_length)
        self.mask = mask if with_mask else None
        self.cache: torch.Tensor | None = None

    def to(self, device: torch.device) -> "TextConditioner":
        self.token_ids = self.token_ids.to(device)
        if self.mask is not None:
            self.mask = self.mask.to(device)
        return self

    def _run_encoder(self, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.text_encoder(ids)[0] if mask is None else self.text_encoder(ids, attention_mask=mask)[0]

    def _encode(self, rows: torch.Tensor | slice) -> torch.Tensor:
        return self._run_encoder(self.token_ids[rows], None if self.mask is None else self.mask[rows])

    @torch.no_grad()
    def precompute(self, batch_size: int = 256) -> None:
        """Encode every distinct caption once (frozen encoders only)."""
        if self.trainable:
            return
        size = len(self.vocab) * self.token_ids.shape[1] * text_hidden_size(self.text_encoder) * 4
        if size > MAX_CACHE_BYTES:
            logger.info("not caching text states: %d distinct captions would take %.1f GiB", len(self.vocab), size / 2**30)
            return
        chunks = [self._encode(slice(i, i + batch_size)).float() for i in range(0, len(self.vocab), batch_size)]
        self.cache = torch.cat(chunks)
        logger.info("cached frozen text-encoder states for %d distinct captions", len(self.vocab))

    def __call__(self, condition: torch.Tensor | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """States of caption ids (B,), or of caption texts made by the step (tokenized here)."""
        if not isinstance(condition, torch.Tensor):
            return self._texts(list(condition))
        states = self._states(condition)
        return states if self.mask is None else (states, self.mask[condition])

    def _texts(self, texts: list[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        device = self.token_ids.device
        ids, mask = tokenize_with_mask(self.tokenizer, texts, self.max_length, warn=False)
        ids, mask = ids.to(device), mask.to(device)
        mask = None if self.mask is None else mask
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            states = self._run_encoder(ids, mask)
        return states if mask is None else (states, mask)

    def _states(self, caption_ids: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[caption_ids]
        unique, inverse = torch.unique(caption_ids, return_inverse=True)
        if self.trainable:
            states = self._encode(unique)
        else:
            with torch.no_grad():
                states = self._encode(unique)
        return states[inverse]


def drop_captions(caption_ids: torch.Tensor, null_index: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each caption by the empty prompt with `probability` (trains the unconditional branch)."""
    if probability <= 0:
        return caption_ids
    drop = torch.rand(caption_ids.shape, generator=generator, device=caption_ids.device) < probability
    return torch.where(drop, torch.full_like(caption_ids, null_index), caption_ids)


def drop_caption_texts(texts: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """`drop_captions` for caption texts: each replaced by the empty prompt with `probability`."""
    if probability <= 0:
        return texts
    drop = (torch.rand(len(texts), generator=generator, device=generator.device) < probability).tolist()
    return ["" if dropped else text for text, dropped in zip(texts, drop)]
