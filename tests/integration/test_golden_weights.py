"""Golden exported weights: a 4-step run of every config in configs/tiny/ must export the same bits.

The hashes pin the whole path from config to exported files (data order, noise, model construction and
initialisation, loss, optimizer, EMA, export) so that a redesign of the training code can be shown to change
no number. They were recorded from main before the family/objective redesign (issue 17).

Floating-point results depend on the CPU's vector unit (oneDNN/MKL pick kernels by it), so the bit-exact
comparison is made where the CPU capability matches the one recorded; elsewhere each file's tensors are
compared by their sum and sum of squares (rel 1e-4), which still catches any change of the math. The runs use
one thread so that the core count of the machine does not enter the sums.
Regenerate only after a deliberate change: `python -m tests.integration.test_golden_weights <scratch dir>`.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftrain.config import load_config
from difftrain.training.loop import train

from ..instances import write_instance_images

pytestmark = pytest.mark.integration

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

RECORDED_CAPABILITY = "AVX2"
# config -> exported file -> (sha256 of the tensors in key order, sum, sum of squares)
GOLDEN: dict[str, dict[str, tuple[str, float, float]]] = {
    "digits-class": {
        "unet/diffusion_pytorch_model.safetensors":
            ("b0110858daea43f5bd6d4f94e452dc3d93ad5d645f8f4ee95587a37007524413", 331.1767395495116, 919.3621891265736),
    },
    "digits-text": {
        "text_encoder/model.safetensors":
            ("d12787fd846e39ce3c3ee07c41e487630502dc48f7033f2dd026a06e55956f5d", 42.74570902032255, 152.46547531572858),
        "unet/diffusion_pytorch_model.safetensors":
            ("030e4a5be437d93e26951bb72a2ab6ec753cf9094d8ddeb3bf30ba4a4241cce6", 536.8421770325217, 1094.9012531656938),
    },
    "dreambooth-lora": {
        "pytorch_lora_weights.safetensors":
            ("37e1912c10155bc99001cee3191879ff19726ffc9ec623d79562f75ed1adaceb", -11.028454310631787, 187.46852927412715),
    },
    "folder-uncond": {
        "unet/diffusion_pytorch_model.safetensors":
            ("aa2b6071d82f952dae18deb4bb5245f1f6dee8ec153274682439ab77d7a03336", 325.0076877269962, 572.001386813096),
    },
    "mini-sd": {
        "text_encoder/model.safetensors":
            ("70b4af02a55dec958e305e6c63d0c5a9fe7e0ff01296b2a278d903ddb7de0bca", 42.921301902964615, 152.41034680107512),
        "unet/diffusion_pytorch_model.safetensors":
            ("6ce2f52b966d3645e2429b735946017e18ce712d2a2285a30ea448bf05f475d1", 407.21041909107976, 848.6647597331965),
        "vae/diffusion_pytorch_model.safetensors":
            ("9d62a73d49aa24ee6617b015a7c3e77b8a3e003947d5913da0ef46cc83230523", 319.7136483765498, 497.68373287553715),
    },
}


def _digest(path: Path) -> tuple[str, float, float]:
    tensors = load_file(path)
    sha = hashlib.sha256()
    total, squares = 0.0, 0.0
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        sha.update(key.encode())
        sha.update(str(tensor.dtype).encode())
        sha.update(str(tuple(tensor.shape)).encode())
        sha.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        as_double = tensor.double()
        total += float(as_double.sum())
        squares += float((as_double * as_double).sum())
    return sha.hexdigest(), total, squares


def _exported(run: Path) -> dict[str, tuple[str, float, float]]:
    files = sorted(p for p in run.rglob("*.safetensors") if "checkpoints" not in p.relative_to(run).parts)
    return {str(p.relative_to(run)): _digest(p) for p in files}


def run_all(root: Path) -> dict[str, dict[str, tuple[str, float, float]]]:
    """Each tiny config for its 4 steps, on one thread; the mini-sd run is the DreamBooth base."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flowers = SHARED_DATA / "flowers" / "train" / "daisy"
        runs = {
            "digits-class": [],
            "digits-text": [],
            "folder-uncond": [f"data.path={flowers}"],
            "mini-sd": [],
        }
        results = {}
        for name, overrides in runs.items():
            results[name] = _exported(train(load_config(f"tiny/{name}", overrides, output_dir=str(root / name))))
        db_overrides = [f"model.pretrained={root / 'mini-sd'}", f"data.instance_dir={write_instance_images(root / 'instance')}",
                        f"data.class_dir={root / 'class'}"]
        db = train(load_config("tiny/dreambooth-lora", db_overrides, output_dir=str(root / "dreambooth-lora")))
        results["dreambooth-lora"] = _exported(db)
        return results
    finally:
        torch.set_num_threads(threads)


def test_every_tiny_config_exports_the_recorded_weights(tmp_path: Path):
    if not (SHARED_DATA / "flowers").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    results = run_all(tmp_path)
    assert results.keys() == GOLDEN.keys()
    exact = torch.backends.cpu.get_cpu_capability() == RECORDED_CAPABILITY
    for name, files in GOLDEN.items():
        assert results[name].keys() == files.keys(), name
        for file, (sha, total, squares) in files.items():
            got_sha, got_total, got_squares = results[name][file]
            if exact:
                assert got_sha == sha, f"{name}/{file}: exported weights changed"
            else:
                assert (got_total, got_squares) == pytest.approx((total, squares), rel=1e-4), f"{name}/{file}"


if __name__ == "__main__":
    import pprint

    print("RECORDED_CAPABILITY =", repr(torch.backends.cpu.get_cpu_capability()))
    pprint.pprint(run_all(Path(sys.argv[1])), width=120)
