"""TransMatcher (NeurIPS 2021): a feature map per image, compared location by location by the
fused matcher; trained with upstream's recipe (graph sampler, pairwise matching BCE, SGD
Nesterov with the backbone at 0.1x, step schedule, gradient clipping, frozen BatchNorm).

The feature model is upstream's ResNet (+ IBN-b) to ``final_layer`` + neck + encoder, or, with
``arch`` a ViT (``vit_*`` / ``deit_*``), the ViT's patch tokens on their ``num_y x num_x`` grid,
the last ``num_trans_layers`` blocks as the matcher's levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping

from torch import Tensor, nn

from ..models import QAConv, TransMatcher, build_model
from ..models.vit import ARCHS as VIT_ARCHS, ViTMatchingFeatures
from .base import Method, Parts, register_method
from ..options import non_negative, option
from .losses import PairwiseMatchingLoss, TripletLoss


@dataclass
class TransMatcherOptions:
    """The matchers' own options (TransMatcher and QAConv); the model's are ModelOptions'."""
    margin: float = option(16.0, group="batches and loss", type=float, check=non_negative,
                           help="triplet margin (matchers)")
    backbone_lr_factor: float = option(0.1, group="optimisation", type=float, after="lr",
                                       help="matchers: backbone lr = lr x this")


class MatchingStep(nn.Module):
    """Feature model + matching loss (which holds the matcher): one module for DDP."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images: Tensor, pids: Tensor, cams: Tensor, views: Tensor):
        if getattr(self.model, "side_info", False):
            features = self.model(images, cam_label=cams, view_label=views)
        else:
            features = self.model(images)
        return self.loss(features, pids)


class TransMatcherMethod(Method):
    name = "transmatcher"
    matcher = "transmatcher"
    defaults = {"arch": "resnet50", "ibn": "b", "height": 384, "width": 128, "lr": 0.005,
                "weight_decay": 5e-4, "epochs": 15, "sampler": "graph", "loss": "pairwise",
                "clip_value": 4.0, "freeze_bn": True, "schedule": "step"}
    model_options = ("method", "arch", "ibn", "final_layer", "neck", "nhead", "num_trans_layers",
                     "dim_feedforward", "dropout", "height", "width", "stride", "sie_camera",
                     "sie_view", "sie_coe", "drop_path", "pretrained")
    losses = ("pairwise", "triplet")
    options = TransMatcherOptions
    demo_options = {"arch": "resnet18", "ibn": None, "freeze_bn": False}

    def check(self, config) -> None:
        super().check(config)
        if config.arch in VIT_ARCHS and (config.jpm or config.stem_conv and config.stride != 16):
            raise ValueError("a ViT feeding a matcher has no JPM (jpm: false); the ICS stem "
                             "needs stride 16")

    def model_args(self, config, dataset) -> Dict[str, Any]:
        if config.arch not in VIT_ARCHS:
            return {}
        return {"camera_num": dataset.num_train_cameras, "view_num": dataset.num_train_views}

    def build(self, config, model_args: Mapping[str, Any], *, pretrained: bool = True,
              neck_layout: str = "2.0") -> Parts:
        weights = config.pretrained if pretrained else None
        if config.arch in VIT_ARCHS:
            model = ViTMatchingFeatures(
                config.arch, img_size=(config.height, config.width), stride=config.stride,
                levels=config.num_trans_layers if self.matcher == "transmatcher" else 1,
                matcher=self.matcher,
                camera_num=model_args.get("camera_num", 0) if config.sie_camera else 0,
                view_num=model_args.get("view_num", 0) if config.sie_view else 0,
                sie_coe=config.sie_coe, drop_path=config.drop_path, stem_conv=config.stem_conv,
                pretrained=weights, pretrain_hw_ratio=config.pretrain_hw_ratio)
            model.side_info = bool(config.sie_camera or config.sie_view)
            model.base.fc.requires_grad_(False)  # upstream's unused head (no gradient, see DDP)
            if self.matcher == "transmatcher":
                matcher = TransMatcher(model.seq_len, model.num_features, config.num_trans_layers,
                                       config.dim_feedforward)
            else:
                matcher = QAConv(model.num_features, model.height, model.width)
        else:
            model, matcher = build_model(
                config.arch, config.ibn, config.final_layer, config.neck, config.nhead,
                config.num_trans_layers, config.dim_feedforward, config.dropout, config.height,
                config.width, self.matcher, weights, neck_layout=neck_layout)
        # Upstream registers an unused template decoder layer; it never gets a gradient, which
        # DistributedDataParallel would reject, so it is left out of training.
        template = getattr(matcher, "decoder_layer", None)
        if template is not None:
            template.requires_grad_(False)
        return {"model": model, "matcher": matcher}

    def step_module(self, parts: Parts, config) -> nn.Module:
        if config.loss == "pairwise":
            loss = PairwiseMatchingLoss(parts["matcher"])
        else:
            loss = TripletLoss(parts["matcher"], margin=config.margin)
        return MatchingStep(parts["model"], loss)

    def param_groups(self, parts: Parts, config) -> List[Dict[str, Any]]:
        """The backbone at ``lr * backbone_lr_factor``; the new layers and the matcher at ``lr``."""
        model = parts["model"]
        backbone = [p for p in model.base.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        new = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
        matcher = [p for p in parts["matcher"].parameters() if p.requires_grad]
        groups = [{"params": backbone, "lr": config.lr * config.backbone_lr_factor, "name": "backbone"},
                  {"params": new, "lr": config.lr, "name": "new"},
                  {"params": matcher, "lr": config.lr, "name": "matcher"}]
        return [g for g in groups if g["params"]]

    def optimizer(self, groups, config):
        import torch

        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.momentum > 0)


register_method(TransMatcherMethod())
