"""A run directory has one owner and holds one run.

* :class:`RunLock`: an exclusive ``flock`` on ``OUT/.lock``, taken before the run writes anything. The kernel drops
  it when its holder dies, even by SIGKILL, so a crash never leaves a stale lock; the file keeps the holder's pid,
  host and start time for the message a second process gets.
* :func:`check_fresh_start`: a run that does not resume refuses a directory that already holds a run, unless told
  to ``--overwrite`` it, which moves the old run aside (nothing is deleted).
* :func:`check_resume_config`: resuming with a config that differs from the checkpoint's in what defines the run
  (model, data, batch, seed, recipe...) is refused, naming each difference.
* :class:`GracefulStop`: SIGTERM or SIGINT asks the loop to stop after the current step with a checkpoint; a
  second signal stops at once.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ck

LOCK = ".lock"
# What defines a run: resuming with any of these changed would continue another run's weights under this name.
# The rest (steps, epochs, milestones, lr schedule, evaluation/log/checkpoint cadence, threads...) may change.
DEFINING = ("model", "model_kwargs", "dataset", "batch_size", "seed", "recipe", "val_split", "normalize", "augment")
# Settings that change how a run is carried out or kept, never its weights or the numbers it logs (resumes are
# bit-identical whatever the checkpoint cadence).
HOW_NOT_WHAT = ("resume", "progress", "threads", "data", "workers", "checkpoint_every", "checkpoint_minutes",
                "keep_last", "tensorboard")
# A finished run, resumed, trains and evaluates nothing more: these may differ too, as they would apply to no step.
_MOOT_WHEN_FINISHED = ("out", "overwrite", "steps", "epochs", "log_every", "eval_every", "log_format", "device",
                       "precision", "channels_last", "compile", "cuda_graph")


class RunDirError(RuntimeError):
    """The run directory is in use, holds another run, or does not match the run being resumed."""


class RunLock:
    """``with RunLock(out):`` holds ``out/.lock`` exclusively, or raises RunDirError naming the holder."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, running since "
                       f"{holder.get('since', '?')}") if holder else "another process"
                raise RunDirError(f"{self.out} is in use by {who}: one run per directory. Wait for it to end, stop "
                                  f"it (it checkpoints on SIGTERM), or give this run another --out.") from None
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)   # releases the flock; the file stays (removing it would race a new holder)
            self.fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


# What a run writes into its directory (resnets.train.loop, .log); --overwrite moves these and only these.
RUN_ITEMS = ("config.json", "log.jsonl", "log.csv", "summary.json", "tensorboard", "checkpoints")


def run_contents(out: Path) -> list[str]:
    """What in ``out`` belongs to a run (empty: no run there)."""
    found = []
    for name in ("config.json", "log.jsonl", "log.csv", "summary.json", "tensorboard"):
        if (out / name).exists():
            found.append(name)
    ck = out / "checkpoints"
    if ck.is_dir():
        n = sum(1 for c in ck.iterdir() if not c.name.startswith("."))
        if n:
            found.append(f"{n} checkpoint(s)")
    return found


def check_fresh_start(out: Path, overwrite: bool) -> str | None:
    """Refuse (RunDirError) a fresh run in a directory holding a run; with ``overwrite``, move that run (its
    :data:`RUN_ITEMS`) to a sibling ``OUT.old-TIMESTAMP`` directory and return a sentence saying so."""
    found = run_contents(out)
    if not found:
        return None
    if not overwrite:
        raise RunDirError(f"{out} already holds a run ({', '.join(found)}). Continue it with --resume auto, or "
                          f"start over with --overwrite (the old run is moved to {out.name}.old-TIMESTAMP beside it; "
                          "nothing is deleted), or give this run another --out.")
    out = out.resolve()     # --out . has no name of its own; its sibling is named after the folder
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = out.parent / f"{out.name}.old-{stamp}"
    k = 1
    while aside.exists():
        aside = out.parent / f"{out.name}.old-{stamp}-{k}"
        k += 1
    aside.mkdir()
    for name in RUN_ITEMS:     # other files (the user's own, in --out .) stay where they are
        if (out / name).exists():
            shutil.move(str(out / name), str(aside / name))
    return f"--overwrite: the run that was in {out} ({', '.join(found)}) was moved to {aside}"


def set_aside_later_checkpoints(out: str | os.PathLike, step: int) -> Path | None:
    """A run resumed from an earlier checkpoint than its last goes another way from ``step`` on: its checkpoints
    of later steps (and a ``best`` from one of them) are of the abandoned line. Left in place, pruning (which keeps
    the highest steps) would delete the new line's checkpoints, and ``--resume auto`` would go back to the old
    line. They are moved to ``checkpoints/abandoned-TIME``, never deleted; returns that folder (None: none)."""
    d = Path(out) / "checkpoints"
    later = [c for c in ck.list_checkpoints(d) if int(c.name.split("-")[1]) > step]
    best = d / "best"
    if (best / ck.WEIGHTS).is_file():
        try:
            if ck.checkpoint_meta(best).get("step", 0) > step:
                later.append(best)
        except ck.CheckpointError:
            pass
    if not later:
        return None
    aside = d / f"abandoned-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    aside.mkdir()
    for c in later:
        os.replace(c, aside / c.name)
    return aside


def config_diffs(saved: dict[str, Any], now: dict[str, Any], skip: set[str]) -> list[str]:
    """The fields outside ``skip`` in which a run's saved config and this launch's differ, each as a phrase."""
    from ..config import TrainConfig

    saved = TrainConfig.from_dict(saved).to_dict()     # (older runs' spellings read as today's)
    return [f"{k}: {saved.get(k)!r} in the run, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if k not in skip and saved.get(k) != now.get(k)]


def check_finished_resume(saved: dict[str, Any] | None, now: dict[str, Any], out: str, step: int) -> None:
    """A run resumed at its last step trains nothing: if this launch asks for settings that would have shaped its
    training (lr, schedule, weight decay...), its results would be reported, and its config.json rewritten, under
    settings they were not trained with. Refused before anything is written."""
    if not saved:
        return
    diffs = config_diffs(saved, now, set(HOW_NOT_WHAT) | set(_MOOT_WHEN_FINISHED))
    if diffs:
        raise RunDirError(f"{out}: its run ended at step {step}, so nothing would be trained with this launch's "
                          "settings, yet it differs in " + "; ".join(diffs) + ". Train those settings as a new run "
                          "in another --out (or give --overwrite to move this one aside), or resume with the run's "
                          "own config (OUT/config.json).")


def check_resume_config(saved: dict[str, Any] | None, now: dict[str, Any], where: str) -> None:
    if not saved:
        return
    diffs = [f"{k}: {saved.get(k)!r} in the run, {now.get(k)!r} now" for k in DEFINING
             if k in saved and saved.get(k) != now.get(k)]
    if diffs:
        raise RunDirError(f"--resume {where}: this config is not the run's; it differs in " + "; ".join(diffs)
                          + ". Resume with the run's own settings (resnets train --config OUT/config.json "
                          "--resume auto), or start a new run in another --out.")


class GracefulStop:
    """While active, the first SIGTERM/SIGINT sets ``signum`` (the loop checkpoints and stops after its current
    step); a second one restores the default action and re-raises it, so the process stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:            # second signal: no more grace
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():   # signal handlers live in the main thread
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self.restore()


class StoppedBySignal(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, out: Path,
                 also: list["StoppedBySignal"] | None = None):
        self.signum, self.step, self.checkpoint, self.out = signum, step, checkpoint, out
        self.also = also or []          # runs stopped with it (side by side)
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        lines = [f"stopped by {name}; every run wrote a checkpoint and can resume exactly where it stopped:"]
        for s in [self, *self.also]:
            lines.append(f"  {s.out}: after step {s.step}, checkpoint {s.checkpoint}")
        if not self.also:
            lines.append(f"Resume with: resnets train --config {out / 'config.json'} --resume auto")
        super().__init__("\n".join(lines))

    def __reduce__(self):   # it crosses from a worker process to its parent (resnets reproduce on a CPU)
        return type(self), (self.signum, self.step, self.checkpoint, self.out, self.also)


def _from_elsewhere(resume: str, out: Path) -> bool:
    """Whether ``--resume`` names a checkpoint outside ``out`` (a run branched into a new directory)."""
    if resume == "auto":
        return False
    try:
        Path(resume).resolve().relative_to(out.resolve())
        return False
    except ValueError:
        return True


def own_run_dir(cfg, ctx) -> RunLock | None:
    """Take ``cfg.out``'s lock and check a fresh run does not mix with an old one; every rank raises the same
    RunDirError if rank 0 could not. Nothing is written to ``cfg.out`` before this succeeds."""
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = RunLock(cfg.out).__enter__()
            if cfg.resume is None or _from_elsewhere(cfg.resume, Path(cfg.out)):
                # (a checkpoint of another directory starts a run here: one already here must not be mixed in)
                moved = check_fresh_start(Path(cfg.out), cfg.overwrite)
                if moved:
                    print(moved, flush=True)
        except (RunDirError, OSError) as e:    # OSError: --overwrite could not move the old run aside
            if lock is not None:
                lock.__exit__(None, None, None)
                lock = None
            error = str(e) if isinstance(e, RunDirError) else f"{cfg.out}: {type(e).__name__}: {e}"
    if ctx.enabled:
        error = ctx.broadcast_object(error)
    if error is not None:
        if lock is not None:
            lock.__exit__(None, None, None)
        raise RunDirError(error)
    return lock


def load_resume(cfg, ctx) -> ck.Checkpoint | None:
    """The checkpoint ``cfg.resume`` names (rank 0 chooses for all ranks), checked against this run. Under
    torchrun every rank loads it (``--out`` must be visible to all ranks), and a rank that cannot makes every
    rank stop with the reason, not wait for it."""
    path, why = None, None
    if ctx.is_main:
        try:
            path = find_resume(cfg)
        except ValueError as e:
            if not ctx.enabled:
                raise
            why = str(e)
    if ctx.enabled:
        chosen, why = ctx.broadcast_object((str(path) if path is not None else None, why))
        if why is not None:
            raise ValueError(why)
        path = Path(chosen) if chosen is not None else None
    if path is None:
        return None
    resume, error = None, None
    try:
        resume = _checked_resume(path, cfg)
    except (ck.CheckpointError, OSError, ValueError) as e:
        error = e
    ctx.raise_if_any_failed(error, f"loading the checkpoint {path}")
    return resume


def _checked_resume(path: Path, cfg) -> ck.Checkpoint:
    resume = ck.load_checkpoint(path)
    if resume.state is None:
        raise ck.CheckpointError(f"{resume.path}: holds weights but no training state ({ck.STATE}); cannot resume")
    if resume.model_name != cfg.model:
        raise ck.CheckpointError(f"{resume.path}: is a checkpoint of {resume.model_name}, "
                                 f"but this run trains {cfg.model}")
    check_resume_config(resume.meta.get("config"), cfg.to_dict(), str(resume.path))
    step = resume.state["step"]
    if step == cfg.steps:
        check_finished_resume(resume.meta.get("config"), cfg.to_dict(), cfg.out, step)
    if step > cfg.steps:    # training cannot go back: the run would keep its later weights under the shorter end
        raise ck.CheckpointError(f"{resume.path}: is at step {step}, past this run's end (--steps {cfg.steps}); "
                                 f"give --steps {step} or more to go on from it, or train anew in another --out")
    return resume


def find_resume(cfg) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = ck.list_checkpoints(Path(cfg.out) / "checkpoints")
        return found[-1] if found else None
    p = Path(cfg.resume)
    if not p.exists():
        raise ValueError(f"--resume {p}: no such checkpoint")
    return p


def agree(stop: GracefulStop | None, late: bool, ctx, device: torch.device) -> tuple[bool, bool]:
    """(stop after this step, write a time-based checkpoint now). Under torchrun every rank must take the same
    decisions at the same step: one small all-reduce per step, with rank 0's clock deciding the checkpoint."""
    signalled = stop is not None and stop.signum is not None
    if not ctx.enabled:
        return signalled, late
    flags = torch.tensor([float(signalled), float(late and ctx.is_main)],
                         device=device if ctx.backend == "nccl" else "cpu")
    ctx.all_reduce_sum(flags)
    stop_now, late = flags[0].item() > 0, flags[1].item() > 0
    if stop_now and not signalled:
        stop.signum = 15          # another rank got the signal first
    return stop_now, late
