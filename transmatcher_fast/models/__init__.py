"""Drop-in TransMatcher / QAConv matchers and their feature models, on the fused ``max_sim`` op.

    from transmatcher_fast import TransMatcher          # instead of upstream's transmatcher.py
    model, matcher = transmatcher_fast.build_model()    # upstream's default configuration
    model, matcher = transmatcher_fast.load_upstream_checkpoint("checkpoint.pth.tar")
    model = transmatcher_fast.models.TransReID(751, camera_num=6, sie_camera=True, jpm=True)

A new *model* (a network, its weight loading, its upstream state_dict layout) is a module here,
exported below; it imports only ``ops`` and ``weights_io``, never ``methods`` or the engine. A
new matcher gives what the engine asks of parts: ``project`` / ``score_projected`` /
``bytes_per_pair`` for matching, and for pictures ``correspondences``, ``label`` and
``feature_layout`` (``correspondence.py``); a ViT-like model ``attention_maps``. How a model is
trained (losses, schedules, EMA, clipping) belongs to ``methods``.
"""

from .matcher_features import (QAConvFeatures, TransformerEncoder, TransMatcherFeatures, build_model,
                               feature_map_size, set_qaconv_neck_layout)
from .correspondence import Correspondence
from .upstream_checkpoint import criterion_matcher, load_upstream_checkpoint, matcher_locations, qaconv_neck_layout
from .head import matching_head
from .qaconv import QAConv
from .resnet import ResNet
from .transmatcher import TransformerDecoder, TransformerDecoderLayer, TransMatcher
from .transreid import TransReID, jpm_index
from .vit import (ARCHS as VIT_ARCHS, AttentionMaps, VisionTransformer, ViTMatchingFeatures, build_vit,
                  load_pretrained, resize_pos_embed)

__all__ = [
    "TransMatcher",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "QAConv",
    "ResNet",
    "TransMatcherFeatures",
    "QAConvFeatures",
    "TransformerEncoder",
    "build_model",
    "feature_map_size",
    "load_upstream_checkpoint",
    "criterion_matcher",
    "matcher_locations",
    "Correspondence",
    "qaconv_neck_layout",
    "set_qaconv_neck_layout",
    "matching_head",
    "TransReID",
    "jpm_index",
    "VisionTransformer",
    "ViTMatchingFeatures",
    "AttentionMaps",
    "VIT_ARCHS",
    "build_vit",
    "load_pretrained",
    "resize_pos_embed",
]
