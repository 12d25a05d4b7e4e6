"""Model names -> constructors: ``create_model(name, **overrides)`` and ``list_models()``."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from . import paper
from .blocks import BasicBlock, Bottleneck
from .resnet import CifarResNeXt, CifarResNet, ResNet


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str                  # "imagenet" | "cifar" | "cifar-resnext"
    builder: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    paper_error: tuple[float, str] | None = None   # (error %, where it is reported)

    @property
    def input_size(self) -> tuple[int, int, int, int]:
        return (1, 3, 224, 224) if self.family == "imagenet" else (1, 3, 32, 32)


_REGISTRY: dict[str, ModelSpec] = {}


def _imagenet(depth: int | None = None, *, residual: bool = True, num_classes: int = 1000, **kw: Any) -> ResNet:
    if depth not in paper.TABLE1_LAYERS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(paper.TABLE1_LAYERS)} (Table 1); got {depth}")
    block = BasicBlock if depth < 50 else Bottleneck
    if block is BasicBlock and kw.get("stride_in", "1x1") != "1x1":
        raise ValueError("stride_in applies to bottleneck nets (depth >= 50) only")
    return ResNet(block, paper.TABLE1_LAYERS[depth], num_classes, residual=residual, **kw)


def _cifar(depth: int | None = None, *, num_classes: int = 10, stride_in: str = "1x1", **kw: Any) -> CifarResNet:
    if stride_in != "1x1":
        raise ValueError("stride_in applies to bottleneck nets only; the CIFAR ResNets use basic blocks")
    return CifarResNet(depth, num_classes, **kw)


def _cifar_resnext(*, num_classes: int = 10, stride_in: str = "3x3", **kw: Any) -> CifarResNeXt:
    if stride_in != "3x3":
        raise ValueError("ResNeXt-29 puts the stride on the 3x3 conv (Xie et al. 2017); stride_in must be '3x3'")
    return CifarResNeXt(num_classes=num_classes, **kw)


def _register(name: str, family: str, builder: Callable[..., nn.Module], paper_error=None, **defaults: Any) -> None:
    _REGISTRY[name] = ModelSpec(name, family, builder, defaults, paper_error)


for _d in (18, 34, 50, 101, 152):
    _err = paper.IMAGENET_TOP1_10CROP.get(f"resnet{_d}") or paper.IMAGENET_TOP1_10CROP.get(f"resnet{_d}/B")
    _register(f"resnet{_d}", "imagenet", _imagenet, _err, depth=_d, shortcut="B")
    _register(f"plain{_d}", "imagenet", _imagenet, paper.IMAGENET_TOP1_10CROP.get(f"plain{_d}"), depth=_d, residual=False)
# ResNeXt and wide ResNets put the stride on the 3x3 conv, as their papers and torchvision do.
_register("resnext50_32x4d", "imagenet", _imagenet, depth=50, groups=32, width_per_group=4, stride_in="3x3")
_register("resnext101_32x8d", "imagenet", _imagenet, depth=101, groups=32, width_per_group=8, stride_in="3x3")
_register("resnext101_64x4d", "imagenet", _imagenet, depth=101, groups=64, width_per_group=4, stride_in="3x3")
_register("wide_resnet50_2", "imagenet", _imagenet, depth=50, width_per_group=128, stride_in="3x3")
_register("wide_resnet101_2", "imagenet", _imagenet, depth=101, width_per_group=128, stride_in="3x3")
for _d in (20, 32, 44, 56, 110, 1202):
    _register(f"resnet{_d}", "cifar", _cifar, (paper.TABLE6_ERROR[_d], "Table 6, CIFAR-10"), depth=_d)
for _d in (20, 32, 44, 56, 110):
    _register(f"plain{_d}", "cifar", _cifar, depth=_d, residual=False)
for _c in (8, 16):
    _err, _ = paper.RESNEXT29_CIFAR10[f"{_c}x64d"]
    _register(f"resnext29_{_c}x64d", "cifar-resnext", _cifar_resnext, (_err, "Xie et al. 2017 Table 7, CIFAR-10"),
              cardinality=_c, bottleneck_width=64)


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, ImageNet nets first, in registration order."""
    return [n for n, s in _REGISTRY.items() if family is None or s.family == family]


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `resnets models` for the list"
        raise ValueError(f"unknown model {name!r}{hint}") from None


_ALLOWED = {"num_classes", "shortcut", "stride_in", "zero_init_residual", "depth", "in_channels", "residual",
            "groups", "width_per_group", "widths", "cardinality", "bottleneck_width"}


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered network. Overrides: num_classes, shortcut ("A" | "B" | "C"), stride_in ("1x1" | "3x3"),
    zero_init_residual, depth (any 6n+2 for the CIFAR nets), in_channels, and the family's own arguments."""
    spec = get_spec(name)
    unknown = set(overrides) - _ALLOWED
    if unknown:
        raise ValueError(f"unknown argument(s) for {name}: {sorted(unknown)}; allowed: {sorted(_ALLOWED)}")
    kwargs = {**spec.defaults, **overrides}
    try:
        model = spec.builder(**kwargs)
    except TypeError as e:
        raise ValueError(f"{name}: {e}") from None
    model.model_name = name  # type: ignore[assignment]
    model.model_kwargs = {k: v for k, v in overrides.items()}  # type: ignore[assignment]
    return model
