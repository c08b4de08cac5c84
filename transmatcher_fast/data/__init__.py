"""Data: re-ID datasets from their public layouts, a procedural synthetic dataset, transforms and
loaders. Nothing here imports the models or the ops.

A new labelled *dataset* is a :class:`~.datasets.ReidDataset` subclass in ``datasets.py`` (or a
module of its own, imported here), registered with ``@register_dataset("name")``: ``--dataset
name`` then finds it, and its docstring's expected layout is what a missing folder's error shows.
Unlabelled image folders are ``unlabelled.py``'s; new augmentation goes in ``transforms.py``
(``multicrop.py`` for DINO's crops)."""

from .cfs_list import read_cfs_list, select_top
from .datasets import (DatasetLayoutError, ReidDataset, build_dataset, dataset_names, dataset_root,
                       register_dataset)
from .multicrop import (MultiCropCollate, MultiCropTransform, UnlabelledImages, list_images,
                        make_multicrop_loader)
from .synthetic import generate_synthetic
from . import unlabelled  # noqa: F401  (registers the 'images' dataset)
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomErasing, ReidImageDataset,
                         build_test_transform, build_train_transform, build_transreid_test_transform,
                         build_transreid_train_transform, make_loader)

__all__ = ["read_cfs_list", "select_top", "DatasetLayoutError", "ReidDataset", "build_dataset", "dataset_names", "dataset_root", "register_dataset",
           "generate_synthetic", "IMAGENET_MEAN", "IMAGENET_STD", "ReidImageDataset",
           "build_test_transform", "build_train_transform", "make_loader", "RandomErasing",
           "build_transreid_train_transform", "build_transreid_test_transform", "MultiCropTransform",
           "MultiCropCollate", "UnlabelledImages", "list_images", "make_multicrop_loader"]
