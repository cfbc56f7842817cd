"""difftrain's pipelines take diffusers' call arguments: generator=, num_images_per_prompt, output_type, return_dict.

Tiny real UNets and text encoder, built in the test; DDPM steps, so the per-step noise is drawn too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from PIL import Image

from difftrain.config import DiffusionConfig, TextEncoderConfig
from difftrain.diffusion.schedule import build_noise_scheduler
from difftrain.models.text import build_caption_tokenizer, build_scratch_text_encoder
from difftrain.pipeline import ClassConditionalPipeline, TextToImagePipeline
from difftrain.sampling.generate import ImageSampler, generate
from difftrain.sampling.schedulers import make_scheduler

STEPS = 3
CAPTIONS = [f"A handwritten digit {d}" for d in range(10)]


def _scheduler():
    return make_scheduler("ddpm", build_noise_scheduler(DiffusionConfig()).config)


@pytest.fixture(scope="module")
def class_pipe() -> ClassConditionalPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4, num_class_embeds=4).eval()
    return ClassConditionalPipeline(unet, _scheduler(), class_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def text_pipe() -> TextToImagePipeline:
    tokenizer = build_caption_tokenizer(CAPTIONS, 8)
    torch.manual_seed(0)
    encoder = build_scratch_text_encoder(tokenizer, TextEncoderConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                                      max_length=8)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                attention_head_dim=4, cross_attention_dim=16).eval()
    return TextToImagePipeline(unet, _scheduler(), encoder, tokenizer)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_class_pipeline_generators_give_the_images_of_the_same_seeds(class_pipe):
    by_seed = class_pipe([0, 1, 2], num_inference_steps=STEPS, seed=[5, 6, 9], output_type="np").images
    by_generator = class_pipe([0, 1, 2], num_inference_steps=STEPS, generator=_generators([5, 6, 9]),
                              output_type="np").images
    np.testing.assert_array_equal(by_generator, by_seed)
    # The default (no seed, no generator) is still seed 0, 1, 2, ...: results saved before do not change.
    default = class_pipe([0, 1], num_inference_steps=STEPS, output_type="np").images
    direct = generate(class_pipe.unet, class_pipe.scheduler, [0, 1], num_inference_steps=STEPS, class_labels=[0, 1],
                      guidance_scale=2.0)
    np.testing.assert_array_equal(default, direct.permute(0, 2, 3, 1).numpy().astype("float32") / 255.0)


def test_text_pipeline_generators_give_the_images_of_the_same_seeds(text_pipe):
    prompts = [CAPTIONS[3], CAPTIONS[7]]
    by_seed = text_pipe(prompts, num_inference_steps=STEPS, seed=[4, 8], output_type="np").images
    by_generator = text_pipe(prompts, num_inference_steps=STEPS, generator=_generators([4, 8]), output_type="np").images
    np.testing.assert_array_equal(by_generator, by_seed)
    assert not np.array_equal(by_seed[0], by_seed[1])


def test_one_generator_serves_the_whole_batch(class_pipe, text_pipe):
    first = class_pipe([0, 1, 2], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                       output_type="np").images
    again = class_pipe([0, 1, 2], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                       output_type="np").images
    assert first.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1])
    generator = torch.Generator().manual_seed(3)
    text = text_pipe(CAPTIONS[1], num_images_per_prompt=2, num_inference_steps=STEPS, generator=generator,
                     output_type="np").images
    assert text.shape == (2, 8, 8, 1) and not np.array_equal(text[0], text[1])
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())  # it was drawn from


def test_num_images_per_prompt_repeats_each_label_and_prompt(class_pipe, text_pipe):
    repeated = class_pipe([1, 2], num_images_per_prompt=2, num_inference_steps=STEPS, output_type="np").images
    listed = class_pipe([1, 1, 2, 2], num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_array_equal(repeated, listed)
    per_image = text_pipe([CAPTIONS[2], CAPTIONS[5]], num_images_per_prompt=2, num_inference_steps=STEPS,
                          generator=_generators([0, 1, 2, 3]), output_type="np").images
    listed = text_pipe([CAPTIONS[2], CAPTIONS[2], CAPTIONS[5], CAPTIONS[5]], num_inference_steps=STEPS,
                       output_type="np").images
    np.testing.assert_array_equal(per_image, listed)
    with pytest.raises(ValueError, match="num_images_per_prompt 0"):
        class_pipe([1], num_images_per_prompt=0)


def test_output_types_and_return_dict(class_pipe, text_pipe):
    array = class_pipe([0, 2], num_inference_steps=STEPS, output_type="np").images
    assert isinstance(array, np.ndarray) and array.shape == (2, 8, 8, 1) and array.dtype == np.float32
    assert 0.0 <= array.min() and array.max() <= 1.0
    tensor = class_pipe([0, 2], num_inference_steps=STEPS, output_type="pt").images
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 1, 8, 8) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor.permute(0, 2, 3, 1).numpy(), array)
    pil = class_pipe([0, 2], num_inference_steps=STEPS).images
    assert len(pil) == 2 and all(isinstance(image, Image.Image) and image.size == (8, 8) for image in pil)
    assert np.array_equal(np.asarray(pil[1]), np.round(array[1, ..., 0] * 255).astype(np.uint8))
    plain = text_pipe(CAPTIONS[0], num_inference_steps=STEPS, output_type="pt", return_dict=False)
    assert isinstance(plain, tuple) and len(plain) == 1 and plain[0].shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="output_type 'latent'"):
        class_pipe([0], num_inference_steps=STEPS, output_type="latent")


def test_bad_seed_and_generator_arguments_are_named(class_pipe):
    with pytest.raises(ValueError, match="pass one of them"):
        class_pipe([0], seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="a list of 1 for 2 images"):
        class_pipe([0, 1], generator=_generators([0]))
    with pytest.raises(ValueError, match="a list of 3 for 2 images"):
        class_pipe([0, 1], seed=[0, 1, 2])


def test_image_sampler_from_each_pipeline(class_pipe, text_pipe):
    sampler = ImageSampler.from_pipeline(class_pipe)
    assert (sampler.kind, sampler.num_classes) == ("class", 3)
    text = ImageSampler.from_pipeline(text_pipe)
    assert (text.kind, text.num_classes, text.vae) == ("text", 0, None)
    assert text.tokenizer is text_pipe.tokenizer
    with pytest.raises(ValueError, match="needs prompts"):
        text.generate(_scheduler(), [0], num_inference_steps=STEPS, labels=[0])
    from diffusers import DDPMPipeline

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    unconditional = DDPMPipeline(unet, _scheduler())
    plain = ImageSampler.from_pipeline(unconditional)
    assert (plain.kind, plain.num_classes) == ("unconditional", 0)
    images = plain.generate(_scheduler(), [0, 1], num_inference_steps=STEPS)
    assert images.shape == (2, 1, 8, 8) and images.dtype == torch.uint8
