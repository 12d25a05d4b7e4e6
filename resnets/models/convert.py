"""Weights in from torchvision and timm, and BN folding for inference.

Our ImageNet nets use torchvision's parameter names (as do timm's plain ResNets), so their state_dicts load as
they are; the only architectural difference is where a bottleneck puts its stride, so converted bottleneck nets use
stride_in="3x3". Weight files are read with ``weights_only=True`` only (see :func:`load_state_dict_file`).
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


class UnsafeWeightsError(ValueError):
    """A weights file that ``torch.load(weights_only=True)`` refuses: unpickling it could run code."""


_STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def refusal_reason(error: BaseException) -> str:
    """The line of torch's weights_only error that names what was refused (e.g. "unsupported GLOBAL posix.system")."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else repr(error))


def load_state_dict_file(path: Any) -> dict[str, torch.Tensor]:
    """Tensors from a ``.pth``/``.pt``/``.bin`` state_dict (or a dict holding one under ``state_dict``/``model``) or a
    ``.safetensors`` file. Pickles are read only with ``weights_only=True``: one that would import or call anything
    is refused with :class:`UnsafeWeightsError`, and nothing in it runs."""
    import os
    import pickle

    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "model.safetensors")):    # a checkpoint folder of resnets train
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types; nothing in the file can run
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeWeightsError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain data, and "
            f"unpickling it could run code. Only weights-only files are loaded. ({refusal_reason(e)})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch weights file ({str(e).splitlines()[0]})") from None
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors)")
    return dict(obj)


def _as_state_dict(source: Any) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return load_state_dict_file(source)
    if isinstance(source, Mapping):
        for key in _STATE_DICT_KEYS:
            if isinstance(source.get(key), Mapping):
                return dict(source[key])
        return dict(source)
    raise TypeError(f"expected a model, a state_dict or a file path, got {type(source).__name__}")


def _resnet_from_state_dict(sd: Mapping[str, torch.Tensor], name: str | None, source: str) -> ResNet:
    """Our ImageNet ResNet (shortcut B, stride on the 3x3 conv for bottlenecks) holding ``sd``, loaded strictly."""
    sd = _strip_prefix(sd)
    arch = torchvision_arch(sd)
    stride_in = "3x3" if arch["block"] is Bottleneck else "1x1"
    model = ResNet(arch["block"], arch["layers"], arch["num_classes"], shortcut="B", stride_in=stride_in,
                   groups=arch["groups"], width_per_group=arch["width_per_group"], in_channels=arch["in_channels"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} state_dict does not match {name or _name_for(arch) or 'the inferred ResNet'}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.model_name = name or _name_for(arch) or "resnet"
    model.model_kwargs = {"stride_in": stride_in, "num_classes": arch["num_classes"]} if stride_in == "3x3" else \
        {"num_classes": arch["num_classes"]}
    return model


def from_torchvision(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | str, name: str | None = None) -> ResNet:
    """Our ResNet holding a torchvision ResNet's weights; outputs equal torchvision's.

    Accepts a torchvision model, its state_dict, or a path to a ``.pth`` file (loaded with ``weights_only=True``;
    a file that would unpickle code raises :class:`UnsafeWeightsError`).
    """
    return _resnet_from_state_dict(_as_state_dict(model_or_state_dict), name, "torchvision")


# Leaf modules of a plain timm ResNet (resnet18..152, resnext*, wide_resnet*); anything else (SE/ECA attention,
# blur pooling, GroupNorm, other activations, max/avg-max global pooling) computes something our nets do not.
_TIMM_PLAIN_LEAVES = {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d", "Flatten", "Identity",
                      "Linear", "Dropout"}
# State_dict keys that give a timm variant away (deep stem "c/d/t", average-pool downsample "d", SE/ECA blocks).
_TIMM_VARIANT_KEYS = [(re.compile(r"^conv1\.\d+\."), "a deep 3-conv stem (timm resnet*c/d/t/s)"),
                      (re.compile(r"\.downsample\.2\."), "an average-pool downsample (timm resnet*d)"),
                      (re.compile(r"\.(se|attn|eca)\."), "attention (SE/ECA) in its blocks")]


def _check_timm_module(model: nn.Module, ours: ResNet) -> None:
    odd = sorted({type(m).__name__ for m in model.modules() if not list(m.children())} - _TIMM_PLAIN_LEAVES)
    if odd:
        raise ValueError(f"timm model has layers a plain ResNet does not ({', '.join(odd)}); only timm's resnet*, "
                         "resnext* and wide_resnet* architectures convert")
    # Same names, so compare every conv and pool hyper-parameter (strides, dilation from output_stride, groups).
    theirs = dict(model.named_modules())
    for name, m in ours.named_modules():
        t = theirs.get(name)
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            keys = ("stride", "padding", "dilation", "groups", "kernel_size") if isinstance(m, nn.Conv2d) else \
                ("stride", "padding", "dilation", "kernel_size", "ceil_mode")
            if type(t) is not type(m) or any(getattr(t, k) != getattr(m, k) for k in keys):
                raise ValueError(f"timm model differs from a plain ResNet at {name!r}: {t} vs {m}")


def from_timm(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor] | str, name: str | None = None) -> ResNet:
    """Our ResNet holding a timm ResNet's weights (resnet18..152, resnext*, wide_resnet*, any depth); outputs
    equal timm's.

    timm names the parameters of its plain ResNets as torchvision does (conv1, bn1, layerN.i.convK/bnK,
    layerN.i.downsample.0/1, fc) and, like torchvision (ResNet v1.5), strides a bottleneck's 3x3 conv, so the
    result uses stride_in="3x3". Accepts a timm model, its state_dict (also a timm training checkpoint holding
    ``state_dict``/``state_dict_ema``), or a file path (``.pth``/``.bin`` via ``weights_only=True``, or
    ``.safetensors``). timm variants that compute something else (deep stems, average-pool downsampling, SE/ECA,
    blur pooling, GroupNorm) raise ValueError; for a bare state_dict only what the keys reveal can be checked.
    """
    sd = _strip_prefix(_as_state_dict(model_or_state_dict))
    for pattern, what in _TIMM_VARIANT_KEYS:
        hit = next((k for k in sd if pattern.search(k)), None)
        if hit:
            raise ValueError(f"timm state_dict has {what} (key {hit!r}); only plain ResNets convert")
    model = _resnet_from_state_dict(sd, name, "timm")
    if isinstance(model_or_state_dict, nn.Module):
        _check_timm_module(model_or_state_dict, model)
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
