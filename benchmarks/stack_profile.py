"""Where a stacked step's time goes (issue 15): grouped convolutions against one net's, layouts, a kernel profile.

    python3 benchmarks/stack_profile.py --out $OUT        # a GPU: about 2 min
    python3 benchmarks/stack_profile.py --smoke           # any machine, seconds (tiny sizes; checks the script)

Why: on 2026-11-27 (H200, docs/gpu/2026-11-27-h200-c) the paper's nine nets stacked into one network took 23.05 ms
per round against 46.01 ms one at a time, 2.00x, below the 2.3-3.6x predicted from the kernel count
(docs/performance.md). Stacked by depth, where most kernels are twice one net's width, one stream gave 1.12x for
1.59x fewer kernels. So a wider, grouped kernel costs more than a latency-bound kernel should. Four parts, in
this order, each printed as soon as it is done and written to OUT/stack_profile.json:

1. syncs: how often the CPU waits for the GPU in real stacked training (``train_side_by_side(stack=True)``,
   synthetic CIFAR-format data), counted by ``torch.cuda.set_sync_debug_mode`` in two trainings of different
   lengths: their difference per step is the steady state, and each call is listed by the line of Python that
   made it. Until the fifth session every run's batch made three blocking copies of its crop offsets and flips;
   now one pinned, non-blocking copy. On 2026-11-28 one 60-step count (set-up included) gave 55 per step, which
   could not tell set-up from steady state. Expected: none per step in the steady state.
2. convs: one 3x3 convolution of G nets (G groups of C channels, batch 128, bf16) forward and backward, against
   one net's convolution run G times, and against the same G nets as one dense convolution whose weight is
   block-diagonal (G times the arithmetic, one ungrouped kernel; timed with a full weight, as a dense kernel does
   the same work whatever the values); channels_last and NCHW; each captured in a CUDA graph. Ratio = grouped /
   (G x one net's): 1/G would be free width, 1 no gain. On 2026-11-28 the 32-channel capture failed inside cuDNN;
   a width whose capture fails is timed again uncaptured, each call synchronised (its rows say captured: false).

3. profile: the kernels of a few eager steps of the nine stacked and of the deepest (ResNet-110) alone, summed by
   kind (convolution, batch norm, optimizer, copy/cat, other), with the top kernels. GPU busy time per step
   against the captured step's wall time says whether the kernels or the gaps between them cost the time.
4. layouts: the captured step of all nine stacked, bf16 channels_last (what runs now), bf16 NCHW, without
   cudnn.benchmark (as side_by_side.py's graphs part ran on 2026-11-27: 13-14% slower for one net), fp32 (TF32)
   channels_last, and with ``torch.compile`` of the forward inside the graph (1.28x for one ResNet-56 on the
   H200; the stacked network compiles with no graph break on the CPU, untried on a GPU). Last, as compiling is
   slow.

Each part, and each width of part 2, runs in a process of its own (see ``run_job``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from resnets.train.runtime import pick_runtime  # noqa: E402
from side_by_side import NINE, stacked_statics  # noqa: E402

KINDS = (("convolution", ("conv", "xmma", "implicit", "wgrad", "dgrad", "gemm", "cudnn", "cutlass")),
         ("batch norm", ("batch_norm", "batchnorm", "bn_", "welford")),
         ("optimizer", ("foreach", "multi_tensor")),
         ("copy/cat", ("copy", "cat", "gather", "index")))


def log(msg: str) -> None:
    print(msg, flush=True)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def timed(fn, cuda: bool, iters: int, repeats: int = 5, capture: bool = True) -> float:
    """ms per call of ``fn``, median of ``repeats``: on a GPU ``iters`` calls captured in one CUDA graph and
    replayed (no launch cost, as in the training step), or (``capture=False``) called and synchronised; on the
    CPU plain calls."""
    if cuda and capture:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1000 / iters)
        return statistics.median(out)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        out.append((time.perf_counter() - t0) * 1000 / iters)
    return statistics.median(out)


def conv_fwd_bwd(x: torch.Tensor, w: torch.Tensor, groups: int):
    """Forward and both backward convolutions (input and weight gradients) of one 3x3 layer, as in training."""
    x = x.requires_grad_()
    w = w.requires_grad_()

    def fn():
        out = F.conv2d(x, w, padding=1, groups=groups)
        torch.autograd.grad(out, (x, w), out)     # a gradient of the output's shape; its values do not matter
    return fn


def convs_part(batch: int, gs: list[int], widths: list[tuple[int, int]], device, dtype, iters: int,
               capture: bool = True) -> list[dict]:
    cuda = device.type == "cuda"
    rows = []
    for c, hw in widths:
        for fmt_name, fmt in (("channels_last", torch.channels_last), ("NCHW", torch.contiguous_format)):
            def make(cin, cout, groups):
                x = torch.randn(batch, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
                w = (torch.randn(cout, cin // groups, 3, 3, device=device, dtype=dtype) * 0.1
                     ).contiguous(memory_format=fmt)
                return conv_fwd_bwd(x, w, groups)
            one = timed(make(c, c, 1), cuda, iters, capture=capture)
            for g in gs:
                grouped = timed(make(g * c, g * c, g), cuda, iters, capture=capture)
                ones = [make(c, c, 1) for _ in range(g)]
                separate = timed(lambda: [f() for f in ones], cuda, max(1, iters // g), capture=capture)
                dense = timed(make(g * c, g * c, 1), cuda, iters, capture=capture)
                rows.append({"C": c, "HW": hw, "layout": fmt_name, "G": g, "one_ms": one, "separate_ms": separate,
                             "grouped_ms": grouped, "dense_blockdiag_ms": dense,
                             "ratio_grouped_vs_separate": grouped / separate})
                r = rows[-1]
                log(f"| {c} | {hw}x{hw} | {fmt_name} | {g} | {one:.3f} | {separate:.3f} | {grouped:.3f} | "
                    f"{dense:.3f} | {r['ratio_grouped_vs_separate']:.2f} |")
    return rows


def layouts_part(nets, batch: int, rounds: int) -> dict:
    base = pick_runtime("auto")
    cuda = base.device.type == "cuda"
    variants = {"as trained": (base, False, True), "NCHW": (replace(base, channels_last=False), False, True)}
    if cuda:
        variants["cudnn.benchmark off"] = (base, False, False)     # as side_by_side.py ran on 2026-11-27
        variants["fp32 (TF32)"] = (pick_runtime("auto", precision="fp32"), False, True)
        variants["torch.compile in the graph"] = (base, True, True)     # last: one compile of the whole stack
    tf32, bench = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32 = True
    out = {}
    try:
        for name, (rt, compile, benchmark) in variants.items():
            torch.backends.cudnn.benchmark = benchmark and cuda
            t0 = time.perf_counter()
            (step,) = stacked_statics(nets, batch, rt, compile=compile, by_depth=False)
            setup = time.perf_counter() - t0
            run = step.graph.replay if cuda else step._eager
            out[name] = timed(run, cuda, rounds, capture=False)     # already captured (or eager here)
            log(f"| {name} ({rt.describe()}) | {out[name]:.2f} | {setup:.0f} |")
            del step, run
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = tf32, bench
    return out


def profile_part(nets, batch: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    rt = pick_runtime("auto")
    cuda = rt.device.type == "cuda"
    res = {}
    cases = {"all stacked": sorted(nets, key=lambda nd: -nd[1]), "deepest alone": [max(nets, key=lambda nd: nd[1])]}
    for name, group in cases.items():
        (step,) = stacked_statics(group, batch, rt, compile=False, by_depth=False, capture=False)   # warmed up
        x = torch.randn(batch, 3 * len(group), 32, 32, device=rt.device).contiguous(memory_format=rt.memory_format)
        y = torch.randint(0, 10, (batch, len(group)), device=rt.device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step(x, y)
            if cuda:
                torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            dev = str(getattr(e, "device_type", "")).endswith("CUDA")
            if cuda and not dev:
                continue
            us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) if cuda \
                else e.self_cpu_time_total
            if us > 0:
                kernels[e.key] = (kernels.get(e.key, (0, 0))[0] + e.count, kernels.get(e.key, (0, 0))[1] + us)
        kinds: dict[str, list] = {}
        for k, (n, us) in kernels.items():
            kk = kinds.setdefault(kind_of(k), [0, 0.0])
            kk[0] += n
            kk[1] += us
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:20]
        per = {k: {"kernels_per_step": n / steps, "ms_per_step": us / steps / 1000} for k, (n, us) in kinds.items()}
        busy = sum(v["ms_per_step"] for v in per.values())
        res[name] = {"nets": [f"{n}-{d}" for n, d in group], "steps": steps,
                     "what": "CUDA kernels" if cuda else "CPU ops (self time)",
                     "busy_ms_per_step": busy, "by_kind": per,
                     "top": [{"name": k[:120], "calls_per_step": n / steps, "ms_per_step": us / steps / 1000}
                             for k, (n, us) in top]}
        log(f"\n{name} ({', '.join(res[name]['nets'])}): {res[name]['what']}, {busy:.2f} ms busy per step "
            f"({sum(v['kernels_per_step'] for v in per.values()):.0f} per step)")
        log("| kind | per step | ms per step | share |\n|---|---|---|---|")
        for k, v in sorted(per.items(), key=lambda kv: -kv[1]["ms_per_step"]):
            log(f"| {k} | {v['kernels_per_step']:.0f} | {v['ms_per_step']:.2f} | {v['ms_per_step'] / busy:.0%} |")
        log("| top kernel | calls per step | ms per step |\n|---|---|---|")
        for t in res[name]["top"][:10]:
            log(f"| {t['name'][:90]} | {t['calls_per_step']:.0f} | {t['ms_per_step']:.3f} |")
        del step
    return res


def _count_syncs(nets, batch: int, steps: int, root: Path) -> tuple[int, dict[str, int], float]:
    """Synchronising calls in one stacked training of ``steps`` steps, by the line of Python that made them."""
    import warnings
    from side_by_side import synthetic_cifar
    from resnets.config import recipe
    from resnets.train.side_by_side import train_side_by_side
    cuda = torch.cuda.is_available()
    cfgs = [recipe("cifar-paper", model=f"{n}20", model_kwargs={"depth": d}, steps=steps, seed=i, batch_size=batch,
                   milestones=(10 * steps,), eval_every=10 * steps, eval_subset=500, log_every=steps,
                   checkpoint_every=0, progress=False, warmup_lr=None, out=str(root / f"{steps}-{i}-{n}{d}"))
            for i, (n, d) in enumerate(nets)]
    data = synthetic_cifar(max(20 * batch, 2000), 500)
    repo = str(Path(__file__).resolve().parents[1]) + "/"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        try:
            train_side_by_side(cfgs, data=data, stack=True)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        wall = time.perf_counter() - t0
    where: dict[str, int] = {}
    n = 0
    for w in caught:
        if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message):
            n += 1
            at = f"{w.filename.replace(repo, '')}:{w.lineno}"
            where[at] = where.get(at, 0) + 1
    return n, where, wall


def syncs_part(nets, batch: int, steps: tuple[int, int], root: Path) -> dict:
    """Two trainings that differ only in their number of steps: the difference of their counts is what each step
    costs in the steady state, with set-up, capture, logging and the final evaluation taken out."""
    cuda = torch.cuda.is_available()
    (n1, w1, t1), (n2, w2, t2) = (_count_syncs(nets, batch, s, root) for s in steps)
    per_step = (n2 - n1) / (steps[1] - steps[0])
    steady = {k: (w2.get(k, 0) - w1.get(k, 0)) / (steps[1] - steps[0]) for k in set(w1) | set(w2)}
    steady = {k: v for k, v in sorted(steady.items(), key=lambda kv: -kv[1]) if v}
    res = {"runs": len(nets), "steps": list(steps), "syncs": [n1, n2], "wall_s": [t1, t2], "checked": cuda,
           "syncs_per_step": per_step, "steady_by_line": steady,
           "by_line": dict(sorted(w2.items(), key=lambda kv: -kv[1]))}
    log(f"{len(nets)} runs stacked: {n1} synchronising calls in {steps[0]} steps, {n2} in {steps[1]}: "
        f"{per_step:.2f} per step in the steady state{'' if cuda else ' (not checked: no GPU)'}")
    for k, v in list(steady.items())[:8]:
        log(f"  {v:.2f} per step at {k}")
    for k, v in list(res["by_line"].items())[:8]:
        log(f"  {v} in the {steps[1]}-step run at {k}")
    return res


def jobs_for(parts: list[str], smoke: bool) -> list[str]:
    widths = ["4x8"] if smoke else ["16x32", "32x16", "64x8"]
    return [j for p in parts for j in ([f"convs:{w}" for w in widths] if p == "convs" else [p])]


def run_job(job: str, smoke: bool, capture: bool, json_path: Path):
    """One part (or one convolution width) in a process of its own: a CUDA graph capture that fails inside cuDNN
    leaves the process's CUDA random generator in capture state (2026-11-28, H200), and every part after it in
    that process failed with "Offset increment outside graph capture"."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", job, "--json", str(json_path)]
    cmd += ["--smoke"] * smoke + ["--no-capture"] * (not capture)
    return subprocess.run(cmd).returncode


def sizes(smoke: bool) -> tuple[int, list[tuple[str, int]]]:
    """(batch, nets): the paper's, or tiny ones that check the script on any machine."""
    return (8, [("resnet", 14), ("plain", 8)]) if smoke else (128, NINE)


def child(job: str, smoke: bool, capture: bool) -> object:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cudnn.benchmark = True      # as training does; "layouts" also times the stack without it
    device = torch.device("cuda" if cuda else "cpu")
    batch, nets = sizes(smoke)
    if job == "syncs":
        with tempfile.TemporaryDirectory() as tmp:
            return syncs_part(nets, batch, (3, 6) if smoke else (20, 60), Path(tmp))
    if job.startswith("convs:"):
        if capture and os.environ.get("STACK_PROFILE_FAIL_CAPTURE"):    # the test of the uncaptured retry
            raise RuntimeError("capture failed (STACK_PROFILE_FAIL_CAPTURE)")
        c, hw = (int(v) for v in job.split(":")[1].split("x"))
        return convs_part(batch, [2] if smoke else [2, 5, 9], [(c, hw)], device,
                          torch.bfloat16 if cuda else torch.float32, 2 if smoke else 20, capture)
    if job == "profile":
        return profile_part(nets, batch, 2 if smoke else 5)
    if job == "layouts":
        return layouts_part(nets, batch, 2 if smoke else 30)
    raise ValueError(f"unknown job {job!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("stack-profile-out"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes and nets, for any machine")
    p.add_argument("--parts", nargs="*", default=["syncs", "convs", "profile", "layouts"])
    p.add_argument("--job", help=argparse.SUPPRESS)          # a child process: one part, or one width of convs
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--no-capture", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    if args.job:
        args.json.write_text(json.dumps(child(args.job, smoke, not args.no_capture)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    batch, nets = sizes(smoke)
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "cudnn_benchmark": cuda, "date": time.strftime("%Y-%m-%d"), "smoke": smoke,
           "nets": [f"{n}-{d}" for n, d in nets], "errors": []}
    log(f"[stack_profile] {res['device']}, torch {res['torch']}, smoke={smoke}")
    headers = {
        "convs": "\nconvolution 3x3 forward+backward, batch %d, ms:\n| C | HW | layout | G | one net | G nets one "
                 "after another | G nets grouped | G nets dense block-diagonal | grouped / separate |\n"
                 "|---|---|---|---|---|---|---|---|---|" % batch,
        "layouts": "\nall %d nets stacked in one network, captured step, ms per round:\n| variant | ms | set-up s |\n"
                   "|---|---|---|" % len(nets)}
    shown = set()
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs_for(args.parts, smoke):
            name = job.split(":")[0]
            if name in headers and name not in shown:
                log(headers[name])
                shown.add(name)
            t0, path, capture = time.time(), Path(tmp) / "job.json", True
            path.unlink(missing_ok=True)
            rc = run_job(job, smoke, capture, path)
            if rc and name == "convs":
                log(f"[stack_profile] {job}: failed with its timings captured; again, each call synchronised")
                capture = False
                rc = run_job(job, smoke, capture, path)
            if rc or not path.exists():
                res["errors"].append(f"{job}: exit {rc} (its traceback is above)")
            elif name == "convs":
                res.setdefault("convs", []).extend(dict(r, captured=capture and cuda)
                                                   for r in json.loads(path.read_text()))
            else:
                res[name] = json.loads(path.read_text())
            log(f"[stack_profile] {job}: {time.time() - t0:.1f} s")
            (args.out / "stack_profile.json").write_text(json.dumps(res, indent=1))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
