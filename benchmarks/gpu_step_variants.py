"""Where a CIFAR net's captured training step spends its time on a GPU, and which step variants are faster (issue 15:
ResNet-20 <= 1.5 ms and ResNet-56 <= 3 ms per step at batch 128 on an H100).

    python3 benchmarks/gpu_step_variants.py --out $OUT            # a GPU: about 3 min (torch.compile is most of it)
    python3 benchmarks/gpu_step_variants.py --smoke               # any machine: checks the script (no graphs on a CPU)

Every variant is a whole training step (forward, cross-entropy, backward, SGD with momentum 0.9 and weight decay
1e-4) captured in one CUDA graph by ``resnets.train.graphs.StaticStep``, on synthetic data, and replayed. Variants
change one thing each against the step training uses today (bf16 autocast, channels_last, torch's default foreach
SGD): the fused SGD kernel, NCHW, fp32 (TF32 convolutions), and torch.compile of the forward inside the capture.

The profile part counts the GPU kernels of one replayed step and sums their durations (torch.profiler, CUPTI): a
step whose kernel time is far below its wall time is bound by the gaps between kernels; one whose kernel time is
close to it is bound by the kernels themselves (many small ones, each under-filling the GPU).
Output: tables on stdout as each part ends, and OUT/gpu_step_variants.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from resnets.models import create_model  # noqa: E402
from resnets.train.graphs import StaticStep  # noqa: E402

# name -> (autocast dtype or None, channels_last, SGD fused, compile the forward)
VARIANTS = {
    "today: bf16, channels_last, foreach SGD": (torch.bfloat16, True, False, False),
    "fused SGD": (torch.bfloat16, True, True, False),
    "NCHW": (torch.bfloat16, False, False, False),
    "fp32 (TF32)": (None, True, False, False),
    "fp32 (TF32), NCHW, fused SGD": (None, False, True, False),
    "compile in graph": (torch.bfloat16, True, False, True),
    "compile in graph, fused SGD": (torch.bfloat16, True, True, True),
}


def build(name: str, variant, batch: int, device: torch.device, depth: int | None):
    dtype, cl, fused, compiled = variant
    torch.manual_seed(0)
    mf = torch.channels_last if cl else torch.contiguous_format
    kwargs = {"depth": depth} if depth else {}
    model = create_model(name, **kwargs).to(device, memory_format=mf).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          **({"fused": True} if fused else {}))

    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)

    cuda = device.type == "cuda"
    s = StaticStep(model, opt, autocast, (batch, 3, 32, 32), device, mf, capture=cuda, compile=compiled and cuda)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=mf)
    y = torch.randint(0, 10, (batch,), device=device)
    losses = [float(s(x, y)[0]) for _ in range(6)]     # 3 warm-up steps, the capture, 2 replays
    return s, losses


def timed_ms(fn, cuda: bool, rounds: int, repeats: int) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(rounds):
            fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000 / rounds)
    return statistics.median(times)


def kernel_profile(replay, steps: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    by = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by[e.name][0] += 1
        by[e.name][1] += e.device_time
    top = sorted(by.items(), key=lambda kv: -kv[1][1])[:12]
    return {"kernels_per_step": len(kernels) / steps, "kernel_ms_per_step": sum(e.device_time for e in kernels)
            / steps / 1000, "top": [{"name": k[:90], "calls_per_step": v[0] / steps, "ms_per_step": v[1] / steps / 1000}
                                    for k, v in top]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--nets", nargs="+", default=["resnet20", "resnet56", "resnet110"])
    p.add_argument("--compile-nets", nargs="*", default=["resnet20", "resnet56"],
                   help="nets that also get the torch.compile variants (each compile takes ~1 min)")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch, depth = (16, 8) if args.smoke else (128, None)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "batch": batch, "rows": [], "profiles": [], "errors": []}
    print(f"[variants] {res['device']}, torch {res['torch']}, batch {batch}", flush=True)

    def save():
        (out / "gpu_step_variants.json").write_text(json.dumps(res, indent=1) + "\n")

    for net in args.nets:
        base = None
        print(f"\n{net}, batch {batch}: ms per captured step\n| variant | ms/step | vs today | losses after "
              "warm-up, capture |\n|---|---|---|---|", flush=True)
        for vname, variant in VARIANTS.items():
            if variant[3] and net not in args.compile_nets:
                continue
            t = time.perf_counter()
            try:
                s, losses = build(net, variant, batch, device, depth)
                replay = s.graph.replay if cuda else s._eager
                ms = timed_ms(replay, cuda, 3 if args.smoke else args.rounds, 2 if args.smoke else args.repeats)
                base = base if base is not None else ms
                row = {"net": net, "variant": vname, "ms": ms, "vs_today": base / ms, "losses": losses,
                       "setup_s": time.perf_counter() - t - ms * args.rounds * args.repeats / 1000}
                res["rows"].append(row)
                print(f"| {vname} | {ms:.3f} | {base / ms:.2f}x | {' '.join(f'{v:.3f}' for v in losses)} |",
                      flush=True)
                if cuda and vname.startswith("today") or (cuda and vname == "compile in graph, fused SGD"):
                    prof = kernel_profile(replay)
                    prof.update(net=net, variant=vname, wall_ms=ms)
                    res["profiles"].append(prof)
                    print(f"|   profile: {prof['kernels_per_step']:.0f} kernels, {prof['kernel_ms_per_step']:.3f} ms "
                          f"of kernel time per step ({ms:.3f} wall) | | | |", flush=True)
                del s
            except Exception as e:     # one failing variant must not cost the others
                res["errors"].append({"net": net, "variant": vname, "error": f"{type(e).__name__}: {e}"[:500],
                                      "tb": traceback.format_exc()[-3000:]})
                print(f"| {vname} | FAILED: {type(e).__name__}: {str(e)[:200]} | | |", flush=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            save()
    for prof in res["profiles"]:
        print(f"\ntop kernels, {prof['net']} / {prof['variant']} ({prof['kernels_per_step']:.0f} kernels, "
              f"{prof['kernel_ms_per_step']:.3f} ms kernel time, {prof['wall_ms']:.3f} ms wall per step)\n"
              "| kernel | calls/step | ms/step |\n|---|---|---|", flush=True)
        for k in prof["top"]:
            print(f"| {k['name']} | {k['calls_per_step']:.0f} | {k['ms_per_step']:.3f} |", flush=True)
    save()
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
