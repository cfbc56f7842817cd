"""Text conditioning during training: captions as ids into a vocabulary of distinct captions, or (captions that
vary per step: data/caption_recipe.py) as texts tokenized in the step.

A frozen encoder's states are computed once per distinct caption and cached: in RAM while they fit (MAX_CACHE_BYTES),
or with `precompute(disk=True)` (text_encoder.cache_to_disk) in a memory-mapped store on disk
(data/tensor_cache.py), keyed by the encoder's weights, the tokenizer, the token ids and the captions, and reused by
later runs; both give the step the same values. A trained encoder runs once per distinct caption in each batch
(MNIST batches hold 10 distinct captions, not 512). The empty prompt is the last vocabulary entry, so caption
dropout is an index swap.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch

from difftrain.data.tensor_cache import (TensorStore, TensorWriter, cached_store, module_fingerprint, strings_digest,
                                         tensor_digest)
from difftrain.models.text import text_hidden_size, tokenize_with_mask

logger = logging.getLogger(__name__)

# Cache frozen-encoder states only while they fit comfortably in memory.
MAX_CACHE_BYTES = 2 * 1024**3


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what makes a tokenizer's ids: a fast tokenizer's whole serialised pipeline (vocabulary, merges,
    normaliser, templates), else its vocabulary, with its class and padding/truncation sides."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return strings_digest([type(tokenizer).__name__, body, str(getattr(tokenizer, "padding_side", "")),
                           str(getattr(tokenizer, "truncation_side", ""))])


def encoding_parts(encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any], texts: Sequence[str],
                   inputs: Sequence[Optional[torch.Tensor]], batch_size: int) -> dict[str, Any]:
    """The key parts of frozen encoders' outputs for `texts`: each encoder's weights, each tokenizer, the texts,
    the exact inputs (token ids, masks), and how they ran (batch size, device type, autocast), since a kernel
    choice changes the last bits."""
    device = next(encoders[0].parameters()).device
    autocast = torch.is_autocast_enabled(device.type)
    return {
        "encoders": [module_fingerprint(e) for e in encoders],
        "tokenizers": [tokenizer_fingerprint(t) for t in tokenizers],
        "texts": strings_digest(texts), "count": len(texts),
        "inputs": [None if t is None else tensor_digest(t) for t in inputs],
        "batch_size": batch_size, "device": device.type,
        "autocast": str(torch.get_autocast_dtype(device.type)) if autocast else None,
    }


def disk_text_cache(kind: str, parts: dict[str, Any], count: int, batch_size: int,
                    encode: Callable[[slice], dict[str, torch.Tensor]], estimate_bytes: int) -> TensorStore:
    """The frozen encoders' outputs for `count` texts from the disk cache: built once (`encode(rows)` -> named float
    tensors of those rows, batch_size rows at a time, written as they come), reused while `parts` match."""
    def build(writer: TensorWriter) -> None:
        for start in range(0, count, batch_size):
            outputs = encode(slice(start, start + batch_size))
            for name, values in outputs.items():
                if start == 0:
                    writer.create(name, (count, *values.shape[1:]), torch.float32)
                writer.write(name, start, values.float())

    return cached_store(kind, parts, build, estimate_bytes=estimate_bytes,
                        what=f"frozen text-encoder outputs of {count} distinct captions")


def cached_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`table[ids]` on ids' device; a disk cache's table stays memory-mapped on the CPU, so only the rows move."""
    if table.device == ids.device:
        return table[ids]
    return table[ids.to(table.device)].to(ids.device)


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
    def precompute(self, batch_size: int = 256, disk: bool = False) -> None:
        """Encode every distinct caption once (frozen encoders only): into RAM while under MAX_CACHE_BYTES, or with
        `disk` into the memory-mapped disk cache (any size; reused by later runs with the same encoder, tokenizer
        and captions)."""
        if self.trainable:
            return
        size = len(self.vocab) * self.token_ids.shape[1] * text_hidden_size(self.text_encoder) * 4
        if disk:
            parts = encoding_parts([self.text_encoder], [self.tokenizer], self.vocab, [self.token_ids, self.mask],
                                   batch_size)
            parts["max_length"] = self.max_length
            store = disk_text_cache("text-states", parts, len(self.vocab), batch_size,
                                    lambda rows: {"states": self._encode(rows)}, size)
            self.cache = store["states"]
            logger.info("frozen text-encoder states of %d distinct captions memory-mapped from %s (%.1f GiB)",
                        len(self.vocab), store.folder, size / 2**30)
            return
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
            return cached_rows(self.cache, caption_ids)
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
