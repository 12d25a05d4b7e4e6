"""Shared fixtures: a tiny generated CIFAR-10 in the standard python-batch layout, and real CIFAR-10 when present."""
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pytest_configure(config):
    # Under pytest-xdist (./run test on several cores) the workers share the cores: torch's default of a thread
    # per core in every worker would oversubscribe them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def publish_as_torchvision(monkeypatch, model: str, name: str) -> None:
    """Make ``name`` the file name torchvision publishes for ``model``'s DEFAULT weights (the name carries the
    hash that is checked): the tests' own weights stand in for the real file, which they cannot download."""
    from resnets.models import registry

    real = registry.torchvision_weights_entry

    class Entry:
        def __init__(self, entry):
            self.entry, self.url = entry, f"https://example.invalid/models/{name}"

        def __getattr__(self, attr):
            return getattr(self.entry, attr)

    monkeypatch.setattr(registry, "torchvision_weights_entry",
                        lambda n, tag=None: Entry(real(n, tag)) if n == model else real(n, tag))


def twin_nets(depth: int = 8):
    """Two equal ResNet-20-family nets (channels_last), to run one step implementation against another."""
    import torch

    import resnets

    torch.manual_seed(0)
    a = resnets.create_model("resnet20", depth=depth).to(memory_format=torch.channels_last)
    b = resnets.create_model("resnet20", depth=depth).to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    return a, b


def write_fake_cifar10(root: Path, per_batch: int = 64, test: int = 100, seed: int = 0) -> Path:
    """Random but learnable images: each class has its own mean colour, so a few steps already lower the error."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(0, 256, size=(10, 3))

    def batch(n: int, label: str) -> dict:
        labels = rng.integers(0, 10, size=n)
        noise = rng.normal(0, 40, size=(n, 3, 32, 32))
        imgs = np.clip(colours[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        return {b"batch_label": label.encode(), b"labels": labels.tolist(), b"data": imgs.reshape(n, 3072),
                b"filenames": [f"{label}_{i}.png".encode() for i in range(n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per_batch, f"training batch {i} of 5"), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test, "testing batch 1 of 1"), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f, protocol=2)
    return folder


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A directory to pass as --data: 320 training and 100 test images."""
    root = tmp_path_factory.mktemp("tiny-cifar")
    write_fake_cifar10(root)
    return root


@pytest.fixture(scope="session")
def real_cifar(tmp_path_factory) -> Path:
    """Real CIFAR-10: RESNETS_DATA, resnets' cache, or ../shared/data/get-cifar10; skips when none is available."""
    candidates = [os.environ.get("RESNETS_DATA"), os.environ.get("RESNETS_CACHE"),
                  str(Path.home() / ".cache" / "resnets")]
    for c in candidates:
        if c and (Path(c) / "cifar-10-batches-py" / "test_batch").exists():
            return Path(c)
    getter = SHARED / "data" / "get-cifar10"
    if not getter.exists():
        pytest.skip("real CIFAR-10 not available: no RESNETS_DATA, no cache, and no ../shared/data/get-cifar10")
    dest = tmp_path_factory.mktemp("cifar10")
    subprocess.run([str(getter), str(dest)], check=True, capture_output=True)
    return dest


def pytest_sessionfinish(session, exitstatus):
    """The default run (`./run test`, `pytest` with no paths, -k or -m) must run tests: collecting none there means
    the suite itself is broken (a bad testpaths, a marker filter that deselects everything), and `./run` would turn
    pytest's exit code 5 into a pass. Make it a failure instead; a selection that matches nothing stays 5."""
    cfg = session.config
    source = getattr(pytest.Config, "ArgsSource", None)          # pytest >= 7.2
    default = (source is not None and cfg.args_source == source.TESTPATHS and not cfg.option.keyword
               and not cfg.option.markexpr)
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and default:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = cfg.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("conftest: the default run collected no tests; that is a failure, not a pass",
                                red=True)
