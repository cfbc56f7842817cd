"""What a training step does to a caption before tokenizing it: draw one of the image's captions, drop and shuffle
its comma-separated tags (keeping the first `keep_tokens` in place), and put a prefix (trigger word) first.

The changes are a pure function of the caption and a `random.Random`; the text family seeds that from the step's
generator, so the captions a step sees depend only on (seed, step, micro-batch) and resume is exact. Caption dropout
to the empty prompt (train.condition_dropout) stays the family's, as for class labels.

Several captions of one image travel as one string joined by CHOICE_SEPARATOR (a newline, which no single caption
keeps: data/captions.py collapses the whitespace inside each), so the data set and the disk cache keep one string
per image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

CHOICE_SEPARATOR = "\n"


def caption_choices(caption: str) -> list[str]:
    """The captions of one image (one string per caption)."""
    return [c for c in caption.split(CHOICE_SEPARATOR) if c]


@dataclass(frozen=True)
class CaptionRecipe:
    prefix: Optional[str] = None
    """Put first in every caption; never shuffled or dropped."""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    """Tags at the start of the caption (after the prefix) that shuffling and tag dropout leave alone."""
    tag_dropout: float = 0.0
    separator: str = ","

    @classmethod
    def from_config(cls, data_cfg) -> "CaptionRecipe":
        return cls(prefix=data_cfg.caption_prefix or None, shuffle_tags=data_cfg.shuffle_tags,
                   keep_tokens=data_cfg.keep_tokens, tag_dropout=data_cfg.tag_dropout,
                   separator=data_cfg.tag_separator)

    @property
    def draws(self) -> bool:
        """Whether the caption of an image changes from step to step (tags shuffled or dropped), so the step
        needs random draws; several captions per image make it change as well (see `varies`)."""
        return self.shuffle_tags or self.tag_dropout > 0

    def varies(self, captions: Sequence[str]) -> bool:
        """Whether a step can see a caption other than `fixed(caption)` for some image."""
        return self.draws or any(CHOICE_SEPARATOR in c for c in captions)

    def split(self, caption: str) -> list[str]:
        return [t.strip() for t in caption.split(self.separator) if t.strip()]

    def join(self, tags: Sequence[str]) -> str:
        return f"{self.separator} ".join(tags) if self.separator.strip() else self.separator.join(tags)

    def with_prefix(self, caption: str) -> str:
        if not self.prefix:
            return caption
        return self.join([self.prefix, caption]) if caption else self.prefix

    def fixed(self, caption: str) -> str:
        """The caption as every step sees it when nothing is drawn: its first choice, after the prefix. Sampling
        and evaluation prompts built like training captions get the same prefix."""
        choices = caption_choices(caption)
        return self.with_prefix(choices[0] if choices else "")

    def apply(self, caption: str, rng: random.Random) -> str:
        """One step's version of `caption` (which may hold several choices)."""
        choices = caption_choices(caption)
        if not choices:
            return self.with_prefix("")
        chosen = choices[rng.randrange(len(choices))] if len(choices) > 1 else choices[0]
        if not self.draws:
            return self.with_prefix(chosen)
        tags = self.split(chosen)
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens:]
        if self.tag_dropout > 0:
            rest = [t for t in rest if rng.random() >= self.tag_dropout]
        if self.shuffle_tags:
            rng.shuffle(rest)
        return self.with_prefix(self.join(kept + rest))

    def vocabulary_texts(self, captions: Sequence[str]) -> list[str]:
        """Every caption choice and the prefix: the words a tokenizer built from the captions must know."""
        texts = [choice for caption in captions for choice in caption_choices(caption)]
        return texts + ([self.prefix] if self.prefix else [])


def step_captions(recipe: CaptionRecipe, captions: Sequence[str], rows: Sequence[int],
                  generator: torch.Generator) -> list[str]:
    """The captions of data set `rows` in one micro-batch: one seed per row from the step's `generator` (on its
    device), so they depend only on what the generator is keyed by (seed, step, micro-batch slot)."""
    seeds = torch.randint(0, 2**31 - 1, (len(rows),), generator=generator, device=generator.device).tolist()
    return [recipe.apply(captions[row], random.Random(seed)) for row, seed in zip(rows, seeds)]
