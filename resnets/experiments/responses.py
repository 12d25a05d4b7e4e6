"""Fig. 7 of He et al. 2015: standard deviations of the responses of each 3x3 layer.

"The responses are the outputs of each 3x3 layer, after BN and before other nonlinearity (ReLU/addition)."
For each such layer we take the output of its BN over the evaluation images and report the standard deviation
per channel (over images and positions), averaged over channels. The paper finds ResNets' responses generally
smaller than their plain counterparts', supporting that residual functions are closer to zero.

    resnets analyze responses --checkpoint runs/plain20/checkpoints/step-00000500 \
        --checkpoint runs/resnet20/checkpoints/step-00000500 --out fig7.png
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DeviceLoader, load_cifar
from ..models import BasicBlock, Bottleneck
from ..train import checkpoint as ck
from ..train.sources import normalizer_from_checkpoint
from ..train.runtime import pick_runtime


def response_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BN that follows each 3x3 convolution inside the residual (or plain) blocks, in network order."""
    layers = []
    for name, block in model.named_modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            for conv_name in ("conv1", "conv2", "conv3"):
                conv = getattr(block, conv_name, None)
                if conv is not None and conv.kernel_size == (3, 3):
                    layers.append((f"{name}.{conv_name.replace('conv', 'bn')}", getattr(block, conv_name.replace("conv", "bn"))))
    return layers


@torch.no_grad()
def layer_response_std(model: nn.Module, loader) -> list[float]:
    """Per-layer response std (mean over channels of the per-channel std over images and positions)."""
    layers = response_layers(model)
    sums = [None] * len(layers)

    def hook(i):
        def fn(_m, _inp, out):
            o = out.detach().double()
            s = (o.sum(dim=(0, 2, 3)), (o * o).sum(dim=(0, 2, 3)), o.numel() // o.shape[1])
            if sums[i] is None:
                sums[i] = list(s)
            else:
                sums[i][0] += s[0]
                sums[i][1] += s[1]
                sums[i][2] += s[2]
        return fn

    handles = [bn.register_forward_hook(hook(i)) for i, (_, bn) in enumerate(layers)]
    was = model.training
    model.eval()
    try:
        for x, _ in loader:
            model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    out = []
    for s1, s2, n in sums:
        var = (s2 / n - (s1 / n) ** 2).clamp_min(0)
        out.append(var.sqrt().mean().item())
    return out


def analyze_checkpoints(paths: list[str], data: str | None = None, *, subset: int | None = None,
                        device: str = "auto", data_obj=None) -> list[dict[str, Any]]:
    rt = pick_runtime(device, "fp32", False)
    results = []
    for p in paths:
        c = ck.load_checkpoint(p, with_state=False)
        model = ck.model_from_checkpoint(c).to(rt.device)
        cifar = data_obj or load_cifar(c.meta.get("dataset", "cifar10"), root=data, progress=False)
        images, labels = cifar.test_images, cifar.test_labels
        if subset:
            images, labels = images[:subset], labels[:subset]
        loader = DeviceLoader(images, labels, 500, rt.device, train=False, normalizer=normalizer_from_checkpoint(c))
        stds = layer_response_std(model, loader)
        residual = bool(getattr(model, "residual", True))
        label = f"{'ResNet' if residual else 'plain'}-{getattr(model, 'depth', '?')}"
        results.append({"checkpoint": str(p), "model": c.model_name, "label": label, "residual": residual,
                        "std": stds, "images": len(labels)})
    return results


def plot_responses(results: list[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Fig. 7 layout: top, std by layer index (original order); bottom, sorted by magnitude."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6.5))
    for r in results:
        style = "-" if r["residual"] else "--"
        ax1.plot(range(1, len(r["std"]) + 1), r["std"], style, marker=".", label=r["label"])
        ax2.plot(range(1, len(r["std"]) + 1), sorted(r["std"], reverse=True), style, marker=".", label=r["label"])
    ax1.set_xlabel("layer index (original)")
    ax2.set_xlabel("layer index (sorted by magnitude)")
    for ax in (ax1, ax2):
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Std of 3x3 layer responses (after BN, before addition/ReLU); cf. He et al. 2015 Fig. 7")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return out
