"""transmatcher_fast: fused, memory-light TransMatcher / QAConv matching.

    q_best, g_best = transmatcher_fast.max_sim(query, gallery, score_embed)
    reid = transmatcher_fast.ReID.load("checkpoint.pt")       # rank your own images

See README.md ("The op", "Backends") for the op's contract and the backends.
"""

from . import _extension, reference
from .ops import available_backends, get_backend, max_sim, set_backend, use_backend
from .models import (QAConv, TransformerDecoder, TransformerDecoderLayer, TransMatcher,
                     build_model, load_upstream_checkpoint)
from ._version import __version__
from .engine.reid import ReID, Ranking
__all__ = [
    "max_sim",
    "set_backend",
    "get_backend",
    "use_backend",
    "available_backends",
    "reference",
    "TransMatcher",
    "TransformerDecoderLayer",
    "TransformerDecoder",
    "QAConv",
    "build_model",
    "load_upstream_checkpoint",
    "ReID",
    "Ranking",
    "__version__",
]

_extension.warn_if_missing(available_backends())
