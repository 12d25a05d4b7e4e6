"""Several training runs side by side in one process, one step of each in turn.

    from resnets.train.side_by_side import train_side_by_side
    results = train_side_by_side([cfg_resnet20, cfg_plain20, cfg_resnet56])    # list of TrainResult, same order

Why: at the paper's batch of 128 one CIFAR net uses a small part of a modern GPU. A whole-step graph of ResNet-56
takes 5.92 ms on an H100 while its arithmetic needs about 1 ms (../shared/gpu/README.md), so nets trained one
after another leave the GPU mostly idle. Here every run issues its steps on a CUDA stream of its own, and the
scheduler enqueues one step of each run in turn, so the small kernels of different nets can overlap on the GPU.

Each run is the generator of :func:`resnets.train.loop.train_steps`, the same code that trains a run alone: its
own data order, evaluations, log, checkpoints and ``--resume``. The global CPU RNG (model initialisation; the CUDA
RNG is not drawn from in training) is saved and restored around every step of every run, so a run draws exactly
what it would draw alone; on the CPU a run trained
side by side ends bit-identical to the same run trained alone (``tests/test_side_by_side.py``).

On a CPU the runs are interleaved in this one process, which is correct but not faster: there
``resnets reproduce`` trains its runs in separate processes with a thread each (measured faster on 2 cores;
:func:`resnets.experiments.reproduce.plan_workers`). Not for torchrun: each run here is a single-device run.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Generator

import torch

from ..config import TrainConfig
from . import distributed as ddp
from .loop import TrainResult, train_steps
from .rundir import GracefulStop, StoppedBySignal
from .runtime import pick_runtime


@dataclass
class _Run:
    cfg: TrainConfig
    steps: Generator[int, None, TrainResult]
    stream: Any
    rng: torch.Tensor
    result: TrainResult | None = None
    error: BaseException | None = None


class SideBySideError(RuntimeError):
    """One or more runs failed; the others were trained to their end. ``errors`` maps run directory to error."""

    def __init__(self, errors: dict[str, BaseException]):
        self.errors = errors
        lines = [f"{out}: {type(e).__name__}: {e}" for out, e in errors.items()]
        super().__init__(f"{len(errors)} of the runs trained side by side failed:\n  " + "\n  ".join(lines))


def train_side_by_side(cfgs: list[TrainConfig], *, data=None,
                       on_log: Callable[[TrainConfig, dict[str, Any]], None] | None = None,
                       device: str | None = None) -> list[TrainResult]:
    """Train every config to its end, one step of each in turn; returns their results in the given order.

    ``data``: one :class:`resnets.data.CifarData` for all runs (each still builds its own split, order and
    augmentation from its own seed). ``on_log(cfg, record)`` sees every log record of every run. A run that
    fails does not stop the others; when all have ended, :class:`SideBySideError` names every failure.
    """
    if not cfgs:
        return []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("runs side by side are single-device runs; under torchrun, train one run per launch")
    outs = [os.path.abspath(c.out) for c in cfgs]
    dup = sorted({o for o in outs if outs.count(o) > 1})
    if dup:
        raise ValueError(f"runs side by side need an output directory each; shared: {', '.join(dup)}")
    devices = {c.device if device is None else device for c in cfgs}
    if len(devices) != 1:
        raise ValueError(f"runs side by side share one device; got {sorted(devices)}")
    dev = devices.pop()
    ctx = ddp.DistContext()
    rt = pick_runtime(dev)
    is_cuda = rt.is_cuda
    start_rng = torch.get_rng_state()
    stop = GracefulStop()
    runs: list[_Run] = []
    for cfg in cfgs:
        # Progress bars of interleaved runs would overwrite one another; on_log reports instead.
        cfg = replace(cfg, progress=False)
        log = (lambda r, c=cfg: on_log(c, r)) if on_log is not None else None
        runs.append(_Run(cfg, train_steps(cfg, ctx, dev, data, log, stop),
                         torch.cuda.Stream(rt.device) if is_cuda else None, start_rng.clone()))
    try:
        with stop:   # SIGTERM/SIGINT: every run checkpoints after its current step and stops
            active = list(runs)
            while active:
                for run in list(active):
                    if not _advance(run, is_cuda):
                        active.remove(run)
            if is_cuda:
                torch.cuda.synchronize()
    finally:
        for run in runs:           # a second signal closes every run: logs flushed, locks released
            run.steps.close()
        torch.set_rng_state(start_rng)
    errors = {r.cfg.out: r.error for r in runs if r.error is not None}
    if errors and all(isinstance(e, StoppedBySignal) for e in errors.values()):
        first = next(iter(errors.values()))
        raise StoppedBySignal(first.signum, first.step, first.checkpoint, first.out, also=list(errors.values())[1:])
    if errors:
        raise SideBySideError(errors) from next(iter(errors.values()))
    return [r.result for r in runs]


def _advance(run: _Run, is_cuda: bool) -> bool:
    """One step of ``run`` with its own RNG state and stream; False once it has ended (result or error)."""
    torch.set_rng_state(run.rng)
    stream = torch.cuda.stream(run.stream) if is_cuda else contextlib.nullcontext()
    try:
        with stream:
            next(run.steps)
        return True
    except StopIteration as stop:
        run.result = stop.value
        return False
    except Exception as e:   # noqa: BLE001 - recorded and raised once every run has ended
        run.error = e
        return False
    finally:
        run.rng = torch.get_rng_state()
