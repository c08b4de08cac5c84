"""Data: re-ID datasets from their public layouts, a procedural synthetic dataset, transforms and
loaders. Nothing here imports the models or the ops."""

from .datasets import (DatasetLayoutError, ReidDataset, build_dataset, dataset_names,
                       register_dataset)
from .synthetic import generate_synthetic
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, ReidImageDataset, build_test_transform,
                         build_train_transform, make_loader)

__all__ = ["DatasetLayoutError", "ReidDataset", "build_dataset", "dataset_names", "register_dataset",
           "generate_synthetic", "IMAGENET_MEAN", "IMAGENET_STD", "ReidImageDataset",
           "build_test_transform", "build_train_transform", "make_loader"]
