"""The learning-rate schedule (Sec. 4.2: divide by 10 at 32k and 48k iterations; warm up ResNet-110 at 0.01), and
the resolution of a config into the numbers the loop uses, done once before the first step."""
from __future__ import annotations

import dataclasses
import math

from torch import nn

from ..config import RECIPES, TrainConfig, scale_milestones


def learning_rate(cfg: TrainConfig, step: int, warming_up: bool) -> float:
    """Step decay: lr * gamma^(number of milestones passed); the warm-up lr while warming up (ResNet-110).
    ``lr_schedule="cosine"`` (not the paper; imagenet-modern): lr * (1 + cos(pi * step / steps)) / 2."""
    base = cfg.warmup_lr if warming_up else cfg.lr
    if cfg.lr_schedule == "cosine" and not warming_up:
        return float(base) * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    if cfg.lr_schedule == "one-cycle" and not warming_up:
        # cifar-fast (not the paper): linear rise from base/10 over lr_warmup of the steps, then linear decay to 0
        rise = max(1, round(cfg.lr_warmup * cfg.steps))
        if step < rise:
            return float(base) * (0.1 + 0.9 * step / rise)
        return float(base) * max(0.0, (cfg.steps - step) / max(1, cfg.steps - rise))
    if cfg.lr_schedule not in ("step", "cosine", "one-cycle"):
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose step, cosine or one-cycle")
    return float(base) * cfg.gamma ** sum(step >= m for m in cfg.milestones)


def resolve_warmup(cfg: TrainConfig, model: nn.Module) -> float | None:
    if cfg.warmup_lr == "auto":
        # Sec. 4.2 warms up ResNet-110 (and, in Sec. 4.2's last paragraph, the 1202-layer net); not shallower ones.
        return 0.01 if getattr(model, "depth", 0) >= 110 and cfg.lr > 0.01 else None
    return None if cfg.warmup_lr is None else float(cfg.warmup_lr)


def resolve_steps(cfg: TrainConfig, train_size: int) -> TrainConfig:
    """``epochs`` become ``steps`` (whole batches per epoch), and a recipe's own milestones scale with them."""
    if not cfg.epochs:
        return cfg
    steps = max(1, math.ceil(cfg.epochs * (train_size // cfg.batch_size)))
    base = RECIPES.get(cfg.recipe)
    milestones = cfg.milestones
    if base is not None and cfg.milestones == base.milestones:
        milestones = scale_milestones(dataclasses.replace(base, milestones=cfg.milestones), steps)
    return dataclasses.replace(cfg, steps=steps, milestones=milestones, epochs=None)
