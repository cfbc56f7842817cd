"""SDXL text conditioning against diffusers' own StableDiffusionXLPipeline.encode_prompt, and the size/crop ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difftrain.models.sdxl_text import DualTextConditioner, encode_sdxl, load_sdxl_text_encoders, sdxl_time_ids, token_ids

from ..tiny_sdxl import build_tiny_sdxl


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "base")


def test_states_and_pooled_match_the_pipelines_encode_prompt(tiny_sdxl: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    prompts = ["a photo of sks dog", "a red flower"]
    expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    tokenizers, encoders = load_sdxl_text_encoders(str(tiny_sdxl))
    with torch.no_grad():
        states, pooled = encode_sdxl(encoders, token_ids(tokenizers, prompts))
    assert states.shape == (2, 77, 64) and pooled.shape == (2, 32)
    torch.testing.assert_close(states, expected, rtol=0, atol=0)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=0)

    # The cached conditioner gives the same rows by caption id as encoding the texts in the step.
    vocab = ["a photo of sks dog", "a red flower", ""]
    conditioner = DualTextConditioner(tokenizers, encoders, vocab, trainable=False)
    conditioner.precompute()
    by_id = conditioner(torch.tensor([1, 0, 1]))
    by_text = conditioner(["a red flower", "a photo of sks dog", "a red flower"])
    assert torch.equal(by_id[0], by_text[0]) and torch.equal(by_id[1], by_text[1])
    # The empty prompt (a dropped caption) is zeros, as the pipeline's force_zeros_for_empty_prompt feeds guidance.
    dropped = conditioner(torch.tensor([2, 0]))
    assert not dropped[0][0].any() and not dropped[1][0].any()
    assert torch.equal(dropped[0][1], by_id[0][1]) and torch.equal(dropped[1][1], by_id[1][1])
    assert not conditioner(["", "a red flower"])[0][0].any()


def test_time_ids_are_original_size_crop_and_target():
    ids = sdxl_time_ids(torch.tensor([[768, 1024], [512, 512]]), torch.tensor([[0, 96], [0, 0]]), (512, 512), 2,
                        torch.device("cpu"))
    assert ids.tolist() == [[768, 1024, 0, 96, 512, 512], [512, 512, 0, 0, 512, 512]]
    assert ids.dtype == torch.float32
    # Without recorded sizes: an uncropped image at the target size, what the pipelines pass by default.
    assert sdxl_time_ids(None, None, (64, 96), 1, torch.device("cpu")).tolist() == [[64, 96, 0, 0, 64, 96]]
