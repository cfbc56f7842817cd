"""uint8 images from a denoising network (a diffusers UNet, DiT or PixArt transformer): `ImageSampler` (the network
plus what turns labels or prompts into its condition and decodes latents) and the functions it is built on,
`generate` and `generate_from_text`.

Every caller that samples (the pipelines, `difftrain sample`, `difftrain evaluate`, preview grids,
evaluation during training, DreamBooth class images) goes through here, so an image depends on the same
things everywhere: its seed (or generator), its condition, the scheduler and the step count.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from difftrain.data.transforms import from_model_range
from difftrain.models.backbone import (TextTimeCondition, denoising_network, geometry, network_call, null_class,
                                      takes_text_mask)
from difftrain.models.text import encode_prompts
from difftrain.sampling.guidance import Denoiser
from difftrain.sampling.sample import Seed, sample


def network_denoiser(network: torch.nn.Module, text: Optional[tuple] = None) -> Denoiser:
    """Adapt a denoising network (UNet, DiT, PixArt: models/backbone.py) to the (x_t, t, cond) denoiser interface.

    cond is class labels (or None), or with `text` = (states, mask or None) of the distinct prompts, rows into them:
    the sampler slices and concatenates a row index like any batch-first condition, whatever the network is fed.
    """
    call = network_call(type(network))
    if text is None:
        def denoise(x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
            return call(network, x.to(network.dtype), t, cond).float()
    else:
        states, mask = text

        def denoise(x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
            rows = states[cond].to(network.dtype)
            return call(network, x.to(network.dtype), t, rows if mask is None else (rows, mask[cond])).float()
    return denoise


def text_time_denoiser(network: torch.nn.Module, states: torch.Tensor, pooled: torch.Tensor,
                       time_ids: torch.Tensor) -> Denoiser:
    """The denoiser of an SDXL-style UNet: cond rows into the distinct prompts' (states, pooled) and one row of
    size/crop ids for every image."""
    def denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = network.dtype
        condition = TextTimeCondition(states[cond].to(dtype), pooled[cond].to(dtype),
                                      time_ids.expand(x.shape[0], -1).to(dtype))
        return network_call(type(network))(network, x.to(dtype), t, condition).float()
    return denoise


def _sample_uint8(network, scheduler, seeds, cond, null_cond, num_inference_steps, guidance_scale, batch_size, device,
                  vae=None, text=None, denoiser=None):
    channels, size = geometry(network)
    samples = sample(
        denoiser or network_denoiser(network, text), scheduler, (channels, size, size), seeds,
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


@torch.no_grad()
def generate(
    unet: torch.nn.Module,
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
    `unet` is any class or unconditional network of models/backbone.py (a DiT's null class is 1000: labels up to 999
    pass here; a pipeline that knows the trained classes checks them).
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
    unet: torch.nn.Module,
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
    (the empty prompt the model was trained with by default). With `vae` the network works in latent space
    and samples are decoded (divided by `vae.config.scaling_factor` first, as Stable Diffusion does). A PixArt
    network gets the tokenizer's attention mask with the states, as in training.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    device = torch.device(device) if device is not None else unet.device
    max_length = int(tokenizer.model_max_length)
    distinct = sorted(set(prompts) | {negative_prompt})
    encoded = encode_prompts(tokenizer, text_encoder, distinct, max_length, device=device,
                             with_mask=takes_text_mask(type(unet)))
    states, mask = encoded if isinstance(encoded, tuple) else (encoded, None)
    row = {p: i for i, p in enumerate(distinct)}
    cond = torch.tensor([row[p] for p in prompts], device=device)
    null_cond = torch.full_like(cond, row[negative_prompt])
    return _sample_uint8(unet, scheduler, seeds, cond, null_cond, num_inference_steps, guidance_scale, batch_size, device,
                         vae=vae, text=(states.float(), mask))


@torch.no_grad()
def generate_from_text_sdxl(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    prompts: Sequence[str],
    seeds: Sequence[Seed],
    *,
    vae: torch.nn.Module,
    num_inference_steps: int,
    negative_prompt: str = "",
    zero_empty_negative: bool = True,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """`generate_from_text` for an SDXL-style UNet and its two text encoders (models/sdxl_text.py): square samples
    at the UNet's size, ids of an uncropped image of that size, and, as StableDiffusionXLPipeline does with
    `force_zeros_for_empty_prompt` (`zero_empty_negative`), zeros as the empty negative prompt's embeddings."""
    from difftrain.models.sdxl_text import encode_sdxl, sdxl_time_ids, token_ids

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    device = torch.device(device) if device is not None else unet.device
    distinct = sorted(set(prompts) | {negative_prompt})
    states, pooled = encode_sdxl(text_encoders, token_ids(tokenizers, distinct))
    states, pooled = states.float().to(device), pooled.float().to(device)
    row = {p: i for i, p in enumerate(distinct)}
    if negative_prompt == "" and zero_empty_negative:
        states[row[""]], pooled[row[""]] = 0.0, 0.0
    side = geometry(unet)[1] * 2 ** (len(vae.config.block_out_channels) - 1)
    time_ids = sdxl_time_ids(None, None, (side, side), 1, device)
    cond = torch.tensor([row[p] for p in prompts], device=device)
    null_cond = torch.full_like(cond, row[negative_prompt])
    return _sample_uint8(unet, scheduler, seeds, cond, null_cond, num_inference_steps, guidance_scale, batch_size,
                         device, vae=vae, denoiser=text_time_denoiser(unet, states, pooled, time_ids))


def trained_classes(pipe) -> Optional[int]:
    """Classes a pipeline was trained on, where its config says: difftrain's `class_names`, DiTPipeline's labels."""
    names = getattr(pipe.config, "class_names", None) if hasattr(pipe, "config") else None
    if names:
        return len(names)
    labels = getattr(pipe, "labels", None)  # DiTPipeline: label name -> class id, from its id2label
    if isinstance(labels, dict) and labels:
        return len(set(labels.values()))
    return None


class ImageSampler:
    """A denoising network plus what turns class labels or prompts into its condition (and decodes latents).

    Built from live training modules (preview grids, evaluation during training) or from a loaded
    pipeline (`from_pipeline`: `difftrain sample`, `difftrain evaluate`, class images), so every caller
    samples the same way without passing the tokenizer, text encoder and VAE around by hand.
    """

    def __init__(self, unet: torch.nn.Module, tokenizer=None, text_encoder: Optional[torch.nn.Module] = None,
                 vae: Optional[torch.nn.Module] = None, num_classes: Optional[int] = None, tokenizer_2=None,
                 text_encoder_2: Optional[torch.nn.Module] = None, zero_empty_negative: bool = True):
        self.unet = unet
        """The denoising network (any backbone: the name is the UNet-era one callers know)."""
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self._num_classes = num_classes
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        """SDXL: the second tokenizer and text encoder (the UNet then also takes the pooled embedding and ids)."""
        self.zero_empty_negative = zero_empty_negative
        """SDXL: the empty negative prompt as zeros (the pipeline's force_zeros_for_empty_prompt)."""

    @classmethod
    def from_pipeline(cls, pipe) -> "ImageSampler":
        """The sampler of a loaded pipeline: its `unet` or `transformer`, with its tokenizer, text encoder and VAE
        where it has them (difftrain's pipelines, DDPMPipeline, StableDiffusionPipeline, DiTPipeline, PixArt's)."""
        network = denoising_network(pipe)
        if network is None:
            raise ValueError(f"{type(pipe).__name__} has no `unet` or `transformer`; difftrain samples DDPMPipeline, "
                             "ClassConditionalPipeline, UnconditionalPipeline, TextToImagePipeline, "
                             "StableDiffusionPipeline, DiTPipeline and PixArt pipeline folders")
        text_encoder = getattr(pipe, "text_encoder", None)
        tokenizer = getattr(pipe, "tokenizer", None) if text_encoder is not None else None
        config = getattr(pipe, "config", {})
        return cls(network, tokenizer, text_encoder, getattr(pipe, "vae", None), trained_classes(pipe),
                   getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None),
                   bool(config.get("force_zeros_for_empty_prompt", True)) if hasattr(config, "get") else True)

    @property
    def kind(self) -> str:
        """'text' with a text encoder, 'class' for a network with a class embedding, else 'unconditional'."""
        if self.text_encoder is not None:
            return "text"
        return "class" if null_class(self.unet) is not None else "unconditional"

    @property
    def num_classes(self) -> int:
        """The classes the model was trained on (given, else its class table less the null class: a DiT's table has
        1000 rows whatever it trained); 0 unless `kind` is 'class'."""
        if self.kind != "class":
            return 0
        return self._num_classes or int(null_class(self.unet))

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
            if labels is not None and self.kind == "class":
                # The trained classes, which a DiT's 1000-row table does not tell (generate checks only the table).
                bad = [c for c in labels if not 0 <= int(c) < self.num_classes]
                if bad:
                    raise ValueError(f"class label(s) {bad} out of range: the model has classes "
                                     f"0..{self.num_classes - 1}")
            return generate(self.unet, scheduler, seeds, num_inference_steps=num_inference_steps, class_labels=labels,
                            guidance_scale=guidance_scale, batch_size=batch_size, device=device, vae=self.vae)
        if prompts is None or self.tokenizer is None:
            raise ValueError("a text-conditioned model needs prompts and its tokenizer to sample")
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        was_training = [e.training for e in encoders]
        for encoder in encoders:
            encoder.eval()
        try:
            if self.text_encoder_2 is not None:
                return generate_from_text_sdxl(
                    self.unet, scheduler, [self.tokenizer, self.tokenizer_2], encoders, prompts, seeds,
                    vae=self.vae, num_inference_steps=num_inference_steps, negative_prompt=negative_prompt,
                    zero_empty_negative=self.zero_empty_negative, guidance_scale=guidance_scale,
                    batch_size=batch_size, device=device)
            return generate_from_text(self.unet, scheduler, self.tokenizer, self.text_encoder, prompts, seeds,
                                      num_inference_steps=num_inference_steps, negative_prompt=negative_prompt,
                                      guidance_scale=guidance_scale, batch_size=batch_size, device=device,
                                      vae=self.vae)
        finally:
            for encoder, mode in zip(encoders, was_training):
                encoder.train(mode)
