"""Fine-tuning an SDXL base (`model.pretrained` a StableDiffusionXLPipeline folder or hub id): the whole UNet or
LoRA adapters on it and optionally on both text encoders, on captioned data or DreamBooth instance images with
prior preservation (class images from the SDXL base). What differs from Stable Diffusion 1.x/2.x is the text side
(two encoders, penultimate states concatenated, the pooled embedding) and the six size/crop ids of every image,
computed from its real size and crop; the export is a StableDiffusionXLPipeline folder or SDXL LoRA weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from difftrain.data.batches import MicroBatch
from difftrain.data.transforms import covering_size
from difftrain.diffusion.objective import Network, Objective
from difftrain.families.base import Batch, Models, RunSummary
from difftrain.families.export_latent import export_lora, export_stable_diffusion_xl, write_latent_model_card
from difftrain.families.stable_diffusion import StableDiffusionFamily
from difftrain.models.backbone import TextTimeCondition
from difftrain.models.pretrained import (SDXL_COMPONENTS, check_base_pipeline, is_sdxl_base,
                                         stable_diffusion_pipeline_class)
from difftrain.models.sdxl_text import (DualTextConditioner, load_sdxl_text_encoders, sdxl_time_ids,
                                        zeros_for_empty_prompt)
from difftrain.sampling.generate import ImageSampler

logger = logging.getLogger(__name__)


class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "stable-diffusion-xl"

    @classmethod
    def handles(cls, cfg) -> bool:
        return cfg.model.pretrained is not None and is_sdxl_base(cfg.model.pretrained)

    def check_files(self) -> None:
        check_base_pipeline(self.cfg.model.pretrained, components=SDXL_COMPONENTS, kind="an SDXL pipeline")
        super(StableDiffusionFamily, self).check_files()  # the instance folder; the SD 1.x layout check is not ours

    # -- planning ------------------------------------------------------------------------------------------------

    def text_components(self, vocab: list[str]) -> tuple[Any, torch.nn.Module, bool, int]:
        """The first tokenizer and encoder take the text family's place; the second pair is kept here."""
        tokenizers, encoders = load_sdxl_text_encoders(self.cfg.model.pretrained)
        self.tokenizer_2, self.text_encoder_2 = tokenizers[1], encoders[1]
        trainable = bool(self.cfg.text_encoder.train) or (self.lora and self.cfg.lora.train_text_encoder)
        return tokenizers[0], encoders[0], trainable, int(tokenizers[0].model_max_length)

    # -- models --------------------------------------------------------------------------------------------------

    def text_encoder_models(self, network: torch.nn.Module) -> Models:
        """Both encoders, trained (adapters, or fully with text_encoder.train) or frozen, the second after the
        first in `trained` / `frozen`."""
        models = super().text_encoder_models(network)
        self.add_text_encoder(models, self.text_encoder_2)
        return models

    def text_conditioner(self, trained: list[torch.nn.Module], accelerator: Any) -> DualTextConditioner:
        # trained = [text_encoder, text_encoder_2] when the encoders train (build order), else both are frozen.
        if self.text.trainable:
            self.text_encoder_2 = trained[1]
        self.exported_text_encoder_2 = accelerator.unwrap_model(self.text_encoder_2)
        return DualTextConditioner([self.text.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2],
                                   self.text.vocab, self.text.trainable, zero_empty=zeros_for_empty_prompt(self.base))

    # -- the step ------------------------------------------------------------------------------------------------

    def batch(self, micro: MicroBatch, generator: torch.Generator, device: torch.device) -> Batch:
        """Latents as every latent family draws them, the caption condition, and each image's size/crop ids."""
        x0, mask, flipped = self.latents.draw_with_mask(micro, generator)  # flips and latent noise first
        return Batch(x0, (self.condition(micro, generator, device), self.time_ids(micro, flipped, device)), mask)

    def time_ids(self, micro: MicroBatch, flipped: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """SDXL's ids from each image's recorded original size and crop; the image as trained (its bucket) is the
        target size. A flipped image's crop is mirrored: its left edge is measured from the other side."""
        height, width = (int(side) for side in micro.images.shape[-2:])
        crops, original = micro.crops_top_left, micro.original_sizes
        if flipped is not None and crops is not None and original is not None and self.cfg.data.center_crop:
            crops = crops.clone()
            for i in flipped.nonzero().flatten().tolist():
                resized_width = covering_size((int(original[i, 1]), int(original[i, 0])), width, height)[0]
                crops[i, 1] = resized_width - crops[i, 1] - width
        return sdxl_time_ids(original, crops, (height, width), micro.images.shape[0], device)

    def network(self, condition: Any) -> Network:
        captions, time_ids = condition
        states, pooled = self.conditioner(captions)
        module, call = self.unet, self.call
        text = TextTimeCondition(states, pooled, time_ids)
        return lambda x, t: call(module, x, t, text)

    # -- sampling and export -------------------------------------------------------------------------------------

    def sampler(self, network: torch.nn.Module) -> ImageSampler:
        sampler = super().sampler(network)
        sampler.tokenizer_2, sampler.text_encoder_2 = self.tokenizer_2, self.text_encoder_2
        return sampler

    def export(self, network: torch.nn.Module, objective: Objective, output_dir: Path) -> None:
        if not self.lora:
            encoders = [self.exported_text_encoder, self.exported_text_encoder_2]
            export_stable_diffusion_xl(network, self.export_vae(), encoders, [self.text.tokenizer, self.tokenizer_2],
                                       objective.inference_scheduler(self.cfg.sample.scheduler), output_dir)
            return
        encoders = {}
        if self.cfg.lora.train_text_encoder:
            encoders = {"text_encoder": self.exported_text_encoder, "text_encoder_2": self.exported_text_encoder_2}
        paths = export_lora(network, encoders, self.cfg, self.base, output_dir,
                            pipeline_class=stable_diffusion_pipeline_class(xl=True))
        logger.info("LoRA weights: %s (load with StableDiffusionXLPipeline's pipe.load_lora_weights(%r))",
                    ", ".join(map(str, paths.values())), str(output_dir))

    def write_model_card(self, summary: RunSummary, objective: Objective, output_dir: Path) -> None:
        write_latent_model_card(self.cfg, summary, output_dir, self.base, objective.describe(),
                                pipeline="StableDiffusionXLPipeline")
