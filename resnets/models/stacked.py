"""Several CIFAR nets computed as one network: every convolution a grouped convolution with a group per net,
every BatchNorm one layer over all the nets' channels, the classifier one grouped matrix product.

    >>> nets = [CifarResNet(56), CifarResNet(20), CifarResNet(20, residual=False)]   # deepest first
    >>> stacked = StackedCifarNets(nets)
    >>> logits = stacked(stack_inputs([x0, x1, x2]))                      # (N, 3, 10): net k's logits at [:, k]
    >>> stacked.bind(nets)         # the nets' parameters and buffers become views of the stacked ones

Why: at the paper's batch of 128 a CIFAR net's training step on a GPU is about a thousand small kernels that keep
the GPU busy but use little of it (docs/performance.md, "GPU: second session"). K nets of one depth stacked this
way take the same number of kernels as one net, each K times larger. Nets of different depths (the same widths)
stack too: block i of a stage is computed for the nets that have it, a prefix of the stack when the nets come
deepest first, and a net's output waits at the end of its stage for the deeper ones'. So the paper preset's nine
nets (plain-20..56, ResNet-20..110) take the kernels of one ResNet-110, not of all nine.

The arithmetic of each net is its own: a group of a grouped convolution sees only its net's channels, BatchNorm
normalises each channel over the batch as before, and net k's logits depend only on net k's input and weights.
Nets with and without shortcuts (plain and residual, Fig. 6) stack together: a plain net's shortcut is multiplied
by zero. Option A shortcuts only (the paper's CIFAR nets, Sec. 4.2); a projection (B, C) has parameters that a plain
net lacks.

Tensor layout: every stacked parameter and buffer is the tensors of that name of the nets that have it,
concatenated along their first dimension in the order the nets were given (``num_batches_tracked`` is one count
for all; ``groups[name]`` says how many nets hold the name: the first ones). The names are those of
:class:`resnets.models.CifarResNet`, so ``unstack`` and ``bind`` are a slice per name.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BasicBlock, ZeroPadShortcut
from .resnet import CifarResNet

__all__ = ["StackedCifarNets", "stack_inputs", "can_stack"]


def stack_inputs(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """K batches of (N, C, H, W), one per net, as the stacked net's input (N, K*C, H, W)."""
    return torch.cat(list(xs), 1)


def can_stack(nets: Sequence[nn.Module]) -> tuple[bool, str]:
    """Whether ``nets`` can be stacked, and why not."""
    if not nets:
        return False, "no nets"
    if not all(type(n) is CifarResNet for n in nets):
        return False, "only CIFAR ResNets and plain nets (Sec. 4.2) stack"
    first = nets[0]
    for prev, n in zip([first, *nets], nets):
        if any(isinstance(b.downsample, nn.Module) and not isinstance(b.downsample, ZeroPadShortcut) for b in n.blocks()):
            return False, f"{n.extra_repr()}: only option A shortcuts stack (a projection has weights a plain net lacks)"
        if family_shapes(n) != family_shapes(first):
            return False, f"different shapes: {first.extra_repr()} and {n.extra_repr()}"
        if n.depth > prev.depth:
            return False, f"nets of different depths stack deepest first: {prev.extra_repr()} before {n.extra_repr()}"
    return True, ""


def family_shapes(net: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The shapes that nets must share to stack: all but those of the blocks after a stage's first, which the
    first block's shapes fix and whose number is the depth's."""
    return tuple((name, tuple(t.shape)) for name, t in net.state_dict().items() if _block_index(name) in (None, 0))


def _block_index(name: str) -> int | None:
    """i of a name in the i-th block of a stage ("layer2.3.conv1.weight" -> 3), None outside the stages."""
    parts = name.split(".")
    return int(parts[1]) if parts[0].startswith("layer") and len(parts) > 2 else None


class _StackedZeroPad(nn.Module):
    """Option A for K nets at once: subsample, then append zero channels to each net's channels."""

    def __init__(self, k: int, shortcut: ZeroPadShortcut):
        super().__init__()
        self.k, self.in_planes, self.out_planes, self.stride = k, shortcut.in_planes, shortcut.out_planes, shortcut.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        x = x.unflatten(1, (self.k, self.in_planes))
        x = F.pad(x, (0, 0, 0, 0, 0, self.out_planes - self.in_planes)).flatten(1, 2)
        # the 5-d detour loses channels_last, which the addition and the convolutions after it want
        return x.contiguous(memory_format=torch.channels_last) if last else x


class _StackedBlock(nn.Module):
    """K basic blocks (Fig. 5 left); ``residual[k]`` says whether net k adds its shortcut (Eqn 1) or is plain."""

    def __init__(self, k: int, blocks: Sequence[BasicBlock]):
        super().__init__()
        self.k = k
        b = blocks[0]
        cin, cout = b.conv1.in_channels, b.conv1.out_channels
        self.conv1 = nn.Conv2d(k * cin, k * cout, 3, b.conv1.stride, 1, groups=k, bias=False)
        self.bn1 = nn.BatchNorm2d(k * cout, eps=b.bn1.eps, momentum=b.bn1.momentum)
        self.conv2 = nn.Conv2d(k * cout, k * cout, 3, 1, 1, groups=k, bias=False)
        self.bn2 = nn.BatchNorm2d(k * cout, eps=b.bn2.eps, momentum=b.bn2.momentum)
        self.relu = nn.ReLU(inplace=True)
        pad = next((m.downsample for m in blocks if m.residual and m.downsample is not None), None)
        self.downsample = _StackedZeroPad(k, pad) if pad is not None else None
        residual = [m.residual for m in blocks]
        self.all_residual, self.any_residual = all(residual), any(residual)
        mask = torch.tensor(residual, dtype=torch.float32).repeat_interleave(cout).view(1, -1, 1, 1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.any_residual:
            s = x if self.downsample is None else self.downsample(x)
            # A plain net's shortcut times 0 adds exactly 0 to its output and its gradient.
            out = out + s if self.all_residual else torch.addcmul(out, s, self.mask.to(s.dtype))
        return self.relu(out)


class _StackedLinear(nn.Module):
    """K fully connected layers: weight (K*classes, C), bias (K*classes); (N, K*C) -> (N, K, classes)."""

    def __init__(self, k: int, fc: nn.Linear):
        super().__init__()
        self.k, self.out_features = k, fc.out_features
        self.weight = nn.Parameter(torch.empty(k * fc.out_features, fc.in_features))
        self.bias = nn.Parameter(torch.empty(k * fc.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(1, (self.k, -1))
        w = self.weight.unflatten(0, (self.k, self.out_features)).to(x.dtype)
        return torch.einsum("nkc,koc->nko", x, w) + self.bias.view(self.k, -1).to(x.dtype)


class StackedCifarNets(nn.Module):
    """K CIFAR nets (:class:`resnets.models.CifarResNet`) of one width, deepest first, as one network, starting
    from their weights. Input (N, K*3, H, W) (:func:`stack_inputs`), output (N, K, classes)."""

    def __init__(self, nets: Sequence[CifarResNet]):
        super().__init__()
        ok, why = can_stack(nets)
        if not ok:
            raise ValueError(f"cannot stack these nets: {why}")
        # Building the layers draws initial weights that the nets' weights then replace: keep the caller's random
        # stream where it was (a resumed run must draw what it would have drawn).
        with torch.random.fork_rng(devices=[]):
            self._build(nets)
        ref = next(nets[0].parameters())
        self.to(device=ref.device, dtype=ref.dtype)
        states = [n.state_dict() for n in nets]
        self.groups = {name: sum(name in s for s in states) for name in states[0]}
        self.load_state_dict(self.stack_state(states))

    def _build(self, nets: Sequence[CifarResNet]) -> None:
        k = self.k = len(nets)
        first = nets[0]
        cin, c0 = first.conv1.in_channels, first.conv1.out_channels
        self.in_channels = cin
        self.conv1 = nn.Conv2d(k * cin, k * c0, 3, 1, 1, groups=k, bias=False)
        self.bn1 = nn.BatchNorm2d(k * c0, eps=first.bn1.eps, momentum=first.bn1.momentum)
        self.relu = nn.ReLU(inplace=True)
        for name in ("layer1", "layer2", "layer3"):
            stages = [getattr(n, name) for n in nets]   # deepest first: block i's nets are a prefix
            setattr(self, name, nn.Sequential(*[_StackedBlock(sum(len(s) > i for s in stages),
                                                              [s[i] for s in stages if len(s) > i])
                                                for i in range(len(stages[0]))]))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = _StackedLinear(k, first.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.k * self.in_channels:
            raise ValueError(f"{self.k} stacked nets expect input (N, {self.k * self.in_channels}, H, W) "
                             f"(stack_inputs); got {tuple(x.shape)}")
        x = self.relu(self.bn1(self.conv1(x)))
        x = self._stage(self.layer3, self._stage(self.layer2, self._stage(self.layer1, x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def _stage(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """A stage's blocks; the nets whose stage has ended (the last ones) set their channels aside until the
        deepest nets' end (one split per change of depth, one concatenation at the end)."""
        k, done = self.k, []
        for block in blocks:
            if block.k < k:
                x, rest = x.split([block.k * x.shape[1] // k, (k - block.k) * x.shape[1] // k], 1)
                done.append(rest)
                k = block.k
            x = block(x)
        return torch.cat([x, *reversed(done)], 1) if done else x

    @staticmethod
    def stack_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The nets' state dicts (deepest first) as one: each name's tensors concatenated along dim 0 (counts:
        the first net's)."""
        out = {}
        for name, t in states[0].items():
            out[name] = t.clone() if t.dim() == 0 else torch.cat([s[name] for s in states if name in s], 0)
        return out

    def unstack(self) -> list[dict[str, torch.Tensor]]:
        """Net k's state dict (views of this net's tensors), for every k."""
        state = self.state_dict()
        return [{name: t if t.dim() == 0 else t.chunk(self.groups[name], 0)[i] for name, t in state.items()
                 if i < self.groups[name]} for i in range(self.k)]

    def bind(self, nets: Sequence[nn.Module]) -> None:
        """Make every parameter and buffer of ``nets`` a view of this network's, so that training this network
        trains them: their evaluation, ``state_dict`` and checkpoints see its weights with nothing copied.
        Call it after moving this network to its device and memory format (``.to`` makes new tensors)."""
        mine = dict(self.named_parameters())
        mine.update(self.named_buffers())
        for i, net in enumerate(nets):
            for module_name, module in net.named_modules():
                prefix = f"{module_name}." if module_name else ""
                for name, p in module.named_parameters(recurse=False):
                    p.data = mine[prefix + name].chunk(self.groups[prefix + name], 0)[i]
                for name, b in list(module.named_buffers(recurse=False)):
                    t = mine[prefix + name]
                    module._buffers[name] = t if t.dim() == 0 else t.chunk(self.groups[prefix + name], 0)[i]
