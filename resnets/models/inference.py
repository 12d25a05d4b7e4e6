"""Fast inference for any of our networks: BN folded into the convolutions, channels_last, optionally compiled.

Eval-mode BN is an affine map per channel, so it folds into the preceding convolution (``fold_batchnorm``,
He et al. 2015 use BN after every convolution, Sec. 3.4); what is left is convolutions with a bias, ReLUs, the
additions of Eqn 1/2, pooling and the classifier.

    >>> from resnets.models import create_model, inference_model
    >>> fast = inference_model(create_model("resnet50").eval(), compile="inductor")
    >>> logits = fast(images)                      # (N, 3, H, W), any memory format; runs under no_grad

Compilers (``compile=``):
  "none"      the folded eager model
  "inductor"  ``torch.compile`` with inductor's ``freezing`` (weights become constants: prepacked for oneDNN on
              the CPU, conv + ReLU / conv + add + ReLU fused where the backend can)
  "jit"       ``torch.jit.trace`` + ``freeze`` + ``optimize_for_inference`` (deprecated by torch; kept because it
              compiles in seconds on a small CPU)
  "auto"      "inductor" (see docs/performance.md for the measured choice)

Numerical agreement with the unfolded model (fp32, measured in tests/test_bench.py and docs/performance.md):
max |logit difference| <= 1e-4 x max |logit| (folding changes rounding only; compilers reorder sums).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .convert import fold_batchnorm

COMPILERS = ("none", "inductor", "jit", "auto")

#: fp32 tolerance of folded/compiled logits vs the original model: |diff| <= FP32_RTOL * max|logits| (+ FP32_ATOL)
FP32_RTOL, FP32_ATOL = 1e-4, 1e-5


class InferenceModel(nn.Module):
    """The folded (and possibly compiled) network; converts inputs to its dtype and memory format and runs
    without autograd. ``folded`` is the plain folded module (its weights are what the compiled code uses)."""

    def __init__(self, folded: nn.Module, runner: nn.Module | torch.jit.ScriptModule, memory_format: torch.memory_format,
                 dtype: torch.dtype | None, compiler: str):
        super().__init__()
        self.folded = folded
        self.runner = runner if runner is not folded else None
        self.memory_format, self.dtype, self.compiler = memory_format, dtype, compiler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = x.to(dtype=self.dtype or x.dtype, memory_format=self.memory_format)   # one copy at most
            return (self.runner if self.runner is not None else self.folded)(x)

    def extra_repr(self) -> str:
        mf = "channels_last" if self.memory_format == torch.channels_last else "contiguous"
        return f"BN folded, {mf}, dtype={self.dtype or 'unchanged'}, compiler={self.compiler}"


def _example_for(model: nn.Module, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    size = 32 if type(model).__name__.startswith("Cifar") else 224
    return torch.zeros(1, getattr(model, "in_channels", 3), size, size, device=device, dtype=dtype)


def inference_model(model: nn.Module, *, channels_last: bool = True, compile: str | bool = "none",
                    dtype: torch.dtype | None = None, example: torch.Tensor | None = None) -> InferenceModel:
    """An eval-mode copy of ``model`` for inference: BN folded into convs, channels_last, optionally compiled.

    ``model`` itself is not changed. ``dtype`` casts the weights (e.g. ``torch.bfloat16`` on a GPU: no autocast
    casts per call). ``example`` is a batch used to trace for ``compile="jit"`` (default: one zero image of the
    model's input size). (Inductor's CUDA graphs bought nothing on an H200 at batch 256, 9.6 vs 9.5 ms, 2026-11-27,
    docs/performance.md, and were removed.)
    """
    if compile is True:
        compile = "auto"
    if compile is False or compile is None:
        compile = "none"
    if compile not in COMPILERS:
        raise ValueError(f"unknown compiler {compile!r}; choose one of {', '.join(COMPILERS)}")
    if compile == "auto":
        compile = "inductor"
    folded = fold_batchnorm(model)            # a copy, in eval mode
    if dtype is not None:
        folded = folded.to(dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    folded = folded.to(memory_format=memory_format)
    for p in folded.parameters():
        p.requires_grad_(False)
    p0 = next(folded.parameters())
    runner: nn.Module = folded
    if compile == "inductor":
        runner = torch.compile(folded, options={"freezing": True})
    elif compile == "jit":
        ex = example if example is not None else _example_for(model, p0.device, p0.dtype)
        ex = ex.to(device=p0.device, dtype=dtype or ex.dtype).contiguous(memory_format=memory_format)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")       # TracerWarnings of the input checks; jit's deprecation notice
            traced = torch.jit.trace(folded, ex)
            runner = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    return InferenceModel(folded, runner, memory_format, dtype, compile)


@torch.no_grad()
def max_logit_error(reference: nn.Module, fast: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max |fast(x) - reference(x)|, max |reference(x)|), both in fp32; ``reference`` runs in eval mode."""
    was = reference.training
    reference.eval()
    try:
        ref = reference(x).float()
    finally:
        reference.train(was)
    out = fast(x).float()
    return (out - ref).abs().max().item(), ref.abs().max().item()
