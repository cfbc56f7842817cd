"""Inference on exported runs: difftrain's pipelines and `load_pipeline`.

Unconditional runs export a plain diffusers `DDPMPipeline`. diffusers has no pipeline for
class-conditional UNet2DModels or pixel-space text-conditioned UNets, so those export
:class:`ClassConditionalPipeline` and :class:`TextToImagePipeline` (`DiffusionPipeline` subclasses);
`load_pipeline(dir)` opens every kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

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


class ClassConditionalPipeline(DiffusionPipeline):
    """UNet2DModel with a class embedding (last row = null class) and classifier-free guidance.

    Example:
        >>> pipe = difftrain.load_pipeline("runs/digits")
        >>> images = pipe(class_labels=[0, 1, 2], guidance_scale=2.0).images
        >>> images = pipe(class_labels=3, num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, class_names: Optional[list] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names) if class_names else None)

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_class_embeds) - 1

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
        images = ImageSampler(self.unet).generate(
            self.scheduler, noise_sources(len(labels), seed, generator), num_inference_steps=num_inference_steps,
            labels=labels, guidance_scale=guidance_scale, device=self.device,
        )
        result = images_as(images, output_type)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)


class TextToImagePipeline(DiffusionPipeline):
    """Pixel-space text-to-image: UNet2DConditionModel + a transformers text encoder and tokenizer.

    The tokenizer's model_max_length is the prompt length the UNet was trained with.

    Example:
        >>> pipe = difftrain.load_pipeline("runs/mnist-text")
        >>> image = pipe("A handwritten digit 4", guidance_scale=5.0).images[0]
        >>> images = pipe("A handwritten digit 4", num_images_per_prompt=4,
        ...               generator=torch.Generator().manual_seed(0)).images
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, scheduler: SchedulerMixin, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

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
        images = ImageSampler(self.unet, self.tokenizer, self.text_encoder).generate(
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
            "ClassConditionalPipeline, TextToImagePipeline, StableDiffusionPipeline) and other diffusers pipelines"
        )
    return found


ADAPTER_BASE_FILE = "adapter_base.json"
"""Written beside a LoRA run's pytorch_lora_weights.safetensors: the base pipeline the adapters belong to."""


def load_pipeline(path: Union[str, Path], device: Union[str, torch.device, None] = None) -> DiffusionPipeline:
    """Open an exported difftrain run (or any local diffusers pipeline folder) for inference.

    A LoRA run (pytorch_lora_weights.safetensors, no model_index.json) loads its base pipeline and
    then the adapters with `load_lora_weights`.
    """
    from difftrain.models.pretrained import stable_diffusion_pipeline_class

    adapter_base = Path(path) / ADAPTER_BASE_FILE
    if not (Path(path) / "model_index.json").is_file() and adapter_base.is_file():
        base = json.loads(adapter_base.read_text())["base_model"]
        pipe = stable_diffusion_pipeline_class().from_pretrained(base, safety_checker=None,
                                                                 requires_safety_checker=False)
        pipe.load_lora_weights(str(path))
        return pipe.to(device) if device is not None else pipe
    kind = pipeline_kind(path)
    if kind == "StableDiffusionPipeline":
        pipe = stable_diffusion_pipeline_class().from_pretrained(str(path))
    elif kind == ClassConditionalPipeline.__name__:
        pipe = ClassConditionalPipeline.from_pretrained(str(path))
    elif kind == TextToImagePipeline.__name__:
        pipe = TextToImagePipeline.from_pretrained(str(path))
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
