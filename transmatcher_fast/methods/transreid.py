"""TransReID (ICCV 2021): a ViT (overlapping patches, SIE, JPM, BNNeck) whose L2-normalised test
feature is compared by Euclidean distance; trained with upstream's recipe (``configs/``): P x K
sampler 16 x 4, cross-entropy on the BN features' scores + soft-margin batch-hard triplet on the
features before BN (JPM: 0.5 global + 0.5 mean of the locals), SGD momentum 0.9 with biases at
2x the rate, weight decay 1e-4 everywhere, 5 warm-up epochs from 1 % then cosine to 0.2 %
stepped per epoch, 120 epochs, AMP; 256 x 128 input with flip, pad 10 + crop and random erasing
(p 0.5, pixel mode), mean = std = 0.5. TransReID-SSL fine-tuning is the same method with its
preset (``configs/transreid_ssl_*.yaml``: lr 4e-4, 20 warm-up epochs, no JPM/SIE, ICS stem).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping

from torch import Tensor, nn

from ..data import build_transreid_test_transform, build_transreid_train_transform
from ..models.embedding import EmbeddingDistance
from ..models.transreid import TransReID
from ..models.vit import ARCHS as VIT_ARCHS
from .base import Method, Parts, register_method
from ..options import non_negative, option, probability
from .losses import TransReIDLoss

PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)
_LOSS = "batches and loss"  # their help group


@dataclass
class TransReIDOptions:
    """TransReID's own loss, augmentation and optimizer options (upstream's values); the
    model's are ModelOptions'."""
    id_loss_weight: float = option(1.0, group=_LOSS, type=float, check=non_negative)
    triplet_loss_weight: float = option(1.0, group=_LOSS, type=float, check=non_negative)
    label_smoothing: float = option(0.0, group=_LOSS, type=float, check=non_negative,
                                    help="cross-entropy label smoothing (TransReID's configs: off)")
    erasing_p: float = option(0.5, group=_LOSS, type=float, check=probability,
                              help="TransReID's random erasing probability")
    bias_lr_factor: float = option(2.0, group="optimisation", type=float, check=non_negative,
                                   after="backbone_lr_factor", help="transreid: bias lr = lr x this")


class TransReIDStep(nn.Module):
    """Model + loss as one module (for DDP): ``forward(images, pids, cams, views)`` feeds the
    camera and view labels to SIE as upstream does, and scores the training outputs."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images: Tensor, pids: Tensor, cams: Tensor, views: Tensor):
        scores, features = self.model(images, cam_label=cams, view_label=views)
        return self.loss(scores, features, pids)


class TransReIDMethod(Method):
    name = "transreid"
    defaults = {"arch": "vit_base_patch16", "ibn": None, "height": 256, "width": 128, "lr": 0.008,
                "weight_decay": 1e-4, "epochs": 120, "sampler": "pk_all", "loss": "softmax_triplet",
                "clip_value": 0.0, "freeze_bn": False, "schedule": "cosine"}
    model_options = ("method", "arch", "height", "width", "stride", "sie_camera", "sie_view",
                     "sie_coe", "jpm", "shift_num", "shuffle_groups", "divide_length", "rearrange",
                     "drop_path", "neck_feat", "stem_conv", "pretrain_hw_ratio", "gem_pooling",
                     "pretrained")
    losses = ("softmax_triplet",)
    options = TransReIDOptions
    eval_amp = "none"  # upstream's inference is float32 (do_inference has no autocast)
    # A tiny ViT from scratch with camera SIE and JPM (the whole model, small).
    demo_options = {"arch": "vit_tiny_patch16", "sie_camera": True, "jpm": True, "drop_path": 0.0,
                    "warmup_epochs": 2}

    def check(self, config) -> None:
        super().check(config)
        if config.arch not in VIT_ARCHS:
            raise ValueError(f"arch {config.arch!r} is not a ViT; TransReID takes one of {sorted(VIT_ARCHS)}")

    def model_args(self, config, dataset) -> Dict[str, Any]:
        # SIE's camera and view counts come from the training split, as upstream's.
        return {"num_classes": dataset.num_train_ids, "camera_num": dataset.num_train_cameras,
                "view_num": dataset.num_train_views}

    def build(self, config, model_args: Mapping[str, Any], *, pretrained: bool = True) -> Parts:
        model = TransReID(
            model_args["num_classes"], model_args.get("camera_num", 0), model_args.get("view_num", 0),
            arch=config.arch, img_size=(config.height, config.width), stride=config.stride,
            sie_camera=config.sie_camera, sie_view=config.sie_view, sie_coe=config.sie_coe,
            jpm=config.jpm, shift_num=config.shift_num, shuffle_groups=config.shuffle_groups,
            divide_length=config.divide_length, rearrange=config.rearrange,
            drop_path=config.drop_path, neck_feat=config.neck_feat,
            pretrained=config.pretrained if pretrained else None, stem_conv=config.stem_conv,
            pretrain_hw_ratio=config.pretrain_hw_ratio, gem_pooling=config.gem_pooling)
        model.side_info = bool(config.sie_camera or config.sie_view)
        # Upstream's backbone keeps an ImageNet-style head that nothing calls: no gradient ever
        # reaches it, and DistributedDataParallel would wait for one.
        model.base.fc.requires_grad_(False)
        if config.jpm:
            # Under JPM the backbone's own last block and LayerNorm are never used (b1 and b2
            # are their copies): no gradient, so DDP needs no unused-parameter search.
            model.base.blocks[-1].requires_grad_(False)
            model.base.norm.requires_grad_(False)
        return {"model": model, "matcher": EmbeddingDistance("euclidean")}

    def step_module(self, parts: Parts, config) -> nn.Module:
        return TransReIDStep(parts["model"], TransReIDLoss(config.id_loss_weight, config.triplet_loss_weight,
                                                           config.label_smoothing))

    def param_groups(self, parts: Parts, config) -> List[Dict[str, Any]]:
        """Upstream's ``make_optimizer``: biases at ``bias_lr_factor x lr``, everything else at
        ``lr``, weight decay on all of them (two groups, not one per tensor)."""
        params = [(n, p) for n, p in parts["model"].named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in params if "bias" not in n], "lr": config.lr, "name": "weights"},
                  {"params": [p for n, p in params if "bias" in n],
                   "lr": config.lr * config.bias_lr_factor, "name": "biases"}]
        return [g for g in groups if g["params"]]

    def train_transform(self, config):
        return build_transreid_train_transform(config.height, config.width, erasing_p=config.erasing_p,
                                               mean=PIXEL_MEAN, std=PIXEL_STD)

    def test_transform(self, config, height: int, width: int):
        return build_transreid_test_transform(height, width, mean=PIXEL_MEAN, std=PIXEL_STD)


register_method(TransReIDMethod())
