"""One SGD training step (forward, cross-entropy, backward, update), shared by the eager path and the whole-step
CUDA graph (:class:`resnets.train.graphs.StaticStep` captures :func:`sgd_step`), so the two cannot drift apart.

The NaN policy lives here too. ``on_nan="stop"`` costs nothing per step: the loop sees a non-finite mean loss when
it writes a log line and stops. ``on_nan="skip"`` decides on the host after each forward pass: a non-finite loss
skips the backward pass and the update, and the BatchNorm running statistics that the forward pass moved are put
back, so a skipped step leaves no trace in the weights.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class StepOut(NamedTuple):
    loss: torch.Tensor       # device scalars: the loop sums them between log lines without a host sync
    wrong: torch.Tensor
    skipped: bool = False    # on_nan="skip" skipped this step's update


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, autocast, x: torch.Tensor, y: torch.Tensor,
             label_smoothing: float = 0.0, keep: Callable[[torch.Tensor], bool] | None = None,
             backward_on_skip: bool = False) -> StepOut:
    """Forward, loss, backward, update. The gradients must be zero or None on entry.
    ``keep(loss)`` false skips the update (``backward_on_skip``: still run the backward pass, which DDP's gradient
    all-reduce expects once per forward, and discard the gradients)."""
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    wrong = (logits.argmax(1) != y).sum()
    if keep is not None and not keep(loss):
        if backward_on_skip:
            loss.backward()
            optimizer.zero_grad(set_to_none=True)
        return StepOut(loss.detach(), wrong, True)
    loss.backward()
    optimizer.step()
    return StepOut(loss.detach(), wrong)


def make_eager_step(model: nn.Module, optimizer: torch.optim.Optimizer, rt, *, label_smoothing: float = 0.0,
                    on_nan: str = "stop", all_finite: Callable[[torch.Tensor], bool] | None = None,
                    backward_on_skip: bool = False, buffers_of: nn.Module | None = None
                    ) -> Callable[[torch.Tensor, torch.Tensor], StepOut]:
    """The eager training step. With ``on_nan="skip"``, ``all_finite(loss)`` decides for all ranks together under
    DDP; ``buffers_of`` is the module whose BN statistics a skipped step restores (default ``model``)."""
    skip = on_nan == "skip"
    keep = (all_finite or (lambda loss: torch.isfinite(loss).item())) if skip else None
    buffers = list((buffers_of or model).buffers()) if skip else []

    def step(x: torch.Tensor, y: torch.Tensor) -> StepOut:
        saved = [b.clone() for b in buffers]
        optimizer.zero_grad(set_to_none=True)
        out = sgd_step(model, optimizer, rt.autocast, x, y, label_smoothing, keep, backward_on_skip)
        if out.skipped:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
        return out

    return step
