"""The CIFAR-10 experiments of He et al. 2015, Section 4.2: plain vs residual nets of growing depth (Fig. 6) and
the ResNet errors of Table 6.

    resnets reproduce cifar10 --preset demo               # ~12 min on a 2-core CPU: the degradation problem
    resnets reproduce cifar10 --preset paper --seeds 5    # the full 64k-iteration recipe (a GPU job)
    resnets reproduce cifar10 --preset paper --stack      # the same, all runs as one stacked network

Each (net, depth, seed) is one training run under OUT/runs/; an interrupted experiment picks up where it
stopped (finished runs are reused, unfinished ones resume from their last checkpoint). At the end it writes
OUT/results.json, OUT/results.md (our errors beside the paper's) and OUT/fig6.png (training error dashed, test
error solid, one line per depth; plain nets left, ResNets right), plus OUT/fig7.png (layer responses), and
prints an interpretation computed from the measured numbers.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, recipe
from ..data import load_cifar
from ..models.paper import TABLE6_ERROR, TABLE6_PARAMS_M, TABLE6_RESNET110_MEAN_STD
from ..train import read_log
from ..train import train as train_run
from ..train.side_by_side import SideBySideError, StoppedBySignal, raise_run_errors
from ..train.rundir import HOW_NOT_WHAT, config_diffs
from ..train.runtime import pick_runtime


@dataclass
class Preset:
    name: str
    depths: tuple[int, ...]
    nets: tuple[str, ...]
    seeds: int
    config: TrainConfig
    note: str = ""
    response_subset: int | None = 2000


# The demo must finish in 15 minutes on a 2-core CPU. Measured there (torch 2.14.1, fp32, channels_last, batch 128,
# two 1-thread runs side by side): a step of a 20-layer net takes 0.65 s, of a 56-layer net 1.8-2.1 s, so 250
# iterations of the four nets take about 250 x (0.65 + 2.0) = 660 s.
# lr 0.01, not the recipe's 0.1: at 0.1 the 56-layer nets, plain and residual alike (and an independent minimal
# ResNet-56 we wrote to check), blow up in their first iterations here (loss 6-10) and sit at chance (~89%
# training error) for hundreds of iterations: a 300-iteration run at 0.1 ended with plain-56 85.5% and ResNet-56
# 89.4%. A ResNet-56 at 0.01 reached 74% after 50 iterations and then blew up when switched to 0.1. The paper
# itself starts ResNet-110 at 0.01 because "0.1 is slightly too large to start converging" (Sec. 4.2). The
# `paper` preset keeps the recipe's 0.1, warm-up and 64k iterations.
DEMO = Preset(
    "demo", depths=(20, 56), nets=("plain", "resnet"), seeds=1,
    config=recipe("cifar-paper", steps=250, lr=0.01, milestones=(10**9,), eval_every=125, eval_subset=2000,
                  log_every=25, checkpoint_every=250, keep_last=1, warmup_lr=None),
    note="250 iterations per net at batch 128 (0.64 epochs), lr 0.01 constant (see the preset's comment for why "
         "not 0.1), otherwise Sec. 4.2's recipe; training error over the last 25 iterations; test error on the first "
         "2000 test images; one seed.",
    response_subset=1000,
)

# Section 4.2 in full: 64k iterations, lr 0.1 divided by 10 at 32k and 48k, warm-up at 0.01 for ResNet-110.
PAPER = Preset(
    "paper", depths=(20, 32, 44, 56, 110), nets=("plain", "resnet"), seeds=1,
    config=recipe("cifar-paper", eval_every=2000, log_every=200, checkpoint_every=4000, keep_last=1),
    note="the recipe of Section 4.2 (64k iterations, batch 128, lr 0.1 / 10 at 32k and 48k, ResNet-110 warm-up), "
         "full 50k training images, full 10k test set.",
    response_subset=None,
)

PRESETS = {"demo": DEMO, "paper": PAPER}


def run_name(net: str, depth: int, seed: int) -> str:
    return f"{net}{depth}-seed{seed}"


def _finished(out: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    s, c = out / "summary.json", out / "config.json"
    if not (s.exists() and c.exists()):
        return None
    if config_diffs(json.loads(c.read_text()), cfg.to_dict(), set(HOW_NOT_WHAT)):
        return None
    summary = json.loads(s.read_text())
    # config.json is rewritten when a run is taken further, summary.json only when it ends: a summary of an
    # earlier, shorter end is not this run's result
    return summary if summary.get("steps") == cfg.steps else None


def _curves(run_dir: Path) -> dict[str, list]:
    rows = read_log(run_dir / "log.jsonl")
    train = [(r["step"], r["error"]) for r in rows if r["split"] == "train"]
    test = [(r["step"], r["error"]) for r in rows if r["split"] in ("test", "val")]
    return {"train": train, "test": test}


def run_experiment(preset: str | Preset = "demo", *, depths: list[int] | None = None, nets: list[str] | None = None,
                   seeds: int | None = None, out: str | Path = "runs/reproduce-cifar10", data: str | None = None,
                   overrides: dict[str, Any] | None = None, progress: bool = True, data_obj=None,
                   responses: bool = True, workers: int | None = None,
                   side_by_side: bool | None = None, stack: bool | str = False) -> dict[str, Any]:
    p = PRESETS[preset] if isinstance(preset, str) else preset
    # (a depth or net given twice would be two jobs on one run directory)
    depths = tuple(dict.fromkeys(depths or p.depths))
    nets = tuple(dict.fromkeys(nets or p.nets))
    seeds = seeds or p.seeds
    for d in depths:
        if (d - 2) % 6 or d < 8:
            raise ValueError(f"CIFAR depths are 6n+2 (20, 32, 44, 56, 110, ...); got {d}")
    for n in nets:
        if n not in ("plain", "resnet"):
            raise ValueError(f"nets are 'plain' and/or 'resnet'; got {n!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cifar = data_obj or load_cifar("cifar10", root=data, progress=progress)
    rt = pick_runtime((overrides or {}).get("device", "auto"))
    jobs = []
    for depth in depths:
        for net in nets:
            for seed in range(seeds):
                run_dir = out / "runs" / run_name(net, depth, seed)
                cfg = replace(p.config, model=f"{net}20", model_kwargs={"depth": depth}, seed=seed,
                              out=str(run_dir), data=data, progress=progress, **(overrides or {}))
                jobs.append((net, depth, seed, cfg))
    todo = []
    for net, depth, seed, cfg in jobs:
        if _finished(Path(cfg.out), cfg) is None:
            todo.append(cfg)
        else:
            print(f"{net}-{depth} (seed {seed}): finished earlier, reused", flush=True)
    failed: SideBySideError | None = None
    try:
        _run_jobs(todo, cifar, rt, workers, rt.is_cuda if side_by_side is None else side_by_side, stack)
    except SideBySideError as e:    # the other runs trained to their end: their results are written, then this
        failed = e
    runs = []
    for net, depth, seed, cfg in jobs:
        if failed is not None and cfg.out in failed.errors:
            continue
        run_dir = Path(cfg.out)
        summary = json.loads((run_dir / "summary.json").read_text())
        test = _test_metrics(cfg, summary, data, rt)
        runs.append({"net": net, "depth": depth, "seed": seed, "name": run_dir.name, "dir": str(run_dir),
                     "train_error": summary["train_error"], "test_error": test["error"],
                     "test_top5_error": test["top5_error"], "test_images": test["n"],
                     "val_error": summary["final"]["error"] if cfg.val_split else None,
                     # the best of the evaluations while training: on the validation split when there is one
                     f"best_{'val' if cfg.val_split else 'test'}_error": (summary.get("best") or {}).get("error"),
                     "seconds": summary["seconds"], "runtime": summary.get("runtime"),
                     "params": _params(net, depth), "curves": _curves(run_dir)})
    if not runs:
        raise failed
    n_workers, threads = plan_workers(len(todo), rt, workers)     # as _run_jobs planned the runs of this call
    if stack:
        n_workers = workers or len(todo)
    runtime = f"{rt.describe()}; {n_workers} run(s) at a time, side by side on CUDA streams" if rt.is_cuda else \
        f"CPU, {os.cpu_count()} cores; {n_workers} run(s) at a time with {threads} thread(s) each; fp32, channels_last"
    if not todo:
        runtime = f"{rt.describe()}; no run trained in this call (every run was reused)"
    ran_on = sorted({r["runtime"] for r in runs if r.get("runtime")})
    if stack and todo:
        runtime += f"; {_stacked(stack)} (grouped convolutions)"
    if ran_on:
        runtime += f" (runs report: {'; '.join(ran_on)})"
    results = {
        "preset": p.name, "note": _note(p, overrides), "depths": list(depths), "nets": list(nets), "seeds": seeds,
        "config": replace(p.config, **(overrides or {})).to_dict(), "runtime": runtime,
        "torch": torch.__version__, "data_source": cifar.source, "wall_seconds": None,
        "date": time.strftime("%Y-%m-%d"), "runs": runs, "table": summarize(runs),
        "reused": len(jobs) - len(todo),
        "failed": {Path(o).name: f"{type(e).__name__}: {e}" for o, e in (failed.errors if failed else {}).items()},
    }
    results["interpretation"] = interpret(results)
    if responses:
        results["fig7"] = _fig7(runs, out, cifar, p.response_subset, str(rt.device))
    results["wall_seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    plot_fig6(results, out / "fig6.png")
    if failed is not None:
        raise failed
    return results


def plan_workers(n_jobs: int, rt, workers: int | None = None) -> tuple[int, int | None]:
    """How many runs train at once, and torch threads for each.

    On a GPU every run trains side by side in this process, each on a CUDA stream of its own
    (:mod:`resnets.train.side_by_side`): one CIFAR net at batch 128 leaves most of the GPU idle. ``workers``
    caps how many run at once (1: one after another). On a CPU, parallel processes with fewer threads each beat
    one run with all threads: measured on a 2-core machine, two 1-thread ResNet-56 runs took 1.76 s/step each
    (0.88 s/step together), one 2-thread run 1.25-1.35 s/step."""
    if rt.is_cuda:
        return max(1, min(n_jobs, workers or n_jobs)), None
    cores = os.cpu_count() or 1
    w = workers or max(1, min(n_jobs, cores))
    return w, max(1, cores // w)


def _report(cfg: TrainConfig, r: dict[str, Any]) -> None:
    if r["split"] == "train" and (r["step"] % (cfg.log_every * 4) == 0 or r["step"] == cfg.steps):
        print(f"  {Path(cfg.out).name}: step {r['step']}/{cfg.steps}, training error {r['error']:.1f}%, "
              f"{r['img_per_s']:.0f} img/s", flush=True)


def _train_job(cfg: TrainConfig, data_obj) -> str:
    train_run(replace(cfg, resume="auto"), data=data_obj, on_log=lambda r: _report(cfg, r))
    return cfg.out


_PARENT: int | None = None     # in a worker: the pid of the `reproduce` that started it


def _worker_init(parent: int) -> None:
    """A worker is its own process group, so that a signal reaches it once, forwarded by the parent (Ctrl-C or
    `timeout` signal the whole group, and a second signal stops a run at once, without its checkpoint). If the
    parent dies (kill -9), the worker sends itself one SIGTERM: its run checkpoints and stops instead of training
    on, orphaned. (Not PR_SET_PDEATHSIG: the kernel sends that again as each of the parent's threads exits, and the
    second signal lost the checkpoint.)"""
    global _PARENT
    _PARENT = parent
    os.setpgrp()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="resnets-parent-watch", daemon=True).start()


def _worker_job(cfg: TrainConfig) -> str:
    torch.set_num_threads(cfg.threads or 1)
    try:
        return _train_job(cfg, None)
    finally:
        if _PARENT is not None and os.getppid() != _PARENT:
            # Orphaned (its run has checkpointed): no more work will come, and the queue's pipe never closes.
            os._exit(128 + signal.SIGTERM)


def _stacked(stack: bool | str) -> str:
    return "runs of one depth stacked into one network" if stack == "depth" else "runs stacked into one network"


def _run_jobs(todo: list[TrainConfig], cifar, rt, workers: int | None, side_by_side: bool,
              stack: bool | str = False) -> None:
    """``side_by_side``: interleave the runs in this process (the GPU default; on a CPU only the tests use it).
    ``stack``: side by side, with the runs stacked into one network, or one per depth with "depth"
    (:mod:`resnets.train.stacked`)."""
    if not todo:
        return
    n, threads = plan_workers(len(todo), rt, workers)
    if stack:
        side_by_side, n = True, workers or len(todo)
    for i, cfg in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] queued {Path(cfg.out).name}: {cfg.steps} steps", flush=True)
    if side_by_side and n > 1:
        from ..train.side_by_side import train_side_by_side
        where = "a CUDA stream each" if rt.is_cuda else "interleaved"
        where += f"; {_stacked(stack)}" if stack else ""
        print(f"training {n} runs at a time side by side on {rt.describe()}, {where}", flush=True)
        failures: dict[str, BaseException] = {}
        for i in range(0, len(todo), n):
            group = [replace(c, resume="auto") for c in todo[i:i + n]]
            try:
                train_side_by_side(group, data=cifar, on_log=lambda c, r: _report(c, r), stack=stack)
            except SideBySideError as e:      # the group's other runs ended; the next groups train all the same
                failures.update(e.errors)
            for c in group:
                print(f"{'failed' if c.out in failures else 'finished'} {Path(c.out).name}", flush=True)
        raise_run_errors(failures)
        return
    if n == 1:
        errors: dict[str, BaseException] = {}
        for cfg in todo:
            try:
                _train_job(replace(cfg, threads=threads or cfg.threads), cifar)
            except (StoppedBySignal, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - the next runs train; every failure is raised at the end
                errors[cfg.out] = e
        raise_run_errors(errors)
        return
    print(f"training {n} runs at a time, {threads} thread(s) each", flush=True)
    # Workers load the data themselves (about a second from the cache); per-run progress bars would interleave.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init,
                                                initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_worker_job, replace(cfg, threads=threads, progress=False)): cfg.out for cfg in todo}
        errors: dict[str, BaseException] = {}
        signalled = []

        def forward(signum, frame):
            signalled.append(signum)
            for f in futures:
                f.cancel()                  # runs not started yet stay queued for the next `reproduce`
            for proc in multiprocessing.active_children():     # the pool's workers
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass
        main = threading.current_thread() is threading.main_thread()    # only there can handlers be set
        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            for f in concurrent.futures.as_completed(futures):
                if f.cancelled():
                    continue
                try:
                    print(f"finished {Path(f.result()).name}", flush=True)
                except KeyboardInterrupt:       # stopped while setting up, before it had anything to save
                    pass
                except Exception as e:  # noqa: BLE001 - the other runs finish (or checkpoint) first
                    errors[futures[f]] = e
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    raise_run_errors({c.out: errors[c.out] for c in todo if c.out in errors})
    if signalled:
        raise KeyboardInterrupt


def _note(p: Preset, overrides: dict[str, Any] | None) -> str:
    """The preset's note, and what this call changed of the preset's recipe (the note describes the preset's)."""
    overrides = overrides or {}
    note = p.note
    v = overrides.get("val_split")
    if v:
        note = (note.replace("full 50k training images, ", "").replace("test error on the first 2000 test images; ", "")
                + f" Trained on 50k - {v} images, {v} held out for validation (Sec. 4.2's 45k/5k split when 5000); "
                "the validation error is logged while training, and the final weights meet the full 10k test set "
                "once.")
    base, used = p.config.to_dict(), replace(p.config, **overrides).to_dict()
    changed = [f"{k} {base[k]} -> {used[k]}" for k in sorted(used)
               if k not in ("val_split", "device", "threads", "data", "progress", "out", "resume") and used[k] != base[k]]
    if changed:
        note += f" Changed from the preset here: {', '.join(changed)}."
    return note


def _test_metrics(cfg: TrainConfig, summary: dict[str, Any], data: str | None, rt) -> dict[str, Any]:
    """The final weights on the test set. A run with a train/val split evaluated on val while it trained; its
    last checkpoint meets the test set here, once (the result is kept in the run's test.json)."""
    if not cfg.val_split:
        return summary["final"]
    cached = Path(cfg.out) / "test.json"
    if cached.exists():
        res = json.loads(cached.read_text())
        if res.get("step") == cfg.steps:      # else the weights of an earlier end, before the run went further
            return res
    from ..train.checkpoint import list_checkpoints
    from ..train.evaluate import evaluate_checkpoint
    last = list_checkpoints(Path(cfg.out) / "checkpoints")[-1]
    res = evaluate_checkpoint(str(last), data, device=str(rt.device), progress=False)
    if res["step"] != cfg.steps:
        raise RuntimeError(f"{cfg.out}: the last checkpoint is step {res['step']}, not the run's end ({cfg.steps})")
    cached.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _params(net: str, depth: int) -> int:
    with torch.device("meta"):
        from ..models import create_model
        m = create_model(f"{net}20", depth=depth)
    return sum(p.numel() for p in m.parameters())


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (net, depth): mean (and std over seeds) of the final training and test errors."""
    rows = []
    keys = sorted({(r["net"], r["depth"]) for r in runs}, key=lambda k: (k[1], k[0]))
    for net, depth in keys:
        rs = [r for r in runs if r["net"] == net and r["depth"] == depth]
        tr, tr_sd = _mean_std([r["train_error"] for r in rs])
        te, te_sd = _mean_std([r["test_error"] for r in rs])
        rows.append({"net": net, "depth": depth, "seeds": len(rs), "train_error": tr, "train_error_std": tr_sd,
                     "test_error": te, "test_error_std": te_sd, "params": rs[0]["params"],
                     "paper_test_error": TABLE6_ERROR.get(depth) if net == "resnet" else None,
                     "paper_params_m": TABLE6_PARAMS_M.get(depth) if net == "resnet" else None})
    return rows


def _row(table, net, depth):
    return next((r for r in table if r["net"] == net and r["depth"] == depth), None)


def interpret(results: dict[str, Any]) -> list[str]:
    """Sentences about what the measured numbers show, each computed from them; effects that do not show are said."""
    table, depths = results["table"], sorted(results["depths"])
    lines = []
    if len(depths) < 2:
        return ["Only one depth was trained: depth effects cannot be judged."]
    lo, hi = depths[0], depths[-1]
    pl, ph = _row(table, "plain", lo), _row(table, "plain", hi)
    rl, rh = _row(table, "resnet", lo), _row(table, "resnet", hi)
    steps = results["config"]["steps"]
    if pl and ph:
        d = ph["train_error"] - pl["train_error"]
        if d > 0:
            lines.append(f"Degradation shows: plain-{hi} has a higher training error than plain-{lo} "
                         f"({ph['train_error']:.1f}% vs {pl['train_error']:.1f}%, +{d:.1f} points). The deeper plain "
                         "net fits its training data worse, so this is not overfitting (Sec. 4.2, Fig. 6 left).")
        else:
            lines.append(f"Degradation does NOT show in this run: plain-{hi} training error {ph['train_error']:.1f}% "
                         f"is not above plain-{lo}'s {pl['train_error']:.1f}%.")
    if ph and rh:
        d = ph["train_error"] - rh["train_error"]
        if d >= 5:
            lines.append(f"Residual learning fixes it: ResNet-{hi} trains to {rh['train_error']:.1f}% error vs "
                         f"{ph['train_error']:.1f}% for plain-{hi} with the same layers and parameters "
                         f"({d:.1f} points lower).")
        elif d > 0:
            lines.append(f"ResNet-{hi} trains only slightly better than plain-{hi} ({rh['train_error']:.1f}% vs "
                         f"{ph['train_error']:.1f}%, {d:.1f} points): not a clear effect in this run.")
        else:
            lines.append(f"The residual fix does NOT show in this run: ResNet-{hi} {rh['train_error']:.1f}% vs "
                         f"plain-{hi} {ph['train_error']:.1f}% training error.")
    if rl and rh and steps >= 64000:
        # trained as long as the paper: the ResNets' training errors are all near 0 by now, so the ordering that
        # Table 6 reports is the test error's
        gap = rl["test_error"] - rh["test_error"]
        if gap > 0:
            lines.append(f"The deeper ResNet is better: ResNet-{hi} {rh['test_error']:.2f}% vs ResNet-{lo} "
                         f"{rl['test_error']:.2f}% test error ({gap:.2f} points), the ordering of Table 6.")
        else:
            lines.append(f"The deeper ResNet is NOT better here: ResNet-{hi} {rh['test_error']:.2f}% vs ResNet-{lo} "
                         f"{rl['test_error']:.2f}% test error; Table 6 has the deeper one better up to 110 layers.")
    elif rl and rh:
        gap = rl["train_error"] - rh["train_error"]
        runs = "one run" if results.get("seeds", 1) == 1 else f"a mean of {results['seeds']} runs"
        if 0 < gap < 3:
            lines.append(f"ResNet-{hi} and ResNet-{lo} are too close to call ({rh['train_error']:.1f}% vs "
                         f"{rl['train_error']:.1f}% training error, {gap:.1f} points, within the noise of a short "
                         f"window of {runs}). The paper's claim that the deeper ResNet ends better needs long "
                         "training (64k iterations, Fig. 6 right): the `paper` preset tests it.")
        elif gap >= 3:
            lines.append(f"Deeper ResNet already better: ResNet-{hi} {rh['train_error']:.1f}% vs ResNet-{lo} "
                         f"{rl['train_error']:.1f}% training error (Fig. 6 right).")
        else:
            lines.append(f"After {steps} iterations the deeper ResNet has not yet overtaken the shallower one "
                         f"(ResNet-{hi} {rh['train_error']:.1f}% vs ResNet-{lo} {rl['train_error']:.1f}% training "
                         "error). The paper shows that ordering after long training (64k iterations, Fig. 6 right); "
                         "this short run cannot test it: the `paper` preset does.")
    if all(r and r.get("test_error") is not None for r in (pl, ph, rl, rh)):
        lines.append(f"Test error ({results['runs'][0]['test_images']} test images): plain-{lo} {pl['test_error']:.1f}%, "
                     f"plain-{hi} {ph['test_error']:.1f}%, ResNet-{lo} {rl['test_error']:.1f}%, ResNet-{hi} "
                     f"{rh['test_error']:.1f}%.")
    if steps < 64000:
        lines.append(f"These are {steps}-iteration runs; the paper's Table 6 errors come from 64k iterations and are "
                     "not comparable to them.")
    return lines


def _fmt(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def results_markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [f"# CIFAR-10: plain vs residual nets (preset `{results['preset']}`)", "",
             f"- {results['note']}",
             f"- Recipe: batch {cfg['batch_size']}, lr {cfg['lr']}, momentum {cfg['momentum']}, weight decay "
             f"{cfg['weight_decay']}, milestones {cfg['milestones']}, {cfg['steps']} iterations, "
             f"{'pad-crop-flip' if cfg['augment'] else 'no augmentation'}, {cfg['normalize']} normalisation.",
             f"- Hardware: {results['runtime']}; torch {results['torch']}; {results['date']}; "
             f"wall time of this invocation {results['wall_seconds'] and round(results['wall_seconds'])} s"
             f"{' (runs reused from an earlier invocation: ' + str(results['reused']) + ')' if results.get('reused') else ''}; "
             f"the runs' own times add up to {round(sum(r['seconds'] for r in results['runs']))} s "
             f"(they overlap when runs train side by side).",
             f"- Data: {results['data_source']}", "",
             "Training error is measured on the augmented training batches of the last "
             f"{cfg['log_every']} iterations; test error on {results['runs'][0]['test_images']} test images.", "",
             "| depth | params | plain train err % | plain test err % | ResNet train err % | ResNet test err % | "
             "paper ResNet test err % (Table 6) |", "|---|---|---|---|---|---|---|"]
    for depth in results["depths"]:
        pl, rs = _row(results["table"], "plain", depth), _row(results["table"], "resnet", depth)
        any_row = pl or rs
        if any_row is None:         # every run of this depth failed (listed below the table)
            continue
        lines.append(f"| {depth} | {any_row['params'] / 1e6:.2f}M | "
                     f"{_fmt(pl and pl['train_error'], pl and pl['train_error_std'])} | "
                     f"{_fmt(pl and pl['test_error'], pl and pl['test_error_std'])} | "
                     f"{_fmt(rs and rs['train_error'], rs and rs['train_error_std'])} | "
                     f"{_fmt(rs and rs['test_error'], rs and rs['test_error_std'])} | "
                     f"{_paper_cell(depth)} |")
    lines += ["", "The paper does not tabulate its plain nets; Fig. 6 (left) shows them above the ResNets at every "
              "depth."]
    if results.get("failed"):
        lines += ["", f"**{len(results['failed'])} run(s) failed and are not in the table or the figures:**", ""]
        lines += [f"- {name}: {why}" for name, why in results["failed"].items()]
    lines += ["", "## What the numbers show", ""]
    lines += [f"- {s}" for s in results["interpretation"]]
    lines += ["", "![Fig. 6 style curves](fig6.png)"]
    if results.get("fig7"):
        lines += ["", "## Layer responses (Fig. 7)", "", results["fig7"]["summary"], "", "![Fig. 7](fig7.png)"]
    lines += ["", "## Runs", "", "| run | train err % | test err % | seconds |", "|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['name']} | {r['train_error']:.2f} | {r['test_error']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_progress(out: str | Path) -> Path:
    """Fig. 6 of an experiment that has not finished (stopped, or still training): the curves its runs under
    OUT/runs have logged so far, averaged over seeds, in OUT/fig6-progress.png."""
    out = Path(out)
    runs, steps, val_split = [], 0, None
    for run_dir in sorted((out / "runs").glob("*")):
        if not ((run_dir / "config.json").exists() and (run_dir / "log.jsonl").exists()):
            continue
        cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        depth = cfg.model_kwargs.get("depth")
        if depth is None or not cfg.model.startswith(("plain", "resnet")):
            continue
        steps, val_split = max(steps, cfg.steps or 0), cfg.val_split
        runs.append({"net": "plain" if cfg.model.startswith("plain") else "resnet", "depth": depth,
                     "seed": cfg.seed, "curves": _curves(run_dir)})
    if not runs:
        raise ValueError(f"{out}: no CIFAR runs with a log under {out / 'runs'}")
    done = max((s for r in runs for s, _ in r["curves"]["train"]), default=0)
    results = {"preset": out.name, "nets": sorted({r["net"] for r in runs}), "depths": sorted({r["depth"] for r in runs}),
               "runs": runs, "config": {"steps": steps, "val_split": val_split}}
    return plot_fig6(results, out / "fig6-progress.png",
                     title=f"He et al. 2015 Fig. 6, so far: {done} of {steps} iterations ({out.name})")


def plot_fig6(results: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Fig. 6 layout: plain nets left, ResNets right; training error dashed, test error solid; one colour per depth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = [n for n in ("plain", "resnet") if n in results["nets"]]
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.5), sharey=True, squeeze=False)
    colours = plt.get_cmap("tab10")
    steps = results["config"]["steps"]
    scale, unit = (1e4, "iter. (1e4)") if steps >= 20000 else (1, "iterations")
    for ax, net in zip(axes[0], nets):
        for k, depth in enumerate(results["depths"]):
            rs = [r for r in results["runs"] if r["net"] == net and r["depth"] == depth]
            if not rs:
                continue
            tr = _average_curves([r["curves"]["train"] for r in rs])
            te = _average_curves([r["curves"]["test"] for r in rs])
            label = f"{'plain' if net == 'plain' else 'ResNet'}-{depth}"
            ax.plot([s / scale for s, _ in tr], [e for _, e in tr], "--", color=colours(k), alpha=0.8)
            ax.plot([s / scale for s, _ in te], [e for _, e in te], "-", color=colours(k), lw=2, label=label)
        ax.set_title(f"{'plain nets' if net == 'plain' else 'ResNets'} on CIFAR-10")
        ax.set_xlabel(unit)
        ax.grid(alpha=0.3)
        held_out = "validation" if results["config"].get("val_split") else "test"
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title=f"dashed: training, bold: {held_out}", fontsize=8)
        else:                       # every run of this panel failed
            ax.text(0.5, 0.5, "no run finished", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel("error (%)")
    fig.suptitle(title or f"He et al. 2015 Fig. 6, reproduced (preset {results['preset']}, {steps} iterations)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _average_curves(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], statistics.fmean(c[i][1] for c in curves)) for i in range(n)]


def _paper_cell(depth: int) -> str:
    """Table 6's error; for ResNet-110 the paper gives its best of 5 runs and their mean, to set beside a mean."""
    if depth == 110:
        mean, std = TABLE6_RESNET110_MEAN_STD
        return f"{_fmt(TABLE6_ERROR[110])} (best of 5; mean {mean} ± {std})"
    return _fmt(TABLE6_ERROR.get(depth))


def _fig7(runs, out: Path, cifar, subset, device: str = "auto") -> dict[str, Any] | None:
    from ..train.checkpoint import list_checkpoints
    from .responses import analyze_checkpoints, plot_responses

    seed0 = [r for r in runs if r["seed"] == 0]
    paths = []
    for r in seed0:
        ckpts = list_checkpoints(Path(r["dir"]) / "checkpoints")     # complete step-N ones, by step
        if ckpts:
            paths.append(str(ckpts[-1]))
    if not paths:
        return None
    res = analyze_checkpoints(paths, data_obj=cifar, subset=subset, device=device)
    plot_responses(res, out / "fig7.png")
    parts = []
    for depth in sorted({r["depth"] for r in seed0}):
        pl = next((x for x in res if x["label"] == f"plain-{depth}"), None)
        rs = next((x for x in res if x["label"] == f"ResNet-{depth}"), None)
        if pl and rs:
            mp, mr = statistics.fmean(pl["std"]), statistics.fmean(rs["std"])
            verdict = "smaller" if mr < mp else "NOT smaller"
            parts.append(f"depth {depth}: mean response std ResNet {mr:.3f} vs plain {mp:.3f} ({verdict})")
    summary = ("Std of each 3x3 layer's response after BN, before addition/ReLU, over "
               f"{res[0]['images']} test images; " + "; ".join(parts) + ". The paper (Fig. 7) reports ResNets' "
               "responses generally smaller than the plain nets'.")
    return {"checkpoints": paths, "summary": summary}
