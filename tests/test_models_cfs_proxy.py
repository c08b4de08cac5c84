"""CFS proxies (models/cfs_proxy.py): a plain ViT's cls token; other models refused in one line."""

import pytest
import torch
from torch import nn

from transmatcher_fast.models.cfs_proxy import ClsToken, ProxyError, proxy_of_trained
from transmatcher_fast.models.vit import build_vit


def tiny_vit():
    return build_vit("vit_small_patch16", img_size=(32, 16), depth=1, embed_dim=24, num_heads=2)


def test_proxy_is_the_cls_token_after_the_final_norm():
    vit = tiny_vit().eval()
    proxy = proxy_of_trained(vit, {"method": "transreid", "arch": "vit_small_patch16"}, (32, 16), "--x f.pt")
    assert isinstance(proxy, ClsToken)
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.equal(proxy(x), vit.forward_levels(x, levels=1)[0][:, 0])


def test_models_that_cannot_be_proxies_are_refused():
    config = {"method": "qaconv", "arch": "resnet18"}
    with pytest.raises(ProxyError, match=r"^--x f.pt: a qaconv model of arch resnet18, not a ViT"):
        proxy_of_trained(nn.Linear(2, 2), config, (32, 16), "--x f.pt")
    vit = tiny_vit()
    with pytest.raises(ProxyError, match="JPM or SIE"):
        proxy_of_trained(vit, {"method": "transreid", "arch": "v", "jpm": True}, (32, 16), "--x f.pt")
    with pytest.raises(ProxyError, match=r"^--height 64 --width 32: --x f.pt was trained at 32x16"):
        proxy_of_trained(vit, {"method": "transreid", "arch": "v"}, (64, 32), "--x f.pt")
