"""Re-ID methods on one engine: each module says how its model is built, trained and compared
(see :mod:`.base`) and declares its own options (a dataclass of :func:`..options.option`
fields); ``get_method(name)`` returns the registered one. A new method is a new module here,
imported below.

- ``transmatcher``: TransMatcher (fused matching of feature maps; ResNet or ViT features)
- ``qaconv``: QAConv (fused matching without gate or projection)
- ``transreid``: TransReID / TransReID-SSL fine-tuning (ViT embeddings, Euclidean distance)
- ``dino``: DINO self-supervised pre-training (TransReID-SSL; student, EMA teacher, multi-crop)
"""

from .base import (FROM_METHOD, METHOD_DEFAULTED, Method, ModelOptions, Parts, all_losses, get_method,
                   method_names, option_classes, register_method)
# Registration order is the order of their options and losses in --help.
from . import transmatcher, qaconv, transreid, dino  # noqa: F401,E402  (registers the methods)

DEFAULT_METHOD = "transmatcher"  # what a run trains when it names no method

__all__ = ["Method", "ModelOptions", "Parts", "DEFAULT_METHOD", "FROM_METHOD", "METHOD_DEFAULTED",
           "all_losses", "get_method", "method_names", "option_classes", "register_method"]
