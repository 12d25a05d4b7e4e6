"""The run log: one JSON object (or CSV row) per record in OUT/log.jsonl (log.csv), optionally mirrored to
TensorBoard. A resumed run cuts the log back to its checkpoint's step, so the log reads as if it never stopped."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any


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
