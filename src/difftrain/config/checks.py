"""Cross-field validation of a :class:`RunConfig`: every problem is collected, none raised alone."""

from __future__ import annotations

import math
import re
from typing import Optional

from difftrain.config.schema import (DDPM_ONLY_FIELDS, FLOW_ONLY_FIELDS, FLOW_SCHEDULERS, DiffusionConfig,
                                     RunConfig)


def check_config(cfg: RunConfig) -> list[str]:
    """Cross-field checks; returns every problem found (empty list when valid)."""
    problems: list[str] = []
    t, d, m = cfg.train, cfg.data, cfg.model

    def positive(name: str, value: Optional[float], allow_none: bool = True) -> None:
        if value is None:
            if not allow_none:
                problems.append(f"'{name}' must be set")
            return
        if value <= 0:
            problems.append(f"'{name}' = {value!r}: must be > 0")

    if t.max_steps is None and t.num_epochs is None:
        problems.append("set 'train.max_steps' or 'train.num_epochs' (neither is set)")
    if t.max_steps is not None and t.num_epochs is not None:
        problems.append(
            f"'train.max_steps' = {t.max_steps} and 'train.num_epochs' = {t.num_epochs} are both set; "
            "set one and null the other (e.g. train.num_epochs=null)"
        )
    for name in ("max_steps", "num_epochs", "batch_size", "gradient_accumulation_steps", "learning_rate",
                 "log_every_steps", "checkpoint_every_steps", "checkpoint_every_epochs",
                 "checkpoints_total_limit", "sample_every_steps", "sample_every_epochs", "max_grad_norm"):
        positive(f"train.{name}", getattr(t, name))
    for a, b in (("checkpoint_every_steps", "checkpoint_every_epochs"), ("sample_every_steps", "sample_every_epochs")):
        if getattr(t, a) is not None and getattr(t, b) is not None:
            problems.append(f"'train.{a}' and 'train.{b}' are both set; set one and null the other")
    if t.nonfinite_max_skips < 1:
        problems.append(f"'train.nonfinite_max_skips' = {t.nonfinite_max_skips}: must be >= 1")
    if t.nonfinite_max_rollbacks < 0:
        problems.append(f"'train.nonfinite_max_rollbacks' = {t.nonfinite_max_rollbacks}: must be >= 0")
    if not 0.0 < t.nonfinite_lr_factor < 1.0:
        problems.append(f"'train.nonfinite_lr_factor' = {t.nonfinite_lr_factor}: must be in (0, 1)")
    if t.lr_warmup_steps < 0:
        problems.append(f"'train.lr_warmup_steps' = {t.lr_warmup_steps}: must be >= 0")
    if not 0.0 <= t.condition_dropout < 1.0:
        problems.append(f"'train.condition_dropout' = {t.condition_dropout}: must be in [0, 1)")
    if not 0.0 < t.ema_decay < 1.0:
        problems.append(f"'train.ema_decay' = {t.ema_decay}: must be in (0, 1)")
    if t.push_to_hub and not t.hub_model_id:
        problems.append("'train.push_to_hub' is true but 'train.hub_model_id' is not set")

    positive("data.resolution", d.resolution, allow_none=False)
    problems += _bucket_problems(cfg)
    positive("data.max_images", d.max_images)
    positive("data.decode_workers", d.decode_workers)
    positive("data.max_memory_gb", d.max_memory_gb)
    if d.loader_workers is not None and d.loader_workers < 0:
        problems.append(f"'data.loader_workers' = {d.loader_workers}: must be >= 0 (0 reads in the training process)")
    if d.streaming and d.source not in ("auto", "hub", "parquet"):
        problems.append(f"'data.streaming' = true streams a hub id's parquet files, but 'data.source' = {d.source!r}; "
                        "use data.source=auto or hub (tar and parquet shards stream without data.streaming)")
    if d.max_image_pixels < 1:
        problems.append(f"'data.max_image_pixels' = {d.max_image_pixels}: must be >= 1 (pixels, width x height)")

    if m.conditioning == "none" and m.num_classes is not None:
        problems.append(f"'model.num_classes' = {m.num_classes} needs 'model.conditioning' = 'class'")
    positive("model.num_classes", m.num_classes)
    te = cfg.text_encoder
    if m.conditioning == "text":
        for name in ("max_length", "hidden_size", "num_layers", "num_heads"):
            positive(f"text_encoder.{name}", getattr(te, name), allow_none=False)
        positive("text_encoder.learning_rate", te.learning_rate)
        if te.pretrained is None and m.pretrained is None and te.train is False:
            problems.append("'text_encoder.train' = false needs 'text_encoder.pretrained' (a from-scratch encoder must be trained)")
        if te.hidden_size % te.num_heads:
            problems.append(f"'text_encoder.hidden_size' = {te.hidden_size} must divide by 'text_encoder.num_heads' = {te.num_heads}")
    problems.extend(_text_cache_problems(cfg))
    if d.captions == "template" and not d.caption_template:
        problems.append("'data.captions' = 'template' needs 'data.caption_template' (e.g. 'a photo of a {label}')")
    if d.captions == "column" and not d.caption_column:
        problems.append("'data.captions' = 'column' needs 'data.caption_column'")
    caption_steps = {"caption_prefix": d.caption_prefix is not None, "shuffle_tags": d.shuffle_tags,
                     "keep_tokens": d.keep_tokens != 0, "tag_dropout": d.tag_dropout != 0.0,
                     "caption_lines": d.caption_lines != "join"}
    if m.conditioning != "text":
        problems += [f"'data.{name}' = {getattr(d, name)!r} needs 'model.conditioning' = 'text'"
                     for name, is_set in caption_steps.items() if is_set]
    if d.keep_tokens < 0:
        problems.append(f"'data.keep_tokens' = {d.keep_tokens}: must be >= 0")
    if not 0.0 <= d.tag_dropout < 1.0:
        problems.append(f"'data.tag_dropout' = {d.tag_dropout}: must be in [0, 1)")
    if not d.tag_separator or "\n" in d.tag_separator:
        problems.append(f"'data.tag_separator' = {d.tag_separator!r}: must be a non-empty string without a newline")
    if d.keep_tokens and not (d.shuffle_tags or d.tag_dropout):
        problems.append(f"'data.keep_tokens' = {d.keep_tokens} has no effect without 'data.shuffle_tags' or "
                        "'data.tag_dropout'")
    if d.caption_template is not None and "{label}" not in d.caption_template:
        problems.append(f"'data.caption_template' = {d.caption_template!r} must contain '{{label}}'")
    if _prompts_without_text_model(cfg):
        problems.append("'sample.prompts' needs 'model.conditioning' = 'text'")
    if m.size == "custom" and not m.unet:
        problems.append("'model.size' = 'custom' needs 'model.unet' kwargs (e.g. block_out_channels)")

    positive("train.eval_every_steps", t.eval_every_steps)
    if t.eval_num_samples < 2 or t.eval_num_reference < 2:
        problems.append(f"'train.eval_num_samples' = {t.eval_num_samples}, 'train.eval_num_reference' = "
                        f"{t.eval_num_reference}: need at least 2 each")
    if t.keep_best_by is not None:
        if t.eval_every_steps is None:
            problems.append(f"'train.keep_best_by' = {t.keep_best_by!r} needs 'train.eval_every_steps'")
        if t.keep_best_by in ("fid", "kid") and not t.eval_inception:
            problems.append(f"'train.keep_best_by' = {t.keep_best_by!r} needs 'train.eval_inception' = true")
        if t.keep_best_by in ("accuracy", "classifier_fid") and not cfg.uses_labels:
            problems.append(f"'train.keep_best_by' = {t.keep_best_by!r} needs labelled data (a class-conditional "
                            "model, or a text model with data.caption_template)")
    problems.extend(_latent_and_finetune_problems(cfg, positive))

    diff = cfg.diffusion
    positive("diffusion.num_train_timesteps", diff.num_train_timesteps, allow_none=False)
    positive("diffusion.snr_gamma", diff.snr_gamma)
    if diff.offset_noise < 0:
        problems.append(f"'diffusion.offset_noise' = {diff.offset_noise}: must be >= 0")
    if not 0 < diff.beta_start < diff.beta_end < 1:
        problems.append(
            f"'diffusion.beta_start' = {diff.beta_start}, 'diffusion.beta_end' = {diff.beta_end}: "
            "need 0 < beta_start < beta_end < 1"
        )

    problems.extend(_objective_problems(cfg))

    s = cfg.sample
    for name in ("num_inference_steps", "num_images", "images_per_class", "batch_size"):
        positive(f"sample.{name}", getattr(s, name), allow_none=False)
    if s.guidance_scale < 0:
        problems.append(f"'sample.guidance_scale' = {s.guidance_scale}: must be >= 0")
    if s.guidance_scale != 1.0 and m.conditioning == "none":
        problems.append(f"'sample.guidance_scale' = {s.guidance_scale} needs a conditional model (model.conditioning)")
    if not cfg.output_dir:
        problems.append("'output_dir' must be set (e.g. --output-dir runs/my-run)")
    return problems


def _bucket_problems(cfg: RunConfig) -> list[str]:
    """data.buckets: 'off', 'auto' or a non-empty list of 'WxH' strings (whether the network takes each size is the
    family's check, from the base model's config); not with DreamBooth prior preservation (its instance and class
    images share a micro-batch, which must be one size)."""
    buckets = cfg.data.buckets
    if buckets in ("off", "auto"):
        problems = []
    elif not buckets:
        problems = ["'data.buckets' = []: give 'off', 'auto' or a list of 'WxH' sizes, e.g. ['512x512', '448x576']"]
    else:
        problems = [f"'data.buckets' entry {entry!r}: expected 'WxH' with positive integers, e.g. '512x768'"
                    for entry in buckets if not re.match(r"^\s*[1-9][0-9]*\s*[xX]\s*[1-9][0-9]*\s*$", str(entry))]
    if buckets != "off" and cfg.train.prior_preservation:
        problems.append("'data.buckets' with 'train.prior_preservation' is not supported yet (instance and class "
                        "images share each micro-batch, which holds one size); set data.buckets=off")
    return problems


def _text_cache_problems(cfg: RunConfig) -> list[str]:
    """text_encoder.cache_to_disk where nothing would be cached: no text model, a trained encoder (its outputs change
    every step), or captions that change per step (encoded in the step)."""
    te, m, d = cfg.text_encoder, cfg.model, cfg.data
    if not te.cache_to_disk:
        return []
    key = "'text_encoder.cache_to_disk' = true"
    if m.conditioning != "text":
        return [f"{key} needs 'model.conditioning' = 'text'"]
    trained = ("'text_encoder.train' = true" if te.train
               else "'lora.train_text_encoder' = true" if m.finetune == "lora" and cfg.lora.train_text_encoder
               else "a from-scratch encoder (no 'text_encoder.pretrained')" if te.pretrained is None and m.pretrained is None
               else None)
    problems = []
    if trained:
        problems.append(f"{key} has no effect with {trained}: a trained encoder's outputs change every step, so "
                        "nothing is cached; remove it or use a frozen pretrained encoder")
    if d.shuffle_tags or d.tag_dropout:
        problems.append(f"{key} has no effect with 'data.shuffle_tags' or 'data.tag_dropout': captions that change "
                        "per step are encoded in the step; remove one or the other")
    return problems


def _prompts_without_text_model(cfg: RunConfig) -> bool:
    return bool(cfg.sample.prompts) and cfg.model.conditioning != "text"


def _latent_and_finetune_problems(cfg: RunConfig, positive) -> list[str]:
    """Latent space, fine-tuning, LoRA and DreamBooth combinations."""
    problems: list[str] = []
    d, m, t, v, lora = cfg.data, cfg.model, cfg.train, cfg.vae, cfg.lora
    latent = m.space == "latent" or m.pretrained is not None
    if m.pretrained is not None and m.conditioning != "text":
        problems.append(
            f"'model.conditioning' = {m.conditioning!r} with 'model.pretrained': only 'text' is supported "
            "(a Stable Diffusion style base model)"
        )
    elif latent and m.conditioning != "text" and m.backbone != "dit":
        # diffusers' DiTPipeline would load a UNet2DModel in its transformer slot (with a warning), but only with a
        # 1,001-row class table (null class 1000), also for an unconditional model: refused rather than exported so.
        problems.append(
            f"'model.backbone' = {m.backbone!r} with model.space = 'latent' and model.conditioning = "
            f"{m.conditioning!r}: latent class-conditional and unconditional models export diffusers' DiTPipeline, "
            "which takes a transformer; use model.backbone = 'dit' (or model.space = 'pixel' for a UNet)"
        )
    if m.pretrained is not None and cfg.text_encoder.pretrained is not None:
        problems.append("'text_encoder.pretrained' and 'model.pretrained' are both set; a fine-tuned pipeline "
                        "brings its own text encoder")
    if m.pretrained is not None and m.unet:
        problems.append(f"'model.unet' = {m.unet!r} has no effect with 'model.pretrained' (the base UNet is used); "
                        "remove it")
    if m.pretrained is not None and m.backbone != "unet":
        problems.append(f"'model.backbone' = {m.backbone!r} has no effect with 'model.pretrained' (the base pipeline's "
                        "UNet is fine-tuned); remove it")
    if m.finetune == "lora" and m.pretrained is None:
        problems.append("'model.finetune' = 'lora' needs 'model.pretrained' (the base pipeline the adapters go on)")
    if lora.train_text_encoder and m.finetune != "lora":
        problems.append("'lora.train_text_encoder' needs 'model.finetune' = 'lora'")
    if latent:
        for name in ("batch_size", "learning_rate", "latent_channels", "layers_per_block"):
            positive(f"vae.{name}", getattr(v, name), allow_none=False)
        positive("vae.train_steps", v.train_steps)
        positive("vae.scaling_factor", v.scaling_factor)
        if v.kl_weight < 0:
            problems.append(f"'vae.kl_weight' = {v.kl_weight}: must be >= 0")
        if not v.block_out_channels or not all(isinstance(c, int) and c > 0 for c in v.block_out_channels):
            problems.append(f"'vae.block_out_channels' = {v.block_out_channels!r}: need a list of positive ints")
    if v.cache_latents_to_disk and not latent:
        problems.append("'vae.cache_latents_to_disk' = true has no effect without latents: it needs "
                        "'model.space' = 'latent' or 'model.pretrained'; remove it")
    elif v.cache_latents_to_disk and not v.cache_latents:
        problems.append("'vae.cache_latents_to_disk' = true needs 'vae.cache_latents' = true: with it false every "
                        "step encodes its own batch and nothing is cached")
    positive("lora.rank", lora.rank, allow_none=False)
    positive("lora.alpha", lora.alpha)
    if not 0.0 <= lora.dropout < 1.0:
        problems.append(f"'lora.dropout' = {lora.dropout}: must be in [0, 1)")
    problems.extend(_lora_variant_problems(lora, m.finetune == "lora"))

    if d.instance_dir is not None:
        if not d.instance_prompt:
            problems.append("'data.instance_dir' is set but 'data.instance_prompt' is not (e.g. 'a photo of sks flower')")
        if m.conditioning != "text":
            problems.append("'data.instance_dir' (DreamBooth) needs 'model.conditioning' = 'text'")
    elif d.instance_prompt is not None:
        problems.append("'data.instance_prompt' is set but 'data.instance_dir' is not")
    if t.prior_preservation:
        if not d.class_prompt:
            problems.append("'train.prior_preservation' is true but 'data.class_prompt' is not set "
                            "(e.g. data.class_prompt='a photo of a flower')")
        if d.instance_dir is None:
            problems.append("'train.prior_preservation' needs 'data.instance_dir' and 'data.instance_prompt'")
        if m.pretrained is None:
            problems.append("'train.prior_preservation' needs 'model.pretrained' (the base model generates the class images)")
        positive("data.num_class_images", d.num_class_images, allow_none=False)
        if t.prior_loss_weight < 0:
            problems.append(f"'train.prior_loss_weight' = {t.prior_loss_weight}: must be >= 0")
    return problems


def _lora_variant_problems(lora, is_lora: bool) -> list[str]:
    """DoRA, per-module rank/alpha patterns and the export format."""
    problems: list[str] = []
    for key, patterns, integer in (("lora.rank_pattern", lora.rank_pattern, True),
                                   ("lora.alpha_pattern", lora.alpha_pattern, False)):
        if not isinstance(patterns, dict):
            problems.append(f"'{key}' = {patterns!r}: need a mapping of module name (suffix or regex) to a number")
            continue
        for name, value in patterns.items():
            try:
                re.compile(str(name))
            except re.error as exc:
                problems.append(f"'{key}' key {name!r} is not a valid regular expression: {exc}")
            ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
            if not ok or value <= 0:
                problems.append(f"'{key}' = {{{name!r}: {value!r}}}: need a positive {'integer' if integer else 'number'}")
    if lora.use_dora and lora.export_format != "diffusers":
        problems.append(f"'lora.use_dora' with 'lora.export_format' = {lora.export_format!r}: DoRA adapters export in "
                        "the diffusers format only (diffusers' kohya converter and loaders drop DoRA's magnitudes); "
                        "use lora.export_format = 'diffusers'")
    if not is_lora:
        set_keys = [k for k, on in (("use_dora", lora.use_dora), ("rank_pattern", lora.rank_pattern),
                                    ("alpha_pattern", lora.alpha_pattern),
                                    ("export_format", lora.export_format != "diffusers")) if on]
        problems.extend(f"'lora.{k}' needs 'model.finetune' = 'lora'" for k in set_keys)
    return problems


# SD3's 'mode' density maps [0, 1] onto itself monotonically only for scales in this range (Esser et al. 2024).
_MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


# Flow samplers that diffusers' latent pipelines cannot step (FlowMatchEuler / FlowMatchHeun have no init_noise_sigma
# nor scale_model_input, which StableDiffusionPipeline, PixArtSigmaPipeline and DiTPipeline call).
_NO_INIT_NOISE_SIGMA = ("euler", "heun")
_SD_FLOW_SCHEDULERS = tuple(n for n in FLOW_SCHEDULERS if n not in _NO_INIT_NOISE_SIGMA)


def _objective_problems(cfg: RunConfig) -> list[str]:
    """Fields of one objective set with the other, and what flow matching cannot do."""
    diff, defaults = cfg.diffusion, DiffusionConfig()

    def changed(names: tuple[str, ...]) -> list[str]:
        return [n for n in names if getattr(diff, n) != getattr(defaults, n)]

    if diff.objective == "ddpm":
        return [f"'diffusion.{n}' = {getattr(diff, n)!r} is a flow-matching setting; it needs 'diffusion.objective' = "
                "'flow_matching' (or remove it)" for n in changed(FLOW_ONLY_FIELDS)]
    problems = [f"'diffusion.{n}' = {getattr(diff, n)!r} is a DDPM setting, not read by 'diffusion.objective' = "
                f"'flow_matching' (flow settings: {', '.join(FLOW_ONLY_FIELDS)}); remove it"
                for n in changed(DDPM_ONLY_FIELDS)]
    if cfg.model.pretrained is not None:
        problems.append(f"'diffusion.objective' = 'flow_matching' with 'model.pretrained' = {cfg.model.pretrained!r}: "
                        "a pretrained base was trained as a DDPM model; flow matching trains from scratch only")
    if cfg.sample.scheduler not in FLOW_SCHEDULERS:
        problems.append(f"'sample.scheduler' = {cfg.sample.scheduler!r} cannot sample a flow-matching model; "
                        f"use one of {', '.join(FLOW_SCHEDULERS)}")
    elif cfg.model.space == "latent" and cfg.sample.scheduler in _NO_INIT_NOISE_SIGMA:
        problems.append(f"'sample.scheduler' = {cfg.sample.scheduler!r}: a latent run exports a diffusers pipeline "
                        "(StableDiffusionPipeline, PixArtSigmaPipeline or DiTPipeline), which steps a flow-matching "
                        "model only with "
                        f"{', '.join(_SD_FLOW_SCHEDULERS)}")
    if not diff.logit_std > 0:
        problems.append(f"'diffusion.logit_std' = {diff.logit_std}: must be > 0")
    if not diff.flow_shift > 0:
        problems.append(f"'diffusion.flow_shift' = {diff.flow_shift}: must be > 0")
    if diff.flow_shift_by_resolution and diff.flow_shift != defaults.flow_shift:
        problems.append(f"'diffusion.flow_shift' = {diff.flow_shift} and 'diffusion.flow_shift_by_resolution' = true "
                        "are both set; the shift by resolution replaces the static one, set one of them")
    low, high = _MODE_SCALE_RANGE
    if not low <= diff.mode_scale <= high:
        problems.append(f"'diffusion.mode_scale' = {diff.mode_scale}: must be in [{low:g}, {high:.4f}] "
                        "(SD3's mode density is monotone only there)")
    return problems
