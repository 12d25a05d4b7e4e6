"""Trained weights that ship inside the package: ``create_model("resnet20", weights="cifar10")``.

Each entry is one measured run (docs/models.md has its card): a ``.safetensors`` file in ``resnets/models/weights``
holding the weights, the preprocessing (the per-pixel training mean, Sec. 4.2), the class names and the recipe as a
checkpoint of ``resnets train`` does, plus a ``card`` with the measured test error and where it was measured.
The file's SHA-256 is fixed here and checked before anything is loaded.

    python -m resnets.models.pretrained pack CHECKPOINT --name resnet20 --tag cifar10-paper --card card.json
    python -m resnets.models.pretrained list
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Pretrained:
    model: str
    tag: str
    file: str                  # in resnets/models/weights
    sha256: str                # of the whole file
    test_error: float          # % on the 10,000 CIFAR-10 test images, as measured when it was trained
    errors_first_1000: int     # wrong top-1 predictions on the first 1,000 test images, fp32 on a CPU (the tests)
    recipe: str                # one line; docs/models.md has the card
    kwargs: dict[str, Any] = field(default_factory=lambda: {"num_classes": 10})   # create_model arguments

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


_PAPER = "cifar-paper (Sec. 4.2), 64k iterations on the 45k/5k split, NVIDIA H200, 2026-11-27"
_FAST = "cifar-fast (not the paper), 50 epochs, 53 min on a 2-core CPU, 2026-11-27"
_FAST32 = "cifar-fast (not the paper), 50 epochs, 95 min on a 2-core CPU, 2026-11-27"
_FAST44 = "cifar-fast (not the paper), 50 epochs, 124 min on a 2-core CPU, 2026-11-27"
_FAST56 = "cifar-fast (not the paper), 50 epochs, 291 min on a 2-core CPU (two launches), 2026-11-27"
_FASTP56 = "cifar-fast (not the paper), 50 epochs, 146 min on a 2-core CPU, 2026-11-28"
_FAST110 = "cifar-fast (not the paper), 50 epochs, 310 min on a 2-core CPU (three launches), 2026-11-27/28"

# Measured runs only (docs/models.md). test_error: fp32 on a CPU, all 10,000 test images.
PRETRAINED: dict[tuple[str, str], Pretrained] = {
    (p.model, p.tag): p for p in [
        Pretrained("resnet20", "cifar10-paper", "resnet20-cifar10-paper.safetensors",
                   "8d870a1274c8e1dd91195acf39876594e6a4311ac8208a7e4ca0adecdff38d3b", 8.71, 80, _PAPER),
        Pretrained("plain20", "cifar10-paper", "plain20-cifar10-paper.safetensors",
                   "1e9e749176e67eb521a261579a6a74911dce0ca40794f06cc4d60284a3e17b5a", 9.73, 97, _PAPER),
        Pretrained("resnet20", "cifar10-fast", "resnet20-cifar10-fast.safetensors",
                   "401c00df8f8ec860aae56a1a9db47fbc0baa10048025e438121e21bf383336f8", 8.04, 72, _FAST),
        Pretrained("resnet32", "cifar10-fast", "resnet32-cifar10-fast.safetensors",
                   "ce1896fc149f407ecda35a732290d4112d76c1acac8dea2c83fa0b0f4f1e56fe", 7.44, 66, _FAST32),
        Pretrained("resnet44", "cifar10-fast", "resnet44-cifar10-fast.safetensors",
                   "fbd0d3a9c69ff168b6c1fe7c299c2ccb7540ea2267a18d672c1619f625e2690d", 7.06, 67, _FAST44),
        Pretrained("resnet56", "cifar10-fast", "resnet56-cifar10-fast.safetensors",
                   "46d690ba5f9f4a9d8f96f46aa42a27910169f7cef4b9cd3f0c8ac45036ca643c", 7.27, 77, _FAST56),
        Pretrained("resnet110", "cifar10-fast", "resnet110-cifar10-fast.safetensors",
                   "d97173bb00fc3b4c9c63ac646f9111b4f48ad0bb369f6f6f93f5768cc0e43a9b", 6.78, 59, _FAST110),
        Pretrained("plain56", "cifar10-fast", "plain56-cifar10-fast.safetensors",
                   "a3fa7a54fe4c5e59f1ac362252118930ec19fe8c886e6e45cdf027997ca6817f", 16.73, 166, _FASTP56),
    ]}
# "cifar10": the net's best measured weights
ALIASES: dict[tuple[str, str], str] = {("resnet20", "cifar10"): "cifar10-fast", ("plain20", "cifar10"): "cifar10-paper",
                                       ("resnet32", "cifar10"): "cifar10-fast", ("resnet44", "cifar10"): "cifar10-fast",
                                       ("resnet56", "cifar10"): "cifar10-fast", ("resnet110", "cifar10"): "cifar10-fast",
                                       ("plain56", "cifar10"): "cifar10-fast"}


def available(model: str | None = None) -> list[str]:
    """``model:tag`` of every shipped weights file (aliases included)."""
    keys = list(PRETRAINED) + list(ALIASES)
    return sorted(f"{m}:{t}" for m, t in keys if model is None or m == model)


def resolve(model: str, tag: str) -> Pretrained:
    tag = ALIASES.get((model, tag), tag)
    p = PRETRAINED.get((model, tag))
    if p is None:
        have = ", ".join(available(model)) or "none"
        everything = ", ".join(available()) or "none"
        raise ValueError(f"no shipped {tag!r} weights for {model}; for {model}: {have} (all shipped: {everything})")
    return p


def shipped_kwargs(model: str, tag: str) -> dict[str, Any]:
    """The ``create_model`` arguments the shipped weights were trained with."""
    return dict(resolve(model, tag).kwargs)


def checked_path(model: str, tag: str) -> Path:
    """The shipped file of ``model``/``tag`` after its SHA-256 was checked; a clear error if missing or damaged."""
    p = resolve(model, tag)
    if not p.path.is_file():
        raise FileNotFoundError(f"the shipped weights {p.path} are missing: the installation is incomplete; "
                                "reinstall resnets")
    digest = hashlib.sha256(p.path.read_bytes()).hexdigest()
    if digest != p.sha256:
        raise ValueError(f"the shipped weights {p.path} are damaged: SHA-256 {digest[:16]}..., expected "
                         f"{p.sha256[:16]}...; reinstall resnets")
    return p.path


def is_pretrained_tag(weights: Any) -> bool:
    """Whether ``weights`` names shipped weights (a tag such as "cifar10") rather than a file path: a weights file
    or a checkpoint folder of that name (cifar10-run, say) is a path; any other folder (a CIFAR-10 data folder
    named cifar10 in the working directory) does not hide the tag."""
    if not (isinstance(weights, str) and weights.startswith("cifar") and not Path(weights).suffix):
        return False
    p = Path(weights)
    return not (p.is_file() or (p / "model.safetensors").is_file())


def pack(checkpoint: str, out: str, card: dict[str, Any]) -> str:
    """Write a shipped-weights file from a training checkpoint: its weights, preprocessing and metadata, without
    the optimizer state, plus ``card``. Returns the file's SHA-256."""
    import torch

    from ..train import checkpoint as ck

    c = ck.load_checkpoint(checkpoint, with_state=False)
    model = ck.model_from_checkpoint(c)
    meta = {k: v for k, v in c.meta.items() if k not in ("weights_sha256", "state_sha256")}
    meta["card"] = card
    tmp = Path(out).with_suffix(".tmp-pack")
    ck.save_checkpoint(tmp, model, meta=meta, preprocess=c.preprocess)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    (tmp / ck.WEIGHTS).replace(out)
    tmp.rmdir()
    again = ck.load_checkpoint(out, with_state=False)
    assert all(torch.equal(again.weights[k], c.weights[k]) for k in c.weights)
    return hashlib.sha256(Path(out).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resnets.models.pretrained", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="checkpoint -> resnets/models/weights/MODEL-TAG.safetensors")
    p.add_argument("checkpoint")
    p.add_argument("--name", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--card", required=True, help="JSON file: the measured numbers and where they come from")
    sub.add_parser("list")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for key in available():
            m, t = key.split(":")
            r = resolve(m, t)
            print(f"{key:28s} {r.file:36s} test error {r.test_error:.2f}%  {r.recipe}")
        return 0
    out = WEIGHTS_DIR / f"{args.name}-{args.tag}.safetensors"
    digest = pack(args.checkpoint, str(out), json.loads(Path(args.card).read_text()))
    print(f"{out} ({out.stat().st_size} bytes)\nsha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
