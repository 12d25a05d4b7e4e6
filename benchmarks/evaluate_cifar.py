"""fp32 CPU evaluation of a CIFAR-10 checkpoint or shipped weights file: top-1/top-5 error on all 10,000 test
images, errors on the first 1,000 (the number tests/test_pretrained.py checks) and the error per class.

    python benchmarks/evaluate_cifar.py runs/r32-fast/checkpoints/step-00019500     # docs/models.md cards
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from resnets.train.evaluate import evaluate_checkpoint  # noqa: E402

path = sys.argv[1]
full = evaluate_checkpoint(path, device="cpu", precision="fp32", per_class=True, progress=False)
first = evaluate_checkpoint(path, device="cpu", precision="fp32", subset=1000, progress=False)
print(json.dumps({"n": full["n"], "error": round(full["error"], 2), "top5_error": round(full["top5_error"], 2),
                  "errors_first_1000": round(first["error"] * first["n"] / 100),
                  "per_class": {k: round(v, 1) for k, v in full["per_class_error"].items()}}, indent=1))
