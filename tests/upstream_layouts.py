"""Upstream parameter layouts, written out from the reference document and the public layouts of
torchvision / IBN-Net, independently of transmatcher_fast.models: (key, shape) lists that the
tests compare our modules with and write synthetic upstream files from."""

from __future__ import annotations

import torch


def batchnorm(name: str, n: int) -> list:
    return [(f"{name}.weight", (n,)), (f"{name}.bias", (n,)), (f"{name}.running_mean", (n,)),
            (f"{name}.running_var", (n,)), (f"{name}.num_batches_tracked", ())]


def instancenorm(name: str, n: int) -> list:
    # InstanceNorm2d(affine=True) keeps no running statistics.
    return [(f"{name}.weight", (n,)), (f"{name}.bias", (n,))]


def transmatcher_layer(prefix: str, seq_len: int, d_model: int, dim_feedforward: int) -> list:
    """Reference doc §1.3: score_embed [1,1,L,L], fc1 d->d, bn1 BN1d(1), fc2 L->D, bn2 BN1d(D),
    (relu), fc3 D->1, bn3 BN1d(1), in registration order."""
    keys = [("score_embed", (1, 1, seq_len, seq_len)),
            ("fc1.weight", (d_model, d_model)), ("fc1.bias", (d_model,)),
            *batchnorm("bn1", 1),
            ("fc2.weight", (dim_feedforward, seq_len)), ("fc2.bias", (dim_feedforward,)),
            *batchnorm("bn2", dim_feedforward),
            ("fc3.weight", (1, dim_feedforward)), ("fc3.bias", (1,)),
            *batchnorm("bn3", 1)]
    return [(prefix + k, shape) for k, shape in keys]


def transmatcher(seq_len=192, d_model=512, num_decoder_layers=3, dim_feedforward=2048) -> list:
    """Reference doc §1.4: the unused template ``decoder_layer``, the N copies in
    ``decoder.layers``, and the final BatchNorm1d(1) ``decoder.norm``."""
    keys = transmatcher_layer("decoder_layer.", seq_len, d_model, dim_feedforward)
    for i in range(num_decoder_layers):
        keys += transmatcher_layer(f"decoder.layers.{i}.", seq_len, d_model, dim_feedforward)
    return keys + batchnorm("decoder.norm", 1)


def qaconv(num_features: int, height: int, width: int) -> list:
    """Reference doc §4: scalar BN ``bn``, Linear(h*w -> 1) ``fc``, scalar BN ``logit_bn``."""
    return [*batchnorm("bn", 1), ("fc.weight", (1, height * width)), ("fc.bias", (1,)),
            *batchnorm("logit_bn", 1)]



def qaconv_neck(in_channels: int, neck: int, version: str) -> list:
    """QAConv ``resmap.ResNet`` neck. "2.0" (resmap V1.1, Feb 2021, QAConv <= 2.0): 3x3
    ``neck_conv`` without bias, then BatchNorm2d ``neck_bn``. "2.1" (resmap V1.2, July 2021, QAConv
    2.1 and later): 3x3 ``neck_conv`` with bias, no BatchNorm."""
    conv = [("neck_conv.weight", (neck, in_channels, 3, 3))]
    if version == "2.0":
        return conv + batchnorm("neck_bn", neck)
    if version == "2.1":
        return conv + [("neck_conv.bias", (neck,))]
    raise ValueError(f"version must be '2.0' or '2.1', got {version!r}")

RESNET = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}


def resnet(depth: int, ibn=None) -> list:
    """torchvision ``resnet<depth>`` (ibn=None) or IBN-Net ``resnet<depth>_ibn_b`` state_dict
    layout, fc included: IBN-b has an affine InstanceNorm stem ``bn1`` and an ``IN`` after the
    last block of layer1 and layer2."""
    blocks, bottleneck = RESNET[depth]
    keys = [("conv1.weight", (64, 3, 7, 7))]
    keys += instancenorm("bn1", 64) if ibn == "b" else batchnorm("bn1", 64)
    inplanes = 64
    for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
        out = planes * 4 if bottleneck else planes
        for i in range(count):
            p = f"layer{stage + 1}.{i}."
            if bottleneck:
                keys += [(p + "conv1.weight", (planes, inplanes, 1, 1)), *batchnorm(p + "bn1", planes),
                         (p + "conv2.weight", (planes, planes, 3, 3)), *batchnorm(p + "bn2", planes),
                         (p + "conv3.weight", (out, planes, 1, 1)), *batchnorm(p + "bn3", out)]
            else:
                keys += [(p + "conv1.weight", (planes, inplanes, 3, 3)), *batchnorm(p + "bn1", planes),
                         (p + "conv2.weight", (planes, planes, 3, 3)), *batchnorm(p + "bn2", planes)]
            if ibn == "b" and stage < 2 and i == count - 1:
                keys += instancenorm(p + "IN", out)
            if i == 0 and (stage > 0 or inplanes != out):
                keys += [(p + "downsample.0.weight", (out, inplanes, 1, 1)),
                         *batchnorm(p + "downsample.1", out)]
            inplanes = out
    return keys + [("fc.weight", (1000, inplanes)), ("fc.bias", (1000,))]


def random_state(layout: list, generator: torch.Generator) -> dict:
    """Random tensors for a layout: positive running variances, integer batch counters."""
    state = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(int(torch.randint(1, 1000, (), generator=generator)))
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    return state
