"""Data sources, transforms and the decoded in-memory data set."""

from difftrain.data.dataset import ImageDataset, load_image_dataset

__all__ = ["ImageDataset", "load_image_dataset"]
