"""Every GPU benchmark of issue 5 in one process: whole-step CUDA graphs for the CIFAR nets, ResNet-50 training and
inference against torchvision/timm, and a check that the captured step trains like the eager one.

    bash benchmarks/gpu_suite.sh                          # on a GPU machine: about 5 min on an H100
    python3 benchmarks/gpu_suite.py --smoke               # anywhere, seconds: tiny sizes; on a CPU the CUDA-only
                                                          # parts are listed as skipped, with the reason
    python3 benchmarks/gpu_suite.py --compile-in-graph    # + rows for `resnets train --compile` (compile in the graph)

What runs (all in this process, so the ratios come from the same machine state; docs/performance.md):
1. graph vs eager losses: ResNet-20/56/110, batch 128, bf16 autocast, channels_last, 100 SGD steps from one
   initialisation on the same augmented batches (lr / 10 half-way, so the graph is re-captured once); the max
   |loss difference| of graph vs eager, next to eager vs eager (cuDNN's run-to-run floor).
2. CIFAR ResNet-20/56/110 training step, batch 128: the eager step vs ours (``maybe_graph_step`` ->
   ``resnets.train.graphs.StaticStep(capture=True)``), ms/step.
3. ResNet-50 training step, 224 px, batch 256, bf16 + channels_last: ours (whole-step graph) vs torchvision and timm
   eager (goal: >= 1.26x torchvision).
4. ResNet-50 inference, batch 256, bf16: ours (``inference_model``: BN folded, channels_last, bf16 weights,
   inductor with freezing) vs torchvision ``torch.compile``d under bf16 autocast (goal: >= 25,000 img/s).

``--compile-in-graph`` adds rows for torch.compile inside the captured step (BN + ReLU + add fusion), which is what
``resnets train --compile`` does on a GPU: 1.47x torchvision for ResNet-50 on an H200 (docs/performance.md).

Output: the markdown tables last on stdout, and ``$OUT/gpu_suite.json`` + ``$OUT/gpu_suite.md`` (``--out``, else
the environment's ``OUT``, else ./bench-out), rewritten after every part so a cut-off run keeps what it measured.
A part that fails is recorded with its error and the suite goes on; ``--budget-s`` (default 450) skips the parts
that would start after that many seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import bench  # noqa: E402  (benchmarks/bench.py, beside this file)

PARITY_MODELS = ["resnet20", "resnet56", "resnet110"]
CASES = ["resnet20-train", "resnet56-train", "resnet110-train", "resnet50-train", "resnet50-infer"]
# ../shared/gpu/README.md, H100, PyTorch 2.11.0+cu130, 2026-11-26: eager and whole-step graph ms/step, batch 128
ANCHORS_MS = {"resnet20-train": (9.56, 2.16), "resnet56-train": (24.67, 5.92), "resnet110-train": (51.97, 11.58)}
PAPER_STEPS = 64000                   # Sec. 4.2: 64k iterations


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny nets and batches (checks the suite; runs on a CPU)")
    p.add_argument("--out", default=os.environ.get("OUT") or "./bench-out", help="directory for the JSON/markdown")
    p.add_argument("--cases", nargs="+", choices=CASES, help="benchmark cases (default: all)")
    p.add_argument("--parity", nargs="*", default=None, help=f"nets for the loss check (default {PARITY_MODELS})")
    p.add_argument("--parity-steps", type=int, default=100)
    p.add_argument("--compile-in-graph", action="store_true", help="add: torch.compile inside the captured step")
    p.add_argument("--repeats", type=int, help="timed repeats (default 7)")
    p.add_argument("--iters", type=int, help="iterations per repeat (default 20)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no part after this many seconds")
    return p.parse_args(argv)


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.perf_counter()
        if args.threads:
            torch.set_num_threads(args.threads)
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.opts = bench.Options(device=self.device, smoke=args.smoke, repeats=args.repeats, iters=args.iters,
                                  compile_in_graph=args.compile_in_graph and self.cuda)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.result = {"suite": "gpu_suite", "argv": sys.argv[1:], "machine": bench.machine_info(self.opts),
                       "parity": [], "bench": {"machine": None, "options": None, "cases": []}, "skipped": [],
                       "errors": []}
        self.result["bench"]["machine"] = self.result["machine"]
        self.result["bench"]["options"] = vars(args)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def skip(self, what: str, why: str) -> None:
        self.result["skipped"].append({"what": what, "reason": why})
        print(f"[suite] skipped {what}: {why}", flush=True)

    def part(self, what: str, fn) -> None:
        if self.elapsed() > self.args.budget_s:
            self.skip(what, f"time budget: {self.elapsed():.0f} s used of --budget-s {self.args.budget_s:.0f}")
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one failing part must not cost the others' numbers
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.result["errors"].append({"what": what, "error": msg, "traceback": traceback.format_exc()})
            print(f"[suite] {what} FAILED: {msg}", flush=True)
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            print(f"[suite] {what}: {time.perf_counter() - t:.1f} s (total {self.elapsed():.0f} s)", flush=True)
            self.save()

    # -- parts ------------------------------------------------------------------------------------------------
    def parity(self, name: str) -> None:
        if self.args.smoke:
            r = bench.graph_loss_parity(name, steps=4, batch=bench.SMOKE["batch"], device=self.device,
                                        depth=bench.SMOKE["cifar_depth"])
        else:
            r = bench.graph_loss_parity(name, steps=self.args.parity_steps, batch=128, device=self.device)
        if not r["captured"]:
            r["note"] = "no CUDA device: logic only (StaticStep with capture=False), not a graph measurement"
        self.result["parity"].append(r)

    def matmul(self) -> None:
        n = 256 if self.args.smoke else (8192 if self.cuda else 2048)
        self.result["bench"]["matmul"] = bench.matmul_gflops(self.device, n=n)

    def case(self, name: str) -> None:
        self.result["bench"]["cases"].append(bench.run_case(bench.CASES[name], self.opts))

    def run(self) -> dict:
        args = self.args
        print(f"[suite] device {self.device}" + (f" ({torch.cuda.get_device_name()})" if self.cuda else "")
              + f", torch {torch.__version__}, smoke={args.smoke}, out={self.out}", flush=True)
        if not self.cuda:
            why = "no CUDA device on this machine"
            self.skip("whole-step CUDA graph capture (parity check and the 'ours' rows of the CIFAR cases)",
                      why + "; the CPU rows below run the same code eagerly")
            self.skip("bf16 autocast, torch.compile'd torchvision inference peer", why)
            if args.compile_in_graph:
                self.skip("--compile-in-graph", why)
            if not args.smoke:
                self.skip("every case", why + "; pass --smoke to run the suite's logic on the CPU at tiny sizes")
                return self.finish()
        parity = PARITY_MODELS if args.parity is None else args.parity
        if args.smoke and args.parity is None:
            parity = parity[:1]                     # at smoke sizes every net is the 8-layer one
        for name in parity:
            self.part(f"parity {name}", lambda n=name: self.parity(n))
        for name in (args.cases or CASES):
            self.part(f"case {name}", lambda n=name: self.case(n))
        self.part("matmul floor", self.matmul)
        return self.finish()

    # -- output -----------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.result["elapsed_s"] = round(self.elapsed(), 1)
        self.result["machine"]["loadavg_end"] = bench._loadavg()
        with open(self.out / "gpu_suite.json", "w") as f:
            json.dump(self.result, f, indent=1, default=str)
            f.write("\n")

    def tables(self) -> str:
        lines = []
        if self.result["parity"]:
            lines += ["| net | steps | captured | max abs loss diff graph vs eager | eager vs eager | "
                      "captures | first -> last loss |", "|---|---|---|---|---|---|---|"]
            for r in self.result["parity"]:
                lines.append(f"| {r['model']} | {r['steps']} | {'yes' if r['captured'] else 'no (CPU: logic only)'} | "
                             f"{r['max_abs_loss_diff_graph_vs_eager']:.3g} | {r['max_abs_loss_diff_eager_vs_eager']:.3g} | "
                             f"{r['captures']} | {r['first_loss']:.3f} -> {r['last_loss_graph']:.3f} |")
            lines.append("")
        cifar = [c for c in self.result["bench"]["cases"] if c.get("case") in ANCHORS_MS and "impls" in c]
        if cifar and self.cuda:
            lines += ["| net (batch 128) | eager ms/step | whole-step graph ms/step | speed-up (paired) | "
                      f"{PAPER_STEPS // 1000}k steps | anchor eager / graph ms (shared/gpu/README.md) |",
                      "|---|---|---|---|---|---|"]
            for c in cifar:
                by = {r["key"]: r for r in c["impls"]}
                ours, eager = by.get("ours"), by.get("eager")
                ratio = next((r["ratio"] for r in c["ratios"] if r["ours"] == "ours" and r["peer"] == "eager"), None)
                if ours and eager:
                    kind = "" if ours.get("graph") else " (NOT captured: eager fallback)"
                    lines.append(f"| {c['case']} | {eager['ms_per_iter']:.2f} | {ours['ms_per_iter']:.2f}{kind} | "
                                 f"{ratio:.2f}x | {PAPER_STEPS * ours['ms_per_iter'] / 60000:.1f} min | "
                                 f"{ANCHORS_MS[c['case']][0]} / {ANCHORS_MS[c['case']][1]} |")
            lines.append("")
        if self.result["bench"]["cases"]:
            lines.append(bench.format_tables(self.result["bench"]))
        for s in self.result["skipped"]:
            lines.append(f"- skipped: {s['what']}: {s['reason']}")
        for e in self.result["errors"]:
            lines.append(f"- FAILED: {e['what']}: {e['error']}")
        lines.append(f"\n{self.elapsed():.0f} s in all; JSON in {self.out / 'gpu_suite.json'}")
        return "\n".join(lines)

    def finish(self) -> dict:
        self.save()
        text = self.tables()
        (self.out / "gpu_suite.md").write_text(text + "\n")
        print("\n" + text, flush=True)
        return self.result


def main(argv: list[str] | None = None) -> int:
    result = Suite(parse_args(argv)).run()
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
