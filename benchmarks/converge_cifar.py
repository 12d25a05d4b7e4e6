"""Time to the paper's accuracy: train a CIFAR net with a recipe and report test error against wall time.

    python benchmarks/converge_cifar.py run resnet20 --out runs/r20-fast          # resnets train --recipe cifar-fast
    python benchmarks/converge_cifar.py report runs/r20-fast                       # table + figure of a run

``run`` is ``resnets train --model NET --recipe cifar-fast --threads 2`` with the load average recorded before and
after; ``report`` reads the run's log.jsonl and writes OUT/convergence.png (test error against wall-clock minutes)
and OUT/convergence.json, and prints the test error reached by 15, 30, 45 and 60 minutes and when the target
(Table 6's error for the net) was first reached. The numbers are a benchmark run on a quiet machine, never a test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnets.models.paper import TABLE6_ERROR  # noqa: E402
from resnets.train import read_log  # noqa: E402


def training_clock(rows: list[dict]) -> list[dict]:
    """The log with elapsed_s counted over all launches. Runs resumed before checkpoints kept their time restarted
    it at 0 in each launch; a launch goes on from the last record before it (its checkpoint's step: the log is
    cut there on resume)."""
    out, offset, last = [], 0.0, 0.0
    for r in rows:
        if "elapsed_s" in r:
            if r["elapsed_s"] + offset < last:
                offset = last
            r = {**r, "elapsed_s": r["elapsed_s"] + offset}
            last = r["elapsed_s"]
        out.append(r)
    return out


def report(out: Path, target: float | None = None, marks=(15, 30, 45, 60)) -> dict:
    rows = read_log(out / "log.jsonl")
    cfg = json.loads((out / "config.json").read_text())
    depth = cfg.get("model_kwargs", {}).get("depth") or int("".join(c for c in cfg["model"] if c.isdigit()) or 0)
    if target is None and not cfg["model"].startswith("plain"):    # Table 6 lists ResNets only
        target = TABLE6_ERROR.get(depth)
    rows = training_clock(rows)
    evals = [(r["elapsed_s"] / 60, r["error"], r["step"]) for r in rows if r["split"] in ("test", "val")]
    train = [(r["elapsed_s"] / 60, r["error"]) for r in rows if r["split"] == "train"]
    at = {}
    for m in marks:
        done = [e for e in evals if e[0] <= m]
        at[m] = {"error": done[-1][1], "step": done[-1][2], "minute": round(done[-1][0], 1)} if done else None
    reached = next(({"minute": round(t, 1), "step": s, "error": e} for t, e, s in evals
                    if target is not None and e <= target), None)
    res = {"run": str(out), "model": cfg["model"], "recipe": cfg["recipe"], "target_error": target,
           "final": {"error": evals[-1][1], "minute": round(evals[-1][0], 1), "step": evals[-1][2]} if evals else None,
           "at_minutes": at, "target_reached": reached, "evals": evals}
    (out / "convergence.json").write_text(json.dumps(res, indent=1) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([t for t, _ in train], [e for _, e in train], "--", alpha=0.6, label="training error (augmented batches)")
    ax.plot([t for t, _, _ in evals], [e for _, e, _ in evals], "o-", lw=2, label="test error (10k images)")
    if target is not None:
        ax.axhline(target, color="k", lw=0.8, ls=":", label=f"paper, Table 6: {target}%")
    for m in marks:
        ax.axvline(m, color="grey", lw=0.5, alpha=0.5)
    ax.set_xlabel("wall-clock minutes")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 40)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{cfg['model']}, recipe {cfg['recipe']}")
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=120)
    return res


def print_report(res: dict) -> None:
    print(f"{res['model']} ({res['recipe']}), {res['run']}")
    print("| minutes | test error % | at step |\n|---|---|---|")
    for m, v in res["at_minutes"].items():
        print(f"| {m} | {v['error']:.2f} | {v['step']} |" if v else f"| {m} | - | - |")
    f = res["final"]
    print(f"final: {f['error']:.2f}% at {f['minute']} min (step {f['step']}); target {res['target_error']}%: "
          + (f"reached at {res['target_reached']['minute']} min" if res["target_reached"] else "not reached"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("--out", required=True)
    r.add_argument("--recipe", default="cifar-fast")
    r.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("report")
    q.add_argument("out")
    q.add_argument("--target", type=float)
    # Unknown flags after `run NET` go to `resnets train` (argparse.REMAINDER would also swallow --out there).
    args, extra = p.parse_known_args(argv)
    if extra and args.cmd != "run":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if args.cmd == "run":
        load0 = os.getloadavg()
        t0 = time.time()
        cmd = [sys.executable, "-m", "resnets.cli", "train", "--model", args.model, "--recipe", args.recipe,
               "--threads", str(args.threads), "--out", args.out, "--no-progress", *args.extra]
        rc = subprocess.call(cmd)
        info = {"command": " ".join(cmd[2:]), "wall_s": time.time() - t0, "loadavg_start": load0,
                "loadavg_end": os.getloadavg(), "exit": rc}
        (Path(args.out) / "machine.json").write_text(json.dumps(info, indent=1) + "\n")
        if rc:
            return rc
    print_report(report(Path(args.out), getattr(args, "target", None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
