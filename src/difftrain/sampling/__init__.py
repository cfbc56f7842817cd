"""Sampling: schedulers by name, classifier-free guidance, per-image seeds, image grids, and uint8 images
from a UNet and its conditioners (`generate.ImageSampler`).

Never imports training code or the pipelines, so a trained model samples without the training stack.
"""
