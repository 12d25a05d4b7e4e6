"""Evaluate a checkpoint: ``resnets evaluate --checkpoint PATH --data DIR``.

CIFAR checkpoints on the test set (:func:`evaluate_checkpoint`); ImageFolder (ImageNet-style) checkpoints on
``DIR/val`` with the centre-crop, 10-crop or multi-scale protocol (:func:`evaluate_imagefolder_checkpoint`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DeviceLoader, load_cifar
from . import checkpoint as ck
from .runtime import Runtime, pick_runtime
from .sources import _OnDevice, normalizer_from_checkpoint, spread_subset


def count_wrong(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 mistakes in a batch: how many rows of ``scores`` (N, K) (logits or probabilities) do not
    rank the true label first, and how many do not have it among their 5 highest (all K when K < 5). Two 0-dim
    int64 tensors on the scores' device. The one place resnets counts top-1/top-5 errors."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return (top[:, 0] != labels).sum(), (~(top == labels[:, None]).any(dim=1)).sum()


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], rt: Runtime, *,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   classes: int | None = None) -> dict[str, Any]:
    """Top-1 and top-5 error (%) and mean cross-entropy over every sample of ``loader`` (batches on the device);
    with ``classes``, also ``per_class_error``: the top-1 error (%) of each true class, by class index (None for a
    class with no sample).

    ``reduce``: sums a tensor over ranks in place (``DistContext.all_reduce_sum``) when each rank evaluates its
    own shard; the counts are then those of the whole set."""
    was_training = model.training
    model.eval()
    n, loss_sum = 0, torch.zeros((), device=rt.device, dtype=torch.float64)
    wrong1 = torch.zeros((), device=rt.device, dtype=torch.int64)
    wrong5 = torch.zeros_like(wrong1)
    k = classes or 0
    class_wrong = torch.zeros(k, device=rt.device, dtype=torch.int64)
    class_n = torch.zeros_like(class_wrong)
    for x, y in loader:
        if y.numel() == 0:      # every image of the batch was unreadable (ImageFolder evaluation leaves them out)
            continue
        with rt.autocast():
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        w1, w5 = count_wrong(logits, y)
        wrong1 += w1
        wrong5 += w5
        n += y.numel()
        if k:
            class_n += torch.bincount(y, minlength=k)
            class_wrong += torch.bincount(y[logits.argmax(1) != y], minlength=k)
    model.train(was_training)
    if reduce is not None:
        t = torch.cat([torch.stack([loss_sum, wrong1.double(), wrong5.double(),
                                    torch.tensor(float(n), dtype=torch.float64, device=rt.device)]),
                       class_wrong.double(), class_n.double()])
        reduce(t)
        loss_sum, wrong1, wrong5, n = t[0], t[1].round().long(), t[2].round().long(), int(round(t[3].item()))
        class_wrong, class_n = t[4:4 + k].round().long(), t[4 + k:].round().long()
    res: dict[str, Any] = {"error": 100.0 * wrong1.item() / n, "top5_error": 100.0 * wrong5.item() / n,
                           "loss": loss_sum.item() / n, "n": n}
    if k:
        res["per_class_error"] = [100.0 * w / c if c else None for w, c in zip(class_wrong.tolist(), class_n.tolist())]
    return res


def evaluate_checkpoint(path: str, data: str | None = None, *, device: str = "auto", precision: str = "auto",
                        batch_size: int = 500, subset: int | None = None, progress: bool = True,
                        per_class: bool = False) -> dict[str, Any]:
    """A CIFAR checkpoint on the test set (its first ``subset`` images): top-1/top-5 error, loss; ``per_class``:
    also ``per_class_error``, {class name: top-1 error %}."""
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
    res = evaluate_model(model, loader, rt, classes=len(cifar.classes) if per_class else None)
    if per_class:
        res["per_class_error"] = dict(zip(cifar.classes, res["per_class_error"]))
    return {"checkpoint": str(c.path), "model": c.model_name, "step": c.step, **res}


def is_imagefolder_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` was written by an ImageFolder run (``resnets evaluate`` picks the val protocol by it)."""
    try:
        return ck.load_checkpoint(path, with_state=False).meta.get("dataset") == "imagefolder"
    except ck.CheckpointError:
        return False


def _list_collate(batch):
    batch = [b for b in batch if b is not None]
    return [b[0] for b in batch], torch.as_tensor([int(b[1]) for b in batch], dtype=torch.int64)


@torch.no_grad()
def evaluate_imagefolder_checkpoint(path: str | os.PathLike, data: str | os.PathLike | None, *,
                                    protocol: str = "center", scales: Sequence[int] | None = None,
                                    flip: bool = False, device: str = "auto", precision: str = "auto",
                                    batch_size: int = 32, workers: int = 4, subset: int | None = None
                                    ) -> dict[str, Any]:
    """Top-1/top-5 error of an ImageFolder checkpoint on ``data/val`` (or ``data`` itself if it has no ``val``).

    ``protocol``: ``"center"`` (shorter side ``eval_resize``, one ``crop`` x ``crop`` centre crop: what training
    logs), ``"ten-crop"`` (Krizhevsky's 10 crops, softmax scores averaged; the paper's Tables 2-4 use it) or
    ``"multi-scale"`` (fully-convolutional, whole images at ``scales``, default {224, 256, 384, 480, 640}, scores
    averaged; Table 4/5's best results). Crop, resize and mean come from the checkpoint. ``loss`` is the mean
    negative log of the (averaged) probability of the true class."""
    from ..data.imagefolder import (ImageFolderDataset, make_loader, multiscale_predict, standard_eval_transform,
                                    ten_crop_predict)
    if protocol not in ("center", "ten-crop", "multi-scale"):
        raise ValueError(f"unknown protocol {protocol!r}; choose center, ten-crop or multi-scale")
    c = ck.load_checkpoint(path, with_state=False)
    if c.meta.get("dataset") != "imagefolder":
        raise ck.CheckpointError(f"{c.path}: not an ImageFolder checkpoint (dataset {c.meta.get('dataset')!r}); "
                                 "--ten-crop and --multi-scale apply to ImageNet-style runs")
    if data is None:
        raise ValueError("--data DIR is needed (DIR/val/CLASS/images, or DIR/CLASS/images)")
    root = Path(data)
    val_dir = root / "val" if (root / "val").is_dir() else root
    conf = c.meta.get("config", {})
    crop, resize = int(conf.get("crop", 224)), int(conf.get("eval_resize", 256))
    normalize = normalizer_from_checkpoint(c)
    if protocol == "multi-scale" and normalize.image_size is not None:
        h, w = normalize.image_size
        raise ValueError(f"{c.path} subtracts a per-pixel mean image of {h}x{w}, which fits that size only; "
                         "multi-scale testing feeds whole images at several sizes. Use the centre crop or --ten-crop")
    model = ck.model_from_checkpoint(c)
    rt = pick_runtime(device, precision)
    model = model.to(rt.device, memory_format=rt.memory_format).eval()
    transform = standard_eval_transform(resize, crop, normalize) if protocol == "center" else None
    ds = ImageFolderDataset(val_dir, transform=transform, skip_bad_files="drop", allow_empty_classes=True)
    if c.classes and list(ds.classes) != list(c.classes):
        raise ck.CheckpointError(f"{c.path}: trained on {len(c.classes)} classes {c.classes[:3]}..., "
                                 f"{val_dir} has {len(ds.classes)}: {ds.classes[:3]}...")
    indices = spread_subset(len(ds), subset)     # every class, not the first few (the samples are class-sorted)
    if protocol == "center":
        loader = make_loader(ds, batch_size, train=False, num_workers=workers, sampler=indices,
                             persistent_workers=False, pin_memory=rt.is_cuda)
        metrics = evaluate_model(model, _OnDevice(loader, rt), rt)
    else:
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=indices, num_workers=workers,
                                             collate_fn=_list_collate)
        n, wrong1, wrong5, nll = 0, 0, 0, 0.0
        for images, y in loader:
            if not images:
                continue
            with rt.autocast():
                if protocol == "ten-crop":
                    scores = ten_crop_predict(model, images, crop, resize, normalize=normalize)
                else:
                    scores = multiscale_predict(model, images, tuple(scales or (224, 256, 384, 480, 640)),
                                                flip=flip, normalize=normalize)
            scores, y = scores.float().cpu(), y.cpu()
            w1, w5 = count_wrong(scores, y)
            wrong1 += int(w1)
            wrong5 += int(w5)
            nll += float(-scores.gather(1, y[:, None]).clamp_min(1e-12).log().sum())
            n += y.numel()
        metrics = {"error": 100.0 * wrong1 / n, "top5_error": 100.0 * wrong5 / n, "loss": nll / n, "n": n}
    return {"checkpoint": str(c.path), "model": c.model_name, "step": c.step, "protocol": protocol, **metrics}
