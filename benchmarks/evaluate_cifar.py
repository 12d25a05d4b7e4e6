"""fp32 CPU evaluation of a CIFAR-10 checkpoint or shipped weights file: top-1/top-5 error on all 10,000 test
images, errors on the first 1,000 (the number tests/test_pretrained.py checks) and the error per class.

    python benchmarks/evaluate_cifar.py runs/r32-fast/checkpoints/step-00019500     # docs/models.md cards
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from resnets.data import DeviceLoader, load_cifar  # noqa: E402
from resnets.train import load_checkpoint  # noqa: E402
from resnets.train.checkpoint import model_from_checkpoint  # noqa: E402
from resnets.train.sources import normalizer_from_checkpoint  # noqa: E402
path = sys.argv[1]
c = load_checkpoint(path, with_state=False)
net = model_from_checkpoint(c).eval().float()
cifar = load_cifar("cifar10", progress=False)
loader = DeviceLoader(cifar.test_images, cifar.test_labels, 500, "cpu", train=False, normalizer=normalizer_from_checkpoint(c))
preds, tops, ys = [], [], []
with torch.no_grad():
    for x, y in loader:
        out = net(x)
        preds.append(out.argmax(1)); tops.append(out.topk(5, 1).indices); ys.append(y)
p, t5, y = torch.cat(preds), torch.cat(tops), torch.cat(ys)
wrong = p != y
res = {"n": len(y), "error": round(100 * wrong.float().mean().item(), 2),
       "top5_error": round(100 * (~(t5 == y[:, None]).any(1)).float().mean().item(), 2),
       "errors_first_1000": int(wrong[:1000].sum()),
       "per_class": {name: round(100 * wrong[y == i].float().mean().item(), 1) for i, name in enumerate(c.classes)}}
print(json.dumps(res, indent=1))
