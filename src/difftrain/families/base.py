"""The family interface: what differs between kinds of model, behind one small class per kind.

A family owns its components (denoising network, conditioner, tokenizer, VAE), turns data rows into
model inputs, calls the network, says which parameters train, builds the sampler for previews and
evaluation, and exports the pipeline folder. The training loop, the step, sampling and evaluation call
only this interface; the objective (diffusion/objective.py) decides noise, times, target and weighting.

Life of a family in a run, in call order:
    check_files -> prepare_before_data -> load_data -> plan -> prepare_after_data      (no model built yet)
    network_spec (mixed-precision probe) -> build_models -> use_prepared               (after the Accelerator)
    per micro-batch: rows (the loader gathers them) -> batch -> network (inside autocast) -> reduce_loss
    sampler / preview_conditions / evaluation_conditions -> export -> write_model_card
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

from difftrain.config import RunConfig
from difftrain.data.batches import MicroBatch, TrainingData
from difftrain.diffusion.objective import Network, Objective
from difftrain.sampling.generate import ImageSampler

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro-batch as model inputs: x0 (pixels in [-1, 1] or scaled latents) and the family's condition
    (class labels or caption ids after condition dropout, or None), on the device."""

    x0: torch.Tensor
    condition: Any = None
    mask: Optional[torch.Tensor] = None
    """(B, 1, h, w) float loss mask in [0, 1] at x0's resolution (1: trained), or None for the whole image."""


@dataclass
class Models:
    """What a family trains and uses, before accelerate prepares it."""

    network: torch.nn.Module
    """The denoising network (its trained parameters are the ones the EMA follows)."""
    trained: list[tuple[torch.nn.Module, Optional[float]]] = field(default_factory=list)
    """Other trained modules and their learning rate (None: train.learning_rate)."""
    frozen: list[torch.nn.Module] = field(default_factory=list)
    """Modules the step uses without training them; moved to the device."""


@dataclass
class NetworkSpec:
    """The denoising network as the mixed-precision probe sees it (training/precision.py)."""

    build: Callable[[], torch.nn.Module]
    config: dict
    """Describes the network for the probe's cache key (a cache hit builds nothing)."""
    text_length: Optional[int] = None
    """Tokens per prompt of cross-attention inputs, None without text."""


@dataclass
class PreviewLayout:
    """A preview grid: one row per class or prompt (row_names), or a square grid of unconditional samples."""

    count: int
    per_row: int
    labels: Optional[list[int]] = None
    prompts: Optional[list[str]] = None
    row_names: Optional[list[str]] = None


@dataclass
class RunSummary:
    """Numbers of a finished run for the model card."""

    data_description: str
    num_images: int
    num_skipped: int
    steps: int
    images_seen: int
    epochs: float
    num_parameters: int
    train_seconds: float
    final_loss: Optional[float]
    sample_grid: Optional[str]


class Family(ABC):
    """One kind of model. Subclasses set `name`, implement the abstract methods and are listed in
    families/__init__.py's FAMILIES; `handles(cfg)` says which configs they train."""

    name: ClassVar[str]
    streams: ClassVar[bool] = False
    """Whether the family trains from streamed shards (data/streaming.py): it needs nothing of the data set up front
    (no caption vocabulary, no latent cache)."""
    latent: ClassVar[bool] = False
    """Whether x0 is a VAE latent (the objective's schedule then never clips x0 to [-1, 1])."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dataset: Optional[TrainingData] = None
        """Decoded (an ImageDataset: RAM or disk cache) or streamed (data/streaming.py), set by load_data."""
        self.num_train_images = 0
        """Images the epoch count refers to (DreamBooth: the instance images; class images follow them)."""

    @classmethod
    @abstractmethod
    def handles(cls, cfg: RunConfig) -> bool:
        """Whether this family trains `cfg` (the registry asks each family in turn)."""

    # -- before any model is built: nothing here writes unless it starts the run folder itself --------------------

    def check_files(self) -> None:
        """Checks that need files but no model (a base pipeline's layout, an instance folder, data.buckets against the
        network's configs, loss mask sizes)."""
        instance_dir = self.cfg.data.instance_dir
        if instance_dir is not None:
            from difftrain.data.sources import open_source

            if len(open_source(instance_dir, "folder", "train", "image", None, False, None)) == 0:
                raise ValueError(f"data.instance_dir = {instance_dir!r} holds no images")
        self.check_data_settings()

    def size_multiple(self) -> int:
        """What every side of a training image (in pixels) must divide by for the network (and VAE) to take it, from
        configs alone (no weights); raises ValueError when the network takes square inputs only (data.buckets reads
        it before any model loads)."""
        return 1

    def data_config(self) -> Any:
        """`cfg.data` with data.buckets resolved against `size_multiple()` ('auto': the bucket list; a list: checked,
        ValueError naming the entry the network cannot take)."""
        import dataclasses

        from difftrain.data.buckets import format_bucket, resolve_buckets

        d = self.cfg.data
        if d.buckets == "off":
            return d
        sizes = resolve_buckets(d.buckets, d.resolution, self.size_multiple())
        return dataclasses.replace(d, buckets=[format_bucket(size) for size in sizes])

    def check_data_settings(self) -> None:
        """Before any model loads: data.buckets against the network, each loss mask's size against its image's
        (headers only), and no buckets or masks on streamed data."""
        from difftrain.data.masks import check_mask_sizes
        from difftrain.data.sources import folder_source, is_mnist_folder, is_saved_datasets_dir, streamed_kind

        d = self.data_config()
        path = d.instance_dir or d.path
        kind = None if d.instance_dir else streamed_kind(d.path, d.source, d.streaming)
        if kind is not None:
            for on, key in ((d.buckets != "off", "data.buckets"), (d.mask_dir is not None, "data.mask_dir")):
                if on:
                    raise ValueError(f"{key}: data.path = {d.path!r} is streamed ({kind} shards), and streamed data "
                                     f"is read as square images without masks; use an image folder or turn {key} off")
            return
        folder = Path(path).expanduser()
        if d.mask_dir is None and d.instance_dir is None:
            return  # NAME.mask.png files beside the images: decoding refuses a wrong size (before any model), and a
            # large folder is not listed twice
        if d.source not in ("auto", "folder") and not d.instance_dir or not folder.is_dir() or \
                is_saved_datasets_dir(folder) or is_mnist_folder(folder):
            return
        try:
            source = folder_source(folder)
        except ValueError:  # a folder layout problem: load_data names it
            return
        check_mask_sizes(source, d)

    def prepare_before_data(self, run_folder: Any, processes: Any) -> None:
        """Files the data needs, written into the run folder (e.g. DreamBooth class images).

        `run_folder.start()` creates and locks the folder first; `processes` is accelerate's PartialState.
        """

    def data_wants(self) -> tuple[bool, bool]:
        """(labels, captions) the data must provide."""
        return False, False

    def class_images_dir(self) -> Optional[Path]:
        """DreamBooth: the folder of class images that follow the instance images in the data set, if any."""
        return None

    def load_data(self) -> TrainingData:
        """Decode the training data (DreamBooth: instance images, then class images); sets `dataset` and
        `num_train_images`."""
        from difftrain.data.dataset import load_dreambooth_dataset, load_image_dataset
        from difftrain.data.streaming import open_streaming_set

        data = self.data_config()
        if data.instance_dir is not None:
            self.dataset, self.num_train_images = load_dreambooth_dataset(data, self.class_images_dir())
            self._log_buckets()
            return self.dataset
        labels, captions = self.data_wants()
        stream = open_streaming_set(data, want_labels=labels) if self.streams and data.buckets == "off" else None
        if stream is None:
            self._refuse_a_stream()
            self.dataset = load_image_dataset(data, want_labels=labels, want_captions=captions)
            self._log_buckets()
        else:
            self.dataset = stream
        self.num_train_images = len(self.dataset)
        return self.dataset

    def _log_buckets(self) -> None:
        histogram = getattr(self.dataset, "histogram", None)
        if histogram is not None:
            logger.info("data.buckets: %s", ", ".join(f"{size}: {n}" for size, n in histogram()))

    def _refuse_a_stream(self) -> None:
        from difftrain.data.sources import streamed_kind

        d = self.cfg.data
        kind = streamed_kind(d.path, d.source, d.streaming)
        if kind is not None:
            raise ValueError(f"data.path = {d.path!r} is streamed ({kind} shards), but the {self.name} family reads its "
                             "whole data set up front (caption vocabulary, latent cache); streams train "
                             "model.conditioning 'none' or 'class' in pixel space. Use an image folder instead (a set "
                             "over data.max_memory_gb is decoded once into the disk cache)")

    @abstractmethod
    def plan(self) -> None:
        """Decisions that need the data (classes, captions, text encoder, latent size, network shape); raises
        ConfigError/ValueError for a bad combination, before anything is written."""

    @abstractmethod
    def geometry(self) -> tuple[int, int]:
        """(side, channels) of x0: pixels, or latent cells in latent space (the objective's shift by resolution
        reads the side)."""

    def prepare_after_data(self, run_folder: Any, processes: Any) -> None:
        """Work written into the (started) run folder before training (e.g. a latent run's VAE stage)."""

    def base_schedule(self) -> Optional[Any]:
        """The noise schedule of a fine-tuned base model, which the objective takes over `diffusion.*`."""
        return None

    # -- models ----------------------------------------------------------------------------------------------------

    @abstractmethod
    def network_spec(self) -> NetworkSpec:
        """The network to time for `train.mixed_precision: auto`."""

    @abstractmethod
    def build_models(self, mixed_precision: str) -> Models:
        """Build or load the components (weights from the seeded global RNG, so after `torch.manual_seed`)."""

    @abstractmethod
    def use_prepared(self, network: torch.nn.Module, trained: list[torch.nn.Module], accelerator: Any) -> None:
        """Take the modules accelerate prepared (same order as build_models gave them) and finish the set-up
        that needs them on `accelerator.device` (text caches, latent caches)."""

    # -- the step --------------------------------------------------------------------------------------------------

    def rows(self, position: int, batch_size: int) -> torch.Tensor:
        """Data set rows of the micro-batch at `position` of the data stream (data/order.py); the loader calls it,
        in worker processes too, so it must be a pure function."""
        return self.dataset.rows(self.num_train_images, self.cfg.train.seed, position, batch_size)

    @abstractmethod
    def batch(self, micro: MicroBatch, generator: torch.Generator, device: torch.device) -> Batch:
        """x0 and the condition of a gathered micro-batch, with condition dropout; random draws from `generator`,
        x0's first."""

    @abstractmethod
    def network(self, condition: Any) -> Network:
        """The network bound to a batch's condition (called inside the step's autocast)."""

    def reduce_loss(self, per_example: torch.Tensor) -> torch.Tensor:
        """The step's loss from the objective's per-example losses."""
        return per_example.mean()

    def row_names(self, rows: Sequence[int]) -> list[str]:
        """Names of data set rows for messages (file paths where the source has them)."""
        if self.dataset is None:
            return [f"data set row {r}" for r in rows]
        return self.dataset.row_names(rows)

    # -- sampling and export ---------------------------------------------------------------------------------------

    @abstractmethod
    def sampler(self, network: torch.nn.Module) -> ImageSampler:
        """An ImageSampler of `network` (the unwrapped network, e.g. carrying the EMA weights) with this family's
        condition encoder and decoder."""

    @abstractmethod
    def preview_conditions(self) -> PreviewLayout:
        """What the preview grids show (sample.* section)."""

    def evaluation_conditions(self, class_names: Sequence[str], num_samples: int,
                              captions: Optional[Sequence[str]] = None,
                              ) -> tuple[Optional[list[int]], Optional[list[str]]]:
        """Labels to score (round-robin over classes) and prompts of `num_samples` evaluation samples.

        `captions` stand in for the training captions when the family has not read the data (`difftrain evaluate`).
        """
        return None, None

    @abstractmethod
    def export(self, network: torch.nn.Module, objective: Objective, output_dir: Path) -> None:
        """Write the pipeline folder (or adapters) that diffusers loads."""

    @abstractmethod
    def write_model_card(self, summary: RunSummary, objective: Objective, output_dir: Path) -> None:
        """Write OUTPUT_DIR/README.md for the export."""
