"""The run log: one JSON object (or CSV row) per record in OUT/log.jsonl (log.csv), optionally mirrored to
TensorBoard. A resumed run cuts the log back to its checkpoint's step, so the log reads as if it never stopped."""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def summary_writer_class():
    """TensorBoard's SummaryWriter, or a ValueError saying what to install (asked before a run writes anything)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'resnets[tensorboard]'") from e
    return SummaryWriter


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
            SummaryWriter = summary_writer_class()
            # events of steps after the resumed one go (as in the log); the resumed step's own stay
            self.tb = SummaryWriter(str(out / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """Records after the resumed step were written by the crashed run; the resumed run writes them again."""
        if not self.path.exists():
            return
        # (a line cut short by the crash is dropped; the log is replaced whole, so a second crash here loses nothing)
        kept = [r for r in read_log(self.path, torn_tail_ok=True) if r["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            self._write_to(f, kept, header=True)
        os.replace(tmp, self.path)

    def _write_to(self, f, records: list[dict[str, Any]], header: bool) -> None:
        if self.fmt == "jsonl":
            f.writelines(json.dumps(r) + "\n" for r in records)
            return
        w = csv.DictWriter(f, self.FIELDS, extrasaction="ignore")
        if header:
            w.writeheader()
        w.writerows(records)

    def write(self, record: dict[str, Any], tb: bool = True) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            self._write_to(f, [record], header=new)
        if tb and self.tb is not None:
            for k in ("loss", "error", "top5_error", "lr", "img_per_s"):
                if record.get(k) is not None:
                    self.tb.add_scalar(f"{record['split']}/{k}", record[k], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_log(path: str | os.PathLike, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    """The records of a run's log.jsonl or log.csv, as dicts with numbers. ``torn_tail_ok``: a last record cut
    short (a crash or a full disk while it was written) is dropped; anywhere else, or without it, a record that
    does not read is a ValueError naming the file and line."""
    p = Path(path)
    rows: list[dict[str, Any]] = []
    if p.suffix == ".jsonl":
        lines = [(i, line) for i, line in enumerate(p.read_text().splitlines(), 1) if line.strip()]
        for i, line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                if torn_tail_ok and i == lines[-1][0]:
                    break
                raise ValueError(f"{p}: line {i} is not a log record ({e})") from None
        return rows
    with open(p, newline="") as f:
        records = list(csv.DictReader(f))
    for i, r in enumerate(records, 2):
        try:
            if None in r.values() or None in r:      # fewer or more fields than the header: a row cut short
                raise ValueError(f"{len([v for v in r.values() if v is not None])} fields, not {len(r)}")
            rows.append({k: (v if k == "split" else (None if v == "" else float(v) if k != "step" else int(v)))
                         for k, v in r.items()})
        except ValueError as e:
            if torn_tail_ok and i == len(records) + 1:
                break
            raise ValueError(f"{p}: line {i} is not a log record ({e})") from None
    return rows


@dataclass
class Pauses:
    """Seconds spent outside training (evaluations, checkpoints) by any of the runs that share this object. Runs
    trained side by side share one: while one run evaluates, the others do not train either, so their img/s must
    leave that time out too."""
    total: float = 0.0


class LogWindow:
    """The training loss and error summed on the device between two log lines (no host sync per step), with the
    training time since the last line. Under torchrun each rank sums its own share; :meth:`totals` adds them up."""

    def __init__(self, device: torch.device, pauses: Pauses | None = None):
        self.device = device
        self.loss = torch.zeros((), device=device, dtype=torch.float32)
        self.wrong = torch.zeros((), device=device, dtype=torch.int64)
        self.seen = 0            # images this rank took into the sums
        self.skipped = 0         # steps skipped by on_nan="skip", over the whole run
        self.pauses = pauses if pauses is not None else Pauses()
        self.t, self.paused_at_start = time.perf_counter(), self.pauses.total

    def seconds(self) -> float:
        """Training time since the last line: wall time less every pause taken meanwhile."""
        return time.perf_counter() - self.t - (self.pauses.total - self.paused_at_start)

    def add(self, loss: torch.Tensor, wrong: torch.Tensor, n: int) -> None:
        self.loss += loss.float()
        self.wrong += wrong
        self.seen += n

    def totals(self, ctx, batch: int) -> tuple[float, int | float, int | float]:
        """(mean loss per step, wrong predictions, images) since the last line, summed over ranks."""
        n_steps = self.seen / batch
        if not ctx.enabled:
            return self.loss.item() / n_steps, self.wrong.item(), self.seen
        t = ctx.all_reduce_sum(torch.stack([self.loss.double(), self.wrong.double(),
                                            torch.tensor(float(self.seen), dtype=torch.float64, device=self.device)]))
        return t[0].item() / (n_steps * ctx.world_size), t[1].item(), t[2].item()

    def reset(self) -> None:
        self.loss.zero_()
        self.wrong.zero_()
        self.seen, self.t, self.paused_at_start = 0, time.perf_counter(), self.pauses.total

    def leave_out(self, since: float) -> None:
        """Leave the time from ``since`` to now (an evaluation, a checkpoint) out of the training time of this
        window and of every window that shares its :class:`Pauses`."""
        self.pauses.total += time.perf_counter() - since

    def state(self, ctx) -> dict[str, Any]:
        """Every rank's sums since the last line, for a checkpoint: a run resumed from it logs as if it never
        stopped. All ranks must call this (a collective under torchrun)."""
        mine = torch.tensor([self.loss.item(), float(self.wrong.item()), float(self.seen)], dtype=torch.float64,
                            device=self.device if ctx.backend == "nccl" else "cpu")
        return {"per_rank": [[t[0].item(), int(t[1].item()), int(t[2].item())] for t in ctx.all_gather(mine)],
                "skipped": self.skipped, "seconds": self.seconds()}

    def restore(self, state: dict[str, Any] | None, ctx) -> None:
        if not state:
            return
        self.skipped = state["skipped"]
        if len(state["per_rank"]) == ctx.world_size:    # (a different world size starts a fresh line)
            loss, wrong, self.seen = state["per_rank"][ctx.rank]
            self.loss.fill_(loss)
            self.wrong.fill_(wrong)
            # the images already in the sums took this long before the stop (unknown in older checkpoints)
            self.t, self.paused_at_start = time.perf_counter() - state.get("seconds", 0.0), self.pauses.total
