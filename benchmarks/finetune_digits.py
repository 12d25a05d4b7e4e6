"""What fine-tuning buys (issue 16): our CIFAR-10 ResNet-20 fine-tuned on a small real data set no one here made,
against the same net trained from scratch with the same budget, on this CPU.

    pip install scikit-learn                                   # the data set ships inside its wheel
    python benchmarks/finetune_digits.py prepare /tmp/digits   # ImageFolder layout, a few seconds
    python benchmarks/finetune_digits.py sweep /tmp/digits     # choose lr / backbone_lr on a validation split
    python benchmarks/finetune_digits.py compare /tmp/digits   # the table of docs/finetune.md

The data: scikit-learn's ``digits`` (1,797 handwritten digits, 8x8 grey levels 0-16; the UCI "optdigits" test
set, Alpaydin & Kaynak 1998), scaled to 0-255 and resized to 32x32 RGB. A fixed half of each class is the test set
(DIR/val, 896 images); the training sets are the first 10 or 50 images per class of the other half (DIR-10, DIR-50),
and the sweep's validation set is 20 more images per class of that half that no training set uses.
Every arm trains with the finetune recipe's budget (30 epochs of batch 32: 90 steps on 100 images, 450 on 500),
so the budget is the same; the table reports the wall time of each too. The sweep (one seed, on sweep-10) picks
each arm's lr (and the fine-tuned arm's backbone_lr, and every arm's smallest crop area); compare then runs the
picked settings with 3 seeds on both training sets and evaluates on the test set. Output: a markdown table on stdout and DIR/finetune.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SIZES = (10, 50)           # training images per class
VAL_PER_CLASS = 20


def prepare(root: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    pool: dict[int, list[int]] = {}
    test: dict[int, list[int]] = {}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        half = len(idx) // 2
        test[c], pool[c] = idx[:half].tolist(), idx[half:].tolist()

    def write(folder: Path, picks: dict[int, list[int]]) -> None:
        for c, ids in picks.items():
            (folder / str(c)).mkdir(parents=True, exist_ok=True)
            for i in ids:
                grey = (d.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                img = Image.fromarray(grey, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB")
                img.save(folder / str(c) / f"{i:04d}.png")

    for n in SIZES:
        write(root / f"train-{n}" / "train", {c: ids[:n] for c, ids in pool.items()})
        write(root / f"train-{n}" / "val", test)
    # the sweep chooses on images that neither the training sets nor the test set hold
    n = SIZES[0]
    write(root / f"sweep-{n}" / "train", {c: ids[:n] for c, ids in pool.items()})
    write(root / f"sweep-{n}" / "val", {c: ids[max(SIZES):max(SIZES) + VAL_PER_CLASS] for c, ids in pool.items()})
    counts = {p.name: sum(1 for _ in p.rglob("*.png")) for p in sorted(root.iterdir()) if p.is_dir()}
    print(f"prepared {root}: {counts}")


def run(data: Path, arm: str, seed: int, lr: float, backbone_lr: float = 1.0, min_area: float = 0.08,
        epochs: float | None = None) -> dict:
    from resnets.config import recipe
    from resnets.train import train

    tag = f"{data.name}-{arm}-lr{lr}-b{backbone_lr}-a{min_area}-s{seed}"
    common = dict(model="resnet20", dataset="imagefolder", data=str(data), seed=seed, progress=False, workers=0,
                  threads=1, crop=32, eval_resize=32, lr=lr, crop_min_area=min_area, epochs=epochs,
                  out=str(data.parent / "runs" / tag), overwrite=True,
                  hflip=False)        # a mirrored digit is another symbol (2, 5, 7...)
    if arm == "finetune":
        common.update(weights="cifar10", backbone_lr=backbone_lr)
    elif arm == "linear-probe":
        common.update(weights="cifar10", freeze="backbone")
    elif arm != "scratch":
        raise ValueError(arm)
    cfg = recipe("finetune", **common)
    t = time.perf_counter()
    res = train(cfg)
    return {"data": data.name, "arm": arm, "seed": seed, "steps": res.step, "lr": lr, "backbone_lr": backbone_lr,
            "min_area": min_area, "error": res.final["error"], "seconds": time.perf_counter() - t,
            "loadavg": os.getloadavg()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["prepare", "sweep", "compare"])
    p.add_argument("root", type=Path)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    if args.what == "prepare":
        prepare(args.root)
        return 0
    out = args.root / "finetune.json"
    results = json.loads(out.read_text()) if out.exists() else {"sweep": [], "compare": []}

    def save():
        out.write_text(json.dumps(results, indent=1) + "\n")

    if args.what == "sweep":
        grid = [("scratch", lr, 1.0, a) for lr in (0.03, 0.1, 0.3) for a in (0.08, 0.35)]
        grid += [("finetune", lr, b, a) for lr in (0.01, 0.03, 0.1) for b in (0.1, 1.0) for a in (0.08, 0.35)]
        grid += [("linear-probe", lr, 1.0, 0.35) for lr in (0.03, 0.1, 0.3)]
        done = {(r["arm"], r["lr"], r["backbone_lr"], r["min_area"]) for r in results["sweep"]}
        for arm, lr, b, a in grid:
            if (arm, lr, b, a) in done:
                continue
            r = run(args.root / "sweep-10", arm, 0, lr, b, a)
            results["sweep"].append(r)
            save()
            print(f"| {arm} | lr {lr} | backbone x{b} | min area {a} | val error {r['error']:.2f}% | {r['steps']} steps "
                  f"| {r['seconds']:.0f} s |", flush=True)
        return 0
    best: dict[str, tuple[float, float, float]] = {}
    for arm in ("scratch", "finetune", "linear-probe"):
        rows = [r for r in results["sweep"] if r["arm"] == arm]
        if not rows:
            raise SystemExit("run the sweep first")
        top = min(rows, key=lambda r: (r["error"], r["lr"]))
        best[arm] = (top["lr"], top["backbone_lr"], top["min_area"])
    print("| training images | arm | lr (backbone x, min area) | test error % (mean ± sd over seeds) | steps | "
          "s per run |\n|---|---|---|---|---|---|")
    for n in SIZES:
        for arm, (lr, b, a) in best.items():
            rs = [run(args.root / f"train-{n}", arm, s, lr, b, a) for s in range(args.seeds)]
            results["compare"] += rs
            save()
            errs = [r["error"] for r in rs]
            sd = statistics.stdev(errs) if len(errs) > 1 else 0.0
            print(f"| {10 * n} | {arm} | {lr} (x{b}, {a}) | {statistics.mean(errs):.2f} ± {sd:.2f} "
                  f"({', '.join(f'{e:.2f}' for e in errs)}) | {rs[0]['steps']} | "
                  f"{statistics.mean(r['seconds'] for r in rs):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
