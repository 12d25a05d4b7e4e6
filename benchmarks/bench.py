"""Throughput of our training step and inference against a bare PyTorch loop, torchvision and timm, in one process.

    python benchmarks/bench.py                                 # the CPU cases, a few minutes on a 2-core CPU
    python benchmarks/bench.py --threads 1 --json bench.json   # pin torch's threads; write every timing as JSON
    python benchmarks/bench.py --cases resnet20-train resnet50-infer    # some cases only (`--list` shows them)
    python benchmarks/bench.py --device cuda                   # the GPU cases (benchmarks/gpu_suite.sh runs them all)

A harness, not part of the package (as timm keeps its benchmark.py beside it): it imports the checkout it sits in.

What is compared (docs/performance.md has the numbers and what each optimisation buys):

* CIFAR ResNet-20/56/110 training step (forward, loss, backward, SGD update on one fixed batch of 128):
  ours is the path ``resnets train`` takes: ``pick_runtime`` (channels_last; bf16 autocast on a GPU),
  ``make_eager_step`` and ``maybe_graph_step`` (a whole-step CUDA graph on a GPU, eager on a CPU). The peer is the
  same network in a plain loop: on the CPU eager NCHW fp32 (the "bare" loop), on a GPU eager with the same
  precision and memory format, so the ratio isolates the graph.
* ResNet-50 training step: our ResNet-50 (torchvision's layout, v1.5) on our path vs ``torchvision.models.resnet50``
  and ``timm`` ``resnet50`` in the same plain loop (CPU: NCHW fp32, their default; GPU: bf16 autocast +
  channels_last).
* ResNet-50 inference: ``resnets.models.inference.inference_model`` (BN folded, channels_last, compiled) on the
  torchvision model's own weights vs torchvision eager (CPU) or ``torch.compile``d (GPU), with the max logit
  difference recorded.

Fair timing: every implementation of a case is built first and warmed up; then each repeat times every
implementation in turn, the order reversed on every other repeat (ABBA) so a drifting machine load falls on all of
them alike. Speeds are medians over repeats; a ratio is the median of the per-repeat ratios (each from the same
moment). The table records the threads torch uses and ``os.getloadavg()`` before and after each case: on a shared
machine, compare ratios from one run, not img/s across runs.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this file sits in

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from resnets.models import create_model, from_torchvision  # noqa: E402
from resnets.models.inference import inference_model, max_logit_error  # noqa: E402
from resnets.train.graphs import StaticStep, maybe_graph_step  # noqa: E402
from resnets.train.step import make_eager_step  # noqa: E402
from resnets.train.runtime import Runtime, pick_runtime  # noqa: E402

# Paper recipe (Sec. 4.2 / 3.4) for every SGD in the benchmark, ours and peers alike.
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4


@dataclass(frozen=True)
class CaseSpec:
    name: str
    what: str                   # "train" | "infer"
    model: str                  # our registry name
    batch: dict[str, int]       # per device type
    size: int                   # input pixels (square)
    goal: dict[str, tuple[str, float]] = field(default_factory=dict)   # device -> (peer key or "img/s", value)
    note: str = ""


CASES: dict[str, CaseSpec] = {c.name: c for c in [
    CaseSpec("resnet20-train", "train", "resnet20", {"cpu": 128, "cuda": 128}, 32, {"cpu": ("bare", 1.5)},
             "CIFAR ResNet-20 (Sec. 4.2), one SGD step"),
    CaseSpec("resnet56-train", "train", "resnet56", {"cpu": 128, "cuda": 128}, 32, {"cpu": ("bare", 1.5)},
             "CIFAR ResNet-56"),
    CaseSpec("resnet110-train", "train", "resnet110", {"cpu": 128, "cuda": 128}, 32, {}, "CIFAR ResNet-110"),
    CaseSpec("resnet50-train", "train", "resnet50", {"cpu": 8, "cuda": 256}, 224,
             {"cuda": ("torchvision", 1.26)}, "ImageNet ResNet-50 (v1.5 layout), one SGD step"),
    CaseSpec("resnet50-infer", "infer", "resnet50", {"cpu": 16, "cuda": 256}, 224,
             {"cpu": ("torchvision", 1.5), "cuda": ("img/s", 25000.0)}, "ImageNet ResNet-50 forward, eval"),
]}
DEFAULT_CASES = {"cpu": ["resnet20-train", "resnet56-train", "resnet50-infer", "resnet50-train"],
                 "cuda": ["resnet20-train", "resnet56-train", "resnet110-train", "resnet50-train", "resnet50-infer"]}
SMOKE = {"cifar_depth": 8, "batch": 4, "size": 32}     # --smoke: tiny nets and batches, to test the logic quickly


@dataclass
class Impl:
    key: str                    # "ours", "ours-jit", "bare", "eager", "torchvision", "timm", ...
    label: str                  # what it is, for the table
    role: str                   # "ours" (the headline), "variant" (another of ours), "peer"
    fn: Callable[[], Any]       # one iteration: a training step or a forward pass on a fixed batch
    setup_s: float = 0.0        # building + compiling, not timed
    info: dict[str, Any] = field(default_factory=dict)
    finish: Callable[[], None] | None = None   # after timing: record what actually ran into info


@dataclass
class Options:
    device: str = "cpu"
    threads: int | None = None
    warmup: int | None = None
    repeats: int | None = None
    iters: int | None = None
    smoke: bool = False
    compile: str = "auto"                 # inference compiler for ours (inductor | jit | none | auto)
    compile_in_graph: bool = False        # extra GPU row: torch.compile inside the captured step (train --compile)
    peers_compile: bool | None = None     # torch.compile the inference peer (default: on GPU only)
    batch: int | None = None              # override the case's batch size
    seed: int = 0

    @property
    def is_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


# --------------------------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_impls(impls: list[Impl], *, warmup: int, repeats: int, iters: int, sync: Callable[[], None],
               cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds per iteration of each implementation, one entry per repeat; ABBA order across repeats.
    ``cpu_times``, if given, receives this process's CPU seconds per iteration alongside (on a shared machine,
    single-threaded CPU time is less disturbed by other processes than wall time)."""
    for impl in impls:
        for _ in range(warmup):
            impl.fn()
        sync()
    times: dict[str, list[float]] = {i.key: [] for i in impls}
    for r in range(repeats):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                impl.fn()
            sync()
            times[impl.key].append((time.perf_counter() - t0) / iters)
            if cpu_times is not None:
                cpu_times.setdefault(impl.key, []).append((time.process_time() - c0) / iters)
    return times


def paired_ratio(ours: list[float], peer: list[float]) -> float:
    """Median over repeats of (peer seconds / our seconds): how many times faster ours is, measured side by side."""
    return statistics.median(p / o for o, p in zip(ours, peer))


# --------------------------------------------------------------------------------------------------------------
# Implementations


class _FixedSource:
    """The one thing ``maybe_graph_step`` asks of a data source: the shape of a batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def ours_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opts: Options, *, graph: bool | str = "auto",
               compile_in_graph: bool = False, key: str = "ours", role: str = "ours") -> Impl:
    """Our training path, as ``resnets train`` builds it (runtime, eager step, whole-step graph where it applies)."""
    t0 = time.perf_counter()
    rt = pick_runtime(opts.device, "auto", True)
    model = model.to(rt.device, memory_format=rt.memory_format).train()
    x = x.to(rt.device).contiguous(memory_format=rt.memory_format)   # DeviceLoader hands out channels_last batches
    y = y.to(rt.device)
    opt = _sgd(model)
    eager = make_eager_step(model, opt, rt)
    if compile_in_graph:
        static = StaticStep(model, opt, rt.autocast, tuple(x.shape), rt.device, rt.memory_format, capture=True,
                            compile=True)
        step: Callable = static
        kind = "whole-step CUDA graph, torch.compile inside (resnets train --compile)"
    else:
        step = maybe_graph_step(SimpleNamespace(cuda_graph=graph, on_nan="stop"), model, opt, rt,
                                _FixedSource(x, y), eager)
        static = getattr(step, "static", None)
        kind = "whole-step CUDA graph" if static is not None else "eager step"
    label = f"ours: {_rt_words(rt)}, {kind}"

    def fn():
        return step(x, y)

    info: dict[str, Any] = {"runtime": rt.describe(), "graph": static is not None}

    def finish() -> None:
        # What actually ran: a capture can fail and fall back to eager.
        s = getattr(step, "static", static) if not compile_in_graph else static
        info["graph"] = s is not None
        if s is not None:
            info.update(captures=s.captures, replays=s.replays)
        if getattr(step, "fallback", None):
            info["fallback"] = step.fallback

    return Impl(key, label, role, fn, time.perf_counter() - t0, info, finish)


def _rt_words(rt: Runtime) -> str:
    prec = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[rt.dtype]
    return f"{'channels_last' if rt.channels_last else 'NCHW'} {prec}"


def plain_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opts: Options, *, key: str, label: str,
                channels_last: bool, dtype: torch.dtype | None) -> Impl:
    """The loop anyone writes first: forward, cross-entropy, zero_grad, backward, SGD step."""
    t0 = time.perf_counter()
    dev = torch.device(opts.device)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=mf).train()
    x = x.to(dev).contiguous(memory_format=mf)
    y = y.to(dev)
    opt = _sgd(model)

    def fn():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    fmt = "channels_last" if channels_last else "NCHW"
    prec = "fp32" if dtype is None else f"{str(dtype).replace('torch.', '')} autocast"
    return Impl(key, f"{label}: eager {fmt} {prec}", "peer", fn, time.perf_counter() - t0)


def plain_infer(model: nn.Module, x: torch.Tensor, opts: Options, *, key: str, label: str, channels_last: bool,
                dtype: torch.dtype | None, compile: bool) -> Impl:
    t0 = time.perf_counter()
    dev = torch.device(opts.device)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev, memory_format=mf).eval()
    x = x.to(dev).contiguous(memory_format=mf)
    run = torch.compile(model) if compile else model

    def fn():
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            return run(x)

    if compile:
        fn()                                 # compile now: setup_s holds the compile time, as for ours
    fmt = "channels_last" if channels_last else "NCHW"
    prec = "fp32" if dtype is None else f"{str(dtype).replace('torch.', '')} autocast"
    return Impl(key, f"{label}: {'torch.compile' if compile else 'eager'} {fmt} {prec}", "peer", fn,
                time.perf_counter() - t0)


def ours_infer(reference: nn.Module, x: torch.Tensor, opts: Options, *, compile: str, key: str, role: str) -> Impl:
    t0 = time.perf_counter()
    dev = torch.device(opts.device)
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    ours = from_torchvision(reference) if type(reference).__module__.startswith("torchvision") else reference
    ours = ours.to(dev)
    fast = inference_model(ours, channels_last=True, compile=compile, dtype=dtype, example=x[:1].to(dev))
    xd = x.to(dev)
    words = {"none": "eager", "inductor": "torch.compile (inductor, freezing)", "jit": "jit trace+freeze"}
    label = f"ours: BN folded, channels_last, {'bf16 weights' if dtype else 'fp32'}, {words[fast.compiler]}"

    def fn():
        return fast(xd)

    impl = Impl(key, label, role, fn, 0.0, {"compiler": fast.compiler})
    fn()                                     # compile now, so that setup_s holds the compile time
    impl.setup_s = time.perf_counter() - t0
    err, scale = max_logit_error(ours.eval(), fast, xd)     # vs the unfolded fp32 model
    impl.info.update(max_abs_logit_diff=err, max_abs_logit=scale)
    return impl


# --------------------------------------------------------------------------------------------------------------
# Cases


def _imagenet_batch(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def _optional(impls: list[Impl], skipped: list[tuple[str, str]], key: str, build: Callable[[], Impl],
              calls: int = 1) -> None:
    """Build an optional variant and run it ``calls`` times (past a CUDA-graph capture: warm-up + 2); if that
    fails, record why and keep the case's other rows."""
    try:
        impl = build()
        for _ in range(calls):
            impl.fn()
        impls.append(impl)
    except Exception as e:  # an unmeasured option must not take the case down with it
        skipped.append((key, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def build_case(spec: CaseSpec, opts: Options) -> tuple[list[Impl], dict[str, Any], list[tuple[str, str]]]:
    """The implementations of one case, its parameters, and (key, reason) for peers that cannot run here."""
    dev = torch.device(opts.device)
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    batch = opts.batch or (SMOKE["batch"] if opts.smoke else spec.batch[dev.type])
    size = spec.size if not opts.smoke or spec.size == 32 else SMOKE["size"]
    params = {"batch": batch, "size": size, "precision": "bf16" if dtype else "fp32"}
    skipped: list[tuple[str, str]] = []
    torch.manual_seed(opts.seed)
    impls: list[Impl] = []
    if spec.model.startswith("resnet") and spec.size == 32:          # CIFAR nets
        kw = {"depth": SMOKE["cifar_depth"]} if opts.smoke else {}
        model = create_model(spec.model, **kw)
        params["model"] = f"{spec.model}{' (depth %d, smoke)' % kw['depth'] if kw else ''}"
        g = torch.Generator().manual_seed(opts.seed)
        x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)
        peer = copy.deepcopy(model)                                   # same initial weights
        model0 = copy.deepcopy(model)
        impls.append(ours_train(model, x, y, opts))
        if dev.type == "cuda":
            impls.append(plain_train(peer, x, y, opts, key="eager", label="eager", channels_last=True, dtype=dtype))
            if opts.compile_in_graph:
                _optional(impls, skipped, "ours-compiled-graph", lambda: ours_train(
                    copy.deepcopy(model0), x, y, opts, compile_in_graph=True, key="ours-compiled-graph",
                    role="variant"), calls=5)
        else:
            impls.append(plain_train(peer, x, y, opts, key="bare", label="bare loop", channels_last=False, dtype=None))
        return impls, params, skipped

    import torchvision
    x, y = _imagenet_batch(batch, size, opts.seed)
    if spec.what == "train":
        params["model"] = "resnet50 (stride on the 3x3 conv, as torchvision and timm)"
        ours = create_model("resnet50", stride_in="3x3")
        impls.append(ours_train(ours, x, y, opts))
        cl = dev.type == "cuda"            # peers as they are usually run: GPU bf16 + channels_last, CPU defaults
        impls.append(plain_train(torchvision.models.resnet50(), x, y, opts, key="torchvision", label="torchvision",
                                 channels_last=cl, dtype=dtype))
        try:
            import timm
            impls.append(plain_train(timm.create_model("resnet50", pretrained=False), x, y, opts, key="timm",
                                     label="timm", channels_last=cl, dtype=dtype))
        except ImportError as e:
            skipped.append(("timm", f"timm not importable: {e}"))
        if dev.type == "cuda" and opts.compile_in_graph:
            _optional(impls, skipped, "ours-compiled-graph", lambda: ours_train(
                create_model("resnet50", stride_in="3x3"), x, y, opts, compile_in_graph=True,
                key="ours-compiled-graph", role="variant"), calls=5)
        return impls, params, skipped

    # inference
    params["model"] = "torchvision resnet50 weights in our ResNet-50 (from_torchvision)"
    tv = torchvision.models.resnet50().eval()
    _randomize_bn(tv, opts.seed)               # non-trivial BN statistics, so folding is really exercised
    compiler = opts.compile
    if opts.smoke and compiler == "auto":
        compiler = "none"                      # the smoke test checks the logic, not inductor's compile time
    impls.append(ours_infer(copy.deepcopy(tv), x, opts, compile=compiler, key="ours", role="ours"))
    if dev.type == "cpu" and not opts.smoke:
        # What each step buys: folding + channels_last alone, and the other compiler.
        if impls[0].info["compiler"] != "none":
            impls.append(ours_infer(copy.deepcopy(tv), x, opts, compile="none", key="ours-eager", role="variant"))
        for other in ("inductor", "jit"):
            if other != impls[0].info["compiler"]:
                _optional(impls, skipped, f"ours-{other}", lambda o=other: ours_infer(
                    copy.deepcopy(tv), x, opts, compile=o, key=f"ours-{o}", role="variant"))
    peer_compile = opts.peers_compile if opts.peers_compile is not None else dev.type == "cuda"
    impls.append(plain_infer(tv, x, opts, key="torchvision", label="torchvision", channels_last=dev.type == "cuda",
                             dtype=dtype, compile=peer_compile and not opts.smoke))
    return impls, params, skipped


@torch.no_grad()
def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)


# --------------------------------------------------------------------------------------------------------------
# The floor: how fast could it be?


def matmul_gflops(device: str = "cpu", n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """fp32 (and, on a GPU, bf16) GFLOP/s of an n x n matrix product: the best and the median of ``repeats``;
    what this machine's convolution kernels could reach at most (they are matrix products in disguise)."""
    dev = torch.device(device)
    sync = _sync(dev)
    out: dict[str, float] = {"n": n}
    dtypes = [torch.float32] + ([torch.bfloat16] if dev.type == "cuda" else [])
    for dt in dtypes:
        a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
        iters = 1 if dev.type == "cpu" else 50
        torch.mm(a, b)
        sync()
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.mm(a, b)
            sync()
            rates.append(2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e9)
        name = str(dt).replace("torch.", "")
        out[f"{name}_best"], out[f"{name}_median"] = max(rates), statistics.median(rates)
    return out


def flops_per_iter(model_name: str, what: str, batch: int, size: int, depth: int | None = None) -> float:
    """Multiply-adds x 2 (FLOPs) of one forward pass, x 3 for a training step (forward, then backward: the
    gradients of inputs and of weights each cost about one forward), for a batch."""
    from resnets.models import model_info
    kw = {"depth": depth} if depth else {}
    if model_name == "resnet50":
        kw["stride_in"] = "3x3"
    with torch.device("meta"):
        m = create_model(model_name, **kw)
    macs = model_info(m, (1, 3, size, size))["macs"]
    return 2.0 * macs * batch * (3 if what == "train" else 1)


# --------------------------------------------------------------------------------------------------------------
# Does the captured step train like the eager one?


def graph_loss_parity(model_name: str = "resnet20", *, steps: int = 100, batch: int = 128, device: str = "cuda",
                      depth: int | None = None, seed: int = 0, lr_drop_at: int | None = None) -> dict[str, Any]:
    """Train two copies of one initialisation on the same augmented batches, one with the eager step and one with
    ``StaticStep`` (a captured CUDA graph on a GPU; the same logic uncaptured on a CPU), and compare the losses.

    A third copy trains eagerly again, so the report holds the eager-vs-eager difference too: on a GPU, cuDNN's
    backward kernels may sum in a different order from run to run, which bounds how equal any two runs can be.
    The learning rate drops 10x at ``lr_drop_at`` (default: half-way), which makes the graph re-capture once.
    """
    from resnets.data import DeviceLoader, Normalizer

    rt = pick_runtime(device, "auto", True)
    capture = rt.is_cuda
    torch.manual_seed(seed)
    kw = {"depth": depth} if depth else {}
    base = create_model(model_name, **kw).to(rt.device, memory_format=rt.memory_format).train()
    models = [base, copy.deepcopy(base), copy.deepcopy(base)]
    opts = [_sgd(m) for m in models]
    g = torch.Generator().manual_seed(seed)
    n = batch * 8
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    loader = DeviceLoader(images, labels, batch, rt.device, train=True, normalizer=Normalizer("pixel-mean", images),
                          seed=seed, channels_last=rt.channels_last)
    eager = make_eager_step(models[0], opts[0], rt)
    eager2 = make_eager_step(models[2], opts[2], rt)
    static = StaticStep(models[1], opts[1], rt.autocast, (batch, 3, 32, 32), rt.device, rt.memory_format,
                        capture=capture)
    drop = steps // 2 if lr_drop_at is None else lr_drop_at
    curves: dict[str, list[torch.Tensor]] = {"eager": [], "graph": [], "eager2": []}
    for step in range(steps):
        if step == drop:
            for o in opts:
                for group in o.param_groups:
                    group["lr"] = LR / 10
        x, y = loader.batch(step)
        curves["eager"].append(eager(x, y)[0])
        curves["graph"].append(static(x, y)[0])
        curves["eager2"].append(eager2(x, y)[0])
    losses = {k: torch.stack(v).float().cpu() for k, v in curves.items()}
    return {"model": model_name + (f" (depth {depth})" if depth else ""), "steps": steps, "batch": batch,
            "device": str(rt.device), "runtime": rt.describe(), "captured": capture, "captures": static.captures,
            "replays": static.replays, "lr_drop_at": drop,
            "max_abs_loss_diff_graph_vs_eager": (losses["graph"] - losses["eager"]).abs().max().item(),
            "max_abs_loss_diff_eager_vs_eager": (losses["eager2"] - losses["eager"]).abs().max().item(),
            "first_loss": losses["eager"][0].item(), "last_loss_eager": losses["eager"][-1].item(),
            "last_loss_graph": losses["graph"][-1].item(), "finite": bool(torch.isfinite(losses["graph"]).all()),
            "losses": {k: v.tolist() for k, v in losses.items()}}


# --------------------------------------------------------------------------------------------------------------
# Running and reporting


def _timing_defaults(opts: Options, spec: CaseSpec) -> tuple[int, int, int]:
    if opts.smoke:
        return 1, 2, 1
    if opts.is_cuda:
        return (opts.warmup if opts.warmup is not None else 10, opts.repeats or 7, opts.iters or 20)
    return (opts.warmup if opts.warmup is not None else 2, opts.repeats or 5, opts.iters or 1)


def machine_info(opts: Options) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": opts.device, "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "loadavg_start": _loadavg(),
    }
    if opts.is_cuda:
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark)
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def run_case(spec: CaseSpec, opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    dev = torch.device(opts.device)
    if dev.type not in spec.batch:
        return {"case": spec.name, "skipped": f"no {dev.type} configuration"}
    load0 = _loadavg()
    impls, params, skipped = build_case(spec, opts)
    warmup, repeats, iters = _timing_defaults(opts, spec)
    log(f"[bench] {spec.name}: {', '.join(i.key for i in impls)}; batch {params['batch']} at {params['size']} px; "
        f"warm-up {warmup}, {repeats} repeats x {iters} iterations")
    cpu: dict[str, list[float]] = {}
    times = time_impls(impls, warmup=warmup, repeats=repeats, iters=iters, sync=_sync(dev), cpu_times=cpu)
    for impl in impls:
        if impl.finish:
            impl.finish()
    batch = params["batch"]
    depth = SMOKE["cifar_depth"] if opts.smoke and spec.size == 32 else None
    flops = flops_per_iter(spec.model, spec.what, batch, params["size"], depth)
    ours = next(i for i in impls if i.role == "ours")
    rows = []
    for impl in impls:
        t = times[impl.key]
        med = statistics.median(t)
        row = {"key": impl.key, "label": impl.label, "role": impl.role, "s_per_iter": t,
               "ms_per_iter": 1e3 * med, "img_per_s": batch / med, "img_per_s_best": batch / min(t),
               "img_per_s_worst": batch / max(t), "cpu_s_per_iter": cpu.get(impl.key),
               "gflop_per_s": flops / med / 1e9,
               "setup_s": round(impl.setup_s, 2), **impl.info}
        rows.append(row)
    ratios = []
    peers = [i for i in impls if i.role == "peer"]
    for mine in [i for i in impls if i.role in ("ours", "variant")]:
        for p in peers:
            ratios.append({"ours": mine.key, "peer": p.key, "ratio": paired_ratio(times[mine.key], times[p.key])})
    goal = spec.goal.get(dev.type)
    goal_row = None
    if goal is not None and not opts.smoke:
        target, value = goal
        if target == "img/s":
            got = batch / statistics.median(times[ours.key])
        else:
            got = next((r["ratio"] for r in ratios if r["ours"] == ours.key and r["peer"] == target), None)
        goal_row = {"against": target, "goal": value, "measured": got, "met": got is not None and got >= value}
    return {"case": spec.name, "what": spec.what, "note": spec.note, **params, "gflop_per_iter": flops / 1e9,
            "warmup": warmup,
            "repeats": repeats, "iters": iters, "impls": rows, "ratios": ratios, "goal": goal_row,
            "skipped_peers": [{"key": k, "reason": r} for k, r in skipped],
            "loadavg_before": load0, "loadavg_after": _loadavg()}


def run_bench(opts: Options, cases: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the cases (default: those of the device) and return everything measured, with machine information."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dev = torch.device(opts.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True       # fixed shapes: let cuDNN pick its fastest kernels, for all alike
    names = cases or DEFAULT_CASES[dev.type]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    result: dict[str, Any] = {"machine": machine_info(opts), "options": asdict(opts), "cases": []}
    result["matmul"] = matmul_gflops(opts.device, n=512 if opts.smoke else 2048)
    for name in names:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TF32.*")
            result["cases"].append(run_case(CASES[name], opts, log))
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    result["machine"]["loadavg_end"] = _loadavg()
    return result


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def format_tables(result: dict[str, Any]) -> str:
    """Two markdown tables: throughput per implementation, then ours/peer ratios with the goals."""
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_count']} CPUs)"
    lines = [f"benchmarks/bench.py on {where}, torch {m['torch']}, {m['threads']} threads, {m['date']}; "
             f"load average {m['loadavg_start']} at start, {m.get('loadavg_end')} at end", "",
             "| case | implementation | batch | ms/iter (median) | img/s (median) | img/s range | setup s |",
             "|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if "skipped" in c:
            lines.append(f"| {c['case']} | skipped: {c['skipped']} | | | | | |")
            continue
        for r in c["impls"]:
            extra = ""
            if "max_abs_logit_diff" in r:
                extra = f" (max logit diff {r['max_abs_logit_diff']:.1e} of {r['max_abs_logit']:.1f})"
            if r.get("fallback"):
                extra += f" (graph capture failed: {r['fallback']})"
            lines.append(f"| {c['case']} @{c['size']}px | {r['label']}{extra} | {c['batch']} | "
                         f"{r['ms_per_iter']:.1f} | {_fmt(r['img_per_s'])} | "
                         f"{_fmt(r['img_per_s_worst'])}-{_fmt(r['img_per_s_best'])} | {r['setup_s']} |")
        for s in c.get("skipped_peers", []):
            lines.append(f"| {c['case']} | {s['key']} skipped: {s['reason']} | | | | | |")
    lines += ["", "| case | ours | peer | ratio ours/peer (median of paired repeats) | goal | met | load before -> after |",
              "|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        if "skipped" in c:
            continue
        g = c.get("goal")
        for r in c["ratios"]:
            goal = met = ""
            if g and g["against"] == r["peer"] and r["ours"] == "ours":
                goal, met = f">= {g['goal']}x", "yes" if g["met"] else "no"
            lines.append(f"| {c['case']} | {r['ours']} | {r['peer']} | {r['ratio']:.2f}x | {goal} | {met} | "
                         f"{c['loadavg_before']} -> {c['loadavg_after']} |")
        if g and g["against"] == "img/s":
            lines.append(f"| {c['case']} | ours | (absolute) | {g['measured']:,.0f} img/s | >= {g['goal']:,.0f} img/s | "
                         f"{'yes' if g['met'] else 'no'} | {c['loadavg_before']} -> {c['loadavg_after']} |")
    mm = result.get("matmul")
    if mm:
        dt = "bfloat16" if m.get("gpu") else "float32"      # the GPU cases run in bf16, the CPU ones in fp32
        peak = mm[f"{dt}_best"]
        lines += ["", f"Floor: a {mm['n']}x{mm['n']} {dt} matrix product runs at {peak:,.0f} GFLOP/s here (best of "
                  f"repeats; median {mm[f'{dt}_median']:,.0f}). "
                  "FLOPs per iteration = 2 x multiply-adds x batch (x 3 for a training step).", "",
                  "| case | GFLOP/iter | floor ms/iter at matmul speed | implementation | ms/iter | GFLOP/s | % of matmul |",
                  "|---|---|---|---|---|---|---|"]
        for c in result["cases"]:
            if "impls" not in c:
                continue
            floor = 1e3 * c["gflop_per_iter"] / peak
            for r in c["impls"]:
                lines.append(f"| {c['case']} | {c['gflop_per_iter']:.1f} | {floor:.1f} | {r['key']} | "
                             f"{r['ms_per_iter']:.1f} | {r['gflop_per_s']:,.1f} | {100 * r['gflop_per_s'] / peak:.0f}% |")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")


def main(device: str = "cpu", cases: list[str] | None = None, *, json_path: str | None = None, **kw: Any) -> int:
    """Run, print the tables, write JSON."""
    opts = Options(device=device, **kw)
    result = run_bench(opts, cases)
    print(format_tables(result))
    if json_path:
        write_json(result, json_path)
        print(f"\nwrote {json_path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--cases", nargs="+", metavar="CASE", help="cases to run (default: the device's; --list)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--json", metavar="FILE", help="also write every timing and the machine details as JSON")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, recorded in the output)")
    p.add_argument("--repeats", type=int, help="timed repeats per implementation (CPU 5, GPU 7)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (CPU 2, GPU 10)")
    p.add_argument("--iters", type=int, help="iterations per timed repeat (CPU 1, GPU 20)")
    p.add_argument("--compile", choices=["auto", "inductor", "jit", "none"], default="auto",
                   help="compiler of our inference model (auto: inductor)")
    p.add_argument("--smoke", action="store_true", help="tiny nets and batches: checks the benchmark itself")
    args = p.parse_args(argv)
    if args.list:
        for c in CASES.values():
            print(f"{c.name:16s} {c.what:5s} batch {c.batch}  {c.note}")
        return 0
    unknown = set(args.cases or []) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; --list shows them")
    return main(args.device, args.cases, json_path=args.json, threads=args.threads, repeats=args.repeats,
                warmup=args.warmup, iters=args.iters, compile=args.compile, smoke=args.smoke)


if __name__ == "__main__":
    sys.exit(cli())
