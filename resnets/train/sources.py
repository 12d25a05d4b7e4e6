"""Data sources: what the training loop asks of its data. Both give the local batch of a global step as a pure
function of (seed, step), evaluation batches on the device (this rank's shard), and the preprocessing a
checkpoint must record.

* CIFAR (:class:`CifarSource`): the whole uint8 set on the device, ``DeviceLoader.batch(step)``. Under DDP every
  rank builds the global batch of step k and takes its contiguous slice.
* ImageFolder (:class:`ImageFolderSource`): a DataLoader (worker processes, pinned memory) over
  :class:`GlobalBatchSampler`, a ``DistributedSampler`` whose epoch order is a permutation seeded by (seed,
  epoch); each rank takes its contiguous slice of every global batch, and each sample's augmentation is seeded by
  (seed, epoch, index) (:class:`SeededSamples`), so it does not depend on worker count, worker scheduling or where
  a run resumed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config import TrainConfig
from ..data import DeviceLoader, Normalizer, load_cifar
from . import checkpoint as ck
from . import distributed as ddp
from .runtime import Runtime


def normalizer_from_checkpoint(c: ck.Checkpoint) -> Normalizer:
    """The input normalisation a checkpoint was trained with (its ``preprocess``, :meth:`Normalizer.state_dict`)."""
    if not c.preprocess:
        raise ck.CheckpointError(f"{c.path}: the checkpoint holds no preprocessing; it was not written by resnets train")
    return Normalizer.from_state_dict(c.preprocess)


class CifarSource:
    """CIFAR from :func:`resnets.data.load_cifar`, augmented on the device (Sec. 4.2). Under DDP each rank
    builds the global batch of step k (``DeviceLoader.batch``) and keeps its contiguous slice; the test (or val)
    images are split into contiguous shards, one per rank."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, ctx: ddp.DistContext, data=None,
                 normalizer: Normalizer | None = None):
        if data is None:
            data = load_cifar(cfg.dataset, root=cfg.data, progress=cfg.progress and ctx.is_main)
        self.eval_name = "test"
        eval_images, eval_labels = data.test_images, data.test_labels
        if cfg.val_split:
            data, eval_images, eval_labels = data.split(cfg.val_split, seed=cfg.seed)
            self.eval_name = "val"
        if cfg.eval_subset:
            eval_images, eval_labels = eval_images[:cfg.eval_subset], eval_labels[:cfg.eval_subset]
        self.name, self.classes = data.name, list(data.classes)
        self.train_size = len(data.train_labels)
        self.ctx = ctx
        self.local_batch = ddp.local_batch_size(cfg.batch_size, ctx)
        self.batch_shape = (self.local_batch, *data.train_images.shape[1:])
        self.normalizer = normalizer or Normalizer(cfg.normalize, data.train_images)
        self.loader = DeviceLoader(data.train_images, data.train_labels, cfg.batch_size, rt.device, train=True,
                                   normalizer=self.normalizer, seed=cfg.seed, augment=cfg.augment,
                                   channels_last=rt.channels_last, flip=cfg.hflip)
        if ctx.enabled and len(eval_labels) >= ctx.world_size:
            lo, hi = _shard(len(eval_labels), ctx)
            eval_images, eval_labels = eval_images[lo:hi], eval_labels[lo:hi]
            self.sharded_eval = True
        else:
            self.sharded_eval = False
        self.eval_loader = DeviceLoader(eval_images, eval_labels, max(cfg.batch_size, 500), rt.device, train=False,
                                        normalizer=self.normalizer, channels_last=rt.channels_last)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.batch(step)
        if self.ctx.enabled:
            lo = self.ctx.rank * self.local_batch
            x, y = x[lo:lo + self.local_batch], y[lo:lo + self.local_batch]
        return x, y

    def preprocess(self) -> dict[str, Any]:
        return self.normalizer.state_dict()

    def close(self) -> None:
        pass


def _shard(n: int, ctx: ddp.DistContext) -> tuple[int, int]:
    """Rank ``ctx.rank``'s contiguous share [lo, hi) of ``n`` items (shares differ by at most one)."""
    return n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size


class GlobalBatchSampler(torch.utils.data.distributed.DistributedSampler):
    """A ``DistributedSampler`` whose order is defined per *global* batch, and which can start mid-epoch.

    Epoch ``e`` (``set_epoch(e)``) permutes the dataset with a generator seeded by (seed, e), cuts it into
    ``len // global_batch`` global batches (the rest is dropped) and yields rank ``r``'s contiguous slice
    ``[r * B/N, (r + 1) * B/N)`` of each, from global batch ``start_batch`` on. So N ranks together see exactly
    the batches one process with batch B sees, and a resumed run skips the batches already done without reading
    them. Items are ``(epoch, index)`` pairs, for :class:`SeededSamples`. (torch's DistributedSampler deals
    indices round-robin, ``perm[rank::N]``, which gives the same epochs but not the same per-step batches.)"""

    def __init__(self, dataset, global_batch: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        if global_batch % num_replicas:
            raise ValueError(f"global batch {global_batch} does not divide across {num_replicas} ranks")
        self.global_batch, self.local_batch = global_batch, global_batch // num_replicas
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} training images give no full batch of {global_batch}")
        self.start_batch = 0

    def order(self, epoch: int) -> torch.Tensor:
        from ..data.augment import _seed_for
        g = torch.Generator().manual_seed(_seed_for(self.seed, 2, epoch))
        return torch.randperm(len(self.dataset), generator=g)

    def __iter__(self):
        perm = self.order(self.epoch)
        for k in range(self.start_batch, self.steps_per_epoch):
            lo = k * self.global_batch + self.rank * self.local_batch
            for i in perm[lo:lo + self.local_batch].tolist():
                yield self.epoch, i

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * self.local_batch


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[index]`` with torch's global RNG seeded by (seed, epoch, index) while the transform runs (and
    restored after): the random augmentation of a sample depends only on which sample in which epoch, not on the
    worker process that happens to load it. Keys are ``(epoch, index)``."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        from ..data.augment import _seed_for
        epoch, index = key
        state = torch.get_rng_state()
        torch.manual_seed(_seed_for(self.seed, 3, epoch, index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


class _OnDevice:
    """Iterate a DataLoader of CPU (pinned) batches, yielding them on the device in the run's memory format."""

    def __init__(self, loader, rt: Runtime):
        self.loader, self.rt = loader, rt

    def __iter__(self):
        for x, y in self.loader:
            if y.numel() == 0:      # every file of the batch unreadable: nothing to move or evaluate
                continue
            yield (x.to(self.rt.device, non_blocking=True).contiguous(memory_format=self.rt.memory_format),
                   y.to(self.rt.device, non_blocking=True))


def imagefolder_normalizer(cfg_normalize: str) -> Normalizer:
    """0..255 units: the paper subtracts a mean only ("pixel-mean", approximated per channel by the ImageNet mean,
    as resnets.data.imagefolder does); "channel" also divides by the ImageNet std."""
    from ..data.imagefolder import imagenet_normalizer
    if cfg_normalize not in ("pixel-mean", "channel"):
        raise ValueError(f"unknown normalize {cfg_normalize!r}; choose pixel-mean or channel")
    return imagenet_normalizer(divide_by_std=cfg_normalize == "channel")


def imagefolder_dirs(data: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """``DIR/train`` and ``DIR/val`` (None if absent) of an ImageNet-layout directory."""
    if data is None:
        raise ValueError("ImageFolder training needs --data DIR, with DIR/train/CLASS/*.JPEG and DIR/val/CLASS/*.JPEG")
    root = Path(data)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"--data {root}: no {root / 'train'} directory (expected DIR/train/CLASS/images "
                                f"and DIR/val/CLASS/images, the ImageNet layout)")
    return root / "train", (root / "val" if (root / "val").is_dir() else None)


class ImageFolderSource:
    """ImageNet-layout data (Sec. 3.4): ``DIR/train`` with the paper's augmentation, through a DataLoader with
    ``cfg.workers`` worker processes per rank and pinned memory (on GPUs), over :class:`GlobalBatchSampler`;
    evaluation on ``DIR/val`` with a single centre crop (shorter side ``eval_resize``, ``crop`` x ``crop``), each
    rank evaluating a contiguous shard. ``batch(step)`` keeps one DataLoader iterator open along an epoch and
    opens a new one (``set_epoch``, ``start_batch``) when a step is not the next one (a new epoch, a resume)."""

    name = "imagefolder"
    eval_name = "val"

    def __init__(self, cfg: TrainConfig, rt: Runtime, ctx: ddp.DistContext, normalizer: Normalizer | None = None):
        from ..data.imagefolder import (ImageFolderDataset, make_loader, paper_train_transform,
                                        random_resized_transform, standard_eval_transform)
        train_dir, val_dir = imagefolder_dirs(cfg.data)
        self.rt, self.ctx = rt, ctx
        self.normalizer = normalizer or imagefolder_normalizer(cfg.normalize)
        if cfg.augment and cfg.crop_style == "random-resized":
            tf = random_resized_transform(self.normalizer, cfg.crop, cfg.crop_min_area, cfg.hflip, cfg.lighting)
        elif cfg.augment:
            tf = paper_train_transform(self.normalizer, min_size=cfg.resize_min, max_size=cfg.resize_max,
                                       crop=cfg.crop, alphastd=cfg.lighting, hflip=cfg.hflip)
        else:
            tf = standard_eval_transform(cfg.eval_resize, cfg.crop, self.normalizer)
        train_ds = ImageFolderDataset(train_dir, transform=tf, skip_bad_files=True)
        self.classes = list(train_ds.classes)
        if len(self.classes) < 2:
            raise ValueError(f"{train_dir} has one class folder ({self.classes[0]}): a classifier needs two or more "
                             "(one folder per class: DIR/train/CLASS/*)")
        self.train_size = len(train_ds)
        self.local_batch = ddp.local_batch_size(cfg.batch_size, ctx)
        self.batch_shape = (self.local_batch, 3, cfg.crop, cfg.crop)    # every training transform ends in this crop
        self.sampler = GlobalBatchSampler(train_ds, cfg.batch_size, ctx.world_size, ctx.rank, cfg.seed)
        self.loader = make_loader(SeededSamples(train_ds, cfg.seed), self.local_batch, train=True,
                                  num_workers=cfg.workers, sampler=self.sampler, seed=cfg.seed,
                                  pin_memory=rt.is_cuda)
        self._it = None
        self._next: tuple[int, int] | None = None
        self.eval_loader: Iterable | None = None
        self.sharded_eval = False
        if val_dir is not None:
            val_ds = ImageFolderDataset(val_dir, transform=standard_eval_transform(cfg.eval_resize, cfg.crop,
                                                                                   self.normalizer),
                                        skip_bad_files="drop", allow_empty_classes=True)
            if list(val_ds.classes) != self.classes:
                raise ValueError(f"{val_dir} has {len(val_ds.classes)} class folders, {train_dir} has "
                                 f"{len(self.classes)}; they must be the same (sorted) names")
            chosen = spread_subset(len(val_ds), cfg.eval_subset)
            n = len(chosen)
            lo, hi = (_shard(n, ctx) if ctx.enabled and n >= ctx.world_size else (0, n))
            self.sharded_eval = ctx.enabled and n >= ctx.world_size
            self.eval_loader = _OnDevice(make_loader(val_ds, self.local_batch, train=False, num_workers=cfg.workers,
                                                     sampler=chosen[lo:hi], persistent_workers=False,
                                                     pin_memory=rt.is_cuda), rt)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(step, self.sampler.steps_per_epoch)
        if self._it is None or self._next != (epoch, k):
            self.sampler.set_epoch(epoch)
            self.sampler.start_batch = k
            self._it = iter(self.loader)
        x, y = next(self._it)
        self._next = (epoch, k + 1)
        return (x.to(self.rt.device, non_blocking=True).contiguous(memory_format=self.rt.memory_format),
                y.to(self.rt.device, non_blocking=True))

    def preprocess(self) -> dict[str, Any]:
        return self.normalizer.state_dict()

    def close(self) -> None:
        self._it = None
        # persistent workers live on in the DataLoader (holding copies of a rank's sockets) until it lets go
        self.loader._iterator = None


def spread_subset(n: int, subset: int | None) -> list[int]:
    """``subset`` of ``n`` samples spread evenly over them (all when ``subset`` is None or >= n). ImageFolder
    samples are sorted by class, so the first ``subset`` would be the first few classes only."""
    if not subset or subset >= n:
        return list(range(n))
    return [i * n // subset for i in range(subset)]


def make_source(cfg: TrainConfig, rt: Runtime, ctx: ddp.DistContext, data=None, normalizer: Normalizer | None = None):
    """The run's data; ``normalizer`` replaces the one computed from the data (fine-tuning: the weights')."""
    if cfg.dataset == "imagefolder":
        if data is not None:
            raise ValueError("data= is for CIFAR runs; ImageFolder runs read cfg.data")
        return ImageFolderSource(cfg, rt, ctx, normalizer)
    if cfg.dataset not in ("cifar10", "cifar100"):
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose cifar10, cifar100 or imagefolder")
    return CifarSource(cfg, rt, ctx, data, normalizer)
