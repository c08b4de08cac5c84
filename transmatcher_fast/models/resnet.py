"""ResNet-18/34/50/101/152 and IBN-Net-b backbones, truncated at a stage, in the parameter layout
of torchvision (``torchvision.models.resnet*``) and IBN-Net (``resnet*_ibn_b``), so their
state_dicts load without torchvision or a download.

Upstream builds the whole ImageNet network and stops its forward after ``final_layer``; this one
builds the modules up to ``final_layer`` only (the stages after it and ``fc`` never run, so they
are left out: less memory, nothing changes in the output). Loading a full-network file skips the
keys of the modules left out, and only those.
"""

from __future__ import annotations

import os
from typing import Optional

from torch import Tensor, nn

from .. import weights_io

# blocks per stage, and whether the block is a bottleneck (4x expansion)
DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
STAGES = ("layer1", "layer2", "layer3", "layer4")
FINAL_LAYERS = ("layer2", "layer3", "layer4")
# Output stride of each stage and its channels (basic blocks, bottlenecks).
STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
CHANNELS = {"layer1": (64, 256), "layer2": (128, 512), "layer3": (256, 1024), "layer4": (512, 2048)}
IBN_TYPES = (None, "b")


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, instance_norm: bool = False):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # IBN-b: instance norm after the residual sum of a stage's last block.
        self.IN = nn.InstanceNorm2d(planes, affine=True) if instance_norm else None
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        if self.IN is not None:
            out = self.IN(out)
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride is on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, instance_norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.IN = nn.InstanceNorm2d(planes * 4, affine=True) if instance_norm else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        if self.IN is not None:
            out = self.IN(out)
        return self.relu(out)


class ResNet(nn.Module):
    """A ResNet (``ibn=None``, torchvision layout) or IBN-Net-b (``ibn="b"``, IBN-Net layout)
    up to ``final_layer``. ``forward`` returns the ``[B, C, H/s, W/s]`` map of that stage."""

    def __init__(self, depth: int = 50, ibn: Optional[str] = None, final_layer: str = "layer3"):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        if ibn not in IBN_TYPES:
            raise ValueError(f"ibn must be None or 'b' (IBN-Net-b), got {ibn!r}")
        if final_layer not in FINAL_LAYERS:
            raise ValueError(f"final_layer must be one of {FINAL_LAYERS}, got {final_layer!r}")
        self.depth, self.ibn, self.final_layer = depth, ibn, final_layer
        blocks, bottleneck = DEPTHS[depth]
        block = Bottleneck if bottleneck else BasicBlock
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # IBN-b replaces the stem BN with an affine instance norm.
        self.bn1 = nn.InstanceNorm2d(64, affine=True) if ibn == "b" else nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for index, name in enumerate(STAGES[:STAGES.index(final_layer) + 1]):
            planes = CHANNELS[name][0]
            stride = 1 if index == 0 else 2
            # IBN-b: instance norm in the last block of layer1 and layer2.
            with_in = ibn == "b" and index < 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion))
            layers = [block(inplanes, planes, stride, downsample)]
            inplanes = planes * block.expansion
            for i in range(1, blocks[index]):
                layers.append(block(inplanes, planes, instance_norm=with_in and i == blocks[index] - 1))
            setattr(self, name, nn.Sequential(*layers))
        self.out_channels = inplanes
        self.stride = STRIDES[final_layer]
        # torchvision's and IBN-Net's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stage_names(self) -> tuple[str, ...]:
        return STAGES[:STAGES.index(self.final_layer) + 1]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names():
            x = getattr(self, name)(x)
        return x

    def skipped_prefixes(self) -> tuple[str, ...]:
        """state_dict prefixes of the full ImageNet network that this truncated one leaves out."""
        return tuple(f"{name}." for name in STAGES[STAGES.index(self.final_layer) + 1:]) + ("fc.",)

    def load_pretrained(self, path: str) -> None:
        """Load ImageNet weights from a local torchvision / IBN-Net state_dict file (keys such as
        ``conv1.weight``, ``layer1.0.bn1.running_mean``; a ``module.`` or ``base.`` prefix and a
        ``{"state_dict": ...}`` wrapper are accepted). Keys of the stages after ``final_layer``
        and of ``fc`` are skipped; any other missing or unexpected key, or a shape mismatch,
        raises a ValueError naming the file and the keys."""
        state = read_state_dict(path)
        skipped = self.skipped_prefixes()
        state = {k: v for k, v in state.items() if not k.startswith(skipped)}
        weights_io.load_exactly(self, state, f"pretrained weights file {path!r}",
                                hint=f"expected a {describe(self.depth, self.ibn)} state_dict "
                                     "(torchvision / IBN-Net layout)")


def describe(depth: int, ibn: Optional[str]) -> str:
    return f"ResNet-{depth}" + ("-IBN-b" if ibn == "b" else "")


def read_state_dict(path: str) -> dict:
    """A state_dict from a local file, read with ``weights_only=True`` (no code runs)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file {path!r} does not exist; nothing is "
                                "downloaded: pass the path of a local state_dict file")
    try:
        state = weights_io.load(path)
    except weights_io.WeightsFileError as error:
        raise ValueError(f"cannot read pretrained weights file {path!r} as a state_dict "
                         f"(weights only): {error.problem}") from None
    state = weights_io.unwrap(state, ("state_dict",))
    if not weights_io.is_state_dict(state):
        raise ValueError(f"pretrained weights file {path!r} does not hold a state_dict "
                         "(a dict of parameter names to tensors)")
    state = weights_io.strip_prefix(state, "module.", only_if_all=True)
    return weights_io.strip_prefix(state, "base.", only_if_all=True)
