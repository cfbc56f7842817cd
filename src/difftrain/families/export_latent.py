"""Exports of latent runs: a StableDiffusionPipeline folder (from scratch or fully fine-tuned), or LoRA
weights that `pipe.load_lora_weights(output_dir)` reads, optionally merged into a full pipeline."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Optional

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from difftrain.config import RunConfig
from difftrain.models.lora import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, WEIGHT_NAMES, save_lora_weights
from difftrain.models.pretrained import load_base_pipeline, stable_diffusion_pipeline_class
from difftrain.pipeline import ADAPTER_BASE_FILE
from difftrain.families.base import RunSummary
from difftrain.families.export import card_front_matter, card_loss_and_grid, pipeline_modules, save_pipeline_atomically
from difftrain.writes import atomic_write_text, save_folder_atomically, state_bytes

logger = logging.getLogger(__name__)


def export_stable_diffusion(unet, vae, text_encoder, tokenizer, scheduler: SchedulerMixin, output_dir: Path) -> None:
    """A folder that plain `StableDiffusionPipeline.from_pretrained(output_dir)` loads (safety checker off)."""
    pipe = stable_diffusion_pipeline_class()(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    save_pipeline_atomically(pipe, output_dir)


def export_stable_diffusion_xl(unet, vae, text_encoders: list, tokenizers: list, scheduler: SchedulerMixin,
                               output_dir: Path) -> None:
    """A folder that plain `StableDiffusionXLPipeline.from_pretrained(output_dir)` loads."""
    pipe = stable_diffusion_pipeline_class(xl=True)(
        vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=scheduler,
    )
    save_pipeline_atomically(pipe, output_dir)


def export_pixart(transformer, vae, text_encoder, tokenizer, scheduler: SchedulerMixin, output_dir: Path) -> None:
    """A folder that plain `PixArtSigmaPipeline.from_pretrained(output_dir)` loads: the pipeline records the
    component classes it was given (difftrain's CLIP-style encoder and tokenizer), not its T5 annotations."""
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    save_pipeline_atomically(pipe, output_dir)


def pixart_call(prompt: str, max_length: int) -> str:
    """The PixArtSigmaPipeline call that samples as difftrain trained: prompts of the trained token count, no
    aspect-ratio bins (the transformer is square at one size) and no caption cleaning (it needs bs4 and ftfy)."""
    return (f"pipe(\"{prompt}\", max_sequence_length={max_length}, use_resolution_binning=False, "
            "clean_caption=False)")


def export_formats(cfg: RunConfig) -> tuple[str, ...]:
    """The LoRA file formats lora.export_format asks for."""
    return ("diffusers", "kohya") if cfg.lora.export_format == "both" else (cfg.lora.export_format,)


def export_lora(unet, text_encoders: Mapping[str, Optional[torch.nn.Module]], cfg: RunConfig, base: str,
                output_dir: Path, pipeline_class: Optional[type] = None) -> dict[str, Path]:
    """The LoRA files of lora.export_format (models/lora.save_lora_weights) + adapter_base.json; with
    lora.export_merged, OUTPUT_DIR/merged too. `text_encoders`: {"text_encoder": ..., "text_encoder_2": ...} (None
    for an encoder without adapters); `pipeline_class`: StableDiffusionPipeline unless given (SDXL passes its own)."""
    pipeline_class = pipeline_class or stable_diffusion_pipeline_class()
    paths = save_lora_weights(output_dir, unet, text_encoders, pipeline_class=pipeline_class,
                              formats=export_formats(cfg))
    atomic_write_text(output_dir / ADAPTER_BASE_FILE, json.dumps({"base_model": base}, indent=2) + "\n",
                      "the LoRA base-model note")
    if cfg.lora.export_merged:
        merged = output_dir / "merged"
        pipe = load_base_pipeline(base)
        weight_name = next(iter(WEIGHT_NAMES[f] for f in paths))
        pipe.load_lora_weights(str(output_dir), weight_name=weight_name)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        save_folder_atomically(merged, output_dir / ".merged-tmp", "the merged pipeline",
                               state_bytes(pipeline_modules(pipe)),
                               lambda tmp: pipe.save_pretrained(str(tmp), safe_serialization=True))
        logger.info("merged pipeline: %s", merged)
    return paths


def write_latent_model_card(cfg: RunConfig, summary: RunSummary, output_dir: Path, base: Optional[str],
                            objective: str, pipeline: str = "StableDiffusionPipeline") -> None:
    """OUTPUT_DIR/README.md of a latent text-to-image run (from scratch, fine-tuned or LoRA); `objective` is the
    objective's `describe()`, `pipeline` the diffusers class that loads the export (or the LoRA's base)."""
    m = cfg.model
    prompt = (cfg.sample.prompts[0] if cfg.sample.prompts else cfg.data.instance_prompt) or "a photo of a flower"
    if m.finetune == "lora" and base:
        what = f"{'DoRA' if cfg.lora.use_dora else 'LoRA'} adapters (rank {cfg.lora.rank}) for `{base}`"
        load = (
            f"```python\nfrom diffusers import {pipeline}\n\n"
            f"pipe = {pipeline}.from_pretrained(\"{base}\")\n"
            f"pipe.load_lora_weights(\"{output_dir}\")  # reads {LORA_WEIGHTS_NAME}\n"
            f"image = pipe(\"{prompt}\").images[0]\n```"
        )
        formats = export_formats(cfg)
        if "diffusers" not in formats:
            load = load.replace(f"\")  # reads {LORA_WEIGHTS_NAME}", f"\", weight_name=\"{KOHYA_WEIGHTS_NAME}\")")
        elif "kohya" in formats:  # both files: the second loading snippet
            load += ("\n\nThe same adapters with kohya's keys, for diffusers:\n\n```python\n"
                     f"pipe.load_lora_weights(\"{output_dir}\", weight_name=\"{KOHYA_WEIGHTS_NAME}\")\n```")
        if "kohya" in formats:
            te_keys = "`lora_te1_...`, `lora_te2_...`" if "XL" in pipeline else "`lora_te_...`"
            load += (f"\n\n`{KOHYA_WEIGHTS_NAME}` holds the adapters with kohya's keys (`lora_unet_...`, "
                     f"{te_keys}), for AUTOMATIC1111, ComfyUI and kohya's scripts.")
        if cfg.lora.export_merged:
            load += f"\n\nA copy with the adapters merged in: `{pipeline}.from_pretrained(\"{output_dir}/merged\")`."
    elif m.backbone == "dit":
        what = (f"A latent text-to-image model (PixArt transformer, {summary.num_parameters / 1e6:.2f}M parameters), "
                "trained from scratch (VAE, text encoder and transformer)")
        load = (
            "```python\nfrom diffusers import PixArtSigmaPipeline\n\n"
            f"pipe = PixArtSigmaPipeline.from_pretrained(\"{output_dir}\")\n"
            f"image = {pixart_call(prompt, cfg.text_encoder.max_length)}.images[0]\n```\n\n"
            "The text encoder is difftrain's (a CLIP-style transformer and its tokenizer, not PixArt's T5), which "
            "PixArtSigmaPipeline loads as saved; the transformer was trained on the tokenizer's attention mask, as "
            f"the pipeline passes it. `difftrain sample {output_dir} --prompt \"{prompt}\"` samples it too."
        )
    else:
        origin = f"fine-tuned from `{base}`" if base else "trained from scratch (VAE, text encoder and UNet)"
        what = f"A latent text-to-image model ({summary.num_parameters / 1e6:.2f}M UNet parameters), {origin}"
        load = (
            f"```python\nfrom diffusers import {pipeline}\n\n"
            f"pipe = {pipeline}.from_pretrained(\"{output_dir}\")\n"
            f"image = pipe(\"{prompt}\").images[0]\n```"
        )
    dreambooth = ""
    if cfg.data.instance_dir:
        dreambooth = (f"\n- DreamBooth: instance prompt {cfg.data.instance_prompt!r} on {cfg.data.instance_dir}"
                      + (f"; prior preservation with {cfg.data.num_class_images} class images of "
                         f"{cfg.data.class_prompt!r}, weight {cfg.train.prior_loss_weight:g}"
                         if cfg.train.prior_preservation else ""))
    loss, grid = card_loss_and_grid(summary)
    kind_tag = "lora" if m.finetune == "lora" else ("pixart" if m.backbone == "dit" else
                                                    "stable-diffusion-xl" if "XL" in pipeline else "stable-diffusion")
    front = card_front_matter(["difftrain", "text-to-image", kind_tag], "text-to-image", base or "")
    text = f"""{front}
# {Path(cfg.output_dir).name}

{what}, trained with [difftrain](https://github.com/difftrain/difftrain).
{grid}
## Training
- Data: {summary.data_description}: {summary.num_images} images at {cfg.data.resolution} px{f'; {summary.num_skipped} file(s) skipped (unreadable, too large, dangling links or without a caption; named in train.log)' if summary.num_skipped else ''}{dreambooth}
- Steps: {summary.steps} optimizer steps, {summary.images_seen} images seen ({summary.epochs:.1f} epochs), batch {cfg.train.batch_size}
- Objective: {objective}
- Optimizer: AdamW, learning rate {cfg.train.learning_rate:g} ({cfg.train.lr_scheduler}), mixed precision {cfg.train.mixed_precision}
- Validation prompts: {', '.join(repr(p) for p in cfg.sample.prompts) or 'the training captions'}
- Final training loss: {loss}; training time: {summary.train_seconds / 60:.1f} min
- Full configuration: `config.yaml`; TensorBoard logs: `logs/`; sample grids: `samples/`

## How to load
{load}
"""
    atomic_write_text(output_dir / "README.md", text, "the model card")


def write_dit_model_card(cfg: RunConfig, summary: RunSummary, class_names: list[str], objective: str,
                         output_dir: Path) -> None:
    """OUTPUT_DIR/README.md of a latent class-conditional or unconditional DiT (a DiTPipeline folder)."""
    s = cfg.sample
    if class_names:
        kind = "class-conditional"
        shown = list(range(min(3, len(class_names))))
        load = (
            "```python\nfrom diffusers import DiTPipeline\n\n"
            f"pipe = DiTPipeline.from_pretrained(\"{output_dir}\")\n"
            f"images = pipe(class_labels={shown}, num_inference_steps={s.num_inference_steps}, "
            f"guidance_scale={s.guidance_scale:g}).images\n"
            f"labels = pipe.get_label_ids([{class_names[0]!r}])  # class names -> labels (pipe.labels lists them)\n```\n\n"
            f"Labels are 0..{len(class_names) - 1}; the unconditional class of classifier-free guidance is "
            "DiTPipeline's class 1000 (guidance is on when guidance_scale > 1)."
        )
        classes = f"\n- Classes ({len(class_names)}): {', '.join(class_names)}"
    else:
        kind = "unconditional"
        load = (
            "```python\nfrom diffusers import DiTPipeline\n\n"
            f"pipe = DiTPipeline.from_pretrained(\"{output_dir}\")\n"
            f"images = pipe(class_labels=[0] * 4, guidance_scale=1.0, num_inference_steps={s.num_inference_steps}).images\n"
            "```\n\n"
            "DiTPipeline is made for class-conditional models: this unconditional DiT has a single class, 0, and no "
            "unconditional class, so pass class 0 once per image and guidance_scale=1.0 (the pipeline's default 4.0 "
            "would ask for class 1000, which this model does not have)."
        )
        classes = ""
    vae = f"pretrained `{cfg.vae.pretrained}`" if cfg.vae.pretrained else "trained from scratch on the same data first"
    loss, grid = card_loss_and_grid(summary)
    front = card_front_matter(["difftrain", "dit"], "unconditional-image-generation")
    text = f"""{front}
# {Path(cfg.output_dir).name}

A {kind} latent diffusion transformer (diffusers `DiTTransformer2DModel`, {summary.num_parameters / 1e6:.2f}M parameters)
on the latents of an `AutoencoderKL` ({vae}), trained from scratch with [difftrain](https://github.com/difftrain/difftrain).
{grid}
## Training
- Data: {summary.data_description}: {summary.num_images} images at {cfg.data.resolution} px{f'; {summary.num_skipped} file(s) skipped (named in train.log)' if summary.num_skipped else ''}{classes}
- Steps: {summary.steps} optimizer steps, {summary.images_seen} images seen ({summary.epochs:.1f} epochs), batch {cfg.train.batch_size}
- Objective: {objective}
- Optimizer: AdamW, learning rate {cfg.train.learning_rate:g} ({cfg.train.lr_scheduler}), mixed precision {cfg.train.mixed_precision}; weights exported {'as the EMA' if cfg.train.use_ema else 'as trained (no EMA)'}
- Final training loss: {loss}; training time: {summary.train_seconds / 60:.1f} min
- Full configuration: `config.yaml`; TensorBoard logs: `logs/`; sample grids: `samples/`

## How to load
Exported pipeline: diffusers' `DiTPipeline` (transformer, vae, scheduler: the `{s.scheduler}` sampler the run's
previews used), loaded by plain diffusers:

{load}
"""
    atomic_write_text(output_dir / "README.md", text, "the model card")
