"""Speed work (issue 5): BN folding and the inference model agree with the original network; the benchmark and the
GPU suite run their logic on the CPU (CUDA-only parts skipped with a reason); the graph step falls back on a CPU."""
from __future__ import annotations

import json
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


def test_converge_report_counts_every_launch_of_a_resumed_run():
    """Logs of runs resumed before checkpoints kept their time restart elapsed_s at 0 in each launch; the
    convergence report's minutes go on from the record where the launch resumed."""
    import converge_cifar
    rows = [{"step": 50, "split": "train", "elapsed_s": 10.0}, {"step": 100, "split": "test", "elapsed_s": 20.0},
            {"step": 100, "split": "event", "event": "resumed"}, {"step": 150, "split": "train", "elapsed_s": 4.0},
            {"step": 200, "split": "test", "elapsed_s": 9.0}, {"step": 250, "split": "train", "elapsed_s": 30.0}]
    assert [r.get("elapsed_s") for r in converge_cifar.training_clock(rows)] == [10, 20, None, 24, 29, 50]
    assert [r.get("elapsed_s") for r in converge_cifar.training_clock(rows[:2])] == [10, 20]


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
