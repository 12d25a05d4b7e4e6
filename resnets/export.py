"""Ship a trained network: ONNX or TorchScript export, checked against PyTorch on random inputs.

    resnets export --checkpoint runs/resnet56/checkpoints/step-00064000 --format onnx --out resnet56.onnx
    resnets export --model resnet50 --weights torchvision --format torchscript --out resnet50.pt
    resnets export --checkpoint CKPT --out resnet56-b8.onnx --static-batch --batch-size 8

The batch axis is dynamic (any batch size) unless ``--static-batch`` fixes it to ``--batch-size``; a traced
TorchScript module takes any batch size either way. The exported file is run (onnxruntime for ONNX,
``torch.jit.load`` for TorchScript) on random inputs of the training resolution (32 px for the CIFAR nets of
Section 4.2, 224 px for the ImageNet nets of Section 3.4) at batches 1, 2 and 3 (or the fixed batch), and the
largest absolute difference of its logits to PyTorch's is reported; above the tolerance (1e-4) the export counts
as failed. The network is exported in eval mode (BN uses its running statistics) and without preprocessing: the
input is the normalised image, as produced by the checkpoint's ``Normalizer`` (see ``resnets.predict``).

So that a client can classify images with the file alone, what it needs besides the network goes into the ONNX
model's ``metadata_props`` (onnxruntime: ``session.get_modelmeta().custom_metadata_map``), each value a JSON
string: ``classes`` (names in output order), ``preprocess`` (resize, then ``x = (pixels * pixel_scale - mean) /
std`` with its statistics), ``input`` and ``output`` (names, NCHW float32 layout, shapes), ``model``,
``model_kwargs``, ``dataset``, ``weights`` and ``resnets_version``. TorchScript files carry the same as one JSON
object in the extra file ``resnets.json``. :func:`read_metadata` reads either.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.normalize import Normalizer
from .models import create_model, from_torchvision, get_spec, pretrained
from .models import registry
from .models.registry import torchvision_file_tag, torchvision_weights_entry
from .train import checkpoint as ck

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4
TORCHSCRIPT_METADATA = "resnets.json"


class ExportError(RuntimeError):
    """The exporter failed, or the exported file cannot be run; the message says which."""


@dataclass
class ExportResult:
    path: Path
    format: str
    exporter: str                      # how the file was made, e.g. "torch.onnx (dynamo)", "torch.jit.trace"
    input_shape: tuple[int, int, int, int]
    max_abs_diff: float | None         # over every checked batch; None when not verified
    tolerance: float
    checked_batches: list[int] = field(default_factory=list)
    max_abs_logit: float | None = None  # the scale the difference is measured against
    dynamic_batch: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff is None or self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        runner = "onnxruntime" if self.format == "onnx" else "torch.jit.load"
        batch = "batch" if self.dynamic_batch else str(self.input_shape[0])
        shape = ", ".join([batch, *map(str, self.input_shape[1:])])
        text = f"wrote {self.path} ({self.format} via {self.exporter}, input [{shape}])"
        classes, pre = self.metadata.get("classes"), self.metadata.get("preprocess")
        known = [f"{len(classes)} class names" if classes else "", f"preprocessing ({pre['mode']})" if pre else ""]
        known = [k for k in known if k]
        text += (f"; metadata: {' and '.join(known)}" if known else
                 "; no class names or preprocessing stored (the source has none)")
        if self.max_abs_diff is None:
            return text + "; not verified"
        verdict = "ok" if self.ok else f"FAILED: above the tolerance {self.tolerance:g}"
        return (text + f"; max |{runner} - PyTorch| = {self.max_abs_diff:.3g} over batches of "
                f"{', '.join(map(str, self.checked_batches))} (logits up to {self.max_abs_logit:.3g}): {verdict}")


@dataclass
class ExportSource:
    """The network to export and what a client needs besides it to classify images."""

    net: nn.Module
    image_size: int | tuple[int, int]
    classes: list[str] | None = None
    preprocess: dict[str, Any] | None = None   # as a checkpoint stores it: Normalizer.state_dict()
    center_crop: bool = False                  # else the whole image is resized to the input size
    resize_shorter: int | None = None          # with center_crop; None: 256/224 of the crop, as resnets.predict
    dataset: str | None = None
    weights: str | None = None


def image_size_for(model_name: str | None, preprocess: dict[str, Any] | None = None) -> int | tuple[int, int]:
    """The training resolution: the pixel-mean image's size when the checkpoint stores one, else the family's
    (32 for CIFAR nets, 224 for ImageNet nets and unregistered names)."""
    if preprocess and "mode" in preprocess and (size := Normalizer.from_state_dict(preprocess).image_size):
        return size
    try:
        return get_spec(model_name).input_size[-1] if model_name else 224
    except ValueError:
        return 224


def _is_imagenet_family(model_name: str | None) -> bool:
    try:
        return get_spec(model_name).family == "imagenet" if model_name else True
    except ValueError:
        return True


def checkpoint_source(c: ck.Checkpoint, net: nn.Module) -> ExportSource:
    # resnets.predict.Predictor uses this too, so the file classifies as `resnets predict` does. An ImageFolder
    # run's images are brought to size as its evaluation did: shorter side to its eval_resize, centre crop.
    name = getattr(net, "model_name", None)
    if c.meta.get("dataset") == "imagefolder":
        conf = c.meta.get("config", {})
        return ExportSource(net, conf.get("crop") or image_size_for(name, c.preprocess), c.classes,
                            c.preprocess or None, True, conf.get("eval_resize"), dataset="imagefolder")
    if c.meta.get("dataset") in ("cifar10", "cifar100"):
        # CIFAR's images are 32 x 32 and were trained and evaluated whole, whatever family the net is of (an
        # ImageNet ResNet-18 trained on CIFAR, a torchvision net fine-tuned there): resized whole, never cropped
        return ExportSource(net, 32, c.classes, c.preprocess or None, False, dataset=c.meta["dataset"])
    return ExportSource(net, image_size_for(name, c.preprocess), c.classes, c.preprocess or None,
                        _is_imagenet_family(name), dataset=c.meta.get("dataset"))


def _torchvision_source(net: nn.Module, model: str, weights: str) -> ExportSource:
    entry = torchvision_weights_entry(model, weights)
    t = entry.transforms()
    preprocess = {"mode": "channel", "mean": torch.tensor(t.mean, dtype=torch.float64),
                  "std": torch.tensor(t.std, dtype=torch.float64)}
    return ExportSource(net, t.crop_size[0], list(entry.meta["categories"]), preprocess, True, t.resize_size[0],
                        "imagenet", f"torchvision:{entry.name}")


def load_source(checkpoint: str | os.PathLike | None = None, model: str | None = None,
                weights: str | None = None, stride_in: str | None = None) -> ExportSource:
    """The network to export with its class names and preprocessing: from a checkpoint (a resnets checkpoint, or a
    bare torchvision state_dict file, read with weights_only=True), or from a model name with random or published
    weights (``weights``: None, "torchvision", "torchvision:TAG", a shipped tag such as "cifar10", or a file).
    ``stride_in``: the bottleneck layout of a bare state dict loaded into ``model`` (it cannot say so itself)."""
    layout = {"stride_in": stride_in} if stride_in else {}
    if checkpoint is not None:
        if weights is not None:
            raise ValueError("give --weights with --model, not with --checkpoint")
        c = ck.load_checkpoint(checkpoint, with_state=False)
        if stride_in and (c.model_name or not model):
            raise ValueError("--stride-in is for a bare state dict loaded into --model NAME" +
                             (f"; the checkpoint {c.path} says its own layout" if c.model_name else ""))
        if not c.model_name and model and torchvision_file_tag(model, checkpoint):
            net = create_model(model, weights=checkpoint)   # torchvision's file by its name: its layout (v1.5)
        elif c.model_name or model:
            net = ck.model_from_checkpoint(c, model, **layout)
        else:
            try:  # a bare state_dict: torchvision's (or timm's plain) ResNet layout names its own architecture
                net = from_torchvision(c.weights)
            except ValueError as e:
                raise ck.CheckpointError(f"{c.path}: the checkpoint does not say which model it holds and is not "
                                         f"a torchvision ResNet state_dict ({e}); pass --model NAME") from None
        tag = None if c.model_name else torchvision_file_tag(getattr(net, "model_name", model), checkpoint)
        if tag:
            registry.check_torchvision_file(checkpoint, Path(checkpoint).name)
        src = _torchvision_source(net, net.model_name, tag) if tag else checkpoint_source(c, net)
    elif model is None:
        raise ValueError("give --checkpoint PATH or --model NAME")
    else:
        net = create_model(model, weights=weights, **layout)
        by_path = torchvision_file_tag(model, weights)
        if isinstance(weights, str) and weights.split(":", 1)[0] == "torchvision":
            src = _torchvision_source(net, model, weights)
        elif by_path:       # torchvision's file by path: its classes and transforms
            src = _torchvision_source(net, model, by_path)
        else:   # a shipped file or a file of ours is a checkpoint: its classes and preprocessing come along
            c = _checkpoint_of(model, weights)
            src = checkpoint_source(c, net) if c is not None else \
                ExportSource(net, image_size_for(model), center_crop=_is_imagenet_family(model))
        src.weights = src.weights or (None if weights is None else str(weights))
    n_out = src.net.fc.out_features if isinstance(getattr(src.net, "fc", None), nn.Linear) else None
    if src.classes and n_out is not None and n_out != len(src.classes):
        raise ck.CheckpointError(f"{checkpoint or model}: {len(src.classes)} class names for a network with "
                                 f"{n_out} outputs")
    return src


def _checkpoint_of(model: str, weights: str | os.PathLike | None) -> ck.Checkpoint | None:
    """The checkpoint (metadata only) behind ``weights``: the shipped file of a tag, or a weights file that
    carries resnets' metadata; None for random weights or a bare state_dict file."""
    if weights is None:
        return None
    if pretrained.is_pretrained_tag(weights):
        return ck.load_checkpoint(pretrained.checked_path(model, weights), with_state=False)
    if not (Path(weights).is_file() or (Path(weights) / "model.safetensors").is_file()):
        return None
    try:
        c = ck.load_checkpoint(weights, with_state=False)
    except (ck.CheckpointError, OSError, ValueError):
        return None
    return c if c.model_name else None


def load_for_export(checkpoint: str | os.PathLike | None = None, model: str | None = None,
                    weights: str | None = None) -> tuple[nn.Module, int | tuple[int, int]]:
    """The network to export and its input resolution (see :func:`load_source`)."""
    src = load_source(checkpoint, model, weights)
    return src.net, src.image_size


def preprocess_metadata(preprocess: dict[str, Any], size: tuple[int, int], center_crop: bool,
                        resize_shorter: int | None = None) -> dict[str, Any]:
    """The checkpoint's preprocessing as plain JSON a client can apply without resnets: resize, then
    ``x = (pixels * pixel_scale - mean) / std``. Per-channel statistics are stored with shape (C, 1, 1), so mean and
    std broadcast against the (C, H, W) image whatever the mode."""
    mode = preprocess.get("mode")
    if mode not in ("pixel-mean", "channel", "subtract-mean-255"):
        raise ExportError(f"unknown preprocessing mode {mode!r} in the checkpoint")

    def channelwise(v: Any) -> Any:
        t = torch.as_tensor(v, dtype=torch.float64)
        return (t[:, None, None] if t.dim() == 1 else t).tolist()

    h, w = size
    mean = torch.as_tensor(preprocess["mean"])
    if mean.dim() == 3 and tuple(mean.shape[1:]) != (h, w):
        raise ValueError(f"the per-pixel mean image is {mean.shape[1]}x{mean.shape[2]}, so the input must be that "
                         f"size, not {h}x{w} (drop --image-size)")
    out: dict[str, Any] = {
        "mode": mode,
        "size": [h, w],
        "pixel_scale": 1.0 if mode == "subtract-mean-255" else 1.0 / 255.0,
        "mean": channelwise(preprocess["mean"]),
        "std": channelwise(preprocess["std"]) if preprocess.get("std") is not None else None,
        "formula": "x = (pixels * pixel_scale - mean) / std: pixels is the resized RGB image as (C, H, W) floats "
                   "0..255; mean and std broadcast against it; std null means 1",
        "interpolation": "bilinear",
    }
    if center_crop:
        out["resize"] = "shorter-side-then-center-crop"
        out["resize_shorter_side"] = resize_shorter or round(256 / 224 * max(h, w))
    else:
        out["resize"] = "stretch-to-size"
    return out


def export_metadata(src: ExportSource, shape: tuple[int, int, int, int], num_outputs: int,
                    dynamic_batch: bool) -> dict[str, Any]:
    """What goes into the exported file besides the network (values: plain JSON types)."""
    from . import __version__

    batch: Any = "batch" if dynamic_batch else shape[0]
    meta: dict[str, Any] = {
        "model": getattr(src.net, "model_name", None),
        "model_kwargs": dict(getattr(src.net, "model_kwargs", {}) or {}),
        "resnets_version": __version__,
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "shape": [batch, *shape[1:]],
                  "channels": "RGB", "values": "the preprocessed image (see preprocess), not raw pixels"},
        "output": {"name": "logits", "dtype": "float32", "shape": [batch, num_outputs],
                   "values": "logits in the order of classes; softmax gives probabilities"},
    }
    if src.classes:
        meta["classes"] = list(src.classes)
    if src.preprocess:
        resize = src.resize_shorter
        trained = src.image_size if isinstance(src.image_size, int) else max(src.image_size)
        if resize and max(shape[2:]) != trained:    # --image-size: the shorter side scales with the crop
            resize = round(resize * max(shape[2:]) / trained)
        meta["preprocess"] = preprocess_metadata(src.preprocess, shape[2:], src.center_crop, resize)
    if src.dataset:
        meta["dataset"] = src.dataset
    if src.weights:
        meta["weights"] = src.weights
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`export` stored in an ONNX or TorchScript file, JSON-decoded."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx
        proto = onnx.load(str(path), load_external_data=False)
        out = {}
        for p in proto.metadata_props:
            try:
                out[p.key] = json.loads(p.value)
            except json.JSONDecodeError:   # another tool's entry
                out[p.key] = p.value
        return out
    extra = {TORCHSCRIPT_METADATA: ""}
    with _quiet():
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[TORCHSCRIPT_METADATA]) if extra[TORCHSCRIPT_METADATA] else {}


@contextlib.contextmanager
def _quiet():
    """The exporters announce their progress and deprecations on stdout/stderr; the summary says what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _export_onnx(model: nn.Module, x: torch.Tensor, out: Path, opset: int | None, dynamic_batch: bool) -> str:
    # The dynamo-based exporter (torch.export + onnxscript) is torch's supported path; the TorchScript-based one is
    # deprecated and slated for removal. Both give the same graph for these nets (parity ~1e-6 on resnet20, ~6e-5
    # on an untrained resnet50 with logits ~100), so the new one is used, with the legacy one as a fallback for
    # installs where torch.export or onnxscript cannot handle something. Weights go inside the .onnx file (no
    # external .data file): the largest net here (wide_resnet101_2, 0.5 GB) is below ONNX's 2 GB limit.
    kw: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    try:
        with _quiet():
            shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
            torch.onnx.export(model, (x,), str(out), dynamo=True, external_data=False, dynamic_shapes=shapes,
                              verbose=False, **kw)
        return "torch.onnx (dynamo)"
    except Exception as dynamo_error:  # noqa: BLE001 - any failure of the new exporter: try the legacy one
        first = str(dynamo_error).splitlines()[0] if str(dynamo_error) else type(dynamo_error).__name__
        try:
            axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            with _quiet():
                torch.onnx.export(model, (x,), str(out), dynamo=False, dynamic_axes=axes, **kw)
        except Exception as legacy_error:
            raise ExportError(f"ONNX export failed: dynamo exporter: {first}; legacy exporter: {legacy_error}") \
                from legacy_error
        return f"torch.onnx (legacy TorchScript-based; the dynamo exporter failed: {first[:200]})"


def _write_onnx_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx
    from onnx.helper import set_model_props

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    set_model_props(proto, {**props, **{k: json.dumps(v) for k, v in meta.items()}})
    onnx.save(proto, str(path))


def _export_torchscript(model: nn.Module, x: torch.Tensor, out: Path, meta: dict[str, Any]) -> str:
    # Traced rather than scripted: the nets are static convolution stacks, and tracing needs no TorchScript
    # annotations in the model code. A traced conv net accepts any batch size (and any image size).
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta)})
    return "torch.jit.trace"


def _run_exported(path: Path, fmt: str):
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("verifying an ONNX export needs onnxruntime: pip install 'resnets[export]' "
                              "(or skip the check: --no-verify)") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")  # the file we just wrote
    loaded.eval()
    return lambda x: loaded(x)


@torch.no_grad()
def verify_export(model: nn.Module, path: str | os.PathLike, fmt: str, shape: tuple[int, int, int, int],
                  batches: list[int], seed: int = 0) -> tuple[float, float]:
    """Largest |exported - PyTorch| over the logits of random inputs of each batch size, and the largest |logit|.
    In fp32 the difference grows with the logits' scale: an untrained 50-layer net (logits ~100) reaches ~1e-4,
    a trained one (logits ~10) stays near 1e-5."""
    run = _run_exported(Path(path), fmt)
    g = torch.Generator().manual_seed(seed)
    worst, scale = 0.0, 0.0
    for b in batches:
        x = torch.randn(b, *shape[1:], generator=g)
        ref = model(x)
        try:
            got = run(x)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types, e.g. for a batch it cannot take
            raise ExportError(f"{path}: the exported model fails on an input of shape {tuple(x.shape)}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if got.shape != ref.shape:
            raise ExportError(f"{path}: the exported model returns shape {tuple(got.shape)} for input "
                               f"{tuple(x.shape)}, PyTorch {tuple(ref.shape)}")
        worst = max(worst, float((got.float() - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return worst, scale


def _check_out(out: Path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if out.is_dir():
        raise ExportError(f"{out} is a directory; give the path of the file to write")
    if not out.parent.is_dir():
        raise ExportError(f"{out}: the directory {out.parent} does not exist; create it first")


def export_model(model: nn.Module | ExportSource, out: str | os.PathLike, fmt: str = "onnx", *,
                 image_size: int | tuple[int, int] | None = None, batch_size: int = 1, opset: int | None = None,
                 dynamic_batch: bool = True, verify: bool = True, tolerance: float = TOLERANCE) -> ExportResult:
    """Export ``model`` (on CPU, fp32, eval mode) to ONNX or TorchScript, with its metadata, and check the file
    against PyTorch. A bare network gets no class names or preprocessing; an :class:`ExportSource` brings them.
    The file appears only once it is complete: on an error nothing is left at ``out``, and a file that fails the
    check goes to ``OUT-STEM.failed.SUFFIX`` instead (``result.path``)."""
    out = Path(out)
    _check_out(out, fmt)
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if fmt == "torchscript" and not dynamic_batch:
        raise ValueError("a traced TorchScript module takes any batch size; a static batch applies to ONNX only")
    src = model if isinstance(model, ExportSource) else \
        ExportSource(model, image_size_for(getattr(model, "model_name", None)))
    size = image_size or src.image_size
    h, w = (size, size) if isinstance(size, int) else size
    # a copy: the caller's model (mid-training on a GPU, say) keeps its device, dtype and mode
    net = copy.deepcopy(src.net).to("cpu", torch.float32).eval()
    # A dynamic batch dimension must not be traced with batch 1 (torch.export would specialise it to 1).
    example_batch = max(batch_size, 2) if dynamic_batch else batch_size
    shape = (example_batch, getattr(net, "in_channels", 3), h, w)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        num_outputs = int(net(x[:1]).shape[1])
    meta = export_metadata(src, shape, num_outputs, dynamic_batch)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        if fmt == "onnx":
            exporter = _export_onnx(net, x, tmp, opset, dynamic_batch)
            _write_onnx_metadata(tmp, meta)
        else:
            exporter = _export_torchscript(net, x, tmp, meta)
        result = ExportResult(out, fmt, exporter, shape, None, tolerance, dynamic_batch=dynamic_batch,
                              metadata=meta)
        if verify:
            batches = sorted({1, example_batch, 3}) if dynamic_batch else [example_batch]
            result.max_abs_diff, result.max_abs_logit = verify_export(net, tmp, fmt, shape, batches)
            result.checked_batches = batches
        if not result.ok:   # keep a good file at out; the failed one lies beside it, to look into
            result.path = out.with_name(f"{out.stem}.failed{out.suffix}")
        os.replace(tmp, result.path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def export(checkpoint: str | os.PathLike | None = None, *, model: str | None = None, weights: str | None = None,
           fmt: str = "onnx", out: str | os.PathLike, opset: int | None = None, dynamic_batch: bool = True,
           image_size: int | None = None, batch_size: int = 1, tolerance: float = TOLERANCE,
           verify: bool = True, stride_in: str | None = None) -> ExportResult:
    """``resnets export``: build the network from a checkpoint (or a name), export it with its class names and
    preprocessing, check the file."""
    _check_out(Path(out), fmt)   # before the (slow) model load
    src = load_source(checkpoint, model, weights, stride_in)
    return export_model(src, out, fmt, image_size=image_size, batch_size=batch_size, opset=opset,
                        dynamic_batch=dynamic_batch, verify=verify, tolerance=tolerance)
