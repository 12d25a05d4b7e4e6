"""torch.hub entry points: every network of resnets, with its shipped or torchvision weights.

    import torch
    model = torch.hub.load("/path/to/resnets", "resnet20", source="local", weights="cifar10")   # a checkout
    torch.hub.list("/path/to/resnets", source="local")                                        # every name

Each entry point is ``resnets.create_model(NAME, weights=..., **overrides)``: ``weights`` is None (random), a
shipped tag ("cifar10", "cifar10-paper": docs/models.md), "torchvision", or a weights file.
"""
dependencies = ["torch", "torchvision", "safetensors"]

from resnets.models.registry import create_model as _create_model  # noqa: E402
from resnets.models.registry import list_models as _list_models  # noqa: E402


def _entry(name):
    def entry(weights=None, **overrides):
        return _create_model(name, weights=weights, **overrides)
    entry.__name__ = name
    entry.__doc__ = f"resnets.create_model({name!r}, weights=..., **overrides)"
    return entry


for _name in _list_models():
    globals()[_name] = _entry(_name)
