"""DreamBooth test data: four photos of 'the subject', scikit-learn digit 7s as 16 px RGB PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_instance_images(folder: Path) -> Path:
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    sevens = [i for i, label in enumerate(digits.target) if label == 7][:4]
    for k, i in enumerate(sevens):
        array = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(array).resize((16, 16)).convert("RGB").save(folder / f"seven-{k}.png")
    return folder
