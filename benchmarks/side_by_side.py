"""One at a time against side by side (issue 15): the paper preset's nine CIFAR nets on one GPU.

    python3 benchmarks/side_by_side.py --out $OUT          # a GPU: about 2 min on an H100
    python3 benchmarks/side_by_side.py --smoke             # any machine, seconds (tiny nets; checks the script)

Two measurements, each printed as soon as it is done and written to OUT/side_by_side.json:

1. graphs: each net's whole training step captured once (resnets.train.graphs.StaticStep, batch 128, bf16,
   channels_last, synthetic data) and replayed (a) one net after another on one stream, (b) round-robin with a
   CUDA stream per net, (c) all nets' steps captured into one graph with a parallel branch per net.
2. end to end: real training runs (resnets.train.train_steps: on-device augmentation, logging, the captured step)
   on synthetic CIFAR-format data, each alone and then all of them side by side
   (resnets.train.side_by_side.train_side_by_side), for sets of nets: the nine, and the pairs the paper preset
   trains first. ms per round = time for one step of every net in the set.

Both also time the nets stacked (resnets.train.stacked): the nets of one depth as one network of grouped
convolutions, one captured step per depth, the depths' steps (a) one after another and (b) a stream each; and
all the nets as one network (deepest first; a net's stage ends before a deeper one's), one captured step. End to
end, ``train_side_by_side(stack="depth")`` and ``stack=True`` (all). The set "nine-x5" is the nine with 5 seeds
each (``--seeds 5``, as Table 6 reports ResNet-110), 45 runs: 10 per stack at depths 20-56, 5 at 110.

Ratio = (sum of the nets' ms/step alone) / (ms per round side by side): the aggregate throughput gain.

First of all, a check that the stacked step trains like the nets alone (``stacked_parity``): ResNet-56, ResNet-20
and plain-20, each with a learning rate of its own that drops 10x half-way (a copy into the graph's rate tensors,
no re-capture), 100 steps on 8 fixed batches (the nets memorise them, so a wrong rate or batch shows in the loss)
eagerly alone, eagerly alone again (the GPU's run-to-run floor), eagerly alone in the other memory format (other
kernels, same arithmetic: how far this training amplifies a change of rounding order), and stacked in one captured
graph; the loss curves go into the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from resnets.config import recipe  # noqa: E402
from resnets.data.cifar import CifarData  # noqa: E402
from resnets.models import create_model  # noqa: E402
from resnets.train import train  # noqa: E402
from resnets.models.stacked import StackedCifarNets  # noqa: E402
from resnets.train.graphs import StaticStep  # noqa: E402
from resnets.train.runtime import pick_runtime  # noqa: E402
from resnets.train.step import make_eager_step  # noqa: E402
from resnets.train.side_by_side import train_side_by_side  # noqa: E402
from resnets.train.stacked import StackedSGD, StackedStep  # noqa: E402

# Fig. 6 left (plain-20/32/44/56) and right / Table 6 (ResNet-20/32/44/56/110): the paper preset's nine nets
NINE = [("plain", 20), ("plain", 32), ("plain", 44), ("plain", 56),
        ("resnet", 20), ("resnet", 32), ("resnet", 44), ("resnet", 56), ("resnet", 110)]
SETS = {"nine": NINE, "r20+p20": [("resnet", 20), ("plain", 20)],
        "2x(r20+p20)": [("resnet", 20), ("plain", 20), ("resnet", 20), ("plain", 20)],
        "r20+p20+r110": [("resnet", 20), ("plain", 20), ("resnet", 110)],
        "nine-x5": [n for n in NINE for _ in range(5)]}


def log(msg: str) -> None:
    print(msg, flush=True)


class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn, rounds: int, repeats: int = 5) -> float:
        """Median over ``repeats`` of the wall time of ``rounds`` calls of ``fn``, per call."""
        fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(rounds):
                fn()
            self.sync()
            times.append((time.perf_counter() - t) * 1000 / rounds)
        return statistics.median(times)


def stacked_statics(nets, batch: int, rt, compile: bool, by_depth: bool = True,
                    capture: bool = True) -> list[StackedStep]:
    """A captured stacked step per depth, its nets in the order given; or (``by_depth=False``) one for all the
    nets, deepest first. ``capture=False``: eager steps (to profile their kernels one by one)."""
    depths = list(dict.fromkeys(d for _, d in nets)) if by_depth else [None]
    statics = []
    for depth in depths:
        torch.manual_seed(0)
        models = [create_model(f"{n}20", depth=d).to(rt.device, memory_format=rt.memory_format)
                  for n, d in sorted(nets, key=lambda nd: -nd[1]) if depth in (None, d)]
        stacked = StackedCifarNets(models).to(rt.device, memory_format=rt.memory_format).train()
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in models]
        opt = StackedSGD(stacked, models, opts, 0.9, 1e-4, False)
        opt.set_lr([0.1] * len(models))
        s = StackedStep(stacked, opt, rt.autocast, (batch, 3, 32, 32), rt.device, rt.memory_format,
                        capture=capture and rt.is_cuda, compile=compile and rt.is_cuda, k=len(models))
        x = torch.randn(batch, 3 * len(models), 32, 32, device=rt.device).contiguous(memory_format=rt.memory_format)
        y = torch.randint(0, 10, (batch, len(models)), device=rt.device)
        for _ in range(4):       # 3 warm-up steps, then the capture
            s(x, y)
        statics.append(s)
    return statics


def stacked_parity(nets, batch: int, steps: int) -> dict:
    """Each net trained alone (eager, twice, and once in the other memory format) and all of them stacked
    (captured on a GPU) on the same batches: the largest |loss difference| per net, stacked vs alone next to two
    floors. Alone vs alone is the run-to-run floor (0 where the kernels are deterministic). Alone in the other
    memory format runs other convolution kernels on the same arithmetic, so it measures how far this training
    amplifies a change of rounding order, which is all a correct stack changes: on 2026-11-27 (H200, bf16, lr 0.1
    on memorised random labels) stacked vs alone differed by up to 1.08 in loss while alone vs alone was 0,
    which that floor alone could not tell apart from a bug."""
    from resnets.data import DeviceLoader, Normalizer
    rt = pick_runtime("auto")
    nets = sorted(nets, key=lambda nd: -nd[1])          # a stack is deepest first
    lrs = [0.1 / 2 ** i for i in range(len(nets))]      # a rate of its own per net
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8 * batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (8 * batch,), generator=g)
    loader = DeviceLoader(images, labels, batch, rt.device, train=True, normalizer=Normalizer("pixel-mean", images),
                          seed=0, channels_last=rt.channels_last)
    torch.manual_seed(0)
    base = [create_model(f"{n}20", depth=d).to(rt.device, memory_format=rt.memory_format).train() for n, d in nets]
    other = torch.contiguous_format if rt.memory_format == torch.channels_last else torch.channels_last
    fmt = {"alone": rt.memory_format, "again": rt.memory_format, "layout": other, "stacked": rt.memory_format}
    copies = {k: [type(m)(m.depth, residual=m.residual).to(rt.device, memory_format=f).train() for m in base]
              for k, f in fmt.items()}
    for ms in copies.values():
        for m, b in zip(ms, base):
            m.load_state_dict(b.state_dict())
    opts = {k: [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4) for m, lr in zip(ms, lrs)]
            for k, ms in copies.items()}
    alone = ("alone", "again", "layout")
    eager = {k: [make_eager_step(m, o, rt) for m, o in zip(copies[k], opts[k])] for k in alone}
    stacked = StackedCifarNets(copies["stacked"]).to(rt.device, memory_format=rt.memory_format).train()
    stacked.bind(copies["stacked"])
    sgd = StackedSGD(stacked, copies["stacked"], opts["stacked"], 0.9, 1e-4, False)
    step = StackedStep(stacked, sgd, rt.autocast, (batch, 3, 32, 32), rt.device, rt.memory_format,
                       capture=rt.is_cuda, k=len(nets))
    losses: dict[str, list] = {k: [] for k in fmt}
    for i in range(steps):
        if i == steps // 2:
            lrs = [lr / 10 for lr in lrs]
            for k in alone:
                for o, lr in zip(opts[k], lrs):
                    o.param_groups[0]["lr"] = lr
        x, y = loader.batch(i % 8)
        for k in alone:
            xk = x.contiguous(memory_format=fmt[k])
            losses[k].append(torch.stack([f(xk, y).loss.float() for f in eager[k]]))
        sgd.set_lr(lrs)
        losses["stacked"].append(step(x.repeat(1, len(nets), 1, 1), y[:, None].expand(-1, len(nets))).loss.float())
    curves = {k: torch.stack(v).cpu() for k, v in losses.items()}     # (steps, nets)
    return {"nets": [f"{n}-{d}" for n, d in nets], "steps": steps, "batch": batch, "runtime": rt.describe(),
            "captured": step.graph is not None, "replays": step.replays, "captures": step.captures,
            "max_abs_diff_stacked_vs_alone": (curves["stacked"] - curves["alone"]).abs().amax(0).tolist(),
            "max_abs_diff_alone_vs_alone": (curves["again"] - curves["alone"]).abs().amax(0).tolist(),
            "max_abs_diff_other_layout": (curves["layout"] - curves["alone"]).abs().amax(0).tolist(),
            "other_layout": "channels_last" if other == torch.channels_last else "contiguous",
            "curves": {k: [[round(v, 5) for v in row] for row in c.tolist()] for k, c in curves.items()},
            "first_loss": curves["alone"][0].tolist(), "last_loss_alone": curves["alone"][-1].tolist(),
            "last_loss_stacked": curves["stacked"][-1].tolist(),
            "finite": bool(torch.isfinite(curves["stacked"]).all())}


def graphs_part(nets, batch: int, rounds: int, smoke: bool, fused_sgd: bool = False, compile: bool = False,
                stack: bool = True, res: dict | None = None) -> dict:
    """The graphs-only rows, written into ``res`` as each is measured, so that a run cut short (the 2026-11-27
    nine x 5 run was, while capturing its 45-branch graph) keeps the rows it had."""
    rt = pick_runtime("auto")
    timer = Timer(rt.is_cuda)
    statics = []
    for net, depth in nets:
        torch.manual_seed(0)
        model = create_model(f"{net}20", depth=depth).to(rt.device, memory_format=rt.memory_format).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                              **({"fused": True} if fused_sgd else {}))
        s = StaticStep(model, opt, rt.autocast, (batch, 3, 32, 32), rt.device, rt.memory_format, capture=rt.is_cuda,
                       compile=compile and rt.is_cuda)
        x = torch.randn(batch, 3, 32, 32, device=rt.device).contiguous(memory_format=rt.memory_format)
        y = torch.randint(0, 10, (batch,), device=rt.device)
        for _ in range(4):       # 3 warm-up steps, then the capture
            s(x, y)
        statics.append(s)
    replay = (lambda s: s.graph.replay()) if rt.is_cuda else (lambda s: s._eager())
    res = {} if res is None else res
    res.update({"nets": [f"{n}-{d}" for n, d in nets], "batch": batch, "runtime": rt.describe(),
                "sgd": ("fused" if fused_sgd else "foreach") + (", torch.compile in graph" if compile else ""),
                "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default (8)")})
    first = {n: s for n, s in reversed(list(zip(nets, statics)))}    # seeds of one net step alike: time one
    alone = {n: timer.ms(lambda s=s: replay(s), rounds) for n, s in first.items()}
    res["alone_ms"] = [alone[n] for n in nets]
    res["alone_sum_ms"] = total = sum(res["alone_ms"])

    def row(key: str, ms: float) -> None:
        res[key + "_ms"], res[key + "_ratio"] = ms, total / ms

    row("one_stream", timer.ms(lambda: [replay(s) for s in statics], rounds))
    if stack:
        stacks = stacked_statics(nets, batch, rt, compile)
        res["stacks"] = [s.k for s in stacks]
        row("stacked_one_stream", timer.ms(lambda: [replay(s) for s in stacks], rounds))
        if rt.is_cuda:
            sstreams = [torch.cuda.Stream() for _ in stacks]
            for st in sstreams:
                st.wait_stream(torch.cuda.current_stream())

            def stacked_round_robin():
                for s, st in zip(stacks, sstreams):
                    with torch.cuda.stream(st):
                        s.graph.replay()
            row("stacked_streams", timer.ms(stacked_round_robin, rounds))
        del stacks
        one = stacked_statics(nets, batch, rt, compile, by_depth=False)
        row("stacked_all", timer.ms(lambda: replay(one[0]), rounds))
        del one
    if rt.is_cuda:
        streams = [torch.cuda.Stream() for _ in statics]

        def round_robin():
            for s, st in zip(statics, streams):
                with torch.cuda.stream(st):
                    s.graph.replay()
        cur = torch.cuda.current_stream()
        for st in streams:
            st.wait_stream(cur)
        row("streams", timer.ms(round_robin, rounds))
        # (c) one graph, a branch per net: forked from and joined back to the capture stream
        torch.cuda.synchronize()
        for s in statics:
            s.optimizer.zero_grad(set_to_none=True)
        big = torch.cuda.CUDAGraph()
        with torch.cuda.graph(big):
            cs = torch.cuda.current_stream()
            # Fork every branch from the start of the capture, and join them all at the end. (The first GPU run,
            # 2026-11-27, joined each branch before forking the next, which chains the branches one after
            # another: its 0.98x "one graph" row measured that chain, not parallel branches.)
            for st in streams:
                st.wait_stream(cs)
            for s, st in zip(statics, streams):
                with torch.cuda.stream(st):
                    s._body()
            for st in streams:
                cs.wait_stream(st)
        row("one_graph", timer.ms(big.replay, rounds))
    return res


def synthetic_cifar(n_train: int, n_test: int) -> CifarData:
    rng = np.random.default_rng(0)
    return CifarData("cifar10", rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
                     rng.integers(0, 10, n_train), rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
                     rng.integers(0, 10, n_test), [f"c{i}" for i in range(10)], "synthetic")


def end_to_end_part(nets, data, steps: int, batch: int, root: Path, stack: bool = True) -> dict:
    """ms/step of each run alone, and ms per round of all of them side by side (and stacked), from steps//3 to
    steps. Seeds of one net take one time alone."""
    k1, k2 = steps // 3, steps
    log_every = steps // 3

    def cfg(i, net, depth, tag):
        return recipe("cifar-paper", model=f"{net}20", model_kwargs={"depth": depth}, steps=steps, seed=i,
                      batch_size=batch, milestones=(10 * steps,), eval_every=10 * steps, eval_subset=500,
                      log_every=log_every, checkpoint_every=0, progress=False, warmup_lr=None,
                      out=str(root / tag / f"{i}-{net}{depth}"))

    once: dict[tuple[str, int], float] = {}
    for i, (net, depth) in enumerate(nets):
        if (net, depth) in once:
            continue
        t: dict[int, float] = {}
        train(cfg(i, net, depth, "alone"), data=data,
              on_log=lambda r, t=t: t.__setitem__(r["step"], time.perf_counter()) if r["split"] == "train" else None)
        once[(net, depth)] = (t[k2] - t[k1]) * 1000 / (k2 - k1)
    alone = [once[n] for n in nets]

    def together(tag: str, **kw) -> tuple[float, float]:
        seen: dict[int, float] = {}
        cfgs = [cfg(i, n, d, tag) for i, (n, d) in enumerate(nets)]

        def on_log(c, r):
            # The first run's records: between its records of steps k1 and k2 every run takes exactly k2 - k1
            # steps (the last run's would also hold the other runs' final evaluations).
            if r["split"] == "train" and c.out == cfgs[0].out:
                seen[r["step"]] = time.perf_counter()

        t0 = time.perf_counter()
        train_side_by_side(cfgs, data=data, on_log=on_log, **kw)
        return (seen[k2] - seen[k1]) * 1000 / (k2 - k1), time.perf_counter() - t0

    sbs, wall = together("together")
    res = {"nets": [f"{n}-{d}" for n, d in nets], "steps": steps, "timed_steps": [k1, k2], "alone_ms": alone,
           "alone_sum_ms": sum(alone), "side_by_side_ms_per_round": sbs, "ratio": sum(alone) / sbs,
           "side_by_side_wall_s": wall, "img_per_s_side_by_side": len(nets) * batch * 1000 / sbs,
           "paper_64k_min_side_by_side": 64000 * sbs / 60000, "paper_64k_min_alone": 64000 * sum(alone) / 60000}
    if stack:
        for tag, how in (("stacked", "depth"), ("stacked_all", "all")):
            st, wall = together(tag, stack=how)
            res.update({f"{tag}_ms_per_round": st, f"{tag}_ratio": sum(alone) / st, f"{tag}_wall_s": wall,
                        f"img_per_s_{tag}": len(nets) * batch * 1000 / st, f"paper_64k_min_{tag}": 64000 * st / 60000})
    return res


def table(res: dict) -> str:
    lines = []
    q = res.get("parity")
    if q:
        lines += [f"stacked vs alone, {q['steps']} steps ({q['runtime']}, batch {q['batch']}, "
                  f"{'captured: ' + str(q['replays']) + ' replays, ' + str(q['captures']) + ' capture(s)' if q['captured'] else 'eager'}):",
                  "| net | first loss | last loss alone / stacked | max abs loss diff stacked vs alone | alone vs alone "
                  f"| alone, {q.get('other_layout', 'other layout')} |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {f:.3f} | {a:.3f} / {b:.3f} | {d:.3g} | {e:.3g} | {o:.3g} |" for n, f, a, b, d, e, o in
                  zip(q["nets"], q["first_loss"], q["last_loss_alone"], q["last_loss_stacked"],
                      q["max_abs_diff_stacked_vs_alone"], q["max_abs_diff_alone_vs_alone"],
                      q.get("max_abs_diff_other_layout", [float("nan")] * len(q["nets"])))]
        lines.append("")
    g = res.get("graphs")
    if g and "alone_ms" in g:
        lines += [f"graphs only, {len(g['nets'])} nets ({g['runtime']}, batch {g['batch']}, {g.get('sgd', 'foreach')} SGD, "
                  f"CUDA_DEVICE_MAX_CONNECTIONS {g.get('CUDA_DEVICE_MAX_CONNECTIONS', 'default (8)')}): "
                  "ms/step alone per net",
                  "| " + " | ".join(g["nets"]) + " | sum |", "|" + "---|" * (len(g["nets"]) + 1),
                  "| " + " | ".join(f"{v:.2f}" for v in g["alone_ms"]) + f" | {g['alone_sum_ms']:.2f} |", "",
                  "| the nets, one step each | ms per round | aggregate ratio vs alone |", "|---|---|---|"]
        stacks = "+".join(map(str, g.get("stacks", [])))
        for k, name in (("one_stream", "one after another, one stream"), ("streams", "round-robin, a stream each"),
                        ("one_graph", "one graph, a branch per net"),
                        ("stacked_one_stream", f"stacked by depth ({stacks} nets), one stream"),
                        ("stacked_streams", f"stacked by depth ({stacks} nets), a stream each"),
                        ("stacked_all", f"all {len(g['nets'])} stacked in one network, deepest first")):
            if f"{k}_ms" in g:
                lines.append(f"| {name} | {g[k + '_ms']:.2f} | {g[k + '_ratio']:.2f}x |")
        lines.append("")
    for name, e in res.get("end_to_end", {}).items():
        lines += [f"end to end, {name} ({', '.join(e['nets'])}), {e['steps']} steps:",
                  "| alone: sum of ms/step | side by side: ms/round | ratio | img/s side by side | "
                  "64k steps alone / side by side |", "|---|---|---|---|---|",
                  f"| {e['alone_sum_ms']:.2f} ({', '.join(f'{v:.2f}' for v in e['alone_ms'])}) | "
                  f"{e['side_by_side_ms_per_round']:.2f} | {e['ratio']:.2f}x | {e['img_per_s_side_by_side']:,.0f} | "
                  f"{e['paper_64k_min_alone']:.1f} / {e['paper_64k_min_side_by_side']:.1f} min |"]
        for tag, name in (("stacked", "stacked by depth"), ("stacked_all", "all in one stack")):
            if f"{tag}_ms_per_round" in e:
                lines.append(f"| {name}: | {e[tag + '_ms_per_round']:.2f} | {e[tag + '_ratio']:.2f}x | "
                             f"{e['img_per_s_' + tag]:,.0f} | {e['paper_64k_min_' + tag]:.1f} min |")
        lines.append("")
    for err in res["errors"]:
        lines.append(f"- FAILED: {err['what']}: {err['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out")
    p.add_argument("--smoke", action="store_true", help="tiny nets, few steps (checks the script on a CPU)")
    p.add_argument("--steps", type=int, default=300, help="steps per run, end to end (timed over the last 2/3)")
    p.add_argument("--rounds", type=int, default=30, help="rounds per timed repeat, graphs only")
    p.add_argument("--sets", nargs="*", default=["nine", "r20+p20", "2x(r20+p20)"], choices=list(SETS),
                   help="end-to-end sets (none: skip)")
    p.add_argument("--fused-sgd", action="store_true", help="graphs only: SGD(fused=True) instead of foreach")
    p.add_argument("--compile", action="store_true", help="graphs only: torch.compile the forward inside the graph")
    p.add_argument("--graph-set", default="nine", choices=list(SETS), help="graphs only: which nets")
    p.add_argument("--skip-graphs", action="store_true")
    p.add_argument("--no-stack", dest="stack", action="store_false", help="skip the stacked rows")
    p.add_argument("--parity-steps", type=int, default=100, help="steps of the stacked-vs-alone loss check (0: skip it)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if cuda:
        # As training does (resnets.train.loop). The runs of 2026-11-27 left it off in the parity check and the
        # graphs part (on only once the end-to-end part had trained). One net's step took 13-14% longer there
        # than in gpu_step_variants.py, which had it on: ResNet-20, -56, -110 2.28, 6.29, 12.32 ms against
        # 2.01, 5.53, 10.81 on the H200.
        torch.backends.cudnn.benchmark = True
    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
                 "cudnn_benchmark": torch.backends.cudnn.benchmark,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": os.getloadavg(), "errors": [],
                 "end_to_end": {}}
    log(f"[side_by_side] {res['device']}, torch {res['torch']}, smoke={args.smoke}")
    batch = 16 if args.smoke else 128
    # smoke: depths 8 and 14 in place of 20-32 and 44-110, so that a stack of all still spans depths
    small = (lambda d: 8 if d <= 32 else 14) if args.smoke else (lambda d: d)
    sets = {k: [(n, small(d)) for n, d in SETS[k]] for k in args.sets}
    steps = 12 if args.smoke else args.steps

    def save():
        res["loadavg_end"] = os.getloadavg()
        (out / "side_by_side.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "side_by_side.md").write_text(table(res) + "\n")

    def part(what, fn):
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:   # one failing part must not cost the others' numbers
            res["errors"].append({"what": what, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()})
            log(f"[side_by_side] {what} FAILED: {type(e).__name__}: {e}")
        except KeyboardInterrupt:    # out of time (gpu_session.sh's timeout -s INT): keep the rows measured so far
            res["errors"].append({"what": what, "error": "interrupted"})
            save()
            log(table(res))
            raise
        save()
        log(f"[side_by_side] {what}: {time.perf_counter() - t:.1f} s")

    if args.stack and args.parity_steps > 0:
        def q():
            res["parity"] = stacked_parity([("resnet", small(56)), ("resnet", small(20)), ("plain", small(20))],
                                           batch, 4 if args.smoke else args.parity_steps)
            log(table({"parity": res["parity"], "errors": []}))
        part("stacked parity", q)
    if not args.skip_graphs:
        def g():
            res["graphs"] = {}
            graphs_part([(n, small(d)) for n, d in SETS[args.graph_set]], batch, 3 if args.smoke else args.rounds,
                        args.smoke, args.fused_sgd, args.compile, args.stack, res=res["graphs"])
            log(table({"graphs": res["graphs"], "errors": []}))
        part("graphs", g)
    n_train = 2000 if args.smoke else 50000
    data = synthetic_cifar(n_train, 500)
    with tempfile.TemporaryDirectory() as tmp:
        for name, nets in sets.items():
            def e(name=name, nets=nets):
                res["end_to_end"][name] = end_to_end_part(nets, data, steps, batch, Path(tmp) / name, args.stack)
                log(table({"end_to_end": {name: res["end_to_end"][name]}, "errors": []}))
            part(f"end to end {name}", e)
    save()
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
