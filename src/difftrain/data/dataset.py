"""Decode a data source once into a uint8 tensor at the training resolution.

Decoding, mode conversion, resize and crop are deterministic, so they run once at start-up (in
threads; PIL releases the GIL); each step then only indexes, flips and normalises tensors.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from difftrain.config import DataConfig
from difftrain.data.batches import MicroBatch
from difftrain.data.captions import resolve_captions
from difftrain.data.bucketed import BucketedImageDataset
from difftrain.data.image_dataset import ImageDataset, log_skipped
from difftrain.data.masks import MaskSizeError, mask_paths, read_mask
from difftrain.data.disk_cache import DiskCache, decode_to_disk, folder_cache_key, memory_budget_bytes, open_cache
from difftrain.data.folder_summary import summarize_folder
from difftrain.data.sources import (
    ImageSource,
    dangling_link_message,
    folder_source,
    is_mnist_folder,
    is_saved_datasets_dir,
    open_source,
)
from difftrain.data.buckets import nearest_bucket, resolve_buckets
from difftrain.data.transforms import (check_pixel_limit, covering_size, draft_for_resolution,
                                       prepare_image_at)

logger = logging.getLogger(__name__)


@dataclass
class CachedImageDataset(ImageDataset):
    """An ImageDataset memory-mapped from the disk cache: `gather` checks each row it reads against the cache's
    checksums and repairs a corrupt chunk from the source (data/disk_cache.py); safe in forked loader workers."""

    in_memory: bool = False
    cache: Optional[DiskCache] = None

    def gather(self, rows: torch.Tensor) -> MicroBatch:
        if self.cache is None:
            return super().gather(rows)
        images = self.cache.read(rows)
        self.cache.check(rows, images)
        return MicroBatch(rows, images, None if self.labels is None else self.labels[rows])


@dataclass
class ImageFacts:
    """What an image was before conversion (for `difftrain check`)."""

    mode: str
    size: tuple[int, int]
    format: Optional[str]
    transparency: bool
    crop_top_left: tuple[int, int] = (0, 0)
    """(top, left) of the crop in the resized image."""
    mask: Optional[np.ndarray] = None
    """The loss mask (1, H, W) uint8, resized and cropped as the image, when it has one."""

    @property
    def original_size(self) -> tuple[int, int]:
        """(height, width) from the header."""
        return self.size[1], self.size[0]


def bucket_sizes_of(cfg: DataConfig) -> Optional[list[tuple[int, int]]]:
    """The (width, height) buckets of `cfg.buckets`, None when off. 'auto' is resolved by the family first
    (Family.data_config: it needs the network's size multiple)."""
    if cfg.buckets in (None, "off"):
        return None
    if cfg.buckets == "auto":
        raise ValueError("data.buckets = 'auto' must be resolved against the network first (Family.data_config)")
    return resolve_buckets(cfg.buckets, cfg.resolution, 1)


def decode_item(source: ImageSource, index: int, cfg: DataConfig, mask_path: Optional[str] = None,
                ) -> tuple[np.ndarray, ImageFacts]:
    """Read, convert, resize and crop item `index` (and its loss mask, the same way): the one reader of training and
    `difftrain check`.

    With data.buckets the image goes to the bucket of nearest aspect ratio. Raises ImageTooLarge, from the header
    alone, for an image over `cfg.max_image_pixels`, MaskSizeError for a mask of another size, and whatever the
    decoder raises for an unreadable, truncated or non-image file. Large JPEGs decode at reduced scale.
    """
    with source.open(index) as image:
        size = image.size  # from the header: PIL has decoded nothing yet
        check_pixel_limit(size, cfg.max_image_pixels)
        buckets = bucket_sizes_of(cfg)
        width, height = (cfg.resolution, cfg.resolution) if buckets is None else buckets[nearest_bucket(size, buckets)]
        draft_for_resolution(image, max(width, height))
        image.load()
        resized = covering_size(image.size, width, height) if cfg.center_crop else (width, height)
        array, crop = prepare_image_at(image, width, height, cfg.channels, cfg.center_crop)
        facts = ImageFacts(image.mode, size, image.format, "transparency" in image.info, crop)
    if mask_path is not None:
        facts.mask = read_mask(mask_path, source.names[index], size, resized, crop, (width, height))
    return array, facts


def _decode(source: ImageSource, index: int, cfg: DataConfig) -> np.ndarray:
    return decode_item(source, index, cfg)[0]


def decode_source(source: ImageSource, cfg: DataConfig, captions: Optional[list[Optional[str]]] = None) -> ImageDataset:
    """Decode every item; unreadable or captionless ones are skipped, named in a warning and counted."""
    count = len(source) if cfg.max_images is None else min(len(source), cfg.max_images)
    skipped: list[tuple[str, str]] = [(path, f"dangling link: {dangling_link_message(target)}")
                                       for path, target in source.dangling_links]
    buckets = bucket_sizes_of(cfg)
    masks = mask_paths(source, cfg, count)
    if count * cfg.channels * cfg.resolution ** 2 > memory_budget_bytes(cfg):
        for what, key in ((buckets, "data.buckets"), (masks, "loss masks (data.mask_dir, NAME.mask.png)")):
            if what is not None:
                raise ValueError(f"{key}: {source.description} is over the memory budget (data.max_memory_gb), and the "
                                 "disk cache holds square images without masks only; raise data.max_memory_gb or "
                                 f"turn {key.split(' ')[0]} off")
        cache = decode_to_disk(source, cfg, count, captions, lambda i: _decode(source, i, cfg))
        return _dataset(source, cache.images, cache.rows, sorted(skipped + cache.skipped), count, captions, cache)
    arrays: list[Optional[np.ndarray]] = [None] * count
    mask_arrays: list[Optional[np.ndarray]] = [None] * count
    geometry: list[Optional[tuple[int, int, int, int]]] = [None] * count

    def work(i: int) -> None:
        if captions is not None and not captions[i]:
            skipped.append((source.names[i], "missing or empty caption"))
            return
        try:
            arrays[i], facts = decode_item(source, i, cfg, masks[i] if masks else None)
            geometry[i], mask_arrays[i] = (*facts.original_size, *facts.crop_top_left), facts.mask
        except MaskSizeError:
            raise
        except Exception as exc:  # any decoder failure means "not a readable image"
            skipped.append((source.names[i], f"{type(exc).__name__}: {exc}"))

    with ThreadPoolExecutor(max_workers=cfg.decode_workers) as pool:
        list(pool.map(work, range(count)))
    keep = [i for i in range(count) if arrays[i] is not None]
    if masks is not None:
        unmasked = [i for i in keep if mask_arrays[i] is None]
        if unmasked:
            logger.info("loss masks: %d of %d images have none and train everywhere (first: %s)", len(unmasked),
                        len(keep), source.names[unmasked[0]])
        for i in unmasked:
            mask_arrays[i] = np.full((1, *arrays[i].shape[1:]), 255, dtype=np.uint8)
    stack = buckets is None
    images = torch.from_numpy(np.stack([arrays[i] for i in keep])) if keep and stack else \
        torch.empty(0, dtype=torch.uint8)
    dataset = _dataset(source, images, keep, sorted(skipped), count, captions)
    table = torch.tensor([geometry[i] for i in keep], dtype=torch.long).reshape(len(keep), 4)
    dataset.original_sizes, dataset.crops_top_left = table[:, :2].contiguous(), table[:, 2:].contiguous()
    if masks is not None and stack:
        dataset.masks = torch.from_numpy(np.stack([mask_arrays[i] for i in keep]))
    if not stack:
        dataset = BucketedImageDataset.from_arrays(dataset, [arrays[i] for i in keep], buckets, cfg.resolution,
                                                   None if masks is None else [mask_arrays[i] for i in keep])
    return dataset


def _dataset(source: ImageSource, images: torch.Tensor, keep: Sequence[int], skipped: list[tuple[str, str]],
             count: int, captions: Optional[list[Optional[str]]], cache: Optional[DiskCache] = None) -> ImageDataset:
    """The decoded rows `keep` of `source` (in RAM, or memory-mapped from `cache`, whose labels and names are read
    from its files) with their labels, captions and names."""
    _report_skipped(source.description, skipped, count + len(source.dangling_links), len(keep))
    kept_captions = None if captions is None else [str(captions[i]) for i in keep]
    if cache is not None:
        return CachedImageDataset(images, cache.labels, list(source.class_names), source.description, skipped,
                                  kept_captions, cache.names, cache=cache)
    labels = None
    if source.labels is not None:
        labels = torch.tensor([source.labels[i] for i in keep], dtype=torch.long)
    return ImageDataset(images, labels, list(source.class_names), source.description, skipped, kept_captions,
                        [source.names[i] for i in keep])


def _report_skipped(description: str, skipped: list[tuple[str, str]], total: int, usable: int) -> None:
    """Warn each skipped item, and refuse a set of which none is usable, naming its first problem."""
    log_skipped(skipped, total)
    if not usable:
        raise ValueError(f"data set {description} has no usable images (of {total} items; "
                         f"first problem: {skipped[0][0]}: {skipped[0][1]})")


class _FolderDecoder:
    """Decodes item i of an image folder that is listed only when first asked (a cache repair): a warm start
    keeps no listing."""

    def __init__(self, folder: Path, cfg: DataConfig):
        self.folder, self.cfg, self.source = folder, cfg, None

    def __call__(self, index: int) -> np.ndarray:
        if self.source is None:
            self.source = folder_source(self.folder)
        return _decode(self.source, index, self.cfg)


def _built_folder_cache(cfg: DataConfig, want_labels: bool) -> Optional[CachedImageDataset]:
    """A whole image folder over the memory budget whose disk cache is built, opened without listing the folder
    into memory (data/folder_summary.py); None where the listing path is needed (anything else, or no cache)."""
    folder = Path(cfg.path).expanduser()
    if cfg.buckets != "off" or cfg.mask_dir is not None:  # the listing path refuses them over the budget
        return None
    if cfg.max_images is not None or cfg.source not in ("auto", "folder") or not folder.is_dir() or \
            (cfg.source == "auto" and (is_saved_datasets_dir(folder) or is_mnist_folder(folder))):
        return None
    summary = summarize_folder(folder)
    if summary is None or (want_labels and not summary.class_names) or \
            summary.count * cfg.channels * cfg.resolution ** 2 <= memory_budget_bytes(cfg):
        return None
    cache = open_cache(cfg, folder_cache_key(summary, cfg), _FolderDecoder(folder, cfg))
    if cache is None:
        return None
    skipped = sorted([(path, f"dangling link: {dangling_link_message(target)}")
                      for path, target in summary.dangling_links] + cache.skipped)
    _report_skipped(summary.description, skipped, summary.count + len(summary.dangling_links), len(cache.rows))
    return CachedImageDataset(cache.images, cache.labels if want_labels else None, summary.class_names,
                              summary.description, skipped, None, cache.names, cache=cache)


def load_image_dataset(cfg: DataConfig, want_labels: bool, want_captions: bool = False) -> ImageDataset:
    """Open `cfg.path` and decode it (with captions for text models). Errors name the path and what was expected."""
    if not want_captions:
        built = _built_folder_cache(cfg, want_labels)
        if built is not None:
            return built
    source = open_source(cfg.path, cfg.source, cfg.split, cfg.image_column, cfg.label_column,
                         want_labels or (want_captions and cfg.caption_template is not None), cfg.caption_column)
    if len(source) == 0:
        links = source.dangling_links
        broken = f"; {len(links)} dangling link(s), e.g. {links[0][0]} -> {links[0][1]}" if links else ""
        raise ValueError(f"data.path = {cfg.path!r} ({source.description}) holds no images{broken}")
    if want_labels and source.labels is None:
        raise ValueError(
            f"model.conditioning = 'class' needs labels, but {source.description} has none "
            "(use one subfolder per class, or set data.label_column)"
        )
    captions = resolve_captions(source, cfg) if want_captions else None
    dataset = decode_source(source, cfg, captions)
    if not want_labels:
        dataset.labels = None
    return dataset


def load_dreambooth_dataset(cfg: DataConfig, class_dir: Optional[Path]) -> tuple[ImageDataset, int]:
    """Instance images captioned `instance_prompt`, then (with `class_dir`) up to `num_class_images` class
    images captioned `class_prompt`, in one data set; returns it and the number of instance images."""
    instance_cfg = dataclasses.replace(cfg, path=cfg.instance_dir, source="folder", max_images=None)
    instance = load_image_dataset(instance_cfg, want_labels=False)
    instance.captions = [str(cfg.instance_prompt)] * len(instance)
    instance.description = f"instance images {cfg.instance_dir}"
    if class_dir is None:
        return instance, len(instance)
    if not class_dir.is_dir():
        raise FileNotFoundError(f"class image folder {class_dir} does not exist (data.class_dir)")
    class_cfg = dataclasses.replace(cfg, path=str(class_dir), source="folder", max_images=cfg.num_class_images)
    prior = load_image_dataset(class_cfg, want_labels=False)
    def joined(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if a is None or b is None else torch.cat([a, b])

    combined = ImageDataset(
        images=torch.cat([instance.images, prior.images]),
        labels=None,
        class_names=[],
        description=f"{instance.description} + class images {class_dir}",
        skipped=instance.skipped + prior.skipped,
        captions=instance.captions + [str(cfg.class_prompt)] * len(prior),
        names=[*(instance.names or []), *(prior.names or [])],
        masks=_joined_masks(instance, prior),
        original_sizes=joined(instance.original_sizes, prior.original_sizes),
        crops_top_left=joined(instance.crops_top_left, prior.crops_top_left),
    )
    return combined, len(instance)


def _joined_masks(a: ImageDataset, b: ImageDataset) -> Optional[torch.Tensor]:
    """The masks of two data sets one after the other (a full mask for images of the one without masks)."""
    if a.masks is None and b.masks is None:
        return None

    def full(d: ImageDataset) -> torch.Tensor:
        if d.masks is not None:
            return d.masks
        logger.info("loss masks: %d images of %s have none and train everywhere", len(d), d.description)
        return torch.full((len(d), 1, *d.images.shape[-2:]), 255, dtype=torch.uint8)

    return torch.cat([full(a), full(b)])
