"""Re-ID methods on one engine: each module says how its model is built, trained and compared
(see :mod:`.base`) and declares its own options (a dataclass of :func:`..options.option`
fields); ``get_method(name)`` returns the registered one. A new method is a new module here,
imported below.

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

from .base import (DEFAULT_METHOD, FROM_METHOD, METHOD_DEFAULTED, Method, ModelOptions, Parts, TrainingHook,
                   all_losses, get_method, method_names, method_of_matcher, option_classes, register_method)
# Registration order is the order of their options and losses in --help.
from . import transmatcher, qaconv, transreid, dino  # noqa: F401,E402  (registers the methods)

__all__ = ["Method", "ModelOptions", "Parts", "TrainingHook", "DEFAULT_METHOD", "FROM_METHOD",
           "METHOD_DEFAULTED", "all_losses", "get_method", "method_names", "method_of_matcher",
           "option_classes", "register_method"]
