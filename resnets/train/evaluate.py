"""Evaluate a checkpoint on the CIFAR test set: ``resnets evaluate --checkpoint PATH --data DIR``."""
from __future__ import annotations

from typing import Any

from ..data import DeviceLoader, load_cifar
from . import checkpoint as ck
from .loop import evaluate_model, normalizer_from_checkpoint
from .runtime import pick_runtime


def evaluate_checkpoint(path: str, data: str | None = None, *, device: str = "auto", precision: str = "auto",
                        batch_size: int = 500, subset: int | None = None, progress: bool = True) -> dict[str, Any]:
    c = ck.load_checkpoint(path, with_state=False)
    model = ck.model_from_checkpoint(c)
    normalizer = normalizer_from_checkpoint(c)
    dataset = c.meta.get("dataset", "cifar10")
    cifar = load_cifar(dataset, root=data, progress=progress)
    if c.classes and list(cifar.classes) != list(c.classes):
        raise ck.CheckpointError(f"{c.path}: trained on classes {c.classes[:3]}..., the data has {cifar.classes[:3]}...")
    rt = pick_runtime(device, precision)
    model = model.to(rt.device, memory_format=rt.memory_format)
    images, labels = cifar.test_images, cifar.test_labels
    if subset:
        images, labels = images[:subset], labels[:subset]
    loader = DeviceLoader(images, labels, batch_size, rt.device, train=False, normalizer=normalizer,
                          channels_last=rt.channels_last)
    return {"checkpoint": str(c.path), "model": c.model_name, "step": c.step, **evaluate_model(model, loader, rt)}
