"""Weights in from torchvision, and BN folding for inference.

Our ImageNet nets use torchvision's parameter names, so a torchvision state_dict loads as it is; the only
architectural difference is where a bottleneck puts its stride, so converted bottleneck nets use stride_in="3x3".
"""
from __future__ import annotations

import copy
import re
from typing import Any, Mapping

import torch
from torch import nn

from . import paper
from .blocks import BasicBlock, Bottleneck
from .resnet import ResNet

_LAYER_KEY = re.compile(r"^layer(\d)\.(\d+)\.")


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def torchvision_arch(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer the architecture (block, layers, groups, width, classes) from a torchvision ResNet state_dict."""
    sd = _strip_prefix(state_dict)
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise ValueError("not a torchvision ResNet state_dict: no conv1.weight / fc.weight")
    counts = [0, 0, 0, 0]
    for k in sd:
        m = _LAYER_KEY.match(k)
        if m and 1 <= int(m.group(1)) <= 4:
            counts[int(m.group(1)) - 1] = max(counts[int(m.group(1)) - 1], int(m.group(2)) + 1)
    if 0 in counts:
        raise ValueError(f"not a torchvision ImageNet ResNet state_dict: blocks per stage {counts}")
    bottleneck = "layer1.0.conv3.weight" in sd
    arch: dict[str, Any] = {"layers": tuple(counts), "block": Bottleneck if bottleneck else BasicBlock,
                            "num_classes": sd["fc.weight"].shape[0], "in_channels": sd["conv1.weight"].shape[1],
                            "groups": 1, "width_per_group": 64}
    if bottleneck:
        w = sd["layer1.0.conv2.weight"]          # (width, width / groups, 3, 3), planes = 64 in layer1
        width, groups = w.shape[0], w.shape[0] // w.shape[1]
        arch["groups"], arch["width_per_group"] = groups, width // groups
    return arch


def _name_for(arch: dict[str, Any]) -> str | None:
    depth = next((d for d, lay in paper.TABLE1_LAYERS.items() if lay == arch["layers"]
                  and (d >= 50) == (arch["block"] is Bottleneck)), None)
    if depth is None:
        return None
    g, w = arch["groups"], arch["width_per_group"]
    if g == 1 and w == 64:
        return f"resnet{depth}"
    if g == 1:
        return f"wide_resnet{depth}_{w // 64}"
    return f"resnext{depth}_{g}x{w}d"


def from_torchvision(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | str, name: str | None = None) -> ResNet:
    """Our ResNet holding a torchvision ResNet's weights; outputs equal torchvision's.

    Accepts a torchvision model, its state_dict, or a path to a ``.pth`` file (loaded with ``weights_only=True``).
    """
    if isinstance(model_or_state_dict, nn.Module):
        sd = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, (str, bytes)) or hasattr(model_or_state_dict, "__fspath__"):
        sd = torch.load(model_or_state_dict, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
    else:
        sd = model_or_state_dict
    sd = _strip_prefix(sd)
    arch = torchvision_arch(sd)
    stride_in = "3x3" if arch["block"] is Bottleneck else "1x1"
    model = ResNet(arch["block"], arch["layers"], arch["num_classes"], shortcut="B", stride_in=stride_in,
                   groups=arch["groups"], width_per_group=arch["width_per_group"], in_channels=arch["in_channels"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"state_dict does not match {name or _name_for(arch) or 'the inferred ResNet'}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.model_name = name or _name_for(arch) or "resnet"
    model.model_kwargs = {"stride_in": stride_in, "num_classes": arch["num_classes"]} if stride_in == "3x3" else \
        {"num_classes": arch["num_classes"]}
    return model


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with every BN that follows a conv folded into that conv's weights and
    bias (w' = w * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta); the BN becomes Identity.
    Only valid in eval mode; the copy is returned in eval mode."""
    folded = copy.deepcopy(model).eval()
    for parent in folded.modules():
        names = list(parent._modules)
        for conv_name, bn_name in _conv_bn_pairs(parent, names):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
            new.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
            parent._modules[conv_name] = new
            parent._modules[bn_name] = nn.Identity()
    return folded


def _conv_bn_pairs(parent: nn.Module, names: list[str]):
    """(convK, bnK) attribute pairs in a block or stem, and (0, 1) inside a projection shortcut."""
    mods = parent._modules
    for name in names:
        if isinstance(mods[name], nn.Conv2d):
            bn_name = name.replace("conv", "bn") if name.startswith("conv") else str(int(name) + 1) if name.isdigit() else None
            if bn_name in mods and isinstance(mods[bn_name], nn.BatchNorm2d) and mods[bn_name].track_running_stats:
                yield name, bn_name
