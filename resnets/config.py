"""Configuration as dataclasses, and the paper's recipes as named instances of them.

A recipe holds the optimisation facts of a section of the paper; every field can be overridden on the command
line (``resnets train --recipe cifar-paper --steps 400 --lr 0.05``) or in Python (``dataclasses.replace``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal


# Every field is also a ``resnets train`` flag: cli.py builds the parser from these fields (--name-with-dashes; its
# type from the annotation: bool -> --x/--no-x, tuple[int, ...] -> comma-separated ints; None and "auto" are values
# a flag cannot give, only a recipe or a config file). The metadata holds each flag's help text and help group, the
# allowed values of str fields (checked by validate() as well as by the parser), and "cli": "explicit" where cli.py
# spells the flags itself or "none" for a field that is not a flag.
_RECIPE, _LOGS, _RUNTIME = "recipe overrides", "evaluation, logs, checkpoints", "runtime"
_IMAGEFOLDER = "ImageFolder data (--recipe imagenet-paper; Sec. 3.4)"
_MODERN = "not the paper (cifar-fast, imagenet-modern)"
_FINETUNE = "fine-tuning pretrained weights (--recipe finetune; not the paper)"


def _field(default: Any, help: str, group: str | None = None, *, choices: tuple[str, ...] | None = None,
           cli: str = "flag", factory: Any = None) -> Any:
    """A TrainConfig field with its command-line metadata (see above)."""
    meta = {"help": help, "group": group, "choices": choices, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what to train
    model: str = _field("resnet20", "a name from `resnets models` (default: the recipe's, resnet20 for CIFAR)")
    model_kwargs: dict[str, Any] = _field(None, "model constructor arguments (flags: --shortcut, --stride-in, "
                                          "--depth, --zero-init-residual)", cli="explicit", factory=dict)
    dataset: str = _field("cifar10", "imagefolder: --data DIR holds DIR/train/CLASS/* and DIR/val/CLASS/* "
                          "(imagenet recipes)", choices=("cifar10", "cifar100", "imagefolder"))
    data: str | None = _field(None, "directory with the data set (else RESNETS_DATA, the cache, or a download)")
    # optimisation (the recipe)
    recipe: str = _field("cifar-paper", "named recipe (default cifar-paper, Sec. 4.2)", cli="explicit")
    steps: int = _field(64_000, "iterations (the recipe's milestones are scaled to match)", _RECIPE)
    epochs: float | None = _field(None, "epochs instead of --steps (epochs x steps per epoch)", _RECIPE)
    batch_size: int = _field(128, "mini-batch size; under torchrun the global batch", _RECIPE)
    lr: float = _field(0.1, "learning rate", _RECIPE)
    momentum: float = _field(0.9, "SGD momentum", _RECIPE)
    weight_decay: float = _field(1e-4, "L2 weight decay", _RECIPE)
    nesterov: bool = _field(False, "Nesterov momentum (not the paper)", _MODERN)
    milestones: tuple[int, ...] = _field((32_000, 48_000), "steps where lr is multiplied by --gamma (divided by 10), "
                                         "e.g. 32000,48000", _RECIPE)
    gamma: float = _field(0.1, "lr factor at each milestone (0.1: divide by 10)", _RECIPE)
    # Sec. 4.2, ResNet-110: "we use 0.01 to warm up the training until the training error is below 80% (about
    # 400 iterations), and then go back to 0.1". None disables it (--no-warmup); "auto" enables it for depth >= 110.
    warmup_lr: float | Literal["auto"] | None = _field("auto", "warm-up lr (default: 0.01 for depth >= 110, as "
                                                       "Sec. 4.2)", _RECIPE)
    warmup_until_error: float = _field(0.80, "warm-up lasts until the training error is below this", _RECIPE)
    warmup_max_steps: int = _field(2_000, "and at most this many steps", _RECIPE)
    # data pipeline
    val_split: int = _field(0, "hold out N training images for validation (5000: the paper's 45k/5k split; 0 "
                            "trains on all 50k)", _RECIPE)
    normalize: str = _field("pixel-mean", "subtract the per-pixel mean (the paper) or per-channel mean/std",
                            _RECIPE, choices=("pixel-mean", "channel"))
    augment: bool = _field(True, "pad-crop-flip: 4-pixel pad, random 32x32 crop, horizontal flip", _RECIPE)
    seed: int = _field(0, "random seed (weights, data order, augmentation)", _RECIPE)
    # ImageFolder pipeline (dataset="imagefolder"; Sec. 3.4): scale augmentation, crop, colour augmentation
    crop: int | None = _field(224, "training crop and single-centre-crop / 10-crop test size (224; the finetune "
                              "recipe: the weights' resolution)", _IMAGEFOLDER)
    crop_style: str = _field("paper", "training crops: the paper's scale augmentation (shorter side from "
                             "[resize-min, resize-max], random crop), or random-resized (a random part of the image, "
                             "--crop-min-area to all of its area, aspect 3/4 to 4/3; the finetune recipe)",
                             _IMAGEFOLDER, choices=("paper", "random-resized"))
    crop_min_area: float = _field(0.08, "random-resized crops: the smallest fraction of the image's area (0.08, as "
                                  "torchvision's references)", _IMAGEFOLDER)
    hflip: bool = _field(True, "random horizontal flips in training, every crop style and CIFAR (off for images "
                         "whose mirror means something else, e.g. digits)", _IMAGEFOLDER)
    resize_min: int = _field(256, "scale augmentation: shorter side from [min, max] (256)", _IMAGEFOLDER)
    resize_max: int = _field(480, "scale augmentation: longest shorter side (480)", _IMAGEFOLDER)
    eval_resize: int | None = _field(256, "shorter side before the test centre crop and the 10 crops (256; the "
                                     "finetune recipe: crop x 8/7, or the crop itself below 128 pixels)",
                                     _IMAGEFOLDER)
    lighting: float = _field(0.1, "PCA colour augmentation (AlexNet) alpha std (0.1; 0 disables)", _IMAGEFOLDER)
    workers: int = _field(8, "DataLoader worker processes per rank (default 8)", _IMAGEFOLDER)
    # optional modern tricks (NOT the paper; used by "cifar-fast" and "imagenet-modern" only)
    label_smoothing: float = _field(0.0, "label smoothing (cifar-fast and imagenet-modern use 0.1)", _MODERN)
    lr_schedule: str = _field("step", "step: the paper's (lr / 10 at --milestones); cosine (imagenet-modern), "
                              "one-cycle (cifar-fast)", _MODERN, choices=("step", "cosine", "one-cycle"))
    lr_warmup: float = _field(0.0, "one-cycle: fraction of the steps for the lr to rise from lr/10 (0.04)", _MODERN)
    # fine-tuning: start from pretrained weights (resnets.train.finetune)
    weights: str | None = _field(None, "start from these weights: torchvision[:TAG], a shipped tag (cifar10), or a "
                                 "checkpoint/weights file; a new head when the data has other classes", _FINETUNE)
    freeze: str | None = _field(None, "keep the stem and the stages up to this one fixed: stem, layer1, ..., or "
                                "backbone (all but the head)", _FINETUNE)
    backbone_lr: float = _field(1.0, "lr of the pretrained layers, as a fraction of --lr (the new head gets --lr)",
                                _FINETUNE)
    # data parallel (torchrun): the global batch is batch_size; BN statistics over the global batch with sync_bn
    sync_bn: bool = _field(False, "under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)",
                           _RUNTIME)
    # evaluation, logging, checkpoints
    eval_every: int = _field(2_000, "evaluate every N steps (and at the end)", _LOGS)
    eval_subset: int | None = _field(None, "evaluate on a fixed N of the test images (CIFAR: the first N; ImageFolder: N spread over every class)", _LOGS)
    log_every: int = _field(50, "log the training loss and error every N steps", _LOGS)
    checkpoint_every: int = _field(2_000, "checkpoint every N steps (0: not by steps)", _LOGS)
    checkpoint_minutes: float = _field(10.0, "also checkpoint when this many minutes passed since the last "
                                       "(default 10; 0: off)", _LOGS)
    keep_last: int = _field(2, "step checkpoints kept (0: all)", _LOGS)
    out: str = _field("runs/default", "run directory (default runs/MODEL)")
    resume: str | None = _field(None, "checkpoint directory, or 'auto' for the newest in --out", _LOGS)
    overwrite: bool = _field(False, "start fresh in an --out that holds a run: the old run is moved to "
                             "OUT.old-TIMESTAMP (not deleted)", _LOGS)
    log_format: str = _field("jsonl", "training log format", _LOGS, choices=("jsonl", "csv"))
    tensorboard: bool = _field(False, "also write TensorBoard event files", _LOGS)
    progress: bool = _field(True, "progress bar", _LOGS)
    on_nan: str = _field("stop", "what a non-finite loss does: stop the run, or skip the step", _LOGS,
                         choices=("stop", "skip"))
    # runtime: one place picks these (resnets.train.runtime)
    device: str = _field("auto", "auto (default), cpu, cuda, cuda:N", _RUNTIME)
    precision: str = _field("auto", "auto: bf16 autocast on a GPU, fp32 on the CPU (no fp16: its small gradients "
                            "need loss scaling, which resnets does not do)", _RUNTIME,
                            choices=("auto", "fp32", "bf16"))
    channels_last: bool = _field(True, "channels_last memory format (on by default: measured faster for GPU and "
                                 "CPU convolutions)", _RUNTIME)
    compile: bool = _field(False, "torch.compile the model (cifar-fast does)", _RUNTIME)
    cuda_graph: bool | Literal["auto"] = _field("auto", "capture the whole step in one CUDA graph (default: where "
                                                "it applies; --no-cuda-graph: never)", _RUNTIME)
    threads: int | None = _field(None, "CPU threads for torch (default: torch's)", _RUNTIME)

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
        for (name, old), value in LEGACY_VALUES.items():   # config.json files of earlier versions
            if d.get(name) == old:
                d[name] = value
        if "milestones" in d:
            if not isinstance(d["milestones"], (list, tuple)):
                raise ValueError(f"milestones must be a list of steps, got {d['milestones']!r}")
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        """A config from a JSON file (e.g. a run's ``config.json``); errors name the file and the problem."""
        p = Path(path)
        try:
            text = p.read_bytes().decode("utf-8")
        except OSError as e:
            raise ValueError(f"{p}: cannot read config ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not a JSON text file ({e.reason} at byte {e.start})") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a JSON object of config fields, found {type(d).__name__}")
        try:
            cfg = cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: {e}") from None
        cfg.validate(source=str(p))
        return cfg

    def validate(self, source: str = "config") -> None:
        """Type and range checks of every field, so a bad value fails here with its name, not hours into a run
        (or as a traceback): zero, negative, non-numeric and absurdly large values."""
        def num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def flag(name):
            return f"{name} (--{name.replace('_', '-')})"

        def integer(name, lo, hi, none_ok=False):
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{source}: {flag(name)} must be an integer in [{lo}, {hi:,}], got {v!r}")

        def real(name, lo, hi, none_ok=False, lo_open=False, hi_open=False):
            v = getattr(self, name)
            if v is None and none_ok:
                return
            ok = num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                raise ValueError(f"{source}: {flag(name)} must be a number in {'(' if lo_open else '['}{lo}, {hi}"
                                 f"{')' if hi_open else ']'}, got {v!r}")

        integer("steps", 1, 10**9)
        integer("batch_size", 1, 65_536)
        integer("log_every", 1, 10**9)
        integer("eval_every", 1, 10**9)
        integer("checkpoint_every", 0, 10**9)
        integer("keep_last", 0, 10**6)
        integer("val_split", 0, 10**8)
        integer("eval_subset", 1, 10**9, none_ok=True)
        integer("seed", 0, 2**63 - 1)
        integer("threads", 1, 4096, none_ok=True)
        integer("workers", 0, 1024)
        integer("warmup_max_steps", 0, 10**9)
        for name in ("crop", "resize_min", "resize_max", "eval_resize"):
            integer(name, 1, 16_384, none_ok=name in ("crop", "eval_resize"))
        real("epochs", 0, 10**6, none_ok=True, lo_open=True)
        real("lr", 0, 100, lo_open=True)
        real("momentum", 0, 1, hi_open=True)
        real("weight_decay", 0, 1)
        real("gamma", 0, 1, lo_open=True)
        real("label_smoothing", 0, 1, hi_open=True)
        real("lr_warmup", 0, 1, hi_open=True)
        real("lighting", 0, 10)
        real("warmup_until_error", 0, 1, lo_open=True)
        real("checkpoint_minutes", 0, 10**6)
        real("backbone_lr", 0, 100)
        real("crop_min_area", 0, 1, lo_open=True)
        for name in ("weights", "freeze"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{source}: {flag(name)} must be a non-empty string, got {v!r}")
        if self.freeze is not None and self.weights is None:
            raise ValueError(f"{source}: --freeze {self.freeze} keeps layers at their initial values: it needs "
                             "--weights (pretrained layers to keep)")
        if self.warmup_lr not in (None, "auto"):
            real("warmup_lr", 0, 100, lo_open=True)
        if self.resize_min > self.resize_max:
            raise ValueError(f"{source}: resize_min {self.resize_min} is above resize_max {self.resize_max}")
        if not isinstance(self.model, str) or not isinstance(self.model_kwargs, dict):
            raise ValueError(f"{source}: model must be a name and model_kwargs an object")
        if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in self.milestones):
            raise ValueError(f"{source}: milestones must be non-negative integers, got {list(self.milestones)!r}")
        for f in dataclasses.fields(self):
            v, allowed = getattr(self, f.name), f.metadata["choices"]
            if allowed and v not in allowed:
                raise ValueError(f"{source}: {flag(f.name)} must be one of {', '.join(allowed)}; got {v!r}")
            kind, special = field_type(f.name)
            if kind is bool and not (isinstance(v, bool) or v in special):
                raise ValueError(f"{source}: {flag(f.name)} must be true or false"
                                 f"{''.join(f' or {s!r}' for s in special)}, got {v!r}")


# Values earlier versions wrote in config.json, and what they mean now; TrainConfig.from_dict maps them.
LEGACY_VALUES: dict[tuple[str, str], Any] = {
    ("channels_last", "auto"): True,     # "auto" always meant on
    ("cuda_graph", "off"): False,        # an alias of False
}


@cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def field_type(name: str) -> tuple[type, tuple[Any, ...]]:
    """What a TrainConfig field holds, read from its annotation: its one type (bool, int, float, str, tuple, dict)
    and the special values it also takes (None, "auto"), which only recipes and config files give, not flags."""
    hint = _hints()[name]
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds, special = [], []
    for m in members:
        if m is type(None):
            special.append(None)
        elif typing.get_origin(m) is Literal:
            special.extend(typing.get_args(m))
        else:
            kinds.append(typing.get_origin(m) or m)
    if len(kinds) != 1:
        raise TypeError(f"TrainConfig.{name}: annotation {hint} must have one type besides None and Literal values")
    return kinds[0], tuple(special)


# Section 4.2: "weight decay of 0.0001 and momentum of 0.9 ... mini-batch size of 128 ... learning rate of 0.1,
# divide it by 10 at 32k and 48k iterations, and terminate training at 64k iterations, which is determined on a
# 45k/5k train/val split." We train on all 50k by default (val_split=5000 gives the paper's split).
CIFAR_PAPER = TrainConfig(recipe="cifar-paper")

# Section 3.4: "We use SGD with a mini-batch size of 256. The learning rate starts from 0.1 and is divided by 10 when
# the error plateaus, and the models are trained for up to 60 x 10^4 iterations. We use a weight decay of 0.0001 and
# a momentum of 0.9. We do not use dropout." The plateau rule is not reproducible as written; we use its common
# fixed-epoch equivalent (fb.resnet.torch, torchvision): 90 epochs, lr / 10 after epochs 30 and 60. One epoch of
# ImageNet-1k train (1,281,167 images) at batch 256 is 5004 steps (last partial batch dropped), so 90 epochs =
# 450,360 iterations (the paper's "up to 600,000" is ~120 epochs). `--epochs N` on other data keeps the 30/60/90
# shape. Augmentation (Sec. 3.4): shorter side uniform in [256, 480], random 224 crop + flip, per-pixel mean
# subtracted (approximated by the per-channel ImageNet mean, resnets.data.imagefolder), PCA colour augmentation.
# Model: ResNet-50 with projection shortcuts for increasing dimensions (option B, Table 3/4). No warm-up.
IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 256
IMAGENET_PAPER = TrainConfig(
    recipe="imagenet-paper", model="resnet50", dataset="imagefolder", batch_size=256, lr=0.1, momentum=0.9,
    weight_decay=1e-4, steps=90 * IMAGENET_STEPS_PER_EPOCH,
    milestones=(30 * IMAGENET_STEPS_PER_EPOCH, 60 * IMAGENET_STEPS_PER_EPOCH), warmup_lr=None,
    normalize="pixel-mean", crop=224, resize_min=256, resize_max=480, eval_resize=256, lighting=0.1,
    eval_every=IMAGENET_STEPS_PER_EPOCH, checkpoint_every=IMAGENET_STEPS_PER_EPOCH // 2, log_every=100, keep_last=2)

# NOT the paper: a few widely used later tricks on top of the paper's ImageNet recipe, for comparison only —
# label smoothing 0.1 (Szegedy et al. 2016), cosine learning-rate decay (Loshchilov & Hutter 2017) and each residual
# block's last BN initialised to zero (Goyal et al. 2017). Same 90 epochs, batch, lr, momentum, weight decay.
IMAGENET_MODERN = dataclasses.replace(
    IMAGENET_PAPER, recipe="imagenet-modern", label_smoothing=0.1, lr_schedule="cosine", milestones=(),
    model_kwargs={"zero_init_residual": True})

# NOT the paper: the paper's nets, data, per-pixel mean and pad/crop/flip augmentation, with an optimisation
# that reaches the paper's ResNet-20 error in about an hour on a 2-core CPU (docs/results.md): 50 epochs of
# batch 128 on all 50k images (19,500 steps, against the paper's 64k steps = 164 epochs); one-cycle lr (linear
# rise from 0.02 to 0.2 over the first 4% of steps, then linear decay to 0; Smith & Topin 2017), Nesterov
# momentum, weight decay 5e-4, label smoothing 0.1 (Szegedy et al. 2016). bf16 autocast and torch.compile, because
# on the CPU we measured (AMD EPYC with avx512_bf16, 2 threads, torch 2.14.1) a ResNet-20 step took 248 ms in fp32
# and 129 ms in bf16 compiled; on a CPU without native bf16, pass --precision fp32.
CIFAR_FAST = dataclasses.replace(
    CIFAR_PAPER, recipe="cifar-fast", steps=19_500, epochs=50, lr=0.2, nesterov=True, weight_decay=5e-4,
    label_smoothing=0.1, lr_schedule="one-cycle", lr_warmup=0.04, milestones=(), warmup_lr=None,
    precision="bf16", compile=True, eval_every=975, checkpoint_every=975, keep_last=2)

# NOT the paper: fine-tuning pretrained weights (--weights) on a small ImageFolder data set of your own. 30 epochs
# of batch 32, cosine lr decay, Nesterov momentum, weight decay 5e-4, label smoothing 0.1; random-resized crops
# (35-100% of the area; and flips) at the weights' resolution, no PCA lighting. lr 0.03 for all layers
# (backbone_lr 1.0) and the 35% crop area were the best of benchmarks/finetune_digits.py's sweep (our CIFAR-10
# ResNet-20 on 100 scikit-learn digits: 4.5% validation error, against 22.5-69% for the other lr / backbone_lr
# pairs and 9.0% for the best from-scratch run; docs/finetune.md). One data set: other weights and images may
# prefer a lower backbone_lr.
FINETUNE = dataclasses.replace(
    CIFAR_PAPER, recipe="finetune", dataset="imagefolder", steps=1_000, epochs=30, batch_size=32, lr=0.03,
    backbone_lr=1.0, nesterov=True, weight_decay=5e-4, label_smoothing=0.1, lr_schedule="cosine", milestones=(),
    warmup_lr=None, crop=None, eval_resize=None, crop_style="random-resized", crop_min_area=0.35, lighting=0.0,
    workers=2, eval_every=10**6, checkpoint_every=10**6, log_every=10)

RECIPES: dict[str, TrainConfig] = {"cifar-paper": CIFAR_PAPER, "cifar-fast": CIFAR_FAST,
                                   "imagenet-paper": IMAGENET_PAPER, "imagenet-modern": IMAGENET_MODERN,
                                   "finetune": FINETUNE}


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
    if "model_kwargs" in overrides:     # e.g. --depth on top of a recipe's zero_init_residual: both apply
        overrides["model_kwargs"] = {**base.model_kwargs, **overrides["model_kwargs"]}
    if "steps" in overrides and base.epochs and "epochs" not in overrides:
        overrides["epochs"] = None    # --steps replaces a recipe's epochs
    if "milestones" in overrides:
        overrides["milestones"] = tuple(int(m) for m in overrides["milestones"])
    elif "steps" in overrides and overrides["steps"] != base.steps:
        # A shorter (or longer) run keeps the recipe's shape: the lr drops at the same fractions of training.
        overrides["milestones"] = scale_milestones(base, overrides["steps"])
    return dataclasses.replace(base, **overrides)


def scale_milestones(base: TrainConfig, steps: int) -> tuple[int, ...]:
    return tuple(max(1, round(m * steps / base.steps)) for m in base.milestones)
