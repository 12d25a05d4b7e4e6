"""Whole-step CUDA graphs: forward, backward and the SGD update of one training step captured once and replayed.

The CIFAR nets at the paper's batch of 128 are bound by kernel launches on a modern GPU (eager ResNet-56 takes the
same ~30 ms per step at batch 128 and 512 on an H100; ../shared/gpu/README.md), so replaying the whole step as one
graph removes most of the step time. The batch is copied into static input buffers; the learning rate is a Python
float inside torch's SGD, so a new graph is captured when the schedule changes it (a few times per run with the
paper's step schedule; the cosine and one-cycle schedules, which change it every step, train eagerly).

Where a captured step does not apply (CPU, ``on_nan="skip"``, which needs a host-side decision inside the step),
or capture fails, training runs the eager step; ``StaticStep(capture=False)`` is the same logic without a graph,
which is how the CPU tests check it against the eager step.

``StaticStep(compile=True)`` runs a ``torch.compile``d forward (inductor: BN + ReLU + add fused into fewer kernels)
inside the captured step; ``resnets train --compile`` on a GPU takes this path. Measured on an H200 (2026-11-27,
docs/performance.md): ResNet-20 2.01 -> 1.56 ms/step, ResNet-56 5.53 -> 4.34, ResNet-50 at 224 px 53.8 -> 37.2 ms
(1.47x torchvision's eager bf16 loop), for a one-off compile of 27-40 s per CIFAR net.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from .step import StepOut, sgd_step

StepFn = Callable[[torch.Tensor, torch.Tensor], StepOut]


class StaticStep:
    """One training step on static buffers; captured into a CUDA graph when ``capture`` is true.

    The first ``warmup`` calls run eagerly (on a side stream when capturing, as CUDA graphs require) and are real
    training steps; later calls replay the graph, capturing a new one whenever the learning rate changed.
    At least one warm-up step is needed when capturing: it creates the optimizer's momentum buffers (SGD's first
    step clones the gradient, which a replayed graph would redo every step) and lets cuDNN pick its algorithms.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, autocast, batch_shape: tuple[int, ...],
                 device: torch.device, memory_format: torch.memory_format, capture: bool, warmup: int = 3,
                 compile: bool = False, label_smoothing: float = 0.0):
        if capture and warmup < 1:
            raise ValueError("a captured step needs warmup >= 1 (optimizer state and cuDNN algorithms)")
        self.model, self.optimizer, self.autocast = model, optimizer, autocast
        self.forward = torch.compile(model) if compile else model
        self.capture = capture
        self.label_smoothing = label_smoothing
        self.warmup = warmup
        self.calls = 0
        self.replays = 0
        x_shape, y_shape = self.shapes(batch_shape)
        self.x = torch.zeros(x_shape, device=device).contiguous(memory_format=memory_format)
        self.y = torch.zeros(y_shape, device=device, dtype=torch.int64)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_lr: float | None = None
        self.captures = 0
        self.loss = self.wrong = None

    def shapes(self, batch_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The static input and label buffers' shapes for a batch of ``batch_shape``."""
        return batch_shape, batch_shape[:1]

    def lr(self):
        """What a captured graph depends on of the schedule: the lr of every parameter group (fine-tuning gives
        the pretrained layers a share of the head's), Python floats inside torch's SGD."""
        return tuple(g["lr"] for g in self.optimizer.param_groups)

    def _body(self) -> None:
        self.loss, self.wrong, _ = sgd_step(self.forward, self.optimizer, self.autocast, self.x, self.y,
                                            self.label_smoothing)

    def _eager(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._body()

    def _capture(self) -> None:
        # Each capture gets a pool of its own. Dropping the old graph releases its pool, and capturing into a
        # released pool trips the allocator's "use_count > 0" assert (torch 2.11, H200, at the first lr change).
        self.graph = None
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        # thread_local: a DataLoader's pin-memory thread allocating meanwhile must not invalidate the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._body()
        self.graph_lr = self.lr()
        self.captures += 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepOut:
        if x.data_ptr() != self.x.data_ptr():      # a loader may have written the batch into the buffers already
            self.x.copy_(x)
        if y.data_ptr() != self.y.data_ptr():
            self.y.copy_(y)
        self.calls += 1
        if not self.capture:
            self._eager()
            return StepOut(self.loss.clone(), self.wrong.clone())
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager()
            torch.cuda.current_stream().wait_stream(side)
            return StepOut(self.loss.clone(), self.wrong.clone())
        if self.graph is None or self.lr() != self.graph_lr:
            self._capture()
        self.graph.replay()
        self.replays += 1
        # Outputs of a graph are overwritten by the next replay: hand out copies.
        return StepOut(self.loss.clone(), self.wrong.clone())


def graph_applies(cfg, rt, distributed: bool = False, lr_in_graph: bool = False) -> tuple[bool, str]:
    """Whether the whole-step graph applies to this run, and why not. ``lr_in_graph``: the step reads the lr from
    a tensor (the stacked runs' SGD), so any schedule replays one graph."""
    if cfg.cuda_graph is False:
        return False, "disabled by --no-cuda-graph"
    if not rt.is_cuda:
        return False, "CUDA graphs need a GPU"
    if cfg.on_nan == "skip":
        return False, "on_nan='skip' decides on the host inside each step"
    if distributed:
        return False, "the captured step has no DDP gradient all-reduce"
    if getattr(cfg, "lr_schedule", "step") != "step" and not lr_in_graph:
        # the lr is a constant of a captured step: a schedule that changes it every step would capture every step
        return False, f"the {cfg.lr_schedule} schedule changes the lr every step, and a captured step holds it fixed"
    return True, ""


def batch_shape(source) -> tuple[int, ...]:
    """The shape of one of ``source``'s training batches (this rank's). Sources that know it say so without reading
    a batch: reading one would start an ImageFolder DataLoader at step 0, only to start it again where a resumed
    run begins."""
    shape = getattr(source, "batch_shape", None)
    return tuple(shape) if shape is not None else tuple(source.batch(0)[0].shape)


def maybe_graph_step(cfg, model: nn.Module, optimizer, rt, loader, eager_step: StepFn,
                     distributed: bool = False, static_cls: Callable[..., StaticStep] | None = None,
                     lr_in_graph: bool = False) -> StepFn:
    """The captured step where it applies (``static_cls``, default :class:`StaticStep`; see :func:`graph_applies`),
    else ``eager_step``; a capture that fails falls back to ``eager_step`` with a warning."""
    ok, why = graph_applies(cfg, rt, distributed, lr_in_graph)
    if not ok:
        if cfg.cuda_graph is True:
            warnings.warn(f"CUDA graph requested but not used: {why}; training eagerly")
        return eager_step
    static = (static_cls or StaticStep)(model, optimizer, rt.autocast, batch_shape(loader), rt.device,
                                        rt.memory_format, capture=True, compile=bool(getattr(cfg, "compile", False)),
                                        label_smoothing=getattr(cfg, "label_smoothing", 0.0) or 0.0)

    def step(x: torch.Tensor, y: torch.Tensor) -> StepOut:
        nonlocal static
        if static is None:
            return eager_step(x, y)
        try:
            return static(x, y)
        except RuntimeError as e:  # capture failed: an op that cannot be captured; keep training eagerly
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"CUDA graph capture failed ({why}); training eagerly")
            static = None
            step.static, step.fallback = None, why  # type: ignore[attr-defined]
            torch.cuda.synchronize()
            return eager_step(x, y)

    # ``step.static`` is the StaticStep while the graph is in use (None after a fallback, with ``step.fallback``
    # saying why), so callers such as the benchmarks can tell what actually ran.
    step.static, step.fallback = static, None  # type: ignore[attr-defined]
    return step
