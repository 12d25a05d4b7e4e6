"""Configuration as dataclasses, and the paper's recipes as named instances of them.

A recipe holds the optimisation facts of a section of the paper; every field can be overridden on the command
line (``resnets train --recipe cifar-paper --steps 400 --lr 0.05``) or in Python (``dataclasses.replace``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    # what to train
    model: str = "resnet20"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "cifar10"                 # "cifar10" | "cifar100"
    data: str | None = None                  # directory with the data; None: RESNETS_DATA, cache, download
    # optimisation (the recipe)
    recipe: str = "cifar-paper"
    steps: int = 64_000
    epochs: float | None = None              # if set, replaces steps (epochs x steps per epoch)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    milestones: tuple[int, ...] = (32_000, 48_000)
    gamma: float = 0.1
    # Sec. 4.2, ResNet-110: "we use 0.01 to warm up the training until the training error is below 80% (about
    # 400 iterations), and then go back to 0.1". None disables it; "auto" enables it for depth >= 110.
    warmup_lr: float | None | str = "auto"
    warmup_until_error: float = 0.80
    warmup_max_steps: int = 2_000
    # data pipeline
    val_split: int = 0                       # 5000 gives the paper's 45k/5k train/val split; 0 trains on all 50k
    normalize: str = "pixel-mean"            # "pixel-mean" (the paper) | "channel"
    augment: bool = True                     # 4-pixel pad, random 32x32 crop, horizontal flip
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_every: int = 2_000
    eval_subset: int | None = None           # evaluate on the first N test images (a fixed subset)
    log_every: int = 50
    checkpoint_every: int = 2_000
    keep_last: int = 2
    out: str = "runs/default"
    resume: str | None = None                # a checkpoint path, or "auto" for the newest in `out`
    log_format: str = "jsonl"                # "jsonl" | "csv"
    tensorboard: bool = False
    progress: bool = True
    on_nan: str = "stop"                     # "stop" | "skip": what a non-finite loss does
    # runtime: one place picks these (resnets.train.runtime)
    device: str = "auto"                     # "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"                  # "auto" (bf16 on GPU, fp32 on CPU) | "fp32" | "bf16"
    channels_last: bool | str = "auto"       # "auto": on for GPU and CPU convolutions (measured faster on both)
    compile: bool = False
    cuda_graph: bool | str = "auto"          # whole-step CUDA graph where it applies
    threads: int | None = None               # torch CPU threads; None leaves torch's default

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        d = dict(d)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# Section 4.2: "weight decay of 0.0001 and momentum of 0.9 ... mini-batch size of 128 ... learning rate of 0.1,
# divide it by 10 at 32k and 48k iterations, and terminate training at 64k iterations, which is determined on a
# 45k/5k train/val split." We train on all 50k by default (val_split=5000 gives the paper's split).
CIFAR_PAPER = TrainConfig(recipe="cifar-paper")

RECIPES: dict[str, TrainConfig] = {"cifar-paper": CIFAR_PAPER}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """A named recipe with fields replaced by ``overrides`` (None values are ignored)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown config field(s): {sorted(unknown)}")
    base = RECIPES[name]
    if "milestones" in overrides:
        overrides["milestones"] = tuple(int(m) for m in overrides["milestones"])
    elif "steps" in overrides and overrides["steps"] != base.steps:
        # A shorter (or longer) run keeps the recipe's shape: the lr drops at the same fractions of training.
        overrides["milestones"] = scale_milestones(base, overrides["steps"])
    return dataclasses.replace(base, **overrides)


def scale_milestones(base: TrainConfig, steps: int) -> tuple[int, ...]:
    return tuple(max(1, round(m * steps / base.steps)) for m in base.milestones)
