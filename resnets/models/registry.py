"""Model names -> constructors: ``create_model(name, weights=None, **overrides)`` and ``list_models()``; torchvision's
published ImageNet weights by name (``weights="torchvision"``)."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from . import paper, pretrained  # noqa: F401 - pretrained: weights="cifar10" etc.
from .blocks import SHORTCUT_OPTIONS, STRIDE_VARIANTS, BasicBlock, Bottleneck
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
    return ResNet(block, paper.TABLE1_LAYERS[depth], num_classes, residual=residual, **kw)


def _cifar(depth: int | None = None, *, num_classes: int = 10, stride_in: str = "1x1", **kw: Any) -> CifarResNet:
    return CifarResNet(depth, num_classes, **kw)          # stride_in: always "1x1" here (_check_options)


def _cifar_resnext(*, num_classes: int = 10, stride_in: str = "3x3", **kw: Any) -> CifarResNeXt:
    return CifarResNeXt(num_classes=num_classes, **kw)    # stride_in: always "3x3" here (_check_options)


def _check_options(family: str, kwargs: dict[str, Any]) -> None:
    """The one check of the shortcut option and the stride placement (``stride_in``) of a net asked for by name;
    the nets and blocks built from them trust these arguments."""
    shortcut = kwargs.get("shortcut", "B")
    if shortcut not in SHORTCUT_OPTIONS:
        raise ValueError(f"unknown shortcut option {shortcut!r}; choose one of 'A', 'B', 'C' (He et al. 2015, Sec. 3.3)")
    if "stride_in" not in kwargs:
        return
    stride_in = kwargs["stride_in"]
    if stride_in not in STRIDE_VARIANTS:
        raise ValueError(f"unknown stride_in {stride_in!r}; choose '1x1' (paper, v1) or '3x3' (torchvision, v1.5)")
    depth = kwargs.get("depth")
    if family == "imagenet" and isinstance(depth, int) and depth in paper.TABLE1_LAYERS and depth < 50 \
            and stride_in != "1x1":
        raise ValueError("stride_in applies to bottleneck nets (depth >= 50) only")
    if family == "cifar" and stride_in != "1x1":
        raise ValueError("stride_in applies to bottleneck nets only; the CIFAR ResNets use basic blocks")
    if family == "cifar-resnext" and stride_in != "3x3":
        raise ValueError("ResNeXt-29 puts the stride on the 3x3 conv (Xie et al. 2017); stride_in must be '3x3'")


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


# Our names for which torchvision publishes ImageNet weights (its names are ours). Bottleneck nets among them are
# ResNet v1.5: built with stride_in="3x3" when these weights are loaded.
TORCHVISION_WEIGHTS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                       "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
WEIGHTS_URL_ENV = "RESNETS_WEIGHTS_URL"


class WeightsDownloadError(RuntimeError):
    """Published weights could not be fetched (no network, a bad URL, a corrupt download); says what to do."""


def torchvision_weights_entry(name: str, tag: str | None = None):
    """torchvision's weights enum entry for ``name`` (``tag``: e.g. "IMAGENET1K_V1"; None, "" or "DEFAULT": its
    default; "torchvision:TAG" is read as TAG): url, ``meta["categories"]``, ``transforms()``."""
    if name not in TORCHVISION_WEIGHTS:
        raise ValueError(f"torchvision publishes no weights for {name!r}; it has weights for "
                         f"{', '.join(TORCHVISION_WEIGHTS)} (CIFAR and plain nets must be trained: `resnets train`)")
    from torchvision.models import get_model_weights

    if tag is not None and tag.split(":", 1)[0] == "torchvision":
        tag = tag.split(":", 1)[1] if ":" in tag else None
    enum = get_model_weights(name)
    try:
        return enum.DEFAULT if tag in (None, "", "DEFAULT") else enum[tag]
    except KeyError:
        raise ValueError(f"torchvision has no {tag!r} weights for {name}; it has {[e.name for e in enum]}") from None


def torchvision_weights_url(name: str, tag: str | None = None, base_url: str | None = None) -> str:
    """The URL of torchvision's published weights for ``name`` (``tag``: e.g. "IMAGENET1K_V1"; default: torchvision's
    DEFAULT). ``base_url`` (or env RESNETS_WEIGHTS_URL) replaces torchvision's download location: a folder URL gets
    torchvision's file name appended; a URL of a ``.pth`` file is used as it is."""
    entry = torchvision_weights_entry(name, tag)
    base_url = base_url or os.environ.get(WEIGHTS_URL_ENV) or None
    if not base_url:
        return entry.url
    if base_url.endswith((".pth", ".pt")):
        return base_url
    return base_url.rstrip("/") + "/" + entry.url.rsplit("/", 1)[1]


def torchvision_file_tag(name: str, weights: Any) -> str | None:
    """The tag of torchvision's published weights whose file ``weights`` is, by its file name (torchvision names
    each file after the net and its hash: resnet50-0676ba61.pth is IMAGENET1K_V1); None for any other value. Such
    a file, downloaded by hand for a machine without network, must build torchvision's layout (v1.5) as
    ``weights="torchvision:TAG"`` does: the shapes alone cannot tell the layouts apart."""
    if not isinstance(weights, (str, os.PathLike)) or name not in TORCHVISION_WEIGHTS:
        return None
    base = os.path.basename(os.fspath(weights))
    if not base.endswith(".pth"):
        return None
    from torchvision.models import get_model_weights

    return next((e.name for e in get_model_weights(name) if e.url.rsplit("/", 1)[1] == base), None)


def check_torchvision_file(path: str | os.PathLike, file_name: str) -> None:
    """Raise a ValueError unless the file's SHA-256 starts with the hash in torchvision's ``file_name``
    (resnet50-0676ba61.pth: 0676ba61). torch.hub checks only what it downloads, not a file already in its cache or
    one passed by path."""
    import hashlib

    from torch.hub import HASH_REGEX

    m = HASH_REGEX.search(file_name)
    if m is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(m.group(1)):
        raise ValueError(f"{os.fspath(path)}: not torchvision's published {file_name} (SHA-256 {h.hexdigest()[:16]}..., "
                         f"expected {m.group(1)}...): damaged, cut short or another file under its name; delete it "
                         "and fetch it again")


def _download_state_dict(url: str, name: str, progress: bool, file_name: str | None = None) -> dict[str, Any]:
    """torch.hub's cache (TORCH_HOME/hub/checkpoints), SHA-256 checked against the ``-<hash>`` in the file name
    (``file_name``: torchvision's, whatever the URL is called), loaded with weights_only=True."""
    import pickle
    import urllib.error

    import torch.hub

    from .convert import UnsafeWeightsError, refusal_reason

    file_name = file_name or url.rsplit("/", 1)[1]
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    todo = (f"Without network access: download {url} on another machine and either put it in {cache}/ or pass its "
            f"path, keeping that file name: create_model({name!r}, weights=\"/path/to/{file_name}\") (command line: --weights "
            "PATH).")
    cached = os.path.join(cache, file_name)
    if os.path.isfile(cached):          # torch.hub would load it unchecked
        check_torchvision_file(cached, file_name)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress, check_hash=True,
                                                  file_name=file_name, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeWeightsError(f"{os.path.join(cache, file_name)}: refused to load: it holds Python objects that "
                                 f"could run code when unpickled ({refusal_reason(e)})") from None
    except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError; timeouts and refusals are OSErrors
        reason = getattr(e, "reason", None) or e
        raise WeightsDownloadError(f"could not download the weights for {name} from {url}: {reason}. {todo}") from None
    except RuntimeError as e:
        if "hash" not in str(e):
            raise
        raise WeightsDownloadError(f"the weights downloaded for {name} from {url} are not the published file "
                                   f"({e}); nothing was cached. {todo}") from None


def _load_weights(model: nn.Module, name: str, weights: Any, weights_url: str | None, progress: bool,
                  layout_unsaid: bool = False) -> None:
    from .convert import load_state_dict_file

    if isinstance(weights, str) and weights.split(":", 1)[0] == "torchvision":
        tag = weights.split(":", 1)[1] if ":" in weights else None
        # torchvision's own file name, whatever a mirror calls the file: the name carries the hash to check
        official = torchvision_weights_entry(name, tag).url.rsplit("/", 1)[1]
        sd = _download_state_dict(torchvision_weights_url(name, tag, weights_url), name, progress, official)
        source = f"torchvision's {tag or 'DEFAULT'} weights"
    elif pretrained.is_pretrained_tag(weights):
        path = pretrained.checked_path(name, weights)
        # the file is a resnets checkpoint: the preprocessing (per-pixel mean) rides along under "preprocess."
        sd, source = load_state_dict_file(path), f"the shipped {weights!r} weights ({path.name})"
    elif isinstance(weights, (str, os.PathLike)):
        if torchvision_file_tag(name, weights) and os.path.isfile(weights):   # torchvision's file: its hash is known
            check_torchvision_file(weights, os.path.basename(os.fspath(weights)))
        sd, source = load_state_dict_file(weights), os.fspath(weights)
        if layout_unsaid:
            refuse_unsaid_layout(name, weights)
    else:
        raise ValueError(f"weights must be None, a shipped tag such as 'cifar10', 'torchvision', 'torchvision:TAG' "
                         f"or a file path; got {weights!r}")
    # a resnets checkpoint's weights file (shipped ones are such files) also holds its preprocessing, not the net's
    sd = {k: v for k, v in sd.items() if not k.startswith("preprocess.")}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ValueError(f"{source} do not fit {name}{model.model_kwargs or ''}: "
                         f"{lines[1].strip() if len(lines) > 1 else e}") from None


def bottleneck_layout_unsaid(name: str, overrides: Mapping[str, Any]) -> bool:
    """Whether ``name`` with ``overrides`` has bottleneck blocks whose stride may sit on either convolution
    (ResNet v1, the paper's, or v1.5) and nobody said which: ResNeXt and wide ResNets are always v1.5."""
    spec = get_spec(name)
    depth = overrides.get("depth", spec.defaults.get("depth", 0))
    return (spec.family == "imagenet" and "stride_in" not in spec.defaults and "stride_in" not in overrides
            and isinstance(depth, int) and depth >= 50)


def refuse_unsaid_layout(name: str, source: Any) -> None:
    """A bare state dict (no resnets metadata) cannot tell ResNet v1 from v1.5: the tensors have the same shapes,
    and loaded into the other layout the net runs but computes something else (torchvision's ResNet-50 weights in
    the paper's layout lose accuracy with no error). So the layout must be said, unless the file is torchvision's
    by its name (torchvision_file_tag)."""
    raise ValueError(f"{os.fspath(source)}: a bare state dict for {name}, whose bottleneck blocks come in two "
                     "layouts with the same tensors: ResNet v1 (the stride on each block's first 1x1 convolution, "
                     "the paper's) and v1.5 (on the 3x3: torchvision's and timm's weights). The file cannot say "
                     "which, and in the wrong one the net would run but compute something else. Give stride_in='3x3' or "
                     "'1x1' (command line: --stride-in).")


def _resnets_kwargs(weights: Any) -> dict[str, Any] | None:
    """The model_kwargs a resnets checkpoint's weights file holds in its safetensors header; None for any other
    file (a bare state dict)."""
    from ..train.checkpoint import CheckpointError, checkpoint_meta

    path = os.fspath(weights)
    if not (os.path.isdir(path) or path.endswith(".safetensors")):
        return None
    try:
        kwargs = checkpoint_meta(path).get("model_kwargs")
    except CheckpointError:  # unreadable: the load that follows says what is wrong with it
        return None
    return kwargs if isinstance(kwargs, dict) else None


def _layout_of_file(name: str, weights: Any, overrides: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``overrides`` with the bottleneck layout of a weights file given by path: a resnets checkpoint's own
    (a stride_in given that differs is refused); for a bare state dict it must have been given, and the flag
    says it was not (refused once the file was read: an unsafe or missing file is the first thing to say)."""
    if not bottleneck_layout_unsaid(name, {k: v for k, v in overrides.items() if k != "stride_in"}):
        return overrides, False
    kwargs = _resnets_kwargs(weights)
    if kwargs is None:
        return overrides, "stride_in" not in overrides
    theirs = kwargs.get("stride_in", "1x1")
    if overrides.get("stride_in", theirs) != theirs:
        raise ValueError(f"{os.fspath(weights)} holds {name} with stride_in={theirs!r} (its checkpoint says so); "
                         f"drop stride_in={overrides['stride_in']!r}")
    return ({**overrides, "stride_in": theirs} if theirs != "1x1" else overrides), False


def create_model(name: str, weights: str | os.PathLike | None = None, *, weights_url: str | None = None,
                 progress: bool = True, **overrides: Any) -> nn.Module:
    """Build a registered network. Overrides: num_classes, shortcut ("A" | "B" | "C"), stride_in ("1x1" | "3x3"),
    zero_init_residual, depth (any 6n+2 for the CIFAR nets), in_channels, and the family's own arguments.

    ``weights``: None (random initialisation); "cifar10" (or another tag of ``resnets.models.pretrained``) for the
    CIFAR-10 weights shipped in the package, SHA-256-checked (docs/models.md); "torchvision" (or "torchvision:IMAGENET1K_V1" etc.) for torchvision's
    published ImageNet weights, fetched once into torch.hub's cache (TORCH_HOME) and hash-checked; bottleneck nets
    are then ResNet v1.5 (stride_in="3x3"). ``weights_url`` (or env RESNETS_WEIGHTS_URL) fetches them from a mirror
    instead. Or a path to a weights file (``.pth`` read with weights_only=True, or ``.safetensors``).
    """
    spec = get_spec(name)
    unknown = set(overrides) - _ALLOWED
    if unknown:
        raise ValueError(f"unknown argument(s) for {name}: {sorted(unknown)}; allowed: {sorted(_ALLOWED)}")
    unsaid = False
    if (isinstance(weights, str) and weights.split(":", 1)[0] == "torchvision") or torchvision_file_tag(name, weights):
        if name not in TORCHVISION_WEIGHTS:
            torchvision_weights_url(name)  # raises the ValueError listing what torchvision has
        wanted = {"num_classes": 1000, "shortcut": "B", "residual": True, "in_channels": 3,
                  "stride_in": "3x3" if spec.defaults.get("depth", 0) >= 50 else "1x1"}
        clash = {k: overrides[k] for k in wanted if k in overrides and overrides[k] != wanted[k]}
        clash.update({k: overrides[k] for k in ("depth", "groups", "width_per_group") if k in overrides})
        if clash:
            raise ValueError(f"torchvision's {name} weights need {name}'s torchvision architecture; drop {clash} "
                             "(to fine-tune on other classes, replace model.fc after loading)")
        if wanted["stride_in"] == "3x3":
            overrides = {**overrides, "stride_in": "3x3"}
    elif isinstance(weights, (str, os.PathLike)) and not pretrained.is_pretrained_tag(weights):
        overrides, unsaid = _layout_of_file(name, weights, overrides)
    kwargs = {**spec.defaults, **overrides}
    _check_options(spec.family, kwargs)
    try:
        model = spec.builder(**kwargs)
    except TypeError as e:
        raise ValueError(f"{name}: {e}") from None
    model.model_name = name  # type: ignore[assignment]
    model.model_kwargs = {k: v for k, v in overrides.items()}  # type: ignore[assignment]
    if pretrained.is_pretrained_tag(weights):
        wanted = pretrained.shipped_kwargs(name, weights)
        clash = {k: v for k, v in overrides.items() if wanted.get(k, kwargs.get(k)) != v}
        if clash:
            raise ValueError(f"the shipped {weights!r} weights of {name} are for {name}{wanted or ''}; drop {clash}")
    if weights is not None:
        _load_weights(model, name, weights, weights_url, progress, unsaid)
    return model
