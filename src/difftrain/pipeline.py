"""Inference on exported runs: difftrain's pipelines and `load_pipeline`.

Unconditional UNet runs export a plain diffusers `DDPMPipeline`. diffusers has no pipeline for
class-conditional UNet2DModels, pixel-space text-conditioned networks or unconditional DiTs (DDPMPipeline calls its
network without the class label a DiT needs), so those export :class:`ClassConditionalPipeline`,
:class:`TextToImagePipeline` and :class:`UnconditionalPipeline` (`DiffusionPipeline` subclasses). Their denoising
network is the `unet` component for UNets and the `transformer` component for transformers (DiT, PixArt), as
diffusers names them; `load_pipeline(dir)` opens every kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from difftrain.models.backbone import denoising_network
from difftrain.sampling.generate import ImageSampler
from difftrain.sampling.sample import Seed
from difftrain.sampling.schedulers import make_scheduler


GeneratorArg = Union[torch.Generator, Sequence[torch.Generator], None]
OUTPUT_TYPES = ("pil", "np", "pt")


def noise_sources(count: int, seed: Union[int, Sequence[int], None], generator: GeneratorArg) -> list[Seed]:
    """What draws each image's noise, diffusers style: one generator for all images, one per image, or
    without a generator the convenience seeds (image i uses seed+i, or seed[i] for a list; seed 0 by default)."""
    if generator is not None:
        if seed is not None:
            raise ValueError(f"seed={seed!r} and generator= were both given; pass one of them")
        if isinstance(generator, torch.Generator):
            return [generator] * count  # drawn from image after image, as diffusers draws a batch from one
        generators = list(generator)
        if len(generators) != count or not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(f"generator: a list of {len(generators)} for {count} images; pass one torch.Generator, "
                             "or a list with one per image")
        return generators
    seed = 0 if seed is None else seed
    if isinstance(seed, int):
        return [seed + i for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"seed: a list of {len(seeds)} for {count} images; pass one int (image i uses seed+i) "
                         "or one seed per image")
    return seeds


def images_as(images: torch.Tensor, output_type: str) -> Union[list, np.ndarray, torch.Tensor]:
    """uint8 (N, C, H, W) images as diffusers pipelines return them: 'pil' (a list of PIL images), 'np' (float
    (N, H, W, C) in [0, 1]) or 'pt' (float (N, C, H, W) in [0, 1], on the CPU)."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type {output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
    array = images.permute(0, 2, 3, 1).numpy().astype("float32") / 255.0
    if output_type == "pt":
        return torch.from_numpy(array).permute(0, 3, 1, 2)
    return DiffusionPipeline.numpy_to_pil(array) if output_type == "pil" else array


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} {value!r}: must be an integer >= 1")


class _NetworkPipeline(DiffusionPipeline):
    """A pipeline whose denoising network is its `unet` (UNets) or its `transformer` (DiT, PixArt): one of the two
    is registered, the other stays None (saved as [null, null]). The parts after it in `__init__` take a default
    so the old keyword calls keep working; diffusers then counts them as components only when they are listed in
    _optional_components, as here."""

    _optional_components = ["unet", "transformer", "scheduler", "text_encoder", "tokenizer"]

    def _register_network(self, unet: Optional[torch.nn.Module], transformer: Optional[torch.nn.Module]) -> None:
        if (unet is None) == (transformer is None):
            raise ValueError(f"{type(self).__name__}: pass the denoising network as `unet` (a UNet) or as "
                             "`transformer` (a DiT or PixArt transformer), exactly one of them")
        self.register_modules(unet=unet, transformer=transformer)  # the absent one is saved as [null, null]
        if transformer is not None:  # enable_model_cpu_offload moves the component that holds the network
            self.model_cpu_offload_seq = self.model_cpu_offload_seq.replace("unet", "transformer")

    @property
    def network(self) -> torch.nn.Module:
        """The denoising network, whichever component holds it."""
        return denoising_network(self)


class UnconditionalPipeline(_NetworkPipeline):
    """An unconditional transformer (a DiT with one class, always 0), which DDPMPipeline cannot call.

    Example:
        >>> pipe = difftrain.load_pipeline("runs/digits-dit")
        >>> images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, scheduler: Optional[SchedulerMixin] = None, unet: Optional[torch.nn.Module] = None,
                 transformer: Optional[torch.nn.Module] = None):
        super().__init__()
        self.register_modules(scheduler=scheduler)
        self._register_network(unet, transformer)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 25,
        seed: Union[int, Sequence[int], None] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        generator: GeneratorArg = None,
    ):
        """Generate `batch_size` images; noise, `output_type` and `return_dict` as ClassConditionalPipeline's."""
        _check_count("batch_size", batch_size)
        images = ImageSampler(self.network).generate(
            self.scheduler, noise_sources(batch_size, seed, generator), num_inference_steps=num_inference_steps,
            device=self.device,
        )
        result = images_as(images, output_type)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


class ClassConditionalPipeline(_NetworkPipeline):
    """A class-conditional network and classifier-free guidance: a UNet2DModel with a class embedding (last row =
    null class), or a DiT (null class 1000, diffusers' DiTPipeline convention).

    Example:
        >>> pipe = difftrain.load_pipeline("runs/digits")
        >>> images = pipe(class_labels=[0, 1, 2], guidance_scale=2.0).images
        >>> images = pipe(class_labels=3, num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: Optional[torch.nn.Module] = None, scheduler: Optional[SchedulerMixin] = None,
                 class_names: Optional[list] = None, transformer: Optional[torch.nn.Module] = None):
        super().__init__()
        self.register_modules(scheduler=scheduler)
        self._register_network(unet, transformer)
        self.register_to_config(class_names=list(class_names) if class_names else None)

    @property
    def num_classes(self) -> int:
        return ImageSampler.from_pipeline(self).num_classes

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, Sequence[int]],
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        seed: Union[int, Sequence[int], None] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
    ):
        """Generate num_images_per_prompt images per class label.

        The noise comes from `generator` (one torch.Generator, or a list with one per image) when given, else
        from `seed`: image i uses seed+i (or seed[i] for a list), seed 0 by default. `output_type` is 'pil',
        'np' or 'pt'; with return_dict=False the result is a tuple (images,).
        """
        _check_count("num_images_per_prompt", num_images_per_prompt)
        labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
        labels = [c for c in labels for _ in range(num_images_per_prompt)]
        # The pipeline's sampler knows the trained classes (class_names), and refuses labels outside them.
        images = ImageSampler.from_pipeline(self).generate(
            self.scheduler, noise_sources(len(labels), seed, generator), num_inference_steps=num_inference_steps,
            labels=labels, guidance_scale=guidance_scale, device=self.device,
        )
        result = images_as(images, output_type)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


class TextToImagePipeline(_NetworkPipeline):
    """Pixel-space text-to-image: UNet2DConditionModel (`unet`) or PixArtTransformer2DModel (`transformer`, fed the
    tokenizer's attention mask) + a transformers text encoder and tokenizer.

    The tokenizer's model_max_length is the prompt length the network was trained with.

    Example:
        >>> pipe = difftrain.load_pipeline("runs/mnist-text")
        >>> image = pipe("A handwritten digit 4", guidance_scale=5.0).images[0]
        >>> images = pipe("A handwritten digit 4", num_images_per_prompt=4,
        ...               generator=torch.Generator().manual_seed(0)).images
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: Optional[torch.nn.Module] = None, scheduler: Optional[SchedulerMixin] = None,
                 text_encoder=None, tokenizer=None, transformer: Optional[torch.nn.Module] = None):
        super().__init__()
        self.register_modules(scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self._register_network(unet, transformer)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        seed: Union[int, Sequence[int], None] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        generator: GeneratorArg = None,
    ):
        """Generate num_images_per_prompt images per prompt.

        The noise comes from `generator` (one torch.Generator, or a list with one per image) when given, else
        from `seed`: image i uses seed+i (or seed[i] for a list), seed 0 by default. `output_type` is 'pil',
        'np' or 'pt'; with return_dict=False the result is a tuple (images,).
        """
        _check_count("num_images_per_prompt", num_images_per_prompt)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        images = ImageSampler(self.network, self.tokenizer, self.text_encoder).generate(
            self.scheduler, noise_sources(len(prompts), seed, generator), num_inference_steps=num_inference_steps,
            prompts=prompts, negative_prompt=negative_prompt, guidance_scale=guidance_scale, device=self.device,
        )
        result = images_as(images, output_type)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


def pipeline_kind(path: Union[str, Path]) -> str:
    """The `_class_name` recorded in a pipeline folder's model_index.json."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a pipeline folder (no model_index.json); train a run first")
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{index}: not a readable model_index.json ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{index}: expected a JSON object, got a {type(data).__name__}")
    return data.get("_class_name", "")


def diffusers_pipeline_class(kind: str, folder: Union[str, Path]) -> type:
    """The diffusers pipeline class named `kind`; ValueError naming it and the folder when diffusers has none."""
    import diffusers

    # A list (custom pipeline code in the folder) is refused like any unknown name: its code is never imported.
    found = getattr(diffusers, kind, None) if isinstance(kind, str) and kind else None
    if not (isinstance(found, type) and issubclass(found, DiffusionPipeline)):
        raise ValueError(
            f"{folder}: model_index.json names the pipeline class {kind!r}, which is not a pipeline class of "
            f"diffusers {diffusers.__version__}; difftrain opens its own exports (DDPMPipeline, "
            "ClassConditionalPipeline, UnconditionalPipeline, TextToImagePipeline, StableDiffusionPipeline, "
            "DiTPipeline, PixArtSigmaPipeline) and other diffusers pipelines"
        )
    return found


ADAPTER_BASE_FILE = "adapter_base.json"
"""Written beside a LoRA run's pytorch_lora_weights.safetensors: the base pipeline the adapters belong to."""


def load_pipeline(path: Union[str, Path], device: Union[str, torch.device, None] = None) -> DiffusionPipeline:
    """Open an exported difftrain run (or any local diffusers pipeline folder) for inference.

    A LoRA run (pytorch_lora_weights.safetensors, no model_index.json) loads its base pipeline and
    then the adapters with `load_lora_weights`.
    """
    from difftrain.models.pretrained import load_base_pipeline, stable_diffusion_pipeline_class

    adapter_base = Path(path) / ADAPTER_BASE_FILE
    if not (Path(path) / "model_index.json").is_file() and adapter_base.is_file():
        base = json.loads(adapter_base.read_text())["base_model"]
        pipe = load_base_pipeline(base)
        pipe.load_lora_weights(str(path))
        return pipe.to(device) if device is not None else pipe
    kind = pipeline_kind(path)
    if kind == "StableDiffusionPipeline":
        pipe = stable_diffusion_pipeline_class().from_pretrained(str(path))
    elif kind == ClassConditionalPipeline.__name__:
        pipe = ClassConditionalPipeline.from_pretrained(str(path))
    elif kind == TextToImagePipeline.__name__:
        pipe = TextToImagePipeline.from_pretrained(str(path))
    elif kind == UnconditionalPipeline.__name__:
        pipe = UnconditionalPipeline.from_pretrained(str(path))
    elif kind == DDPMPipeline.__name__:
        pipe = DDPMPipeline.from_pretrained(str(path))
    else:
        # Checked first: diffusers itself answers an unknown class with a bare AttributeError.
        pipe = diffusers_pipeline_class(kind, path).from_pretrained(str(path))
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def scheduler_for(pipe: DiffusionPipeline, name: Optional[str]) -> SchedulerMixin:
    """The pipeline's own scheduler, or a scheduler of kind `name` on the same training schedule (clipping
    x0 to [-1, 1] where it can only for pipelines without a VAE, i.e. pixel models)."""
    if name is None:
        return pipe.scheduler
    return make_scheduler(name, pipe.scheduler.config, clip_x0=getattr(pipe, "vae", None) is None)
