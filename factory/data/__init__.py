"""Task data: built-in sets, the user's ImageFolder trees, and what identifies them (:mod:`factory.data.registry`)."""

from factory.data.builtin import make_synthetic, safe_load_pickle
from factory.data.folder import scan_tree
from factory.data.registry import BUILTIN_DATASETS, DATASETS, dataset_identity, load_dataset
from factory.data.stream import MAX_IMAGE_PIXELS
from factory.data.tensors import Dataset, ImageTensors, in_memory, spread, spread_sample

__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "MAX_IMAGE_PIXELS",
    "Dataset",
    "ImageTensors",
    "dataset_identity",
    "in_memory",
    "load_dataset",
    "make_synthetic",
    "safe_load_pickle",
    "scan_tree",
    "spread",
    "spread_sample",
]
