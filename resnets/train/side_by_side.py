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

With ``stack=True`` CIFAR runs go further and train as one network (:mod:`.stacked`): nets of every depth
with the same widths and settings in one stack (``stack="depth"``: a stack per depth), one unit of the scheduler
per stack, a stream each.

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
from .loop import Run, TrainResult, loop_steps, owned_run, setup, train_steps
from .log import Pauses
from .rundir import GracefulStop, StoppedBySignal
from .runtime import pick_runtime


@dataclass
class _Unit:
    """What the scheduler steps: one run, or a stack of runs (:mod:`.stacked`); ``index``: their places in the
    caller's list."""
    index: list[int]
    steps: Generator[int, None, list]
    stream: Any
    rng: torch.Tensor
    result: list | None = None
    error: BaseException | None = None


class SideBySideError(RuntimeError):
    """One or more runs failed; the others were trained to their end. ``errors`` maps run directory to error."""

    def __init__(self, errors: dict[str, BaseException]):
        self.errors = errors
        lines = [f"{out}: {type(e).__name__}: {e}" for out, e in errors.items()]
        super().__init__(f"{len(errors)} of the runs trained side by side failed:\n  " + "\n  ".join(lines))


def train_side_by_side(cfgs: list[TrainConfig], *, data=None,
                       on_log: Callable[[TrainConfig, dict[str, Any]], None] | None = None,
                       device: str | None = None, stack: bool | str = False) -> list[TrainResult]:
    """Train every config to its end, one step of each in turn; returns their results in the given order.

    ``data``: one :class:`resnets.data.CifarData` for all runs (each still builds its own split, order and
    augmentation from its own seed). ``on_log(cfg, record)`` sees every log record of every run. A run that
    fails does not stop the others; when all have ended, :class:`SideBySideError` names every failure.
    ``stack``: True (or "all"): CIFAR runs that share their settings train as one stacked network, whatever
    their depths; "depth": one stacked network per depth (:mod:`.stacked`; not bit-identical to the run alone,
    unlike the default).
    """
    if stack not in (False, True, "all", "depth"):
        raise ValueError(f"stack must be False, True, 'all' or 'depth'; got {stack!r}")
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
    start_rng = torch.get_rng_state()
    stop = GracefulStop()
    # Progress bars of interleaved runs would overwrite one another; on_log reports instead.
    cfgs = [replace(cfg, progress=False) for cfg in cfgs]
    logs = [(lambda r, c=cfg: on_log(c, r)) if on_log is not None else None for cfg in cfgs]
    new_stream = (lambda: torch.cuda.Stream(rt.device)) if rt.is_cuda else (lambda: None)
    errors: dict[int, BaseException] = {}
    pauses = Pauses()     # one run's evaluation or checkpoint is a pause in every run's training
    results: list[TrainResult | None] = [None] * len(cfgs)
    units: list[_Unit] = []
    try:
        with contextlib.ExitStack() as owned, stop:   # SIGTERM/SIGINT: every run checkpoints after its step
            if stack:
                units = _stacked_units(cfgs, ctx, dev, data, logs, stop, owned, new_stream, errors,
                                       by_depth=stack == "depth", pauses=pauses)
            else:
                units = [_Unit([i], _one(train_steps(cfg, ctx, dev, data, log, stop, pauses)), new_stream(),
                               start_rng.clone()) for i, (cfg, log) in enumerate(zip(cfgs, logs))]
            try:
                active = list(units)
                while active:
                    for unit in list(active):
                        if not _advance(unit, rt.is_cuda):
                            active.remove(unit)
                if rt.is_cuda:
                    torch.cuda.synchronize()
            finally:
                for unit in units:   # a second signal closes every run (logs flushed), then the locks go
                    unit.steps.close()
    finally:
        torch.set_rng_state(start_rng)
    for unit in units:
        for j, i in enumerate(unit.index):
            r = unit.error if unit.error is not None else unit.result[j]
            if isinstance(r, BaseException):
                errors[i] = r
            else:
                results[i] = r
    raise_run_errors({cfgs[i].out: e for i, e in sorted(errors.items())})
    return results


def raise_run_errors(errors: dict[str, BaseException]) -> None:
    """After runs trained together have all ended: nothing if none failed; one :class:`StoppedBySignal` listing
    every checkpoint if all were stopped by a signal; else :class:`SideBySideError` naming every failure."""
    if errors and all(isinstance(e, StoppedBySignal) for e in errors.values()):
        first, *also = errors.values()
        raise StoppedBySignal(first.signum, first.step, first.checkpoint, first.out, also=also)
    if errors:
        raise SideBySideError(errors) from next(iter(errors.values()))


def _one(steps: Generator[int, None, TrainResult]) -> Generator[int, None, list]:
    return [(yield from steps)]


def _stacked_units(cfgs, ctx, dev, data, logs, stop, owned: contextlib.ExitStack, new_stream,
                   errors: dict[int, BaseException], by_depth: bool, pauses: Pauses) -> list[_Unit]:
    """Set every run up (each owns its directory until ``owned`` closes), then one unit per stack of runs with
    equal :func:`.stacked.stack_key`, and one per run that stacks with none."""
    from .stacked import stack_key, stack_order, stacked_steps
    groups: dict[Any, list[tuple[int, Run, torch.Tensor]]] = {}
    for i, cfg in enumerate(cfgs):
        member = contextlib.ExitStack()
        try:
            member.enter_context(owned_run(cfg, ctx))
            run = setup(cfg, ctx, dev, data, logs[i], pauses)
        except Exception as e:  # noqa: BLE001 - this run cannot start; the others do
            member.__exit__(type(e), e, e.__traceback__)
            errors[i] = e
            continue
        owned.push(member)
        key = stack_key(run, by_depth)
        groups.setdefault(("alone", i) if key is None else key, []).append((i, run, torch.get_rng_state()))
    if torch.cuda.is_available():
        torch.cuda.synchronize()   # set-up ran on the default stream; each unit runs on a stream of its own
    units = []
    for members in groups.values():
        rng = members[-1][2]
        members = [members[j] for j in stack_order([run for _, run, _ in members])]
        runs = [run for _, run, _ in members]
        steps = stacked_steps(runs, stop) if len(runs) > 1 else _one(loop_steps(runs[0], stop))
        units.append(_Unit([i for i, _, _ in members], steps, new_stream(), rng))
    return units


def _advance(unit: _Unit, is_cuda: bool) -> bool:
    """One step of ``unit`` with its own RNG state and stream; False once it has ended (result or error)."""
    torch.set_rng_state(unit.rng)
    stream = torch.cuda.stream(unit.stream) if is_cuda else contextlib.nullcontext()
    try:
        with stream:
            next(unit.steps)
        return True
    except StopIteration as stop:
        unit.result = stop.value
        return False
    except Exception as e:   # noqa: BLE001 - recorded and raised once every run has ended
        unit.error = e
        return False
    finally:
        unit.rng = torch.get_rng_state()
