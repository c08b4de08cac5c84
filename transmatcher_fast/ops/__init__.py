"""Fused ops with autograd and per-device backend dispatch."""

from .dispatch import available_backends, get_backend, set_backend, use_backend
from .max_sim import max_sim

__all__ = ["max_sim", "set_backend", "get_backend", "use_backend", "available_backends"]
