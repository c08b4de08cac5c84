"""Re-ID methods on one engine: each module says how its model is built, trained and compared
(see :mod:`.base`); ``get_method(name)`` returns the registered one.

- ``transmatcher``: TransMatcher (fused matching of feature maps; ResNet or ViT features)
- ``qaconv``: QAConv (fused matching without gate or projection)
- ``transreid``: TransReID / TransReID-SSL fine-tuning (ViT embeddings, Euclidean distance)
- ``dino``: DINO self-supervised pre-training (TransReID-SSL; student, EMA teacher, multi-crop)

A new *method* is one module here: a :class:`~.base.Method` subclass (how its parts are built
from models, its losses, parameter groups, optimizer, schedule and transforms) ending in
``register_method(...)``, and one line in the import below. Model code (``nn.Module`` networks,
weight loading) goes to ``models``; training utilities shared by methods live here
(``losses``, ``schedules``, ``optim_utils``).
"""

from .base import (DEFAULT_METHOD, METHOD_DEFAULTED, Method, Parts, TrainingHook, get_method, method_names,
                   method_of_matcher, register_method)
from . import dino, qaconv, transmatcher, transreid  # noqa: F401  (registers the methods)

__all__ = ["Method", "Parts", "TrainingHook", "DEFAULT_METHOD", "METHOD_DEFAULTED", "get_method",
           "method_names", "method_of_matcher", "register_method"]
