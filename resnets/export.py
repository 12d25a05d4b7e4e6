"""Ship a trained network: ONNX or TorchScript export, checked against PyTorch on random inputs.

    resnets export --checkpoint runs/resnet56/checkpoints/step-00064000 --format onnx --out resnet56.onnx
    resnets export --model resnet50 --weights torchvision --format torchscript --out resnet50.pt --dynamic-batch

The exported file is run (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) on random inputs of the
training resolution (32 px for the CIFAR nets of Section 4.2, 224 px for the ImageNet nets of Section 3.4) and the
largest absolute difference of its logits to PyTorch's is reported; above the tolerance (1e-4) the export counts
as failed. The network is exported in eval mode (BN uses its running statistics) and without preprocessing: the
input is the normalised image, as produced by the checkpoint's ``Normalizer`` (see ``resnets.predict``).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import create_model, from_torchvision, get_spec
from .train import checkpoint as ck

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4


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

    @property
    def ok(self) -> bool:
        return self.max_abs_diff is None or self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        runner = "onnxruntime" if self.format == "onnx" else "torch.jit.load"
        text = f"wrote {self.path} ({self.format} via {self.exporter}, input {list(self.input_shape)})"
        if self.max_abs_diff is None:
            return text + "; not verified"
        verdict = "ok" if self.ok else f"FAILED: above the tolerance {self.tolerance:g}"
        return (text + f"; max |{runner} - PyTorch| = {self.max_abs_diff:.3g} over batches of "
                f"{', '.join(map(str, self.checked_batches))} (logits up to {self.max_abs_logit:.3g}): {verdict}")


def image_size_for(model_name: str | None, preprocess: dict[str, Any] | None = None) -> int | tuple[int, int]:
    """The training resolution: the pixel-mean image's size when the checkpoint stores one, else the family's
    (32 for CIFAR nets, 224 for ImageNet nets and unregistered names)."""
    mean = (preprocess or {}).get("mean")
    if isinstance(mean, torch.Tensor) and mean.dim() == 3:
        return int(mean.shape[1]), int(mean.shape[2])
    try:
        return get_spec(model_name).input_size[-1] if model_name else 224
    except ValueError:
        return 224


def load_for_export(checkpoint: str | os.PathLike | None = None, model: str | None = None,
                    weights: str | None = None) -> tuple[nn.Module, int | tuple[int, int]]:
    """The network to export and its input resolution: from a checkpoint (a resnets checkpoint, or a bare
    torchvision state_dict file, read with weights_only=True), or from a model name with random or published
    weights (``weights``: None, "torchvision", "torchvision:TAG" or a file path)."""
    if checkpoint is not None:
        if weights is not None:
            raise ValueError("give --weights with --model, not with --checkpoint")
        c = ck.load_checkpoint(checkpoint, with_state=False)
        if c.model_name or model:
            net = ck.model_from_checkpoint(c, model)
        else:
            try:  # a bare state_dict: torchvision's (or timm's plain) ResNet layout names its own architecture
                net = from_torchvision(c.weights)
            except ValueError as e:
                raise ck.CheckpointError(f"{c.path}: the checkpoint does not say which model it holds and is not "
                                         f"a torchvision ResNet state_dict ({e}); pass --model NAME") from None
        return net, image_size_for(getattr(net, "model_name", None), c.preprocess)
    if model is None:
        raise ValueError("give --checkpoint PATH or --model NAME")
    net = create_model(model, weights=weights)
    return net, image_size_for(model)


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


def _export_torchscript(model: nn.Module, x: torch.Tensor, out: Path) -> str:
    # Traced rather than scripted: the nets are static convolution stacks, and tracing needs no TorchScript
    # annotations in the model code. A traced conv net accepts any batch size (and any image size).
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.jit.save(traced, str(out))
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
        got = run(x)
        if got.shape != ref.shape:
            raise ExportError(f"{path}: the exported model returns shape {tuple(got.shape)} for input "
                               f"{tuple(x.shape)}, PyTorch {tuple(ref.shape)}")
        worst = max(worst, float((got.float() - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return worst, scale


def export_model(model: nn.Module, out: str | os.PathLike, fmt: str = "onnx", *,
                 image_size: int | tuple[int, int] = 224, batch_size: int = 1, opset: int | None = None,
                 dynamic_batch: bool = False, verify: bool = True, tolerance: float = TOLERANCE) -> ExportResult:
    """Export ``model`` (on CPU, fp32, eval mode) to ONNX or TorchScript and check the file against PyTorch."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    in_ch = getattr(model, "in_channels", 3)
    model = model.to("cpu", torch.float32).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A dynamic batch dimension must not be traced with batch 1 (torch.export would specialise it to 1).
    example_batch = max(batch_size, 2) if dynamic_batch else batch_size
    shape = (example_batch, in_ch, h, w)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if fmt == "onnx":
        exporter = _export_onnx(model, x, out, opset, dynamic_batch)
    else:
        exporter = _export_torchscript(model, x, out)
    result = ExportResult(out, fmt, exporter, shape, None, tolerance)
    if verify:
        batches = sorted({example_batch, 3}) if dynamic_batch else [example_batch]
        result.max_abs_diff, result.max_abs_logit = verify_export(model, out, fmt, shape, batches)
        result.checked_batches = batches
    return result


def export(checkpoint: str | os.PathLike | None = None, *, model: str | None = None, weights: str | None = None,
           fmt: str = "onnx", out: str | os.PathLike, opset: int | None = None, dynamic_batch: bool = False,
           image_size: int | None = None, batch_size: int = 1, tolerance: float = TOLERANCE,
           verify: bool = True) -> ExportResult:
    """``resnets export``: build the network from a checkpoint (or a name), export it, check the file."""
    net, size = load_for_export(checkpoint, model, weights)
    return export_model(net, out, fmt, image_size=image_size or size, batch_size=batch_size, opset=opset,
                        dynamic_batch=dynamic_batch, verify=verify, tolerance=tolerance)
