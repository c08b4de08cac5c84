"""The proxy models of CFS (TransReID-SSL's conditional filtering): a ViT whose cls token after
the final LayerNorm is compared between a source proxy (DINO pre-trained on the unlabelled
images) and a target proxy (that model fine-tuned on labelled re-ID data).

A proxy comes from a run of ours (pretrain's DINO teacher, a transreid fine-tune without JPM or
SIE: :func:`proxy_of_trained`, given the model the engine rebuilt) or from bare weights
(pretrain's teacher.pth, upstream's DINO checkpoint, TransReID-SSL's released ViT:
:func:`proxy_of_weights`). A file that cannot be a proxy raises :class:`ProxyError`, whose text
names ``where`` (the flag and file)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import nn

from .. import weights_io
from .vit import MultiResolutionViT, VisionTransformer, build_vit, load_pretrained


class ProxyError(ValueError):
    """The file cannot serve as a CFS proxy (the message says why and what to give)."""


class ClsToken(nn.Module):
    """A ViT's cls token after the final LayerNorm, ``[B, 3, H, W] -> [B, D]`` (what CFS compares:
    upstream's NECK_FEAT 'before' without JPM; GeM pooling, if the model has it, left out)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_levels(x, levels=1)[0][:, 0]


def read_proxy_file(path: str) -> Dict[str, Any]:
    """The file's top-level mapping, ``weights_only`` (DINO's checkpoints carry an argparse
    Namespace: plain data); a ValueError naming the file if it cannot be read."""
    state = weights_io.load(path, safe_globals=weights_io.PLAIN_DATA)
    return state if isinstance(state, dict) else {}


def saved_config(state: Dict[str, Any]) -> Dict[str, Any]:
    """The training configuration a file records (empty for bare weights)."""
    return state.get("config") if isinstance(state.get("config"), dict) else {}


def is_trained_run(state: Dict[str, Any]) -> bool:
    """Whether the file is a checkpoint of ``transmatcher-fast`` train or pretrain."""
    return bool(saved_config(state)) and "model" in state and "matcher" in state


def proxy_of_trained(model: nn.Module, config: Dict[str, Any], size: Tuple[int, int], where: str) -> ClsToken:
    """The proxy of a trained model: a plain ViT (no JPM or SIE) at ``size`` (a multi-resolution
    DINO ViT takes any size)."""
    vit = getattr(model, "base", model)
    if not isinstance(vit, VisionTransformer):
        raise ProxyError(f"{where}: a {config['method']} model of arch {config['arch']}, not a ViT; "
                         "CFS compares ViT cls tokens")
    if config.get("jpm") or config.get("sie_camera") or config.get("sie_view"):
        raise ProxyError(f"{where}: trained with JPM or SIE; a CFS proxy is a plain ViT (upstream: "
                         "TransReID-SSL's fine-tuning has neither)")
    if not isinstance(vit, MultiResolutionViT) and tuple(vit.img_size) != tuple(size):
        raise ProxyError(f"--height {size[0]} --width {size[1]}: {where} was trained at "
                         f"{vit.img_size[0]}x{vit.img_size[1]}; give that size")
    return ClsToken(vit)


def proxy_of_weights(path: str, saved: Optional[Dict[str, Any]], arch: str, stem_conv: bool,
                     size: Tuple[int, int], hw_ratio: int, where: str) -> ClsToken:
    """The proxy of bare ViT weights: the file's own ``arch``/``stem_conv`` when it records them
    (``saved``), else the given ones; position embeddings resized by the ``hw_ratio`` rule."""
    saved = saved or {}
    arch, stem_conv = saved.get("arch", arch), saved.get("stem_conv", stem_conv)
    vit = build_vit(arch, img_size=size, stem_conv=stem_conv)
    try:
        load_pretrained(vit, path, hw_ratio)
    except ValueError as error:
        raise ProxyError(f"{where}: {error} (the model: --arch {arch}"
                         f"{' --stem-conv' if stem_conv else ''})") from None
    return ClsToken(vit)
