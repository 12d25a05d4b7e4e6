"""torch.hub.load from a checkout (source="local") gives our networks with our shipped weights (issue 16)."""
from pathlib import Path

import torch

import resnets

REPO = Path(__file__).resolve().parents[1]


def test_hub_lists_every_network_and_loads_shipped_weights():
    import importlib.util
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert all(callable(getattr(hubconf, n)) for n in resnets.list_models())
    hub = torch.hub.load(str(REPO), "resnet20", source="local", weights="cifar10")
    ours = resnets.create_model("resnet20", weights="cifar10")
    a, b = hub.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    net = torch.hub.load(str(REPO), "resnet56", source="local", shortcut="B")
    assert sum(p.numel() for p in net.parameters()) > 850_000
