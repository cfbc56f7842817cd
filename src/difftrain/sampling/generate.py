"""uint8 images from a diffusers UNet: `ImageSampler` (the network plus what turns labels or prompts into its
condition and decodes latents) and the functions it is built on, `generate` and `generate_from_text`.

Every caller that samples (the pipelines, `difftrain sample`, `difftrain evaluate`, preview grids,
evaluation during training, DreamBooth class images) goes through here, so an image depends on the same
things everywhere: its seed (or generator), its condition, the scheduler and the step count.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from difftrain.data.transforms import from_model_range
from difftrain.models.text import encode_prompts
from difftrain.sampling.guidance import Denoiser
from difftrain.sampling.sample import Seed, sample


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """Adapt a diffusers UNet to the (x_t, t, cond) denoiser interface.

    cond is class labels (UNet2DModel), cross-attention states (UNet2DConditionModel) or None.
    """
    if isinstance(unet, UNet2DConditionModel):
        def denoise(x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
            return unet(x.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample.float()
    else:
        def denoise(x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
            return unet(x.to(unet.dtype), t, class_labels=cond).sample.float()
    return denoise


def _sample_uint8(unet, scheduler, seeds, cond, null_cond, num_inference_steps, guidance_scale, batch_size, device,
                  vae=None):
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    samples = sample(
        unet_denoiser(unet), scheduler, shape, seeds,
        num_inference_steps=num_inference_steps, cond=cond, null_cond=null_cond,
        guidance_scale=guidance_scale, batch_size=batch_size, device=device,
    )
    if vae is None:
        return from_model_range(samples).cpu()
    images = []
    for start in range(0, samples.shape[0], batch_size):
        latents = samples[start : start + batch_size] / vae.config.scaling_factor
        images.append(from_model_range(vae.decode(latents.to(device, vae.dtype)).sample).cpu())
    return torch.cat(images)


def null_class(unet: UNet2DModel) -> Optional[int]:
    """Index of the null (unconditional) class, or None for an unconditional UNet."""
    n = getattr(unet.config, "num_class_embeds", None)
    return None if n is None else n - 1


@torch.no_grad()
def generate(
    unet: UNet2DModel,
    scheduler: SchedulerMixin,
    seeds: Sequence[Seed],
    *,
    num_inference_steps: int,
    class_labels: Optional[Sequence[int]] = None,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    device: Union[torch.device, str, None] = None,
    vae: Optional[torch.nn.Module] = None,
) -> torch.Tensor:
    """Sample one image per seed (with class_labels[i] for image i); returns uint8 (N, C, H, W).

    A seed is an int or a torch.Generator (see `sample`). With `vae` the samples are latents and are decoded.
    """
    device = torch.device(device) if device is not None else unet.device
    cond = null_cond = None
    null = null_class(unet)
    if class_labels is not None:
        if null is None:
            raise ValueError("class labels were given but the model is unconditional")
        if len(class_labels) != len(seeds):
            raise ValueError(f"{len(class_labels)} class labels for {len(seeds)} seeds")
        bad = [c for c in class_labels if not 0 <= int(c) < null]
        if bad:
            raise ValueError(f"class label(s) {bad} out of range: the model has classes 0..{null - 1}")
        cond = torch.tensor([int(c) for c in class_labels], device=device)
        null_cond = torch.full_like(cond, null)
    elif null is not None:
        # A class-conditional model asked for no class samples its unconditional (null-class) branch.
        cond = torch.full((len(seeds),), null, device=device)
    return _sample_uint8(unet, scheduler, seeds, cond, null_cond, num_inference_steps, guidance_scale, batch_size, device,
                         vae=vae)


@torch.no_grad()
def generate_from_text(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    tokenizer,
    text_encoder: torch.nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[Seed],
    *,
    num_inference_steps: int,
    negative_prompt: str = "",
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    device: Union[torch.device, str, None] = None,
    vae: Optional[torch.nn.Module] = None,
) -> torch.Tensor:
    """Sample image i from prompts[i] with seeds[i]; returns uint8 (N, C, H, W).

    Each distinct prompt is encoded once. The unconditional branch of guidance is `negative_prompt`
    (the empty prompt the model was trained with by default). With `vae` the UNet works in latent space
    and samples are decoded (divided by `vae.config.scaling_factor` first, as Stable Diffusion does).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    device = torch.device(device) if device is not None else unet.device
    max_length = int(tokenizer.model_max_length)
    distinct = sorted(set(prompts) | {negative_prompt})
    states = encode_prompts(tokenizer, text_encoder, distinct, max_length, device=device).float()
    row = {p: i for i, p in enumerate(distinct)}
    cond = states[torch.tensor([row[p] for p in prompts], device=device)]
    null_cond = states[row[negative_prompt]].expand_as(cond)
    return _sample_uint8(unet, scheduler, seeds, cond, null_cond, num_inference_steps, guidance_scale, batch_size, device,
                         vae=vae)


class ImageSampler:
    """A denoising network plus what turns class labels or prompts into its condition (and decodes latents).

    Built from live training modules (preview grids, evaluation during training) or from a loaded
    pipeline (`from_pipeline`: `difftrain sample`, `difftrain evaluate`, class images), so every caller
    samples the same way without passing the tokenizer, text encoder and VAE around by hand.
    """

    def __init__(self, unet: torch.nn.Module, tokenizer=None, text_encoder: Optional[torch.nn.Module] = None,
                 vae: Optional[torch.nn.Module] = None):
        self.unet = unet
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae

    @classmethod
    def from_pipeline(cls, pipe) -> "ImageSampler":
        """The sampler of a loaded pipeline: TextToImagePipeline and StableDiffusionPipeline (tokenizer, text
        encoder and, for the latter, VAE), ClassConditionalPipeline, DDPMPipeline."""
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise ValueError(f"{type(pipe).__name__} has no UNet; difftrain samples DDPMPipeline, "
                             "ClassConditionalPipeline, TextToImagePipeline and StableDiffusionPipeline folders")
        text_encoder = getattr(pipe, "text_encoder", None)
        tokenizer = getattr(pipe, "tokenizer", None) if text_encoder is not None else None
        return cls(unet, tokenizer, text_encoder, getattr(pipe, "vae", None))

    @property
    def kind(self) -> str:
        """'text' with a text encoder, 'class' for a UNet with a class embedding, else 'unconditional'."""
        if self.text_encoder is not None:
            return "text"
        return "class" if null_class(self.unet) is not None else "unconditional"

    @property
    def num_classes(self) -> int:
        """The model's classes (its class embedding less the null class); 0 unless `kind` is 'class'."""
        return int(null_class(self.unet)) if self.kind == "class" else 0

    def generate(
        self,
        scheduler: SchedulerMixin,
        seeds: Sequence[Seed],
        *,
        num_inference_steps: int,
        labels: Optional[Sequence[int]] = None,
        prompts: Optional[Sequence[str]] = None,
        negative_prompt: str = "",
        guidance_scale: float = 1.0,
        batch_size: int = 64,
        device: Union[torch.device, str, None] = None,
    ) -> torch.Tensor:
        """One image per seed: uint8 (N, C, H, W).

        A text model takes `prompts` (required; `labels` are ignored, callers pass them for scoring), a
        class model `labels` (none: its null-class branch), an unconditional model neither. The text
        encoder runs in eval mode for the call and gets its previous mode back, so this can be called on
        the models being trained.
        """
        if self.text_encoder is None:
            return generate(self.unet, scheduler, seeds, num_inference_steps=num_inference_steps, class_labels=labels,
                            guidance_scale=guidance_scale, batch_size=batch_size, device=device, vae=self.vae)
        if prompts is None or self.tokenizer is None:
            raise ValueError("a text-conditioned model needs prompts and its tokenizer to sample")
        was_training = self.text_encoder.training
        self.text_encoder.eval()
        try:
            return generate_from_text(self.unet, scheduler, self.tokenizer, self.text_encoder, prompts, seeds,
                                      num_inference_steps=num_inference_steps, negative_prompt=negative_prompt,
                                      guidance_scale=guidance_scale, batch_size=batch_size, device=device,
                                      vae=self.vae)
        finally:
            self.text_encoder.train(was_training)
