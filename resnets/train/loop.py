"""The training loop: Section 4.2 (CIFAR) and Section 3.4 (ImageNet), on one device or data-parallel under torchrun.

    resnets train --model resnet56 --recipe cifar-paper --data DIR --out runs/resnet56
    resnets train --model resnet20 --steps 400 --out runs/quick        # a few minutes on a laptop CPU
    resnets train --recipe imagenet-paper --data IMAGENET --out runs/r50   # IMAGENET/train, IMAGENET/val
    torchrun --nproc_per_node 8 -m resnets.cli train --recipe imagenet-paper --data IMAGENET --out runs/r50

Python: ``resnets.train(resnets.config.recipe("cifar-paper", model="resnet110", steps=64000))``.

One loop over steps; the data come from :mod:`.sources` (CIFAR on the device, or an ImageFolder DataLoader), each
giving the batch of a step as a pure function of (seed, step). The run log is :mod:`.log`, evaluation
:mod:`.evaluate`, the run directory's ownership and the graceful stop :mod:`.rundir`.

The checkpoint holds the weights, optimizer, warm-up state and step, so ``--resume`` continues exactly where a run
stopped: the same weights and losses, bit for bit on the CPU, as a run that never stopped (a resumed ImageFolder
run re-enters the epoch at the right batch without reading the batches already done). Under torchrun only rank 0
writes logs and checkpoints; all ranks load the checkpoint it chose. See :mod:`resnets.train.distributed`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

import torch
from torch import nn

from .. import __version__
from ..config import TrainConfig
from . import checkpoint as ck
from . import distributed as ddp
from . import finetune
from .evaluate import evaluate_model
from .log import LogWindow, Pauses, RunLog, summary_writer_class
from .rundir import GracefulStop, StoppedBySignal, agree, load_resume, own_run_dir, set_aside_later_checkpoints
from .runtime import Runtime, pick_runtime
from .schedule import learning_rate, resolve_steps, resolve_warmup
from .sources import make_source
from .step import make_eager_step

__all__ = ["train", "train_steps", "run_to_end", "TrainResult", "NonFiniteLossError", "learning_rate"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped and its last good checkpoint is kept."""


@dataclass
class TrainResult:
    out: Path
    step: int
    final: dict[str, float]            # last evaluation
    best: dict[str, float] | None
    train_error: float | None          # over the last log interval
    train_loss: float | None
    seconds: float                     # training time of all launches (a resume goes on from its checkpoint's)


def train(cfg: TrainConfig, *, data=None, on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` with ``cfg``'s recipe; returns the final evaluation and where everything was written.

    ``data``: a ready :class:`resnets.data.CifarData` (e.g. shared across the runs of an experiment).
    Launched by torchrun (``WORLD_SIZE`` > 1), the process joins the process group, trains its share of every
    global batch under DistributedDataParallel and leaves the group at the end."""
    ctx, device = ddp.setup(cfg.device)
    clean = False
    try:
        with GracefulStop() as stop:
            result = run_to_end(train_steps(cfg, ctx, device, data, on_log, stop))
        clean = True
        return result
    finally:
        ddp.teardown(ctx, clean)


def run_to_end(steps: Iterator[int]) -> TrainResult:
    """Drive a :func:`train_steps` generator to its end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def train_steps(cfg: TrainConfig, ctx: ddp.DistContext, device: str, data,
                on_log: Callable[[dict[str, Any]], None] | None,
                stop: GracefulStop | None = None, pauses: Pauses | None = None) -> Generator[int, None, TrainResult]:
    """The loop as a generator: it yields the number of steps done after every step and returns the
    :class:`TrainResult`. :func:`train` drives one to its end; :mod:`.side_by_side` interleaves several.

    The run owns ``cfg.out`` for its whole life (:class:`resnets.train.rundir.RunLock`, rank 0 under torchrun);
    when ``stop`` has caught SIGTERM/SIGINT, the loop writes a checkpoint after the current step and raises
    :class:`StoppedBySignal`."""
    with owned_run(cfg, ctx):
        return (yield from loop_steps(setup(cfg, ctx, device, data, on_log, pauses), stop))


@contextlib.contextmanager
def owned_run(cfg: TrainConfig, ctx: ddp.DistContext) -> Iterator[None]:
    """Own ``cfg.out`` (its lock) while the body runs. A run that could not start (bad data, a bad checkpoint)
    leaves no directory it made just for its lock."""
    cfg.validate(source="train")          # before anything touches cfg.out
    out = Path(cfg.out)
    new_dir = not out.exists()
    lock = own_run_dir(cfg, ctx)
    try:
        yield
    except BaseException:
        if lock is not None and new_dir and {p.name for p in out.iterdir()} <= {".lock"}:
            lock.__exit__(None, None, None)
            lock = None
            (out / ".lock").unlink(missing_ok=True)
            out.rmdir()
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


# --------------------------------------------------------------------------------------------------------------
# A run's state, and setting it up


@dataclass
class Run:
    """Everything a run carries from one step to the next."""
    cfg: TrainConfig                   # resolved: steps, milestones
    lr_cfg: TrainConfig                # cfg with the warm-up lr resolved, for the schedule
    ctx: ddp.DistContext
    rt: Runtime
    source: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step_fn: Callable
    log: RunLog | None
    on_log: Callable[[dict[str, Any]], None] | None
    meta: dict[str, Any]
    window: LogWindow
    start: int = 0
    warming: bool = False
    recent_wrong: deque = field(default_factory=lambda: deque(maxlen=20))   # for the warm-up test
    warm_pending: list = field(default_factory=list)    # (wrong, batch) of steps the warm-up test has not read
    warmup_met: bool = False           # the test's mean fell below warmup_until_error; acted on at its next read
    best: dict[str, Any] | None = None
    last_good: Path | None = None
    final: dict[str, Any] = field(default_factory=dict)
    last_train: dict[str, Any] = field(default_factory=dict)
    t_start: float = 0.0               # perf_counter at the run's start, moved back by a resumed run's time
    t_ckpt: float = 0.0                # when the last checkpoint was written (or the run started)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def emit(self, record: dict[str, Any]) -> None:
        if self.log is None:
            return
        self.log.write(record)
        if self.on_log is not None:
            self.on_log(record)

    def save(self, step: int, metrics: dict[str, Any] | None, path: Path | None = None) -> Path | None:
        """A checkpoint (rank 0 writes; every rank must call this at the same step). Only a step checkpoint, one
        that --resume can start from, restarts the clock of --checkpoint-minutes."""
        if path is None:
            self.t_ckpt = time.perf_counter()
        partial = self.window.state(self.ctx)
        _read_warmup_errors(self)
        if not self.ctx.is_main:
            return None
        state = {"step": step, "optimizer": self.optimizer.state_dict(), "warming_up": self.warming,
                 "recent_wrong": list(self.recent_wrong), "warmup_met": self.warmup_met, "best": self.best, "rng": ck.rng_state(self.rt.device),
                 "log_partial": partial, "elapsed_s": time.perf_counter() - self.t_start}
        return ck.save_checkpoint(path or self.out / "checkpoints" / f"step-{step:08d}", self.model,
                                  meta={**self.meta, "step": step, "metrics": metrics},
                                  preprocess=self.source.preprocess(), state=state)

    def all_finite(self, loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        return self.ctx.all_reduce_sum(bad).item() == 0


def setup(cfg: TrainConfig, ctx: ddp.DistContext, device: str, data,
          on_log: Callable[[dict[str, Any]], None] | None, pauses: Pauses | None = None) -> Run:
    """Everything before the first step. ``pauses``: shared by runs trained side by side (:class:`Pauses`)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rt = pick_runtime(device, cfg.precision, cfg.channels_last)
    if cfg.tensorboard:     # on every rank, before anything is written: a run left half-made would refuse a rerun
        summary_writer_class()
    if rt.is_cuda:   # fixed batch shapes: let cuDNN time its kernels once and keep the fastest
        torch.backends.cudnn.benchmark = True
    resume = load_resume(cfg, ctx)
    cfg, initial, normalizer = finetune.prepare(cfg, resume)
    source = make_source(cfg, rt, ctx, data, normalizer)
    cfg = resolve_steps(cfg, source.train_size)
    n = len(source.classes)
    torch.manual_seed(cfg.seed)
    model, note = finetune.build_model(cfg, source.classes, initial, resume)
    model = model.to(rt.device, memory_format=rt.memory_format)
    if cfg.sync_bn and ctx.enabled:
        model = ddp.convert_sync_batchnorm(model, rt.device).to(rt.device, memory_format=rt.memory_format)
    params = finetune.param_groups(model, cfg.backbone_lr) if cfg.weights else model.parameters()
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov)
    warmup_lr = resolve_warmup(cfg, model)
    lr_cfg = cfg if warmup_lr is None else dataclasses.replace(cfg, warmup_lr=warmup_lr)
    meta = {"model": cfg.model, "model_kwargs": {"num_classes": n, **model.model_kwargs},
            "classes": source.classes, "dataset": source.name, "config": cfg.to_dict(),
            "world_size": ctx.world_size, "resnets_version": __version__, "torch_version": torch.__version__}
    run = Run(cfg, lr_cfg, ctx, rt, source, model, optimizer, None, None, on_log, meta, LogWindow(rt.device, pauses),
              warming=warmup_lr is not None, t_start=t_start, t_ckpt=t_start)
    if resume is not None:
        model.load_state_dict(resume.weights)
        st = resume.state
        optimizer.load_state_dict(st["optimizer"])
        # (a resume with the warm-up turned off, --no-warmup, leaves it)
        run.start, run.best, run.last_good = st["step"], st.get("best"), resume.path
        run.warming = st["warming_up"] and warmup_lr is not None
        run.recent_wrong.extend(st.get("recent_wrong", []))
        run.warmup_met = bool(st.get("warmup_met", False))
        ck.set_rng_state(st["rng"], rt.device)
        run.window.restore(st.get("log_partial"), ctx)
        if run.start >= cfg.steps and resume.meta.get("metrics"):   # finished: its last evaluation is the final one
            run.final = {"step": run.start, "split": source.eval_name, **resume.meta["metrics"]}
        # elapsed_s in the log and summary.json counts every launch up to here (older checkpoints lack it)
        run.t_start = time.perf_counter() - st.get("elapsed_s", 0.0)
    if ctx.is_main and resume is not None and (aside := set_aside_later_checkpoints(run.out, run.start)):
        note = (f"{note}; " if note else "") + f"resumed from step {run.start}, so the checkpoints of later steps " \
            f"were moved to {aside}"
    if ctx.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        # overwrite is an instruction to this launch, not part of the run: a later --config must not repeat it
        (run.out / "config.json").write_text(json.dumps({**cfg.to_dict(), "overwrite": False}, indent=1,
                                                        sort_keys=True) + "\n")
        run.log = RunLog(run.out, cfg.log_format, cfg.tensorboard, run.start if resume is not None else None)

    if note:
        print(f"{cfg.out}: {note}", flush=True)
        run.emit({"step": 0, "split": "event", "event": note})
    fwd_model: nn.Module = ddp.wrap_ddp(model, ctx, rt.device) if ctx.enabled else model
    if cfg.compile:
        fwd_model = torch.compile(fwd_model)
    step_fn = make_eager_step(fwd_model, optimizer, rt, label_smoothing=cfg.label_smoothing, on_nan=cfg.on_nan,
                              all_finite=run.all_finite if ctx.enabled else None, backward_on_skip=ctx.enabled,
                              buffers_of=model)
    from .graphs import maybe_graph_step   # the whole-step CUDA graph, where it applies (graphs.graph_applies)
    run.step_fn = maybe_graph_step(cfg, model, optimizer, rt, source, step_fn, distributed=ctx.enabled)
    return run


# --------------------------------------------------------------------------------------------------------------
# The loop


def loop_steps(run: Run, stop: GracefulStop | None) -> Generator[int, None, TrainResult]:
    bar = start(run)
    try:
        for step in range(run.start, run.cfg.steps):
            lr, x, y = next_batch(run, step)
            out = run.step_fn(x, y)
            after_step(run, step + 1, lr, y, out, stop, bar)
            yield step + 1
    finally:
        close(run, bar)
    return finish(run)


def start(run: Run):
    """The model in training mode; returns the progress bar (None without one)."""
    run.model.train()
    if run.cfg.progress and run.ctx.is_main:
        from tqdm.auto import tqdm
        return tqdm(total=run.cfg.steps, initial=run.start, desc=run.cfg.model, unit="step", dynamic_ncols=True)
    return None


def next_batch(run: Run, step: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The learning rate of ``step``, set in the optimizer, and the step's batch."""
    lr = learning_rate(run.lr_cfg, step, run.warming)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)    # (fine-tuning: the pretrained layers' share)
    x, y = run.source.batch(step)
    return lr, x, y


def after_step(run: Run, done: int, lr: float, y: torch.Tensor, out, stop: GracefulStop | None, bar=None,
               late: bool | None = None, stopping: bool | None = None) -> None:
    """Everything after the update of step ``done``: log, evaluate, checkpoint, and on a signal checkpoint and
    raise :class:`StoppedBySignal`. ``late``: a time-based checkpoint is due (default: by this run's clock);
    ``stopping``: whether to stop now (default: ``stop`` caught a signal), for runs that must decide together."""
    cfg, ctx = run.cfg, run.ctx
    if out.skipped:
        run.window.skipped += 1
        run.emit({"step": done, "split": "event", "event": f"skipped step {done}: loss {out.loss.item()}"})
    else:
        if run.warming:
            _warmup_test(run, done, out.wrong, y.numel())
        run.window.add(out.loss, out.wrong, y.numel())
    if (done % cfg.log_every == 0 or done == cfg.steps) and run.window.seen:
        _log_train(run, done, lr, y.numel(), bar)
    metrics = None
    if (done % cfg.eval_every == 0 or done == cfg.steps) and run.source.eval_loader is not None:
        metrics = _evaluate(run, done)
    if late is None:
        late = checkpoint_due(run)
    if done == cfg.steps:
        stop_now, late = False, False
    elif stopping is None:
        stop_now, late = agree(stop, late, ctx, run.rt.device)
    else:
        stop_now = stopping
    regular = cfg.checkpoint_every > 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
    if regular or late or stop_now:
        t_save = time.perf_counter()
        if cfg.on_nan == "stop" and run.window.seen:   # not finite since the last log line: no checkpoint of it
            _stop_if_not_finite(run, done, run.window.totals(run.ctx, y.numel())[0], y.numel())
        run.last_good = run.save(done, metrics) or run.last_good
        if ctx.is_main:
            ck.prune_checkpoints(run.out / "checkpoints", cfg.keep_last)
        run.window.leave_out(t_save)
    if bar is not None:
        bar.update(1)
    if stop_now:
        ctx.barrier()
        raise StoppedBySignal(stop.signum or 15, done, run.last_good, run.out)


def checkpoint_due(run: Run) -> bool:
    """``checkpoint_minutes`` have passed since the last checkpoint."""
    return bool(run.cfg.checkpoint_minutes) and time.perf_counter() - run.t_ckpt >= 60 * run.cfg.checkpoint_minutes


def close(run: Run, bar=None) -> None:
    """The progress bar, the log and the data source; after the last step or a failure."""
    if bar is not None:
        bar.close()
    if run.log is not None:
        run.log.close()
    run.source.close()


# The warm-up test reads the training error every 10 steps, one host sync for ten: on a GPU a sync every step
# keeps the host from queueing the next step, and plain-110 warms up for all of its 2,000 steps (the longest), which
# cost ~10 s of a stacked paper preset on an H200 (docs/performance.md).
WARMUP_TEST_EVERY = 10


def _warmup_test(run: Run, done: int, wrong: torch.Tensor, batch: int) -> None:
    """Sec. 4.2: ResNet-110 trains at lr 0.01 "until the training error is below 80%" (here: the mean over the
    last 20 batches), then at the recipe's lr. The test is read every WARMUP_TEST_EVERY steps, so the warm-up ends
    at the first multiple of 10 at or after the step whose mean fell below the threshold (or at
    warmup_max_steps). Under torchrun the test sees the global batch, so all ranks switch together."""
    run.warm_pending.append((wrong, batch))
    if done % WARMUP_TEST_EVERY and done < run.cfg.warmup_max_steps:
        return
    _read_warmup_errors(run)
    if run.warmup_met or done >= run.cfg.warmup_max_steps:
        run.warming = False
        run.emit({"step": done, "split": "event", "event": f"warm-up done at step {done}"})


def _read_warmup_errors(run: Run) -> None:
    """The pending steps' errors into the test's window, in one host sync (a checkpoint reads them too, so that
    it holds them), noting whether the mean of the last 20 fell below the threshold after any of them. Every rank
    calls this at the same steps."""
    if not run.warm_pending:
        return
    wrong = torch.stack([w.double().reshape(()) for w, _ in run.warm_pending])
    batches = [b for _, b in run.warm_pending]
    run.warm_pending.clear()
    if run.ctx.enabled:
        wrong = run.ctx.all_reduce_sum(wrong)
    r = run.recent_wrong
    for w, b in zip(wrong.tolist(), batches):
        r.append(w / (b * run.ctx.world_size))
        if len(r) == r.maxlen and sum(r) / len(r) < run.cfg.warmup_until_error:
            run.warmup_met = True


def _log_train(run: Run, done: int, lr: float, batch: int, bar) -> None:
    w = run.window
    loss_mean, wrong_all, seen_all = w.totals(run.ctx, batch)
    _stop_if_not_finite(run, done, loss_mean, batch)
    if run.rt.is_cuda:   # this run's stream only: runs side by side have streams of their own
        torch.cuda.current_stream(run.rt.device).synchronize()
    dt = w.seconds()
    run.last_train = {"step": done, "split": "train", "loss": loss_mean, "error": 100.0 * wrong_all / seen_all,
                      "lr": lr, "img_per_s": seen_all / dt, "elapsed_s": time.perf_counter() - run.t_start}
    run.emit(run.last_train)
    if bar is not None:
        bar.set_postfix(loss=f"{loss_mean:.3f}", err=f"{run.last_train['error']:.1f}%", img_s=f"{seen_all / dt:.0f}")
    w.reset()


def _stop_if_not_finite(run: Run, done: int, loss_mean: float, batch: int) -> None:
    """on_nan="stop": raise NonFiniteLossError when the mean loss since the last log line is not finite."""
    if not math.isfinite(loss_mean):
        raise NonFiniteLossError(
            f"the training loss became {loss_mean} between steps {done - run.window.seen // batch} and {done}; "
            f"stopped. The last good checkpoint is {run.last_good or 'none (none was written yet)'}. "
            "Lower --lr, or pass --on-nan skip to skip such steps.")


def _evaluate(run: Run, done: int) -> dict[str, float]:
    t_eval = time.perf_counter()
    run.ctx.broadcast_buffers(run.model)   # rank 0's BN statistics everywhere: the ones its checkpoint holds
    metrics = evaluate_model(run.model, run.source.eval_loader, run.rt,
                             reduce=run.ctx.all_reduce_sum if run.source.sharded_eval else None)
    run.final = {"step": done, "split": run.source.eval_name, **metrics,
                 "elapsed_s": time.perf_counter() - run.t_start}
    run.emit(run.final)
    if run.best is None or metrics["error"] < run.best["error"]:
        run.best = {"step": done, **metrics}
        if run.cfg.checkpoint_every > 0:
            run.save(done, metrics, run.out / "checkpoints" / "best")
    run.window.leave_out(t_eval)     # img_per_s counts training time only
    return metrics


def finish(run: Run) -> TrainResult:
    summary = run.out / "summary.json"
    if run.start >= run.cfg.steps and summary.is_file():
        # a finished run resumed (reproduce does so when a setting that does not define the run changed): nothing
        # was trained or evaluated in this launch, so its summary stays as the run left it; one that is unreadable
        # or tells of an earlier, shorter end is written anew below
        try:
            s = json.loads(summary.read_text())
        except ValueError:
            s = {}
        if isinstance(s, dict) and s.get("steps") == run.cfg.steps and "final" in s:
            result = TrainResult(run.out, run.cfg.steps, s["final"], s.get("best"), s.get("train_error"),
                                 s.get("train_loss"), s.get("seconds", 0.0))
            run.ctx.barrier()
            return result
    result = TrainResult(run.out, run.cfg.steps, {k: v for k, v in run.final.items() if k != "split"}, run.best,
                         run.last_train.get("error"), run.last_train.get("loss"), time.perf_counter() - run.t_start)
    if run.ctx.is_main:
        (run.out / "summary.json").write_text(json.dumps({
            "model": run.cfg.model, "steps": run.cfg.steps, "final": result.final, "best": run.best,
            "train_error": result.train_error, "train_loss": result.train_loss, "seconds": result.seconds,
            "runtime": run.rt.describe(), "world_size": run.ctx.world_size,
            "skipped_steps": run.window.skipped}, indent=1) + "\n")
    run.ctx.barrier()   # rank 0's last checkpoint is complete before any rank returns
    return result
