"""Text encoders for text-to-image models: pretrained transformers models, or a small CLIP-style
transformer with a word-level tokenizer built from the training captions (no downloads at all).

`encode_prompts` is the one place prompts become UNet cross-attention states, for training and sampling.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from difftrain.config import TextEncoderConfig

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def build_caption_tokenizer(captions: Sequence[str], max_length: int, max_vocab: int = 30000) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the captions' words (lower-cased; punctuation split off).

    The vocabulary is ordered by (-count, word), so the same captions always give the same ids.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    counts = Counter(word for caption in captions for word in _words(caption))
    specials = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")]
    vocab = {token: i for i, token in enumerate(specials)}
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: max_vocab - len(specials)]:
        vocab[word] = len(vocab)
    core = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, model_max_length=max_length, pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"], bos_token=bos, eos_token=eos,
    )


def build_scratch_text_encoder(tokenizer: PreTrainedTokenizerFast, cfg: TextEncoderConfig) -> CLIPTextModel:
    """A small randomly initialised CLIP text transformer sized by `cfg` (causal attention, as CLIP)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def _subfolder(path: str, name: str) -> dict:
    """Pipelines keep the encoder in text_encoder/ and the tokenizer in tokenizer/."""
    local = Path(path).expanduser()
    return {"subfolder": name} if (local / name).is_dir() else {}


def load_pretrained_text_encoder(path: str, pipeline: bool = False, key: str = "text_encoder.pretrained",
                                  ) -> tuple[PreTrainedTokenizerFast, torch.nn.Module]:
    """Tokenizer and text model from a hub id or local dir (a model folder or a pipeline folder).

    `pipeline` reads the tokenizer/ and text_encoder/ subfolders (needed for hub pipelines, whose
    layout cannot be looked at before downloading); `key` names the config key in errors.

    CLIP checkpoints load as CLIPTextModel (the text tower only), T5 as T5EncoderModel, others via AutoModel.
    Remote code is never executed.
    """
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise FileNotFoundError(f"{key} = {path!r}: no such directory")
    def sub(name: str) -> dict:
        return {"subfolder": name} if pipeline else _subfolder(path, name)

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if looks_local else path, trust_remote_code=False,
                                                  **sub("tokenizer"))
        config = AutoConfig.from_pretrained(str(local) if looks_local else path, trust_remote_code=False,
                                            **sub("text_encoder"))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"{key} = {path!r}: could not load a tokenizer and text model config ({exc}). "
            "Give a hub id (needs internet) or a local folder saved with save_pretrained."
        ) from exc
    kwargs = dict(trust_remote_code=False, **sub("text_encoder"))
    source = str(local) if looks_local else path
    if config.model_type in ("clip", "clip_text_model"):
        model = CLIPTextModel.from_pretrained(source, **kwargs)
    elif config.model_type in ("t5", "umt5", "mt5"):
        from transformers import T5EncoderModel

        model = T5EncoderModel.from_pretrained(source, **kwargs)
    else:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(source, **kwargs)
    return tokenizer, model


def text_hidden_size(model: torch.nn.Module) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))


def tokenize(tokenizer, prompts: Sequence[str], max_length: int, warn: bool = True) -> torch.Tensor:
    """Token ids (B, max_length), padded; prompts longer than max_length are truncated with a warning."""
    return tokenize_with_mask(tokenizer, prompts, max_length, warn)[0]


def tokenize_with_mask(tokenizer, prompts: Sequence[str], max_length: int, warn: bool = True,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (1 on tokens, 0 on padding), both (B, max_length), padded as `tokenize`."""
    if warn:
        for prompt in set(prompts):
            length = len(tokenizer(prompt, truncation=False)["input_ids"])
            if length > max_length:
                logger.warning("prompt %r has %d tokens; truncated to text_encoder.max_length = %d",
                               prompt, length, max_length)
    batch = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def encode_prompts(tokenizer, text_encoder: torch.nn.Module, prompts: Sequence[str], max_length: int,
                   device: torch.device | str | None = None, warn: bool = True, with_mask: bool = False,
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention states (B, max_length, hidden) for `prompts` (no attention mask, as Stable Diffusion), or
    with `with_mask` (states, attention mask) with the mask given to the encoder too (as diffusers' PixArt
    pipelines encode prompts)."""
    device = device if device is not None else next(text_encoder.parameters()).device
    ids, mask = tokenize_with_mask(tokenizer, prompts, max_length, warn=warn)
    ids, mask = ids.to(device), mask.to(device)
    if not with_mask:
        return text_encoder(ids)[0]
    return text_encoder(ids, attention_mask=mask)[0], mask
