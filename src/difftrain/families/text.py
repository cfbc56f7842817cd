"""Text-conditioned pixel-space model from scratch (diffusers UNet2DConditionModel, or PixArtTransformer2DModel with
model.backbone = dit, with cross-attention on a transformers text encoder, pretrained or built from the captions),
exported as difftrain's TextToImagePipeline. PixArt sees the tokenizer's attention mask as diffusers' PixArt
pipelines feed it; the UNet sees every token, as Stable Diffusion.

Its text machinery (captions as ids into a vocabulary, caption dropout to the empty prompt, the encoder
trained or frozen) is shared by the latent families, which subclass it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from difftrain.config import RunConfig
from difftrain.data.batches import MicroBatch
from difftrain.data.caption_recipe import CaptionRecipe, step_captions
from difftrain.diffusion.objective import Network, Objective
from difftrain.families.base import Models, PreviewLayout, RunSummary
from difftrain.families.export import save_pipeline_atomically, write_model_card
from difftrain.families.unconditional import UnconditionalPixelFamily
from difftrain.models.backbone import Conditioning, component_name, takes_text_mask
from difftrain.models.conditioning import TextConditioner, caption_vocabulary, drop_caption_texts, drop_captions
from difftrain.models.text import (build_caption_tokenizer, build_scratch_text_encoder, load_pretrained_text_encoder,
                                   text_hidden_size)
from difftrain.models.unet import COND_UNET_PRESETS
from difftrain.pipeline import TextToImagePipeline
from difftrain.sampling.generate import ImageSampler

logger = logging.getLogger(__name__)


@dataclass
class TextSetup:
    """Text conditioning of a run: the encoder, its tokenizer and the captions as ids."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    trainable: bool
    vocab: list[str]
    """Distinct captions; the last entry is the empty prompt."""
    caption_ids: torch.Tensor
    """(N,) index into vocab per image."""
    max_length: int = 77
    """Tokens per prompt."""


class TextPixelFamily(UnconditionalPixelFamily):
    name = "pixel-text"
    streams = False  # its caption vocabulary is built from every caption before training
    presets = COND_UNET_PRESETS
    dit_takes_any_shape = True  # PixArt: patches of any grid

    @classmethod
    def handles(cls, cfg: RunConfig) -> bool:
        return cfg.model.conditioning == "text" and cfg.model.space == "pixel" and cfg.model.pretrained is None

    def data_wants(self) -> tuple[bool, bool]:
        # Text runs captioned from labels keep the labels: evaluation scores samples per class.
        return self.cfg.data.caption_template is not None, True

    # -- planning ------------------------------------------------------------------------------------------------

    def text_components(self, vocab: list[str]) -> tuple[Any, torch.nn.Module, bool, int]:
        """(tokenizer, encoder, trained?, tokens per prompt): a pretrained encoder, or one built from `vocab`."""
        te = self.cfg.text_encoder
        if te.pretrained is not None:
            tokenizer, encoder = load_pretrained_text_encoder(te.pretrained)
            return tokenizer, encoder, bool(te.train), te.max_length
        tokenizer = build_caption_tokenizer(vocab, te.max_length)
        torch.manual_seed(self.cfg.train.seed)  # a from-scratch encoder starts from the run seed
        return tokenizer, build_scratch_text_encoder(tokenizer, te), True, te.max_length

    def plan(self) -> None:
        captions = self.dataset.captions
        self.recipe = CaptionRecipe.from_config(self.cfg.data)
        # Captions that never change (the common case) are ids into the distinct captions, each tokenized once;
        # ones that do (several per image, shuffled or dropped tags) are made and tokenized per step.
        self.captions_vary = self.recipe.varies(captions)
        vocab, ids = caption_vocabulary([self.recipe.fixed(c) for c in captions])
        words = vocab + self.recipe.vocabulary_texts(captions) if self.captions_vary else vocab
        tokenizer, encoder, trainable, max_length = self.text_components(words)
        tokenizer.model_max_length = max_length  # sampling must use the length the UNet was trained on
        self.text = TextSetup(tokenizer, encoder, trainable, vocab, ids, max_length)
        super().plan()

    def conditioning(self) -> Conditioning:
        return Conditioning("text", text_dim=text_hidden_size(self.text.text_encoder))

    def network_spec(self):
        spec = super().network_spec()
        spec.text_length = self.text.max_length
        return spec

    # -- models --------------------------------------------------------------------------------------------------

    def text_encoder_models(self, network: torch.nn.Module) -> Models:
        """`network` with the text encoder: trained (own learning rate) or frozen."""
        models = Models(network)
        self.add_text_encoder(models, self.text.text_encoder)
        return models

    def add_text_encoder(self, models: Models, encoder: torch.nn.Module) -> None:
        """Add `encoder` to `models`: trained (its adapters, or all of it, at text_encoder.learning_rate) or frozen."""
        adapters = self.text_adapters_wanted()
        encoder.requires_grad_(self.text.trainable and not adapters)
        if adapters:
            self.add_text_adapters(encoder)
        if self.text.trainable:
            encoder.train()
            models.trained.append((encoder, self.cfg.text_encoder.learning_rate))
        else:
            encoder.eval()
            models.frozen.append(encoder)

    def text_adapters_wanted(self) -> bool:
        """Train adapters on the encoder instead of the encoder itself (LoRA fine-tuning); not here."""
        return False

    def add_text_adapters(self, encoder: torch.nn.Module) -> None:
        raise NotImplementedError(f"the {self.name} family trains no text-encoder adapters")

    def build_models(self, mixed_precision: str) -> Models:
        return self.text_encoder_models(super().build_models(mixed_precision).network)

    def use_prepared(self, network: torch.nn.Module, trained: list[torch.nn.Module], accelerator: Any) -> None:
        super().use_prepared(network, trained, accelerator)
        # A trained encoder is prepared (checkpointed, synchronised); a frozen one was only moved to the device.
        self.text_encoder = trained[0] if self.text.trainable else self.text.text_encoder
        self.exported_text_encoder = accelerator.unwrap_model(self.text_encoder)
        self.conditioner = self.text_conditioner(trained, accelerator).to(accelerator.device)
        if not self.captions_vary:  # varying captions are encoded in the step, never from the cache
            self.conditioner.precompute(disk=self.cfg.text_encoder.cache_to_disk)
        elif self.cfg.text_encoder.cache_to_disk:
            logger.warning("text_encoder.cache_to_disk: images with several captions make the captions vary per "
                           "step, so they are encoded in the step and nothing is cached")

    def text_conditioner(self, trained: list[torch.nn.Module], accelerator: Any) -> Any:
        """What turns a batch's captions into the network's text input (`self.text_encoder` is set)."""
        return TextConditioner(self.text.tokenizer, self.text_encoder, self.text.vocab, self.text.max_length,
                               self.text.trainable, with_mask=takes_text_mask(self.network_plan.cls))

    # -- the step ------------------------------------------------------------------------------------------------

    def condition(self, micro: MicroBatch, generator: torch.Generator, device: torch.device) -> Any:
        """Caption ids (B,), or with captions that vary per step the step's caption texts; both after caption
        dropout to the empty prompt."""
        if not self.captions_vary:
            return drop_captions(self.text.caption_ids[micro.rows].to(device), self.conditioner.null_index,
                                 self.cfg.train.condition_dropout, generator)
        texts = step_captions(self.recipe, self.dataset.captions, micro.rows.tolist(), generator)
        return drop_caption_texts(texts, self.cfg.train.condition_dropout, generator)

    def network(self, condition: Any) -> Network:
        module, call, text = self.unet, self.call, self.conditioner(condition)  # states, or (states, mask)
        return lambda x, t: call(module, x, t, text)

    # -- sampling and export -------------------------------------------------------------------------------------

    def sampler(self, network: torch.nn.Module) -> ImageSampler:
        return ImageSampler(network, self.text.tokenizer, self.text_encoder)

    def preview_conditions(self) -> PreviewLayout:
        s = self.cfg.sample
        names = list(s.prompts) or self.text.vocab[:-1][:10]
        prompts = [p for p in names for _ in range(s.images_per_class)]
        return PreviewLayout(count=len(prompts), per_row=s.images_per_class, prompts=prompts, row_names=names)

    def evaluation_conditions(self, class_names: Sequence[str], num_samples: int,
                              captions: Optional[Sequence[str]] = None,
                              ) -> tuple[Optional[list[int]], Optional[list[str]]]:
        """Runs captioned from labels get each label's caption; DreamBooth runs the instance prompt; other text
        runs (free captions) `sample.prompts`, else the training captions, round-robin, with no labels to score."""
        d = self.cfg.data
        template = d.caption_template
        if not (template and "{label}" in template and class_names):
            if captions is None:
                captions = [c for c in self.text.vocab if c] if hasattr(self, "text") else ()
            fixed = [d.instance_prompt] if d.instance_dir and d.instance_prompt else list(self.cfg.sample.prompts or captions)
            if not fixed:
                raise ValueError("this text model has no per-class captions (data.caption_template with {label}), "
                                 "no instance prompt and no sample.prompts: set sample.prompts to evaluate it")
            return None, [fixed[i % len(fixed)] for i in range(num_samples)]
        labels = [i % len(class_names) for i in range(num_samples)]
        recipe = CaptionRecipe.from_config(d)  # the prefix the training captions had
        return labels, [recipe.fixed(template.format(label=class_names[k])) for k in labels]

    def export(self, network: torch.nn.Module, objective: Objective, output_dir: Path) -> None:
        pipe = TextToImagePipeline(scheduler=objective.inference_scheduler(self.cfg.sample.scheduler),
                                   text_encoder=self.exported_text_encoder, tokenizer=self.text.tokenizer,
                                   **{component_name(network): network})
        save_pipeline_atomically(pipe, output_dir)

    def write_model_card(self, summary: RunSummary, objective: Objective, output_dir: Path) -> None:
        write_model_card(self.cfg, summary, self.dataset.class_names, objective.describe(), output_dir)
