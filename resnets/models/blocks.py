"""Residual building blocks of He et al. 2015 (Section 3.2-3.3, Fig. 2 and Fig. 5).

A residual block computes y = relu(F(x) + shortcut(x)) (Eqn 1 when the shortcut is the identity, Eqn 2 when it
is a projection W_s x). With ``residual=False`` the same layers form the "plain" counterpart, y = relu(F(x)).

Shortcut options (Section 3.3, "Identity vs. Projection Shortcuts"):
  A  identity; where dimensions grow, stride-2 subsampling plus zero-padded channels (no parameters)
  B  identity where shapes match, a projection (1x1 conv + BN) where they do not
  C  a projection on every block

Attribute names follow torchvision (conv1, bn1, ..., downsample.0/1) so its checkpoints load directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The options, checked once where a net is asked for (resnets.models.registry.create_model); the blocks and nets
# trust what they are given.
SHORTCUT_OPTIONS = ("A", "B", "C")
STRIDE_VARIANTS = ("1x1", "3x3")   # where a bottleneck puts its stride: "1x1" (paper, v1), "3x3" (torchvision, v1.5)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A where dimensions grow: subsample by ``stride`` and append zero channels. No parameters."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A cannot shrink channels ({in_planes} -> {out_planes}); use shortcut 'B' or 'C'")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_planes - self.in_planes
        # F.pad pads the last dims first: (W, W, H, H, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x

    def extra_repr(self) -> str:
        return f"{self.in_planes}->{self.out_planes}, stride={self.stride}, option A (zero-padded identity)"


class Projection(nn.Sequential):
    """W_s x of Eqn 2: a 1x1 convolution and BN. Indexed children 0/1 match torchvision's ``downsample`` keys."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


def make_shortcut(option: str, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """The shortcut module for one block (``option``: one of :data:`SHORTCUT_OPTIONS`); ``None`` means the identity."""
    grows = stride != 1 or in_planes != out_planes
    if option == "C" or (option == "B" and grows):
        return Projection(in_planes, out_planes, stride)
    if option == "A" and grows:
        return ZeroPadShortcut(in_planes, out_planes, stride)
    return None


class _Block(nn.Module):
    """y = relu(F(x) + shortcut(x)) (Eqn 1/2), or relu(F(x)) for the plain counterpart."""

    residual: bool
    downsample: nn.Module | None
    relu: nn.ReLU

    def residual_function(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual_function(x)
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class BasicBlock(_Block):
    """Two 3x3 convolutions (Fig. 5 left), used by ResNet-18/34 and the CIFAR nets."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, groups: int = 1, base_width: int = 64, stride_in: str = "1x1"):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        if not residual and downsample is not None:
            raise ValueError("a plain block has no shortcut")
        self.residual = residual
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def residual_function(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): the layers of the block, up to (not including) the addition."""
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(_Block):
    """1x1, 3x3, 1x1 with expansion 4 (Fig. 5 right), used by ResNet-50/101/152, ResNeXt and wide ResNets.

    ``stride_in`` places the stride of a down-sampling block: "1x1" on the first 1x1 convolution as the paper
    does (v1), or "3x3" on the 3x3 convolution as torchvision and ResNeXt do (v1.5).
    ``groups`` and ``base_width`` give the ResNeXt (cardinality x width) and wide variants.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, groups: int = 1, base_width: int = 64, stride_in: str = "1x1"):
        super().__init__()
        if not residual and downsample is not None:
            raise ValueError("a plain block has no shortcut")
        width = int(planes * (base_width / 64.0)) * groups
        s1, s3 = (stride, 1) if stride_in == "1x1" else (1, stride)
        self.residual = residual
        self.conv1 = conv1x1(inplanes, width, s1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def residual_function(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3
