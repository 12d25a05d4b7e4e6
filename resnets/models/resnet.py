"""The networks of He et al. 2015: ImageNet ResNets (Table 1), CIFAR ResNets (Section 4.2), their plain
counterparts, and the ResNeXt / wide variants that followed (Xie et al. 2017; Zagoruyko & Komodakis 2016).

    >>> import resnets
    >>> model = resnets.create_model("resnet56")            # CIFAR, 6n+2 layers, option A shortcuts
    >>> model = resnets.create_model("resnet50", shortcut="C", stride_in="3x3")
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import BasicBlock, Bottleneck, conv3x3, make_shortcut

Block = type[BasicBlock] | type[Bottleneck]


class _Net(nn.Module):
    """What the ImageNet and CIFAR nets share: stage building, initialisation, input checks. The ``shortcut`` and
    ``stride_in`` options are not checked here: :func:`resnets.models.create_model` checks them, once."""

    in_channels: int

    def _make_stage(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            out_planes = planes * block.expansion
            shortcut = make_shortcut(self.shortcut, self.inplanes, out_planes, s) if self.residual else None
            layers.append(block(self.inplanes, planes, s, shortcut, residual=self.residual, groups=self.groups,
                                base_width=self.base_width, stride_in=self.stride_in))
            self.inplanes = out_planes
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He et al. 2015b ("Delving deep into rectifiers") normal init, as Sec. 3.4 says; fan_out as torchvision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual block then starts as the identity (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input (N, {self.in_channels}, H, W); got {tuple(x.shape)}")

    def blocks(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (BasicBlock, Bottleneck))]


class ResNet(_Net):
    """ImageNet architecture of Table 1: 7x7/2 conv, 3x3/2 max-pool, four stages (64/128/256/512 filters),
    global average pool and a fully connected layer. ``residual=False`` gives the plain net."""

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, *, shortcut: str = "B",
                 residual: bool = True, stride_in: str = "1x1", groups: int = 1, width_per_group: int = 64,
                 zero_init_residual: bool = False, in_channels: int = 3):
        super().__init__()
        self.block, self.layers, self.shortcut, self.residual = block, tuple(layers), shortcut, residual
        self.stride_in, self.groups, self.base_width, self.in_channels = stride_in, groups, width_per_group, in_channels
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, 64, layers[0], 1)
        self.layer2 = self._make_stage(block, 128, layers[1], 2)
        self.layer3 = self._make_stage(block, 256, layers[2], 2)
        self.layer4 = self._make_stage(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))

    def extra_repr(self) -> str:
        kind = "residual" if self.residual else "plain"
        variant = ""
        if self.block is Bottleneck:
            variant = ", stride_in=1x1 (v1, paper)" if self.stride_in == "1x1" else ", stride_in=3x3 (v1.5, torchvision)"
        group = f", groups={self.groups}, width_per_group={self.base_width}" if self.block is Bottleneck else ""
        return f"{kind}, layers={list(self.layers)}, shortcut={self.shortcut if self.residual else 'none'}{variant}{group}"


class CifarResNet(_Net):
    """CIFAR-10 architecture of Section 4.2: a 3x3 conv to 16 filters, three stages of n basic blocks on maps of
    32/16/8 pixels with 16/32/64 filters (stride 2 starts stages 2 and 3), global average pool, fc; 6n+2 layers."""

    def __init__(self, depth: int, num_classes: int = 10, *, shortcut: str = "A", residual: bool = True,
                 widths: Sequence[int] = (16, 32, 64), zero_init_residual: bool = False, in_channels: int = 3):
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...); got {depth}")
        self.depth, self.shortcut, self.residual, self.in_channels = depth, shortcut, residual, in_channels
        self.stride_in, self.groups, self.base_width = "1x1", 1, 64
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(BasicBlock, widths[0], n, 1)
        self.layer2 = self._make_stage(BasicBlock, widths[1], n, 2)
        self.layer3 = self._make_stage(BasicBlock, widths[2], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self._init_weights(zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))

    def extra_repr(self) -> str:
        kind = "residual" if self.residual else "plain"
        return f"{kind}, depth={self.depth}, shortcut={self.shortcut if self.residual else 'none'}"


class CifarResNeXt(_Net):
    """ResNeXt-29 for CIFAR (Xie et al. 2017, Sec. 5.3): a 3x3 conv to 64 filters, three stages of three
    bottleneck blocks with 256/512/1024 output channels, cardinality C and bottleneck width d (C x d), stride on
    the 3x3 conv, projection shortcuts where shapes change."""

    def __init__(self, cardinality: int = 8, bottleneck_width: int = 64, num_classes: int = 10, *,
                 depth: int = 29, shortcut: str = "B", residual: bool = True, zero_init_residual: bool = False,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"CIFAR ResNeXt depth must be 9n+2 (e.g. 29); got {depth}")
        n = (depth - 2) // 9
        self.depth, self.shortcut, self.residual, self.in_channels = depth, shortcut, residual, in_channels
        self.stride_in, self.groups, self.base_width = "3x3", cardinality, bottleneck_width
        self.inplanes = 64
        self.conv1 = conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # planes * 4 gives the 256/512/1024 outputs; the grouped width is C * d, doubling per stage.
        self.layer1 = self._make_stage(Bottleneck, 64, n, 1)
        self.layer2 = self._make_stage(Bottleneck, 128, n, 2)
        self.layer3 = self._make_stage(Bottleneck, 256, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)
        self._init_weights(zero_init_residual)

    forward_features = CifarResNet.forward_features
    forward = CifarResNet.forward

    def extra_repr(self) -> str:
        return f"depth={self.depth}, cardinality={self.groups}, bottleneck_width={self.base_width}d, shortcut={self.shortcut}"
