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

import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..config import TrainConfig
from ..models import create_model
from . import checkpoint as ck
from . import distributed as ddp
from .evaluate import evaluate_model
from .log import RunLog
from .rundir import GracefulStop, RunDirError, RunLock, StoppedBySignal, check_fresh_start, check_resume_config
from .runtime import Runtime, pick_runtime
from .sources import make_source


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped and its last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------------------------
# The learning-rate schedule of Sec. 4.2


def learning_rate(cfg: TrainConfig, step: int, warming_up: bool) -> float:
    """Step decay: lr * gamma^(number of milestones passed); the warm-up lr while warming up (ResNet-110).
    ``lr_schedule="cosine"`` (not the paper; imagenet-modern): lr * (1 + cos(pi * step / steps)) / 2."""
    base = cfg.warmup_lr if warming_up else cfg.lr
    if cfg.lr_schedule == "cosine" and not warming_up:
        return float(base) * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    if cfg.lr_schedule == "one-cycle" and not warming_up:
        # cifar-fast (not the paper): linear rise from base/10 over lr_warmup of the steps, then linear decay to 0
        rise = max(1, round(cfg.lr_warmup * cfg.steps))
        if step < rise:
            return float(base) * (0.1 + 0.9 * step / rise)
        return float(base) * max(0.0, (cfg.steps - step) / max(1, cfg.steps - rise))
    if cfg.lr_schedule not in ("step", "cosine", "one-cycle"):
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose step, cosine or one-cycle")
    return float(base) * cfg.gamma ** sum(step >= m for m in cfg.milestones)


def resolve_warmup(cfg: TrainConfig, model: nn.Module) -> float | None:
    if cfg.warmup_lr == "auto":
        # Sec. 4.2 warms up ResNet-110 (and, in Sec. 4.2's last paragraph, the 1202-layer net); not shallower ones.
        return 0.01 if getattr(model, "depth", 0) >= 110 and cfg.lr > 0.01 else None
    return None if cfg.warmup_lr is None else float(cfg.warmup_lr)


@dataclass
class TrainResult:
    out: Path
    step: int
    final: dict[str, float]            # last evaluation
    best: dict[str, float] | None
    train_error: float | None          # over the last log interval
    train_loss: float | None
    seconds: float


def _rng_state(rt: Runtime) -> dict[str, Any]:
    s: dict[str, Any] = {"torch": torch.get_rng_state()}
    if rt.is_cuda:
        s["cuda"] = torch.cuda.get_rng_state(rt.device)
    return s


def _set_rng_state(s: dict[str, Any], rt: Runtime) -> None:
    torch.set_rng_state(s["torch"])
    if rt.is_cuda and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], rt.device)


def find_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = ck.list_checkpoints(Path(cfg.out) / "checkpoints")
        return found[-1] if found else None
    p = Path(cfg.resume)
    if not p.exists():
        raise ValueError(f"--resume {p}: no such checkpoint")
    return p


def make_eager_step(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, skip_nonfinite: bool = False,
                    *, label_smoothing: float = 0.0, all_finite: Callable[[torch.Tensor], bool] | None = None,
                    backward_on_skip: bool = False
                    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One SGD step: forward, loss, backward, update. Returns (loss, wrong predictions) as device tensors.
    With ``skip_nonfinite`` a NaN/inf loss returns before the update (the caller restores BN statistics);
    ``all_finite(loss)`` decides that for all ranks together under DDP, where ``backward_on_skip`` still runs the
    backward pass (DDP's gradient all-reduce expects one per forward) and then discards the gradients."""

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with rt.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if skip_nonfinite:
            finite = all_finite(loss) if all_finite is not None else torch.isfinite(loss).item()
            if not finite:
                if backward_on_skip:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.zero_grad(set_to_none=True)
                return loss.detach(), (logits.argmax(1) != y).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), (logits.argmax(1) != y).sum()

    return step


# --------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, *, data=None, on_log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` with ``cfg``'s recipe; returns the final evaluation and where everything was written.

    ``data``: a ready :class:`resnets.data.CifarData` (e.g. shared across the runs of an experiment).
    Launched by torchrun (``WORLD_SIZE`` > 1), the process joins the process group, trains its share of every
    global batch under DistributedDataParallel and leaves the group at the end."""
    ctx, device = ddp.setup(cfg.device)
    try:
        with GracefulStop() as stop:
            return run_to_end(train_steps(cfg, ctx, device, data, on_log, stop))
    finally:
        ddp.teardown(ctx)


def run_to_end(steps: Iterator[int]) -> TrainResult:
    """Drive a :func:`train_steps` generator to its end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def train_steps(cfg: TrainConfig, ctx: ddp.DistContext, device: str, data,
                on_log: Callable[[dict[str, Any]], None] | None,
                stop: GracefulStop | None = None) -> Generator[int, None, TrainResult]:
    """The loop as a generator: it yields the number of steps done after every step and returns the
    :class:`TrainResult`. :func:`train` drives one to its end; :mod:`.side_by_side` interleaves several.

    The run owns ``cfg.out`` for its whole life (:class:`resnets.train.rundir.RunLock`, rank 0 under torchrun);
    when ``stop`` has caught SIGTERM/SIGINT, the loop writes a checkpoint after the current step and raises
    :class:`StoppedBySignal`."""
    cfg.validate(source="train")          # before anything touches cfg.out
    out = Path(cfg.out)
    new_dir = not out.exists()
    lock = _own_run_dir(cfg, ctx)
    try:
        return (yield from _train_steps(cfg, ctx, device, data, on_log, stop))
    except BaseException:
        # A run that could not start (bad data, a bad checkpoint) leaves no directory it made just for its lock.
        if lock is not None and new_dir and {p.name for p in out.iterdir()} <= {".lock"}:
            lock.__exit__(None, None, None)
            lock = None
            (out / ".lock").unlink(missing_ok=True)
            out.rmdir()
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _own_run_dir(cfg: TrainConfig, ctx: ddp.DistContext) -> RunLock | None:
    """Take ``cfg.out``'s lock and check a fresh run does not mix with an old one; every rank raises the same
    RunDirError if rank 0 could not. Nothing is written to ``cfg.out`` before this succeeds."""
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = RunLock(cfg.out).__enter__()
            if cfg.resume is None:
                moved = check_fresh_start(Path(cfg.out), cfg.overwrite)
                if moved:
                    print(moved, flush=True)
        except RunDirError as e:
            if lock is not None:
                lock.__exit__(None, None, None)
                lock = None
            error = str(e)
    if ctx.enabled:
        error = ctx.broadcast_object(error)
    if error is not None:
        if lock is not None:
            lock.__exit__(None, None, None)
        raise RunDirError(error)
    return lock


def _train_steps(cfg: TrainConfig, ctx: ddp.DistContext, device: str, data,
                 on_log: Callable[[dict[str, Any]], None] | None,
                 stop: GracefulStop | None) -> Generator[int, None, TrainResult]:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main = ctx.is_main
    rt = pick_runtime(device, cfg.precision, cfg.channels_last)
    if rt.is_cuda:   # fixed batch shapes: let cuDNN time its kernels once and keep the fastest
        torch.backends.cudnn.benchmark = True
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    resume_from = find_resume(cfg)
    if ctx.enabled:   # every rank loads the checkpoint rank 0 chose (--out must be visible to all ranks)
        chosen = ctx.broadcast_object(str(resume_from) if resume_from is not None else None)
        resume_from = Path(chosen) if chosen is not None else None
    resume = ck.load_checkpoint(resume_from) if resume_from else None
    if resume is not None:
        if resume.state is None:
            raise ck.CheckpointError(f"{resume.path}: holds weights but no training state ({ck.STATE}); cannot resume")
        if resume.model_name != cfg.model:
            raise ck.CheckpointError(f"{resume.path}: is a checkpoint of {resume.model_name}, "
                                     f"but this run trains {cfg.model}")
        check_resume_config(resume.meta.get("config"), cfg.to_dict(), str(resume.path))

    source = make_source(cfg, rt, ctx, data)
    if cfg.epochs:
        from ..config import RECIPES, scale_milestones
        steps = max(1, math.ceil(cfg.epochs * (source.train_size // cfg.batch_size)))
        base = RECIPES.get(cfg.recipe)
        milestones = scale_milestones(_with(base, milestones=cfg.milestones), steps) if base is not None \
            and cfg.milestones == base.milestones else cfg.milestones
        cfg = _with(cfg, steps=steps, milestones=milestones, epochs=None)

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(source.classes), **cfg.model_kwargs)
    model = model.to(rt.device, memory_format=rt.memory_format)
    if cfg.sync_bn and ctx.enabled:
        model = ddp.convert_sync_batchnorm(model, rt.device).to(rt.device, memory_format=rt.memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    warmup_lr = resolve_warmup(cfg, model)
    warming = warmup_lr is not None
    cfg_w = cfg if warmup_lr is None else _with(cfg, warmup_lr=warmup_lr)
    recent_wrong: deque[float] = deque(maxlen=20)   # training error of the last batches, for the warm-up test
    start, best = 0, None
    if resume is not None:
        model.load_state_dict(resume.weights)
        st = resume.state
        optimizer.load_state_dict(st["optimizer"])
        start, warming, best = st["step"], st["warming_up"], st.get("best")
        recent_wrong.extend(st.get("recent_wrong", []))
        _set_rng_state(st["rng"], rt)

    log = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        # overwrite is an instruction to this launch, not part of the run: a later --config must not repeat it
        (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "overwrite": False}, indent=1,
                                                    sort_keys=True) + "\n")
        log = RunLog(out, cfg.log_format, cfg.tensorboard, start if resume is not None else None)
    meta_base = {"model": cfg.model, "model_kwargs": {"num_classes": len(source.classes), **cfg.model_kwargs},
                 "classes": source.classes, "dataset": source.name, "config": cfg.to_dict(),
                 "world_size": ctx.world_size, "resnets_version": __version__, "torch_version": torch.__version__}

    def all_finite(loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        return ctx.all_reduce_sum(bad).item() == 0

    fwd_model: nn.Module = ddp.wrap_ddp(model, ctx, rt.device) if ctx.enabled else model
    if cfg.compile:
        fwd_model = torch.compile(fwd_model)
    step_fn = make_eager_step(fwd_model, optimizer, rt, skip_nonfinite=cfg.on_nan == "skip",
                              label_smoothing=cfg.label_smoothing, all_finite=all_finite if ctx.enabled else None,
                              backward_on_skip=ctx.enabled)
    from .graphs import maybe_graph_step   # the whole-step CUDA graph, where it applies (graphs.graph_applies)
    step_fn = maybe_graph_step(cfg, model, optimizer, rt, source, step_fn, distributed=ctx.enabled)

    def save(step: int, metrics: dict[str, Any] | None, path: Path | None = None) -> Path | None:
        # Every rank calls save() at the same step (all the reasons to save are agreed on). The training-log sums
        # since the last log line, over all ranks, go into the state, so a run stopped between log lines logs as
        # if it had never stopped.
        nonlocal t_ckpt
        t_ckpt = time.perf_counter()
        mine = torch.tensor([loss_acc.item(), float(wrong_acc.item()), float(seen)], dtype=torch.float64,
                            device=rt.device if ctx.backend == "nccl" else "cpu")
        per_rank = [[t[0].item(), int(t[1].item()), int(t[2].item())] for t in ctx.all_gather(mine)]
        if not main:
            return None
        partial = {"per_rank": per_rank, "skipped": skipped}
        state = {"step": step, "optimizer": optimizer.state_dict(), "warming_up": warming,
                 "recent_wrong": list(recent_wrong), "best": best, "rng": _rng_state(rt), "log_partial": partial}
        meta = {**meta_base, "step": step, "metrics": metrics}
        return ck.save_checkpoint(path or ckpt_dir / f"step-{step:08d}", model, meta=meta,
                                  preprocess=source.preprocess(), state=state)

    def emit(record: dict[str, Any]) -> None:
        if not main:
            return
        log.write(record)
        if on_log is not None:
            on_log(record)

    def evaluate() -> dict[str, float]:
        ctx.broadcast_buffers(model)   # rank 0's BN statistics everywhere: the ones its checkpoint holds
        return evaluate_model(model, source.eval_loader, rt,
                              reduce=ctx.all_reduce_sum if source.sharded_eval else None)

    last_good = resume.path if resume is not None else None
    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.model, unit="step", dynamic_ncols=True)
    model.train()
    loss_acc = torch.zeros((), device=rt.device, dtype=torch.float32)
    wrong_acc = torch.zeros((), device=rt.device, dtype=torch.int64)
    seen, skipped, t_log = 0, 0, time.perf_counter()
    t_ckpt = t_log
    partial = resume.state.get("log_partial") if resume is not None else None
    if partial and len(partial["per_rank"]) == ctx.world_size:    # (a different world size starts a fresh line)
        loss_sum, wrong_sum, seen = partial["per_rank"][ctx.rank]
        loss_acc.fill_(loss_sum)
        wrong_acc.fill_(wrong_sum)
        skipped = partial["skipped"]
    last_train: dict[str, Any] = {}
    final: dict[str, Any] = {}
    check_each_step = cfg.on_nan == "skip" or warming
    try:
        for step in range(start, cfg.steps):
            lr = learning_rate(cfg_w, step, warming)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = source.batch(step)
            if cfg.on_nan == "skip":
                saved = [b.clone() for b in model.buffers()]
            loss, wrong = step_fn(x, y)
            if check_each_step:
                finite = all_finite(loss) if ctx.enabled else math.isfinite(loss.item())
                if cfg.on_nan == "skip" and not finite:
                    # No update was applied; the forward pass did move the BN running statistics: put them back.
                    with torch.no_grad():
                        for b, s in zip(model.buffers(), saved):
                            b.copy_(s)
                    skipped += 1
                    emit({"step": step + 1, "split": "event", "event": f"skipped step {step + 1}: loss {loss.item()}"})
                    loss, wrong = None, None
                elif warming:
                    if ctx.enabled:   # the warm-up test must see the global batch, so all ranks switch together
                        w = ctx.all_reduce_sum(wrong.double().reshape(1)).item()
                        recent_wrong.append(w / (y.numel() * ctx.world_size))
                    else:
                        recent_wrong.append(wrong.item() / y.numel())
                    if len(recent_wrong) == recent_wrong.maxlen and sum(recent_wrong) / len(recent_wrong) < cfg.warmup_until_error \
                            or step + 1 >= cfg.warmup_max_steps:
                        warming = False
                        emit({"step": step + 1, "split": "event", "event": f"warm-up done at step {step + 1}"})
            if loss is not None:
                loss_acc += loss.float()
                wrong_acc += wrong
                seen += y.numel()
            done = step + 1
            if (done % cfg.log_every == 0 or done == cfg.steps) and seen:
                n_steps = seen / y.numel()
                if ctx.enabled:   # the log shows the global batch: sums over ranks
                    t = ctx.all_reduce_sum(torch.stack([loss_acc.double(), wrong_acc.double(),
                                                        torch.tensor(float(seen), dtype=torch.float64,
                                                                     device=rt.device)]))
                    loss_mean = t[0].item() / (n_steps * ctx.world_size)
                    wrong_all, seen_all = t[1].item(), t[2].item()
                else:
                    loss_mean = loss_acc.item() / n_steps
                    wrong_all, seen_all = wrong_acc.item(), seen
                if not math.isfinite(loss_mean):
                    raise NonFiniteLossError(
                        f"the training loss became {loss_mean} between steps {done - seen // y.numel()} and {done}; "
                        f"stopped. The last good checkpoint is {last_good or 'none (none was written yet)'}. "
                        "Lower --lr, or pass --on-nan skip to skip such steps.")
                if rt.is_cuda:   # this run's stream only: runs side by side have streams of their own
                    torch.cuda.current_stream(rt.device).synchronize()
                dt = time.perf_counter() - t_log
                last_train = {"step": done, "split": "train", "loss": loss_mean,
                              "error": 100.0 * wrong_all / seen_all, "lr": lr, "img_per_s": seen_all / dt,
                              "elapsed_s": time.perf_counter() - t_start}
                emit(last_train)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_mean:.3f}", err=f"{last_train['error']:.1f}%",
                                    img_s=f"{seen_all / dt:.0f}")
                loss_acc.zero_()
                wrong_acc.zero_()
                seen, t_log = 0, time.perf_counter()
            metrics = None
            if (done % cfg.eval_every == 0 or done == cfg.steps) and source.eval_loader is not None:
                metrics = evaluate()
                final = {"step": done, "split": source.eval_name, **metrics, "elapsed_s": time.perf_counter() - t_start}
                emit(final)
                if best is None or metrics["error"] < best["error"]:
                    best = {"step": done, **metrics}
                    if cfg.checkpoint_every > 0:
                        save(done, metrics, ckpt_dir / "best")
                t_log = time.perf_counter()
            saved_now = False
            late = bool(cfg.checkpoint_minutes) and time.perf_counter() - t_ckpt >= 60 * cfg.checkpoint_minutes
            stop_now, late = _agree(stop, late, ctx, rt) if done < cfg.steps else (False, False)
            if cfg.checkpoint_every > 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps) or late:
                last_good = save(done, metrics) or last_good
                saved_now = True
                if main:
                    ck.prune_checkpoints(ckpt_dir, cfg.keep_last)
                t_log = time.perf_counter()
            if bar is not None:
                bar.update(1)
            if stop_now:
                if not saved_now:
                    last_good = save(done, metrics) or last_good
                    if main:
                        ck.prune_checkpoints(ckpt_dir, cfg.keep_last)
                ctx.barrier()
                raise StoppedBySignal(stop.signum or 15, done, last_good, out)
            yield done
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        source.close()
    result = TrainResult(out, cfg.steps, {k: v for k, v in final.items() if k not in ("split",)}, best,
                         last_train.get("error"), last_train.get("loss"), time.perf_counter() - t_start)
    if main:
        (out / "summary.json").write_text(json.dumps({"model": cfg.model, "steps": cfg.steps, "final": result.final,
                                                      "best": best, "train_error": result.train_error,
                                                      "train_loss": result.train_loss, "seconds": result.seconds,
                                                      "runtime": rt.describe(), "world_size": ctx.world_size,
                                                      "skipped_steps": skipped}, indent=1) + "\n")
    ctx.barrier()   # rank 0's last checkpoint is complete before any rank returns
    return result


def _agree(stop: GracefulStop | None, late: bool, ctx: ddp.DistContext, rt: Runtime) -> tuple[bool, bool]:
    """(stop after this step, write a time-based checkpoint now). Under torchrun every rank must take the same
    decisions at the same step: one small all-reduce per step, with rank 0's clock deciding the checkpoint."""
    signalled = stop is not None and stop.signum is not None
    if not ctx.enabled:
        return signalled, late
    flags = torch.tensor([float(signalled), float(late and ctx.is_main)],
                         device=rt.device if ctx.backend == "nccl" else "cpu")
    ctx.all_reduce_sum(flags)
    stop_now, late = flags[0].item() > 0, flags[1].item() > 0
    if stop_now and not signalled:
        stop.signum = 15          # another rank got the signal first
    return stop_now, late


def _with(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    import dataclasses
    return dataclasses.replace(cfg, **changes)
