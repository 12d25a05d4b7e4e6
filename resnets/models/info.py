"""Parameters and multiply-adds counted from a model itself (Table 1's "FLOPs" are multiply-adds)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model, get_spec


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass for one input of ``input_size`` (N, C, H, W), divided by N.

    torch's FLOP counter counts a multiply-add as 2 FLOPs for convolutions and matrix products; BN, ReLU,
    additions and pooling are not counted, as in the paper's Table 1.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(input_size, device=device)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // input_size[0]


def model_info(name_or_model: str | nn.Module, input_size: tuple[int, ...] | None = None) -> dict[str, Any]:
    """``{"name", "params", "macs", "input_size"}``; input defaults to 224 px for ImageNet nets, 32 px for CIFAR."""
    if isinstance(name_or_model, str):
        # Shapes are all that counting needs: build on the meta device, no memory or compute spent.
        with torch.device("meta"):
            model, name = create_model(name_or_model), name_or_model
    else:
        model, name = name_or_model, getattr(name_or_model, "model_name", type(name_or_model).__name__)
    if input_size is None:
        try:
            input_size = get_spec(name).input_size
        except ValueError:
            input_size = (1, getattr(model, "in_channels", 3), 224, 224)
    return {"name": name, "params": count_params(model), "macs": count_macs(model, tuple(input_size)),
            "input_size": tuple(input_size)}
