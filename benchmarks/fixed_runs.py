"""Fixed short CPU training runs whose results are hashed: run before and after a refactor that must not change
training, and compare the two outputs (issue 14: "CPU training must stay bit-identical").

    python benchmarks/fixed_runs.py > before.txt      # ~2 min on 2 cores, real CIFAR-10 (the cache, or --data)
    ... change the code ...
    python benchmarks/fixed_runs.py > after.txt && diff before.txt after.txt && echo identical

Each run prints the SHA-256 of its final weights (every tensor's bytes, in state-dict order) and of its log
records with the wall-clock fields (img/s, elapsed) removed. The runs cover the paths a refactor of the loop can
break: the paper recipe with milestones and evaluation, a resume half-way, cifar-fast's one-cycle schedule with
Nesterov, label smoothing and bf16, a validation split, and on_nan="skip".
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from resnets.config import recipe  # noqa: E402
from resnets.train import train  # noqa: E402
from resnets.train.checkpoint import load_checkpoint  # noqa: E402

WALL = {"img_per_s", "elapsed_s", "seconds", "time"}


def digest(out: Path) -> tuple[str, str]:
    ck = load_checkpoint(sorted((out / "checkpoints").glob("step-*"))[-1])
    h = hashlib.sha256()
    for k, v in ck.weights.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    clean = [{k: v for k, v in r.items() if k not in WALL} for r in records]
    return h.hexdigest()[:16], hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    common = dict(data=args.data, progress=False, threads=2, eval_subset=500, log_every=10)
    runs = {
        "paper": recipe("cifar-paper", model="resnet20", steps=60, batch_size=64, milestones=(30, 45),
                        eval_every=30, checkpoint_every=30, **common),
        "fast": recipe("cifar-fast", model="resnet20", steps=40, batch_size=64, compile=False, eval_every=20,
                       checkpoint_every=20, **common),
        "val-skip": recipe("cifar-paper", model="plain20", model_kwargs={"depth": 8}, steps=30, batch_size=32,
                           val_split=1000, on_nan="skip", eval_every=15, checkpoint_every=15, **common),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in runs.items():
            cfg = dataclasses.replace(cfg, out=str(Path(tmp) / name))
            train(cfg)
            print(name, *digest(Path(cfg.out)), flush=True)
        # a resume half-way: the paper run stopped after 30 steps, then continued to 60
        half = dataclasses.replace(runs["paper"], out=str(Path(tmp) / "resumed"), steps=30)
        train(half)
        train(dataclasses.replace(runs["paper"], out=half.out, resume="auto"))
        print("paper-resumed", *digest(Path(half.out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
