"""The training loop of Section 4.2 (CIFAR) on one device: step, schedule, evaluation, logging, checkpoints.

    resnets train --model resnet56 --recipe cifar-paper --data DIR --out runs/resnet56
    resnets train --model resnet20 --steps 400 --out runs/quick        # a few minutes on a laptop CPU

Python: ``resnets.train(resnets.config.recipe("cifar-paper", model="resnet110", steps=64000))``.

Every batch is a pure function of (seed, step) (``DeviceLoader.batch``), and the checkpoint holds the weights,
optimizer, warm-up state and step, so ``--resume`` continues exactly where a run stopped: the same weights and
losses, bit for bit on the CPU, as a run that never stopped.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..config import TrainConfig
from ..data import DeviceLoader, Normalizer, load_cifar
from ..models import create_model
from . import checkpoint as ck
from .runtime import Runtime, pick_runtime


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped and its last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------------------------
# The learning-rate schedule of Sec. 4.2


def learning_rate(cfg: TrainConfig, step: int, warming_up: bool) -> float:
    """Step decay: lr * gamma^(number of milestones passed); the warm-up lr while warming up (ResNet-110)."""
    base = cfg.warmup_lr if warming_up else cfg.lr
    return float(base) * cfg.gamma ** sum(step >= m for m in cfg.milestones)


def resolve_warmup(cfg: TrainConfig, model: nn.Module) -> float | None:
    if cfg.warmup_lr == "auto":
        # Sec. 4.2 warms up ResNet-110 (and, in Sec. 4.2's last paragraph, the 1202-layer net); not shallower ones.
        return 0.01 if getattr(model, "depth", 0) >= 110 and cfg.lr > 0.01 else None
    return None if cfg.warmup_lr is None else float(cfg.warmup_lr)


# --------------------------------------------------------------------------------------------------------------
# Logging: JSONL or CSV, plus TensorBoard


class RunLog:
    FIELDS = ["step", "split", "loss", "error", "top5_error", "lr", "img_per_s", "elapsed_s"]

    def __init__(self, out: Path, fmt: str, tensorboard: bool, resume_step: int | None):
        if fmt not in ("jsonl", "csv"):
            raise ValueError(f"unknown log format {fmt!r}; choose jsonl or csv")
        self.path = out / f"log.{fmt}"
        self.fmt = fmt
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("--tensorboard needs the tensorboard package: pip install 'resnets[tensorboard]'") from e
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        """Records after the resumed step were written by the crashed run; the resumed run writes them again."""
        if not self.path.exists():
            return
        kept = [r for r in read_log(self.path) if r["step"] <= step]
        self.path.unlink()
        for r in kept:
            self.write(r, tb=False)

    def write(self, record: dict[str, Any], tb: bool = True) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            if self.fmt == "jsonl":
                f.write(json.dumps(record) + "\n")
            else:
                w = csv.DictWriter(f, self.FIELDS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(record)
        if tb and self.tb is not None:
            for k in ("loss", "error", "top5_error", "lr", "img_per_s"):
                if record.get(k) is not None:
                    self.tb.add_scalar(f"{record['split']}/{k}", record[k], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's log.jsonl or log.csv, as dicts with numbers."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    rows = []
    with open(p, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (v if k == "split" else (None if v == "" else float(v) if k != "step" else int(v)))
                         for k, v in r.items()})
    return rows


# --------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DeviceLoader, rt: Runtime) -> dict[str, float]:
    """Top-1 and top-5 error (%) and mean cross-entropy over every sample of ``loader``."""
    was_training = model.training
    model.eval()
    n, loss_sum = 0, torch.zeros((), device=rt.device, dtype=torch.float64)
    wrong1 = torch.zeros((), device=rt.device, dtype=torch.int64)
    wrong5 = torch.zeros_like(wrong1)
    for x, y in loader:
        with rt.autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        wrong1 += (top[:, 0] != y).sum()
        wrong5 += (~(top == y[:, None]).any(dim=1)).sum()
        n += y.numel()
    model.train(was_training)
    return {"error": 100.0 * wrong1.item() / n, "top5_error": 100.0 * wrong5.item() / n,
            "loss": loss_sum.item() / n, "n": n}


# --------------------------------------------------------------------------------------------------------------
# Setup shared by train() and evaluate


def preprocess_state(normalizer: Normalizer) -> dict[str, Any]:
    return normalizer.state_dict()


def normalizer_from_checkpoint(c: ck.Checkpoint) -> Normalizer:
    if not c.preprocess:
        raise ck.CheckpointError(f"{c.path}: the checkpoint holds no preprocessing; it was not written by resnets train")
    return Normalizer.from_state_dict(c.preprocess)


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


def make_eager_step(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, skip_nonfinite: bool = False
                    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One SGD step: forward, loss, backward, update. Returns (loss, wrong predictions) as device tensors.
    With ``skip_nonfinite`` a NaN/inf loss returns before the update (the caller restores BN statistics)."""

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with rt.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        if skip_nonfinite and not torch.isfinite(loss).item():
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

    ``data``: a ready :class:`resnets.data.CifarData` (e.g. shared across the runs of an experiment)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.on_nan not in ("stop", "skip"):
        raise ValueError(f"on_nan must be 'stop' or 'skip', got {cfg.on_nan!r}")
    if cfg.steps <= 0 or cfg.batch_size <= 0:
        raise ValueError("steps and batch_size must be positive")
    rt = pick_runtime(cfg.device, cfg.precision, cfg.channels_last)
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    resume_from = find_resume(cfg)
    resume = ck.load_checkpoint(resume_from) if resume_from else None
    if resume is not None:
        if resume.state is None:
            raise ck.CheckpointError(f"{resume.path}: holds weights but no training state ({ck.STATE}); cannot resume")
        if resume.model_name != cfg.model:
            raise ck.CheckpointError(f"{resume.path}: is a checkpoint of {resume.model_name}, "
                                     f"but this run trains {cfg.model}")

    # data: the whole uint8 set on the device, augmented there
    if data is None:
        data = load_cifar(cfg.dataset, root=cfg.data, progress=cfg.progress)
    eval_name = "test"
    eval_images, eval_labels = data.test_images, data.test_labels
    if cfg.val_split:
        data, eval_images, eval_labels = data.split(cfg.val_split, seed=cfg.seed)
        eval_name = "val"
    if cfg.eval_subset:
        eval_images, eval_labels = eval_images[:cfg.eval_subset], eval_labels[:cfg.eval_subset]
    if cfg.epochs:
        from ..config import RECIPES, scale_milestones
        steps = max(1, math.ceil(cfg.epochs * (len(data.train_labels) // cfg.batch_size)))
        base = RECIPES.get(cfg.recipe)
        milestones = scale_milestones(_with(base, milestones=cfg.milestones), steps) if base is not None \
            and cfg.milestones == base.milestones else cfg.milestones
        cfg = _with(cfg, steps=steps, milestones=milestones, epochs=None)
    normalizer = Normalizer(cfg.normalize, data.train_images)
    train_loader = DeviceLoader(data.train_images, data.train_labels, cfg.batch_size, rt.device, train=True,
                                normalizer=normalizer, seed=cfg.seed, augment=cfg.augment,
                                channels_last=rt.channels_last)
    eval_loader = DeviceLoader(eval_images, eval_labels, max(cfg.batch_size, 500), rt.device, train=False,
                               normalizer=normalizer, channels_last=rt.channels_last)

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=len(data.classes), **cfg.model_kwargs)
    model = model.to(rt.device, memory_format=rt.memory_format)
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

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n")
    log = RunLog(out, cfg.log_format, cfg.tensorboard, start if resume is not None else None)
    meta_base = {"model": cfg.model, "model_kwargs": {"num_classes": len(data.classes), **cfg.model_kwargs},
                 "classes": data.classes, "dataset": data.name, "config": cfg.to_dict(),
                 "resnets_version": __version__, "torch_version": torch.__version__}

    fwd_model = torch.compile(model) if cfg.compile else model
    step_fn = make_eager_step(fwd_model, optimizer, rt, skip_nonfinite=cfg.on_nan == "skip")
    from .graphs import maybe_graph_step  # whole-step CUDA graph on GPUs; eager everywhere else
    step_fn = maybe_graph_step(cfg, model, optimizer, rt, train_loader, step_fn)

    def save(step: int, metrics: dict[str, Any] | None, path: Path | None = None) -> Path:
        state = {"step": step, "optimizer": optimizer.state_dict(), "warming_up": warming,
                 "recent_wrong": list(recent_wrong), "best": best, "rng": _rng_state(rt)}
        meta = {**meta_base, "step": step, "metrics": metrics}
        return ck.save_checkpoint(path or ckpt_dir / f"step-{step:08d}", model, meta=meta,
                                  preprocess=preprocess_state(normalizer), state=state)

    def emit(record: dict[str, Any]) -> None:
        log.write(record)
        if on_log is not None:
            on_log(record)

    last_good = resume.path if resume is not None else None
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.model, unit="step", dynamic_ncols=True)
    model.train()
    loss_acc = torch.zeros((), device=rt.device, dtype=torch.float32)
    wrong_acc = torch.zeros((), device=rt.device, dtype=torch.int64)
    seen, skipped, t_log = 0, 0, time.perf_counter()
    last_train: dict[str, Any] = {}
    final: dict[str, Any] = {}
    check_each_step = cfg.on_nan == "skip" or warming
    try:
        for step in range(start, cfg.steps):
            lr = learning_rate(cfg_w, step, warming)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = train_loader.batch(step)
            if cfg.on_nan == "skip":
                saved = [b.clone() for b in model.buffers()]
            loss, wrong = step_fn(x, y)
            if check_each_step:
                if cfg.on_nan == "skip" and not math.isfinite(loss.item()):
                    # No update was applied; the forward pass did move the BN running statistics: put them back.
                    with torch.no_grad():
                        for b, s in zip(model.buffers(), saved):
                            b.copy_(s)
                    skipped += 1
                    emit({"step": step + 1, "split": "event", "event": f"skipped step {step + 1}: loss {loss.item()}"})
                    loss, wrong = None, None
                elif warming:
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
                loss_mean = loss_acc.item() / (seen / y.numel())
                if not math.isfinite(loss_mean):
                    raise NonFiniteLossError(
                        f"the training loss became {loss_mean} between steps {done - seen // y.numel()} and {done}; "
                        f"stopped. The last good checkpoint is {last_good or 'none (none was written yet)'}. "
                        "Lower --lr, or pass --on-nan skip to skip such steps.")
                if rt.is_cuda:
                    torch.cuda.synchronize(rt.device)
                dt = time.perf_counter() - t_log
                last_train = {"step": done, "split": "train", "loss": loss_mean,
                              "error": 100.0 * wrong_acc.item() / seen, "lr": lr, "img_per_s": seen / dt,
                              "elapsed_s": time.perf_counter() - t_start}
                emit(last_train)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_mean:.3f}", err=f"{last_train['error']:.1f}%",
                                    img_s=f"{seen / dt:.0f}")
                loss_acc.zero_()
                wrong_acc.zero_()
                seen, t_log = 0, time.perf_counter()
            metrics = None
            if done % cfg.eval_every == 0 or done == cfg.steps:
                metrics = evaluate_model(model, eval_loader, rt)
                final = {"step": done, "split": eval_name, **metrics, "elapsed_s": time.perf_counter() - t_start}
                emit(final)
                if best is None or metrics["error"] < best["error"]:
                    best = {"step": done, **metrics}
                    if cfg.checkpoint_every > 0:
                        save(done, metrics, ckpt_dir / "best")
                t_log = time.perf_counter()
            if cfg.checkpoint_every > 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                last_good = save(done, metrics)
                ck.prune_checkpoints(ckpt_dir, cfg.keep_last)
                t_log = time.perf_counter()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        log.close()
    result = TrainResult(out, cfg.steps, {k: v for k, v in final.items() if k not in ("split",)}, best,
                         last_train.get("error"), last_train.get("loss"), time.perf_counter() - t_start)
    (out / "summary.json").write_text(json.dumps({"model": cfg.model, "steps": cfg.steps, "final": result.final,
                                                  "best": best, "train_error": result.train_error,
                                                  "train_loss": result.train_loss, "seconds": result.seconds,
                                                  "runtime": rt.describe(), "skipped_steps": skipped},
                                                 indent=1) + "\n")
    return result


def _with(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    import dataclasses
    return dataclasses.replace(cfg, **changes)
