"""Data: re-ID datasets from their public layouts, a procedural synthetic dataset, transforms and
loaders. Nothing here imports the models or the ops."""

from .datasets import (DatasetLayoutError, ReidDataset, build_dataset, dataset_names,
                       register_dataset)

__all__ = ["DatasetLayoutError", "ReidDataset", "build_dataset", "dataset_names", "register_dataset"]
