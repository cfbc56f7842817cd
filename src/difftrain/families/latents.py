"""Latent inputs of latent-diffusion training: the frozen VAE, its scale, and the optional latent cache (in RAM, or
with vae.cache_latents_to_disk memory-mapped from the disk tensor cache, data/tensor_cache.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from difftrain.data.batches import MicroBatch
from difftrain.data.tensor_cache import TensorWriter, cached_store, module_fingerprint, rows_digest
from difftrain.data.transforms import to_model_range
from difftrain.models.vae import downsample_factor, encode_distribution_params, sample_latents

logger = logging.getLogger(__name__)

ENCODE_BATCH = 64
"""Images per VAE encoder call when caching (encode_distribution_params' default): the RAM and disk caches encode the
same batches, so they hold the same bits."""

# VAE config entries that do not change what the encoder returns (the scale is applied when a latent is drawn; a
# path or version string would keep one VAE saved in two places from sharing its cache).
_CONFIG_NOT_IN_KEY = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")


def latent_cache_parts(vae: AutoencoderKL, buckets: Sequence[torch.Tensor], random_flip: bool) -> dict[str, Any]:
    """The disk-cache key parts of the latent distributions of `buckets` (uint8 (n, C, H, W) each): the VAE's weights
    (module_fingerprint: names, dtypes, shapes, bytes; a VAE trained in the run is covered like a pretrained one),
    its architecture config, dtype and how it runs (device type, autocast, batch size: a kernel choice changes the
    last bits), a digest of each bucket's images (their count, size, i.e. the resolution or bucket, order and every
    pixel), and the flip setting. The digest is exact and cheap beside encoding: on a 2-core AMD EPYC VM
    (OMP_NUM_THREADS=1) rows_digest took 0.65-0.8 ms per 512x512 image and 3-3.7 ms per 1024x1024 one (about
    1 GiB/s), where the SD/SDXL VAE's encoder (fp32, one thread) took 21.8 s and 101 s per image; a GPU encodes
    in milliseconds, still more than the digest, which reads each image once per run."""
    device = vae.device
    autocast = torch.is_autocast_enabled(device.type)
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_") and k not in _CONFIG_NOT_IN_KEY}
    return {
        "vae": module_fingerprint(vae), "vae_class": type(vae).__name__,
        "vae_config": json.loads(json.dumps(config, sort_keys=True, default=str)),
        "dtype": str(vae.dtype).removeprefix("torch."), "device": device.type,
        "autocast": str(torch.get_autocast_dtype(device.type)) if autocast else None, "batch_size": ENCODE_BATCH,
        "images": [rows_digest(images) for images in buckets],
        "shapes": [list(images.shape) for images in buckets],
        "random_flip": bool(random_flip),
    }


def bucket_tensor_name(bucket: int, images: torch.Tensor) -> str:
    """The store's tensor of a bucket's distributions: `latents/<bucket>-<W>x<H>` (in pixels)."""
    return f"latents/{bucket}-{int(images.shape[-1])}x{int(images.shape[-2])}"


class LatentEncoder:
    """Maps dataset indices to scaled latent samples x0 for one training batch.

    With `cache`, every image is encoded once (and once flipped when flips are on) and each step samples
    from the cached Gaussians; otherwise each batch is encoded on the fly. Both draw the flips and the
    latent noise from the step's generator in the same order, so they train on the same distribution.
    """

    def __init__(self, vae: AutoencoderKL, scaling_factor: float,
                 images_uint8: Union[torch.Tensor, Sequence[torch.Tensor]], random_flip: bool, cache: bool,
                 bucket_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None, disk: bool = False):
        """`images_uint8`: (N, C, H, W), or with data.buckets one such tensor per bucket and `bucket_index` =
        (bucket of each row, its index in its bucket): each bucket's latents are cached in their own tensor.
        `disk` (with `cache`; vae.cache_latents_to_disk): the cache is a store on disk, memory-mapped on the CPU
        (`disk_cache`), instead of tensors on the VAE's device."""
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.random_flip = random_flip
        self.bucket_index = bucket_index
        buckets = [images_uint8] if bucket_index is None else list(images_uint8)
        self.bucket_sizes = [int(images.shape[0]) for images in buckets]
        self.num_images = sum(self.bucket_sizes)
        self.bucket_params: Optional[list[torch.Tensor]] = None
        """Cached distribution parameters per bucket (one bucket without data.buckets), flipped copies after them."""
        self.store_folder: Optional[Path] = None
        """The disk cache's folder (vae.cache_latents_to_disk), else None."""
        self.reused: Optional[bool] = None
        """With the disk cache: whether it was found built (the VAE encoder did not run)."""
        self.layouts: list[torch.Tensor] = []
        """With the disk cache: each bucket's tensor as the RAM cache would lay it out, on the meta device (no memory).
        The encoder's output may come in channels_last strides (CPU convolutions do), which the RAM cache, its rows
        and the drawn latents keep, and the network's convolutions round differently on other strides; the disk
        cache's rows are given the same strides, so the run trains to the same bits."""
        if cache and disk:
            self.bucket_params = self.disk_cache(buckets)
        elif cache:
            self.bucket_params = []
            for images in buckets:
                parts = [encode_distribution_params(vae, images)]
                if random_flip:
                    parts.append(encode_distribution_params(vae, images, flip=True))
                self.bucket_params.append(torch.cat(parts))
            logger.info("cached latent distributions of %d images%s%s (%.1f MiB); the VAE encoder is not run per step",
                        self.num_images, " x 2 flips" if random_flip else "",
                        "" if bucket_index is None else f" in {len(buckets)} buckets",
                        sum(p.numel() for p in self.bucket_params) * 4 / 2**20)

    @torch.no_grad()
    def disk_cache(self, buckets: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each bucket's distribution parameters from the disk tensor cache (kind "latents"): the tensors the RAM
        cache holds, as float32 files memory-mapped on the CPU, built once (ENCODE_BATCH images at a time, written as
        they come, so nothing of the size of the cache is held in memory) and reused by any run whose key parts
        match (latent_cache_parts). A VAE trained in this run is keyed by its weights like any other: a run that
        retrains the same VAE, or resumes with the one it saved, reuses its store; any other VAE writes its own."""
        vae, flips = self.vae, self.random_flip
        names = [bucket_tensor_name(b, images) for b, images in enumerate(buckets)]
        factor, channels = downsample_factor(vae), 2 * int(vae.config.latent_channels)
        shapes = [((2 if flips else 1) * int(images.shape[0]), channels, int(images.shape[-2]) // factor,
                   int(images.shape[-1]) // factor) for images in buckets]
        size = sum(torch.Size(shape).numel() for shape in shapes) * 4
        built: list[bool] = []

        def build(writer: TensorWriter) -> None:
            built.append(True)
            writer.meta["strides"] = {}
            for name, images, shape in zip(names, buckets, shapes):
                writer.create(name, shape, torch.float32)
                n, passes = int(images.shape[0]), []
                for flip in ([False, True] if flips else [False]):
                    chunks = []
                    for start in range(0, n, ENCODE_BATCH):
                        params = encode_distribution_params(vae, images[start:start + ENCODE_BATCH], flip=flip,
                                                            batch_size=ENCODE_BATCH)
                        writer.write(name, start + (n if flip else 0), params)
                        chunks.append(torch.empty_strided(params.shape, params.stride(), device="meta"))
                    passes.append(torch.cat(chunks) if chunks else torch.empty((0, *shape[1:]), device="meta"))
                writer.meta["strides"][name] = list(torch.cat(passes).stride())

        what = (f"latent distributions of {self.num_images} images{' x 2 flips' if flips else ''}"
                f"{'' if self.bucket_index is None else f' in {len(buckets)} buckets'}")
        store = cached_store("latents", latent_cache_parts(vae, buckets, flips), build, estimate_bytes=size,
                             what=what)
        self.store_folder, self.reused = store.folder, not built
        strides = store.meta.get("strides", {})
        self.layouts = [torch.empty_strided(shape, strides.get(name, torch.empty(shape, device="meta").stride()),
                                            device="meta") for name, shape in zip(names, shapes)]
        logger.info("%s memory-mapped from %s (%.1f MiB on disk; %s)", what, store.folder, size / 2**20,
                    "written: the VAE encoder ran once" if built else "reused: the VAE encoder did not run")
        return [store[name] for name in names]

    @property
    def params(self) -> Optional[torch.Tensor]:
        """The cache of data without buckets: (N or 2N with flips, 2 x latent channels, h, w)."""
        return None if self.bucket_params is None else self.bucket_params[0]

    def draw(self, micro: MicroBatch, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of a gathered micro-batch: from the cache by its rows, or encoded from its images."""
        return self.draw_with_mask(micro, generator)[0]

    def draw_with_mask(self, micro: MicroBatch, generator: torch.Generator,
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """`draw`, the micro-batch's loss masks flipped as its latents and area-downsampled to their size
        ((B, 1, h, w) float in [0, 1]; None without masks), and which images were flipped ((B,) bool, None without
        data.random_flip; SDXL mirrors their crop ids)."""
        device = self.vae.device
        flip = None
        if self.random_flip:
            flip = torch.rand(micro.rows.shape[0], generator=generator, device=device) < 0.5
        if self.bucket_params is not None:
            rows, bucket = micro.rows, 0
            if self.bucket_index is not None:
                bucket = int(self.bucket_index[0][rows[0]])
                rows = self.bucket_index[1][rows]
            rows = rows.to(device)
            if flip is not None:
                rows = rows + flip.long() * self.bucket_sizes[bucket]
            table = self.bucket_params[bucket]  # the disk cache's stays memory-mapped on the CPU: rows read there
            params = table[rows.to(table.device)].to(device)
            if self.layouts:  # the disk cache's rows, in the strides the RAM cache's rows would have
                layout = self.layouts[bucket][rows.to("meta")]
                if params.stride() != layout.stride():
                    params = torch.empty_strided(layout.shape, layout.stride(), dtype=params.dtype,
                                                 device=device).copy_(params)
        else:
            x = to_model_range(micro.images.to(device))
            if flip is not None:
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with torch.no_grad():
                params = self.vae.encode(x.to(self.vae.dtype)).latent_dist.parameters.float()
        x0 = sample_latents(params, generator) * self.scaling_factor
        mask = None
        if micro.masks is not None:
            mask = micro.masks.to(device).float() / 255.0
            if flip is not None:
                mask = torch.where(flip[:, None, None, None], mask.flip(-1), mask)
            mask = F.interpolate(mask, size=tuple(x0.shape[-2:]), mode="area")
        return x0, mask, flip
