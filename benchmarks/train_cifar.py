"""CIFAR ResNet training throughput on the CPU: our training path vs a plain eager NCHW PyTorch loop, same run.

    .venv/bin/python benchmarks/train_cifar.py                          # ResNet-20 and ResNet-56, batch 128
    .venv/bin/python benchmarks/train_cifar.py --threads 1 --repeats 9 --json /tmp/train_cifar.json
    .venv/bin/python benchmarks/train_cifar.py --nets resnet110 --batch 64

Ours is what ``resnets train`` runs (channels_last input and weights, ``make_eager_step``; on a CPU
``maybe_graph_step`` keeps the eager step); the "bare" loop is the same network, same initial weights, same batch
and the same SGD (lr 0.1, momentum 0.9, weight decay 1e-4) in NCHW. One training step = forward, cross-entropy,
backward, SGD update; the data pipeline is not timed (benchmarks/input_pipeline.py times it). Implementations are
timed in alternation (ABBA), and the speed-up is the median of the per-repeat ratios; the load average is printed
with it. The goal of issue 3 is >= 1.5x; docs/performance.md says what was measured and why.
It is `python benchmarks/bench.py --cases resnet20-train resnet56-train` with a few more knobs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import bench  # noqa: E402  (benchmarks/bench.py, beside this file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", default=["resnet20", "resnet56"], choices=["resnet20", "resnet56", "resnet110"])
    p.add_argument("--batch", type=int, help="batch size (default 128, the paper's)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="write every timing to this file")
    p.add_argument("--smoke", action="store_true", help="an 8-layer net and batch 4: checks the script")
    a = p.parse_args(argv)
    opts = bench.Options(device="cpu", threads=a.threads, repeats=a.repeats, warmup=a.warmup, batch=a.batch,
                         smoke=a.smoke)
    result = bench.run_bench(opts, [f"{n}-train" for n in a.nets])
    print(bench.format_tables(result))
    if a.json:
        bench.write_json(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
