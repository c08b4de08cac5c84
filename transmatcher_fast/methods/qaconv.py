"""QAConv (ECCV 2020, and 2.1): the TransMatcher method with QAConv's matcher (no gate, no
projection) and feature model (ResNet + neck, L2-normalised). QAConv 2.1's recipe (triplet loss,
adaptive schedule, two images per identity) is ``configs/qaconv.yaml``; the neck layout of a
checkpoint (2.0: conv + BN; 2.1: conv with bias) is read off its weights."""

from __future__ import annotations

from .base import Parts, register_method
from .transmatcher import TransMatcherMethod


class QAConvMethod(TransMatcherMethod):
    name = "qaconv"
    matcher = "qaconv"

    def load(self, config, state, source: str) -> Parts:
        from ..models import qaconv_neck_layout

        layout = qaconv_neck_layout(state["model"], f"{source} ('model')") or "2.0"
        parts = self.build(config, state.get("model_args", {}), pretrained=False, neck_layout=layout)
        parts["model"].load_state_dict(state["model"])
        parts["matcher"].load_state_dict(state["matcher"])
        parts["model"].neck_layout = layout
        return parts


register_method(QAConvMethod())
