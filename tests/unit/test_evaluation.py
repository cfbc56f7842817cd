"""Evaluation math and caches: Fréchet distance in a closed-form case, KID, classifier cache keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difftrain.evaluation.classifier import data_key, get_classifier
from difftrain.evaluation.metrics import frechet_distance, kernel_distance


def _exact_gaussian_sample(n: int, d: int, seed: int) -> torch.Tensor:
    """Samples whose sample mean is exactly 0 and unbiased sample covariance exactly the identity."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    cov = x.T @ x / (n - 1)
    return x @ torch.linalg.inv(torch.linalg.cholesky(cov)).T


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    # N(m1, s1^2 I) vs N(m2, s2^2 I) in d dims: |m1 - m2|^2 + d (s1 - s2)^2
    d = 4
    a = _exact_gaussian_sample(500, d, 0)
    b = 2.0 * _exact_gaussian_sample(500, d, 1) + 1.0
    assert frechet_distance(a, b) == pytest.approx(d * 1.0 + d * (1.0 - 2.0) ** 2, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_is_near_zero_for_identical_sets_and_positive_for_shifted_ones():
    a = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    same_mean, same_std = kernel_distance(a, a.clone(), subset_size=200)
    shifted, _ = kernel_distance(a, a + 1.0, subset_size=200)
    # The unbiased MMD^2 estimate of a set against itself is slightly negative (its cross term keeps the
    # diagonal); "near 0" means tiny next to a real difference.
    assert shifted > 1.0
    assert abs(same_mean) < 0.01 * shifted and same_std >= 0


def test_classifier_cache_key_changes_with_the_data(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 2
    key = data_key(images, labels, steps=5)
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert data_key(changed, labels, steps=5) != key
    assert data_key(images, 1 - labels, steps=5) != key
    first = get_classifier(images, labels, 2, steps=5)
    assert (tmp_path / "classifiers" / f"{key}.safetensors").is_file()
    again = get_classifier(images, labels, 2, steps=5)  # from the cache: same weights, same accuracy
    assert again.test_accuracy == first.test_accuracy
    for p, q in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)
    other = get_classifier(changed, labels, 2, steps=5)
    assert other.key != first.key
    assert len(list((tmp_path / "classifiers").glob("*.safetensors"))) == 2


def test_evaluation_prompts_follow_how_the_run_was_captioned():
    from difftrain.config import load_config
    from difftrain.families import family_for

    def conditioning_for(cfg, names, n, captions=None):
        return family_for(cfg).evaluation_conditions(names, n, captions)

    names = [str(i) for i in range(10)]
    labelled = load_config("tiny/digits-text")
    labels, prompts = conditioning_for(labelled, names, 12)
    assert labels == [i % 10 for i in range(12)]
    assert prompts[3] == "A handwritten digit 3" and prompts[10] == "A handwritten digit 0"

    free = load_config("tiny/digits-text", ["data.caption_template=null", "sample.prompts=[a, b]"])
    assert conditioning_for(free, names, 3) == (None, ["a", "b", "a"])
    no_prompts = load_config("tiny/digits-text", ["data.caption_template=null"])
    assert conditioning_for(no_prompts, names, 2, captions=["x"]) == (None, ["x", "x"])
    with pytest.raises(ValueError, match="sample.prompts"):
        conditioning_for(no_prompts, names, 2)

    classes = load_config("tiny/digits-class")
    labels, prompts = conditioning_for(classes, names, 4)
    assert labels == [0, 1, 2, 3] and prompts is None
