"""Starting a run from pretrained weights: fine-tuning on your own classes (``resnets train --weights``).

    resnets train --model resnet20 --weights cifar10 --recipe finetune --dataset imagefolder --data DIR --out runs/ft
    resnets train --model resnet18 --weights torchvision --recipe finetune --dataset imagefolder --data DIR

What the weights bring: the network (its architecture must be the run's ``--model``), the input normalisation
they were trained with (ImageNet mean/std for torchvision's, the per-pixel CIFAR-10 mean for ours), and their
resolution. When the data set has another number of classes, the classifier head ``fc`` is replaced by a new,
randomly initialised one; the class names then come from the data. ``freeze`` keeps the stem and the stages up to
the one named fixed (their BatchNorm layers stay in eval mode, so their outputs do not change at all), and
``backbone_lr`` scales the learning rate of the pretrained layers against the new head's.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..data import Normalizer
from ..models import create_model
from ..models.registry import (bottleneck_layout_unsaid, refuse_unsaid_layout, torchvision_file_tag,
                               torchvision_weights_entry)
from ..models import pretrained as shipped
from . import checkpoint as ck


@dataclass
class Initial:
    """Pretrained weights, as a model with its own head, and what they were trained with."""
    model: nn.Module
    source: str                        # in words, for messages
    classes: list[str] | None          # the weights' own class names, where known
    normalizer: Normalizer | None      # the input normalisation they expect, where known
    image_size: int | None             # the resolution they were trained at, where known


def load_initial(name: str, weights: str, model_kwargs: dict) -> Initial:
    """The model ``name`` with the weights ``weights`` ("torchvision[:TAG]", a shipped tag such as "cifar10", a
    resnets checkpoint, or a weights file), and what they bring. Raises ValueError for another architecture."""
    kwargs = {k: v for k, v in model_kwargs.items() if k != "num_classes"}
    file_tag = torchvision_file_tag(name, weights)       # torchvision's file, downloaded by hand
    if weights.split(":", 1)[0] == "torchvision" or file_tag:
        from ..data.imagefolder import imagenet_normalizer
        model = create_model(name, weights=weights, **kwargs)
        entry = torchvision_weights_entry(name, file_tag or weights)
        tag = file_tag or (weights.split(":", 1)[1] if ":" in weights else "DEFAULT")
        return Initial(model, f"torchvision's {name} {tag} weights" + (f" ({weights})" if file_tag else ""),
                       list(entry.meta["categories"]),
                       imagenet_normalizer(divide_by_std=True),      # torchvision's weights expect /std
                       entry.transforms().crop_size[0])
    if shipped.is_pretrained_tag(weights):
        return _from_checkpoint(name, ck.load_checkpoint(shipped.checked_path(name, weights), with_state=False),
                                f"the shipped {weights!r} weights of {name}", kwargs)
    path = Path(weights)
    if not path.exists():
        raise ValueError(f"--weights {weights}: no such file, and not 'torchvision' or a shipped tag "
                         f"({', '.join(shipped.available()) or 'none'})")
    try:
        c = ck.load_checkpoint(path, with_state=False)
    except ck.CheckpointError:
        if path.is_dir() or path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
            raise   # a damaged checkpoint or safetensors file: its own error says what is wrong
        c = None    # a pickled file of another layout: load_state_dict_file knows more of them
    if c is not None and c.model_name is not None:
        return _from_checkpoint(name, c, f"the checkpoint {path}", kwargs)
    from ..models.convert import load_state_dict_file   # a bare state dict (e.g. torchvision's .pth format)
    sd = load_state_dict_file(path)
    head = sd.get("fc.weight")
    if bottleneck_layout_unsaid(name, kwargs):
        refuse_unsaid_layout(name, path)
    model = create_model(name, **kwargs, **({"num_classes": head.shape[0]} if head is not None else {}))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"the weights file {path} does not fit {name}: {str(e).splitlines()[-1].strip()}") from None
    return Initial(model, f"the weights file {path}", None, None, None)


def _from_checkpoint(name: str, c: ck.Checkpoint, source: str, kwargs: dict) -> Initial:
    if c.model_name != name:
        raise ValueError(f"{source} are for {c.model_name}, but this run trains {name}: pass --model "
                         f"{c.model_name}, or weights made for {name}")
    model = ck.model_from_checkpoint(c)
    # The net asked for must be the one the weights were built as. A checkpoint records only the arguments that
    # differ from the net's defaults, so compare the nets (their module trees), not the arguments.
    n = c.model_kwargs.get("num_classes")
    if kwargs and repr(create_model(name, **kwargs, **({"num_classes": n} if n else {}))) != repr(model):
        clash = {k: v for k, v in kwargs.items() if k not in c.model_kwargs or c.model_kwargs[k] != v}
        raise ValueError(f"{source} are for {name}{c.model_kwargs}; drop {clash or kwargs}")
    norm = Normalizer.from_state_dict(c.preprocess) if c.preprocess else None
    size = norm.image_size[1] if norm is not None and norm.image_size else None
    return Initial(model, source, c.classes, norm, size)


def fit_head(model: nn.Module, classes: list[str], weights_classes: list[str] | None) -> bool:
    """Replace ``model.fc`` by a new linear layer for ``classes`` unless the weights were trained on exactly these
    classes (same names, same order; or, names unknown, the same number). True if replaced."""
    num_classes = len(classes)
    same = classes == weights_classes if weights_classes is not None else model.fc.out_features == num_classes
    if same and model.fc.out_features == num_classes:
        return False
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return True


def stages(model: nn.Module) -> list[str]:
    """What ``freeze`` may name, input side first: the stem, then each stage (``layer1``...)."""
    return ["stem"] + [n for n, _ in model.named_children() if n.startswith("layer")]


def freeze(model: nn.Module, upto: str) -> list[str]:
    """Freeze the stem and every stage up to and including ``upto`` ("backbone": all but the head). Their
    parameters get no gradients and their BatchNorm layers stay in eval mode even in ``model.train()``."""
    names = stages(model)
    if upto == "backbone":
        upto = names[-1]
    if upto not in names:
        raise ValueError(f"--freeze {upto!r}: {type(model).__name__} has {', '.join(names)} (or 'backbone')")
    frozen = names[:names.index(upto) + 1]
    children = [n for n, _ in model.named_children() if n in ("conv1", "bn1")] + frozen[1:]
    for n in children:
        for p in getattr(model, n).parameters():
            p.requires_grad_(False)

    # By name, through ``self``: a copy of the model (copy.deepcopy rebinds the method) freezes its own modules.
    def train(self, mode: bool = True):
        type(self).train(self, mode)
        for n in children:
            getattr(self, n).eval()
        return self

    model.train = types.MethodType(train, model)
    return frozen


def param_groups(model: nn.Module, backbone_lr: float) -> list[dict]:
    """The trainable parameters in two groups: the pretrained layers at ``backbone_lr`` times the lr, the head at
    the lr. The loop multiplies each group's ``lr_scale`` into the schedule's lr."""
    head = [p for p in model.fc.parameters() if p.requires_grad]
    ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": head, "lr_scale": 1.0}]
    if body:
        groups.insert(0, {"params": body, "lr_scale": backbone_lr})
    return groups


def build_model(cfg, classes: list[str], initial: Initial | None, resume: ck.Checkpoint | None
                ) -> tuple[nn.Module, str | None]:
    """The run's network, before its weights are moved to the device: ``initial``'s with a head for ``classes``,
    or a new one (a resumed fine-tuning run: the architecture its checkpoint records). Then ``cfg.freeze``.
    Returns the model (its ``model_kwargs`` without num_classes) and a line saying where it started from."""
    n = len(classes)
    if cfg.model_kwargs.get("num_classes", n) != n:
        raise ValueError(f"--num-classes {cfg.model_kwargs['num_classes']}, but the data has {n} classes "
                         f"({', '.join(classes[:5])}{', ...' if n > 5 else ''}); drop --num-classes, or start from "
                         "--weights to replace a pretrained head")
    kwargs = resume.model_kwargs if resume is not None and cfg.weights else cfg.model_kwargs
    kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    note = None
    if initial is not None:
        model, replaced = initial.model, fit_head(initial.model, classes, initial.classes)
    else:
        model, replaced = create_model(cfg.model, num_classes=n, **kwargs), False
    frozen = freeze(model, cfg.freeze) if cfg.freeze else None
    if initial is not None:
        note = describe(initial, replaced, n, frozen)
    model.model_kwargs = {k: v for k, v in getattr(model, "model_kwargs", kwargs).items() if k != "num_classes"}
    return model, note


def describe(initial: Initial, replaced: bool, num_classes: int, frozen: list[str] | None) -> str:
    words = [f"starting from {initial.source}"]
    words.append(f"new {num_classes}-class head" if replaced else "their head")
    if frozen:
        words.append(f"frozen: {', '.join(frozen)}")
    words.append("their preprocessing" if initial.normalizer is not None else
                 "no preprocessing known for them: the data's own")
    return "; ".join(words)


def prepare(cfg, resume: ck.Checkpoint | None):
    """Resolve what ``cfg.weights`` brings before the data and the model are built: (cfg with the crop sizes
    resolved, the Initial weights or None, the Normalizer the data must use or None). A resumed run takes the
    normalisation from its checkpoint and needs the weights no more."""
    initial, norm, size = None, None, None
    if cfg.weights is not None:
        if resume is not None:
            norm = Normalizer.from_state_dict(resume.preprocess) if resume.preprocess else None
            size = resume.meta.get("config", {}).get("crop")
        else:
            initial = load_initial(cfg.model, cfg.weights, cfg.model_kwargs)
            norm, size = initial.normalizer, initial.image_size
    crop = cfg.crop if cfg.crop is not None else size or 224
    # ImageNet-size images are resized to 8/7 of the crop and centre-cropped (256 -> 224); CIFAR-size ones, as in
    # the paper's CIFAR tests, are not cropped.
    eval_resize = cfg.eval_resize if cfg.eval_resize is not None else crop if crop < 128 else round(crop * 8 / 7)
    return dataclasses.replace(cfg, crop=crop, eval_resize=eval_resize), initial, norm
