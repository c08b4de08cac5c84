"""Re-ID methods on one engine: each module says how its model is built, trained and compared
(see :mod:`.base`); ``get_method(name)`` returns the registered one.

- ``transmatcher``: TransMatcher (fused matching of feature maps; ResNet or ViT features)
- ``qaconv``: QAConv (fused matching without gate or projection)
- ``transreid``: TransReID / TransReID-SSL fine-tuning (ViT embeddings, Euclidean distance)
- ``dino``: DINO self-supervised pre-training (TransReID-SSL; student, EMA teacher, multi-crop)
"""

from .base import METHOD_DEFAULTED, Method, Parts, TrainingHook, get_method, method_names, register_method
from . import dino, qaconv, transmatcher, transreid  # noqa: F401  (registers the methods)

__all__ = ["Method", "Parts", "TrainingHook", "METHOD_DEFAULTED", "get_method", "method_names",
           "register_method"]
