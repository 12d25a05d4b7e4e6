"""Input-pipeline throughput: our on-device ``DeviceLoader`` vs a torchvision ``DataLoader`` + ``transforms``.

Both produce augmented, normalised CIFAR training batches (4-pixel zero pad + random 32x32 crop + horizontal flip,
per-channel normalisation, batch 128, float32 NCHW):

* ours:        ``resnets.data.DeviceLoader`` (whole uint8 set as one tensor, batched gather on the device)
* torchvision: ``Dataset`` of uint8 HWC arrays -> PIL image -> ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)``, through ``DataLoader`` with
  ``num_workers`` 0 and 2 (``--workers``)

Run (from the repository root)::

    .venv/bin/python benchmarks/input_pipeline.py                       # random uint8 data of CIFAR-10's shape
    .venv/bin/python benchmarks/input_pipeline.py --data DIR            # real CIFAR-10 (DIR holds cifar-10-batches-py)
    .venv/bin/python benchmarks/input_pipeline.py --batches 200 --repeats 3 --workers 0 2 --device cpu --threads 1

Each pipeline is timed ``--repeats`` times, interleaved (shared machines are noisy); the table shows the best and
the median img/s, and the ratio ours / torchvision on the best numbers. Warm-up (first batch, worker start-up)
is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from resnets.data import DeviceLoader, Normalizer, load_cifar  # noqa: E402


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 HWC images converted to PIL per item (what torchvision's CIFAR10 dataset does)."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(images, labels, device, n_batches: int, batch_size: int, seed: int) -> float:
    norm = Normalizer("channel", images)
    loader = DeviceLoader(images, labels, batch_size, device, train=True, normalizer=norm, seed=seed)
    loader.batch(0)  # warm-up (permutation of epoch 0, allocator)
    _sync(device)
    t0 = time.perf_counter()
    for step in range(1, n_batches + 1):
        x, y = loader.batch(step)
    _sync(device)
    assert x.shape == (batch_size, 3, 32, 32) and x.dtype == torch.float32
    return n_batches * batch_size / (time.perf_counter() - t0)


def time_torchvision(images, labels, workers: int, n_batches: int, batch_size: int, seed: int) -> float:
    from torchvision import transforms

    x = torch.from_numpy(images[:10000])
    mean = (x.double().mean((0, 2, 3)) / 255).tolist()
    std = (x.double().permute(1, 0, 2, 3).reshape(3, -1).std(1) / 255).tolist()
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    ds = ArrayDataset(np.ascontiguousarray(images.transpose(0, 2, 3, 1)), labels, tf)
    g = torch.Generator().manual_seed(seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                     generator=g, persistent_workers=workers > 0)
    it = iter(dl)
    next(it)  # warm-up, includes worker start-up
    done = 0
    t0 = time.perf_counter()
    while done < n_batches:
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(dl)
            continue
        done += 1
    elapsed = time.perf_counter() - t0
    assert xb.shape == (batch_size, 3, 32, 32) and xb.dtype == torch.float32
    del it, dl
    return n_batches * batch_size / elapsed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="folder holding cifar-10-batches-py (default: random uint8 data, same shape)")
    ap.add_argument("--batches", type=int, default=200, help="timed batches per run (default 200)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="torchvision num_workers (default 0 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline (default 3)")
    ap.add_argument("--device", default="cpu", help="device for our loader (default cpu)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads in the main process (default: torch's default). On a shared, busy "
                         "machine 1 is far steadier; DataLoader workers always use 1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.data:
        d = load_cifar("cifar10", root=args.data, download=False)
        images, labels, what = d.train_images, d.train_labels, f"CIFAR-10 train ({d.source})"
    else:
        rng = np.random.default_rng(args.seed)
        images = rng.integers(0, 256, (50000, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, 50000).astype(np.int64)
        what = "random uint8 (50000, 3, 32, 32)"
    device = torch.device(args.device)

    results: dict[str, list[float]] = {"ours": []}
    for w in args.workers:
        results[f"tv{w}"] = []
    for r in range(args.repeats):
        results["ours"].append(time_ours(images, labels, device, args.batches, args.batch_size, args.seed + r))
        for w in args.workers:
            results[f"tv{w}"].append(time_torchvision(images, labels, w, args.batches, args.batch_size,
                                                      args.seed + r))

    best_ours = max(results["ours"])
    print(f"data: {what}; {args.batches} batches of {args.batch_size} per run, {args.repeats} runs; "
          f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
    print("| pipeline | device | workers | best img/s | median img/s | ours / this (best) |")
    print("|---|---|---|---:|---:|---:|")
    print(f"| resnets DeviceLoader | {device} | - | {best_ours:,.0f} | {statistics.median(results['ours']):,.0f} | "
          f"1.0x |")
    for w in args.workers:
        rs = results[f"tv{w}"]
        print(f"| torchvision DataLoader + transforms | cpu | {w} | {max(rs):,.0f} | {statistics.median(rs):,.0f} | "
              f"{best_ours / max(rs):.1f}x |")


if __name__ == "__main__":
    main()
