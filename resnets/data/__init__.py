"""CIFAR data: loading with verified sources (:mod:`resnets.data.cifar`) and the paper's augmentation as batched
tensor ops on the training device (:mod:`resnets.data.augment`); input normalisation for every dataset
(:mod:`resnets.data.normalize`). Depends only on torch, numpy, Pillow and the standard library."""

from .augment import DeviceLoader, crop_flip, pad_crop_flip
from .cifar import CacheWriteError, CifarData, CorruptDataError, DataNotFoundError, default_cache_dir, load_cifar
from .normalize import Normalizer

__all__ = [
    "CifarData",
    "load_cifar",
    "DataNotFoundError",
    "CorruptDataError",
    "CacheWriteError",
    "default_cache_dir",
    "pad_crop_flip",
    "crop_flip",
    "Normalizer",
    "DeviceLoader",
]
