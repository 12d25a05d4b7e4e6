"""Speed work (issue 5): BN folding and the inference model agree with the original network; the benchmark and the
GPU suite run their logic on the CPU (CUDA-only parts skipped with a reason); the graph step falls back on a CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import resnets
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402  (benchmarks/bench.py: the harness lives beside the package, not in it)
from resnets.models import fold_batchnorm
from resnets.models.inference import FP32_ATOL, FP32_RTOL, InferenceModel, inference_model, max_logit_error
from resnets.train.graphs import StaticStep, maybe_graph_step
from resnets.train.step import make_eager_step
from resnets.train.runtime import pick_runtime


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)      # a shared 2-core machine: one thread is faster and steadier
    yield
    torch.set_num_threads(n)


@torch.no_grad()
def random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def assert_close_logits(err: float, scale: float) -> None:
    assert err <= FP32_RTOL * scale + FP32_ATOL, f"max |diff| {err:.3g} for logits up to {scale:.3g}"


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet50", 64)])
def test_fold_batchnorm_matches_eval_model(name, size):
    torch.manual_seed(0)
    model = random_bn(resnets.create_model(name))
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())        # the original is untouched
    x = torch.randn(3, 3, size, size)
    err, scale = max_logit_error(model, folded, x)
    assert scale > 1e-3
    assert_close_logits(err, scale)


@pytest.mark.parametrize("compile", ["none", "jit"])
def test_inference_model_parity(compile):
    torch.manual_seed(0)
    model = random_bn(resnets.create_model("resnet20"))
    model.train()                                        # inference_model must not depend on (or change) the mode
    fast = inference_model(model, compile=compile)
    assert isinstance(fast, InferenceModel) and fast.compiler == compile
    assert model.training
    conv = next(m for m in fast.folded.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.bias is not None
    x = torch.randn(5, 3, 32, 32)                       # NCHW in: converted inside
    err, scale = max_logit_error(model, fast, x)
    assert_close_logits(err, scale)
    with torch.enable_grad():
        assert not fast(x).requires_grad


def test_inference_model_rejects_unknown_compiler():
    with pytest.raises(ValueError, match="unknown compiler"):
        inference_model(resnets.create_model("resnet20", depth=8), compile="tensorrt")


@pytest.mark.slow
def test_inference_model_inductor_parity():
    torch.manual_seed(0)
    model = random_bn(resnets.create_model("resnet20", depth=8))
    fast = inference_model(model, compile="inductor")
    err, scale = max_logit_error(model, fast, torch.randn(4, 3, 32, 32))
    assert_close_logits(err, scale)


def test_time_impls_alternates_and_pairs():
    calls: list[str] = []
    impls = [bench.Impl(k, k, "ours" if k == "a" else "peer", lambda k=k: calls.append(k)) for k in ("a", "b")]
    times = bench.time_impls(impls, warmup=1, repeats=4, iters=2, sync=lambda: None)
    assert calls[:2] == ["a", "b"]                                        # warm-up
    assert calls[2:] == ["a", "a", "b", "b", "b", "b", "a", "a"] * 2        # ABBA across repeats
    assert all(len(v) == 4 for v in times.values())
    assert bench.paired_ratio([1.0, 2.0, 1.0], [2.0, 2.0, 3.0]) == 2.0


def test_bench_smoke_prints_ratio_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.cli(["--smoke", "--threads", "1", "--cases", "resnet20-train", "resnet50-infer",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| case | implementation |" in text and "ratio ours/peer" in text
    assert "ours: channels_last fp32, eager step" in text and "bare loop: eager NCHW fp32" in text
    assert "BN folded" in text and "torchvision: eager NCHW fp32" in text
    result = json.loads(out.read_text())
    assert result["machine"]["threads"] == 1 and len(result["machine"]["loadavg_start"]) == 3
    train, infer = result["cases"]
    assert {r["key"] for r in train["impls"]} == {"ours", "bare"}
    assert train["ratios"][0]["ours"] == "ours" and train["ratios"][0]["peer"] == "bare"
    assert train["ratios"][0]["ratio"] > 0 and train["impls"][0]["graph"] is False
    ours = next(r for r in infer["impls"] if r["key"] == "ours")
    assert ours["max_abs_logit_diff"] <= FP32_RTOL * ours["max_abs_logit"] + FP32_ATOL


def test_gpu_suite_smoke_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--threads", "1",
                        "--cases", "resnet20-train", "resnet50-train", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert (tmp_path / "gpu_suite.md").exists()
    assert not result["errors"]
    assert r.stdout.rstrip().splitlines()[-1].endswith("gpu_suite.json")     # the tables come last
    assert "ratio ours/peer" in r.stdout
    (parity,) = result["parity"]
    assert parity["max_abs_loss_diff_graph_vs_eager"] == 0.0 and parity["finite"]
    if not torch.cuda.is_available():
        assert parity["captured"] is False and "logic only" in parity["note"]
        reasons = " ".join(s["what"] + ": " + s["reason"] for s in result["skipped"])
        assert "CUDA graph capture" in reasons and "no CUDA device" in reasons
        assert "skipped: whole-step CUDA graph capture" in r.stdout
    assert [c["case"] for c in result["bench"]["cases"]] == ["resnet20-train", "resnet50-train"]
    assert {r["key"] for r in result["bench"]["cases"][1]["impls"]} >= {"ours", "torchvision"}


def test_gpu_suite_without_smoke_on_cpu_skips_everything(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    # in-process (the script as a script is run by the test above): main() is what `python3 gpu_suite.py` calls
    import gpu_suite
    assert gpu_suite.main(["--out", str(tmp_path)]) == 0, capsys.readouterr().err[-2000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert not result["bench"]["cases"] and not result["parity"]
    assert any(s["what"] == "every case" and "--smoke" in s["reason"] for s in result["skipped"])


def test_graph_step_falls_back_on_cpu():
    rt = pick_runtime("cpu", "fp32", True)
    model = resnets.create_model("resnet20", depth=8).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager = make_eager_step(model, opt, rt)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))
    src = SimpleNamespace(batch=lambda step: (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # "auto" falls back silently
        assert maybe_graph_step(SimpleNamespace(cuda_graph="auto", on_nan="stop"), model, opt, rt, src, eager) is eager
    with pytest.warns(UserWarning, match="CUDA graphs need a GPU"):
        assert maybe_graph_step(SimpleNamespace(cuda_graph=True, on_nan="stop"), model, opt, rt, src, eager) is eager
    with pytest.raises(ValueError, match="warmup >= 1"):
        StaticStep(model, opt, rt.autocast, (4, 3, 32, 32), rt.device, rt.memory_format, capture=True, warmup=0)


def test_side_by_side_benchmark_smoke_with_stacks(tmp_path):
    """benchmarks/side_by_side.py, the script a lent GPU runs for issue 15, on tiny nets here: every row, the
    stacked ones included, is measured and nothing fails. The graphs part's nets are of depths 8, 8 and 14
    here, so the stack of all of them spans two depths."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "side_by_side.py"), "--smoke", "--graph-set",
                        "r20+p20+r110", "--sets", "r20+p20", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "side_by_side.json").read_text())
    assert not res["errors"]
    q = res["parity"]    # the stacked step trains like the nets alone: here eagerly, in fp32
    assert q["finite"] and q["nets"] == ["resnet-14", "resnet-8", "plain-8"]
    assert max(q["max_abs_diff_stacked_vs_alone"]) < 1e-4 and max(q["max_abs_diff_alone_vs_alone"]) == 0
    assert q["other_layout"] in ("channels_last", "contiguous") and max(q["max_abs_diff_other_layout"]) < 1e-2
    assert len(q["curves"]["stacked"]) == 4 and len(q["curves"]["layout"][0]) == 3
    assert res["graphs"]["stacks"] == [2, 1] and res["graphs"]["stacked_one_stream_ms"] > 0
    assert res["graphs"]["stacked_all_ms"] > 0
    assert res["end_to_end"]["r20+p20"]["stacked_ms_per_round"] > 0
    assert res["end_to_end"]["r20+p20"]["stacked_all_ms_per_round"] > 0
    assert "stacked by depth" in r.stdout and "all 3 stacked in one network" in r.stdout


def test_stack_profile_smoke(tmp_path):
    """benchmarks/stack_profile.py, the next lent GPU's look at where a stacked step's time goes, on tiny sizes
    here: every part runs and writes its numbers."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stack_profile.py"), "--smoke", "--out",
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "stack_profile.json").read_text())
    assert not res["errors"] and res["nets"] == ["resnet-14", "plain-8"]
    assert {c["layout"] for c in res["convs"]} == {"channels_last", "NCHW"}
    assert all(c["grouped_ms"] > 0 and c["separate_ms"] > 0 for c in res["convs"])
    assert set(res["layouts"]) == {"as trained", "NCHW"} and min(res["layouts"].values()) > 0
    prof = res["profile"]["all stacked"]
    assert prof["busy_ms_per_step"] > 0 and prof["by_kind"]["convolution"]["kernels_per_step"] > 0
    assert res["profile"]["deepest alone"]["nets"] == ["resnet-14"]
    assert res["syncs"]["runs"] == 2 and res["syncs"]["checked"] is False and res["syncs"]["steps"] == [3, 6]
    assert all(c["captured"] is False for c in res["convs"])      # no GPU: nothing is captured


def test_stack_profile_times_a_width_again_uncaptured_when_its_capture_fails(tmp_path):
    """On 2026-11-28 a capture failed inside cuDNN and poisoned the process for every later part: now each width
    runs in a process of its own, and one whose capture fails is timed again without capture."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stack_profile.py"), "--smoke", "--out",
                        str(tmp_path), "--parts", "convs", "syncs"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "STACK_PROFILE_FAIL_CAPTURE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "failed with its timings captured; again, each call synchronised" in r.stdout
    res = json.loads((tmp_path / "stack_profile.json").read_text())
    assert not res["errors"] and res["convs"] and all(c["captured"] is False for c in res["convs"])
    assert "syncs" in res and "profile" not in res


def test_converge_report_counts_every_launch_of_a_resumed_run():
    """Logs of runs resumed before checkpoints kept their time restart elapsed_s at 0 in each launch; the
    convergence report's minutes go on from the record where the launch resumed."""
    import converge_cifar
    rows = [{"step": 50, "split": "train", "elapsed_s": 10.0}, {"step": 100, "split": "test", "elapsed_s": 20.0},
            {"step": 100, "split": "event", "event": "resumed"}, {"step": 150, "split": "train", "elapsed_s": 4.0},
            {"step": 200, "split": "test", "elapsed_s": 9.0}, {"step": 250, "split": "train", "elapsed_s": 30.0}]
    assert [r.get("elapsed_s") for r in converge_cifar.training_clock(rows)] == [10, 20, None, 24, 29, 50]
    assert [r.get("elapsed_s") for r in converge_cifar.training_clock(rows[:2])] == [10, 20]


def test_gpu_stage_cuts_the_data_into_parts_that_fit_beside_the_tree_and_unpacks_them(tmp_path):
    """benchmarks/gpu_stage.sh: every part plus the working tree fits one call, and --unpack on the other side
    gives back the staged folders and the resume files byte for byte (here with a 20 MiB call limit)."""
    import shutil
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_stage.sh", repo / "benchmarks")
    (repo / ".gitignore").write_text(".devdata\n")
    (repo / "big.bin").write_bytes(os.urandom(3 << 20))      # a 3 MiB tracked file: the tree the parts must leave room for
    rng = torch.Generator().manual_seed(0)
    files = {}
    for part, names in {"p1": ["a.png"], "p2": ["b.png"], "p3": ["c.png", "assemble.sh"]}.items():
        (repo / ".devdata" / part).mkdir(parents=True)
        for n in names:
            data = (b"#!/usr/bin/env bash\necho assembled $1 > \"$1/assembled\"\n" if n == "assemble.sh" else
                    torch.randint(0, 256, (9 << 20,), generator=rng, dtype=torch.uint8).numpy().tobytes())
            (repo / ".devdata" / part / n).write_bytes(data)
            files[f"{part}/{n}"] = data
    resume = tmp_path / "resume"
    resume.mkdir()
    for n in ("paper-results.tar.gz", "paper-weights.tar.aa", "paper-weights.tar.ab"):
        (resume / n).write_bytes(os.urandom(4 << 20))
        files[f"resume-staged/{n}"] = (resume / n).read_bytes()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "t"], cwd=repo, check=True)
    env = {**os.environ, "GPU_CALL_LIMIT_MIB": "20"}
    r = subprocess.run(["bash", "benchmarks/gpu_stage.sh", str(resume)], cwd=repo, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    parts = sorted((repo / ".devdata" / "stage").glob("c*/part"))
    assert len(parts) == 3 and "call 3: carry [\".devdata/stage/c03\"]" in r.stdout      # 39 MiB in 15 MiB parts
    assert all(p.stat().st_size + (3 << 20) <= 20 << 20 for p in parts)
    there = tmp_path / "there"                       # the GPU machine: the script, and the parts the calls carried
    (there / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_stage.sh", there / "benchmarks")
    shutil.copytree(repo / ".devdata" / "stage", there / ".devdata" / "stage")
    r = subprocess.run(["bash", "benchmarks/gpu_stage.sh", "--unpack"], cwd=there, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for rel, data in files.items():
        assert (there / ".devdata" / rel).read_bytes() == data, rel
    assert (there / ".devdata" / "assembled").read_text() == "assembled .devdata\n"
    r = subprocess.run(["bash", "benchmarks/gpu_stage.sh", str(tmp_path / "nothing")], cwd=repo, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "lacks paper-results.tar.gz" in r.stderr


def test_converge_report_targets_table6_for_resnets_only(tmp_path):
    """Table 6 lists ResNets: a plain net of the same depth gets no paper target in the convergence report."""
    import converge_cifar
    rows = [{"step": 50, "split": "train", "error": 50.0, "elapsed_s": 10.0},
            {"step": 100, "split": "test", "error": 30.0, "elapsed_s": 20.0}]
    for model, target in (("plain20", None), ("resnet20", 8.75)):
        out = tmp_path / model
        out.mkdir()
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "config.json").write_text(json.dumps({"model": model, "recipe": "cifar-fast", "model_kwargs": {}}))
        assert converge_cifar.report(out)["target_error"] == target
