"""CIFAR runs trained as one stacked network (:class:`resnets.models.stacked.StackedCifarNets`): one forward,
backward and update per step for all of them, each net a group of every grouped convolution.

    resnets reproduce cifar10 --preset paper --seeds 5 --stack     # on a GPU: the 45 runs as one network
    resnets reproduce cifar10 --preset paper --stack depth         # a network per depth: 5 stacks
    train_side_by_side(cfgs, stack=True)                          # Python

Why: side by side on CUDA streams, the paper preset's nine nets ran 1.74x faster than one at a time on an H200,
well short of the 3x that Table 6 in one 15-minute session needs, because each step is ~1,000 small kernels that
already keep the GPU busy (docs/performance.md, "GPU: second session"). Stacked, plain-20 and ResNet-20 (or five
seeds of ResNet-110) take the kernels of one net, and the nine nets those of one ResNet-110.

What stays each run's own: its data order and augmentation, learning rate and warm-up (Sec. 4.2, ResNet-110), log,
evaluations, checkpoints and ``--resume``; the run's own model and optimizer state are views of the stacked ones
(``StackedCifarNets.bind``), so all of that code is the one :mod:`.loop` uses for a run alone. What differs: the
same arithmetic summed in other orders (BatchNorm over more channels, a grouped convolution), so a stacked run
agrees with the run alone to float rounding, not bit for bit (``tests/test_stacked.py``).

Runs stack when their nets have the same widths (any depth; the same shapes with ``by_depth``) and they share the
step count, the step they start from, batch, optimizer settings, precision and device; any other run of the same
call trains side by side as before.
"""
from __future__ import annotations

import functools
from typing import Generator, Sequence

import torch
import torch.nn.functional as F

from ..models.resnet import CifarResNet
from ..models.stacked import StackedCifarNets, can_stack, family_shapes, stack_inputs
from .graphs import StaticStep, batch_shape, maybe_graph_step
from .loop import Run, TrainResult, after_step, checkpoint_due, close, finish, next_batch, start
from .rundir import GracefulStop
from .step import StepOut

__all__ = ["StackedSGD", "StackedStep", "stack_key", "stack_order", "stacked_steps"]


class StackedSGD:
    """``torch.optim.SGD``'s update (momentum without dampening, weight decay, Nesterov) on stacked parameters,
    with a learning rate per net in device tensors: a new rate is a copy into them, not a new CUDA graph.
    ``lr_full[j]`` holds each element's rate in parameter j's shape, so that the update is one multi-tensor
    (foreach) kernel like torch's, not a kernel per parameter (328 of them for a ResNet-110 stack).

    ``optimizers`` are the runs' own SGD optimizers: their momentum buffers become views of the stacked ones,
    so a run's checkpoint holds its own momentum."""

    def __init__(self, model: StackedCifarNets, nets: Sequence[CifarResNet],
                 optimizers: Sequence[torch.optim.Optimizer], momentum: float, weight_decay: float, nesterov: bool):
        self.k, self.momentum, self.weight_decay, self.nesterov = model.k, momentum, weight_decay, nesterov
        names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.groups = [model.groups[name] for name in names]   # parameter j: nets 0..groups[j]-1 have it
        named = [dict(net.named_parameters()) for net in nets]
        self.members = [[named[i][name] for i in range(g)] for name, g in zip(names, self.groups)]
        self.optimizers = list(optimizers)
        self.lr_full = [torch.zeros_like(p) for p in self.params]
        self._lrs: list[float] | None = None
        self.buffers: list[torch.Tensor] | None = None
        have = [all("momentum_buffer" in opt.state.get(p, {}) for p in named[i].values())
                for i, opt in enumerate(optimizers)]
        if any(have):
            if not all(have):
                raise ValueError("runs to stack must all have momentum buffers (resumed) or none (new)")
            # empty_like keeps each parameter's device and memory format (channels_last convolution weights)
            self.buffers = [torch.empty_like(p).copy_(torch.cat([self.optimizers[i].state[m]["momentum_buffer"]
                                                                 for i, m in enumerate(ms)]))
                            for p, ms in zip(self.params, self.members)]
            self._bind_buffers()

    def set_lr(self, lrs: Sequence[float]) -> None:
        if list(lrs) != self._lrs:   # copies only when a rate changes (milestones, warm-up's end)
            lr = torch.tensor(list(lrs), dtype=self.params[0].dtype, device=self.params[0].device)
            for t, k in zip(self.lr_full, self.groups):
                t.copy_(lr[:k].repeat_interleave(t.shape[0] // k).view(-1, *[1] * (t.dim() - 1)).expand_as(t))
            self._lrs = list(lrs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if self.momentum:
            if self.buffers is None:   # torch's SGD: the first buffer is the gradient itself
                self.buffers = [g.clone() for g in grads]
                self._bind_buffers()
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, grads)
            grads = torch._foreach_add(grads, self.buffers, alpha=self.momentum) if self.nesterov else self.buffers
        if self._lrs is None:
            raise RuntimeError("StackedSGD.step before set_lr: no learning rates")
        torch._foreach_addcmul_(self.params, grads, self.lr_full, value=-1)

    def _bind_buffers(self) -> None:
        for b, ms, k in zip(self.buffers, self.members, self.groups):
            for i, m in enumerate(ms):
                self.optimizers[i].state[m]["momentum_buffer"] = b.chunk(k, 0)[i]


class StackedStep(StaticStep):
    """The training step of K stacked runs, eager or captured: input (N, K*3, H, W), labels (N, K); the loss
    and the count of wrong predictions come back per run. The summed loss gives each net exactly its own
    gradient: net k's loss depends on net k's weights only."""

    def __init__(self, *args, k: int, **kwargs):
        self.k = k
        super().__init__(*args, **kwargs)

    def shapes(self, batch_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n, c, h, w = batch_shape
        return (n, self.k * c, h, w), (n, self.k)

    def lr(self):
        return None    # in tensors the graph reads (StackedSGD.lr_full): no re-capture when it changes

    def _body(self) -> None:
        with self.autocast():
            logits = self.forward(self.x)                                       # (N, K, classes)
            losses = F.cross_entropy(logits.transpose(1, 2), self.y, reduction="none",
                                     label_smoothing=self.label_smoothing).mean(0)   # (K,)
        self.wrong = (logits.argmax(2) != self.y).sum(0)
        losses.sum().backward()
        self.optimizer.step()
        self.loss = losses.detach()


# Settings a stack shares; everything else (seed, data split, output, logging, evaluation) stays each run's own.
_SHARED = ("steps", "batch_size", "momentum", "weight_decay", "nesterov", "label_smoothing", "precision",
           "channels_last", "compile", "cuda_graph", "device", "dataset", "data")


def stack_key(run: Run, by_depth: bool = False) -> tuple | None:
    """Runs with equal keys train as one stack; None: this run does not stack. Nets of different depths share a
    key unless ``by_depth``."""
    cfg = run.cfg
    if not can_stack([run.model])[0]:
        return None
    if cfg.on_nan == "skip" or cfg.weights or cfg.sync_bn or run.ctx.enabled:
        return None
    shapes = (tuple((n, tuple(t.shape)) for n, t in run.model.state_dict().items()) if by_depth
              else family_shapes(run.model))
    return (shapes, run.start, str(run.rt.device)) + tuple(repr(getattr(cfg, f, None)) for f in _SHARED)


def stack_order(runs: Sequence[Run]) -> list[int]:
    """The order runs of one key stack in: deepest net first (:class:`StackedCifarNets`), else as given."""
    return sorted(range(len(runs)), key=lambda i: -getattr(runs[i].model, "depth", 0))


class _Stack:
    """The stacked model, optimizer and step of ``runs`` (same :func:`stack_key`, in :func:`stack_order`)."""

    def __init__(self, runs: Sequence[Run]):
        rt, cfg = runs[0].rt, runs[0].cfg
        nets = [r.model for r in runs]
        self.model = StackedCifarNets(nets).to(rt.device, memory_format=rt.memory_format)
        self.model.bind(nets)
        self.model.train()
        self.optimizer = StackedSGD(self.model, nets, [r.optimizer for r in runs], cfg.momentum, cfg.weight_decay,
                                    cfg.nesterov)
        make = functools.partial(StackedStep, k=len(runs))
        eager = make(self.model, self.optimizer, rt.autocast, batch_shape(runs[0].source), rt.device, rt.memory_format,
                     capture=False, compile=cfg.compile, label_smoothing=cfg.label_smoothing)
        self.step_fn = maybe_graph_step(cfg, self.model, self.optimizer, rt, runs[0].source, eager, static_cls=make,
                                        lr_in_graph=True)

    def step(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], lrs: Sequence[float]) -> list[StepOut]:
        self.optimizer.set_lr(lrs)
        out = self.step_fn(stack_inputs(xs), torch.stack(list(ys), 1))
        return [StepOut(out.loss[k], out.wrong[k]) for k in range(len(lrs))]


def stacked_steps(runs: Sequence[Run], stop: GracefulStop | None
                  ) -> Generator[int, None, list[TrainResult | BaseException]]:
    """Train set-up runs (:func:`resnets.train.loop.setup`) of one :func:`stack_key`, in :func:`stack_order`, as
    one stack, yielding after every step; returns each run's result, or the exception that ended it (the others
    train on)."""
    try:
        stack = _Stack(runs)
    except BaseException:
        for r in runs:
            close(r)
        raise
    results: list[TrainResult | BaseException | None] = [None] * len(runs)
    bars = [start(r) for r in runs]
    active = list(range(len(runs)))
    try:
        for step in range(runs[0].start, runs[0].cfg.steps):
            # An ended run keeps its place in the stack (its slot computes, nothing reads it).
            batches = [next_batch(r, step) for r in runs]
            outs = stack.step([b[1] for b in batches], [b[2] for b in batches], [b[0] for b in batches])
            # One decision for the stack, so that its runs checkpoint (and stop) at one step and stack again on
            # resume: one clock for time-based checkpoints, and a signal seen before the first run's bookkeeping.
            late = any(checkpoint_due(runs[k]) for k in active)
            stopping = stop is not None and stop.signum is not None
            for k in list(active):
                try:
                    after_step(runs[k], step + 1, batches[k][0], batches[k][2], outs[k], stop, bars[k], late,
                               stopping)
                except Exception as e:  # noqa: BLE001 - this run has ended; the others go on
                    results[k] = e
                    active.remove(k)
                    close(runs[k], bars[k])
            if not active:
                break
            yield step + 1
    finally:
        for k in active:
            close(runs[k], bars[k])
    for k in active:
        results[k] = finish(runs[k])
    return results
