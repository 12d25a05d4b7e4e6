"""The trained weights that ship in the package (docs/models.md): they load, pass the hash check, reproduce their
recorded errors, and a damaged or missing file is a clear error."""
import shutil

import numpy as np
import pytest
import torch

import resnets
from resnets.data import DeviceLoader, load_cifar
from resnets.models import pretrained
from resnets.train import load_checkpoint
from resnets.train.sources import normalizer_from_checkpoint

SHIPPED = sorted(pretrained.PRETRAINED)


@pytest.mark.parametrize("model,tag", SHIPPED)
def test_shipped_file_is_whole_and_carries_its_card(model, tag):
    p = pretrained.resolve(model, tag)
    path = pretrained.checked_path(model, tag)
    assert path.stat().st_size < 1.2 * 4 * sum(x.numel() for x in resnets.create_model(model).state_dict().values()) \
        + 64_000, "the file is bigger than the model needs"
    c = load_checkpoint(path, with_state=False)
    card = c.meta["card"]
    assert card["model"] == c.model_name == model and card["tag"] == tag
    assert card["test_error_cpu_fp32"] == p.test_error and card["errors_first_1000_cpu_fp32"] == p.errors_first_1000
    assert c.classes[:2] == ["airplane", "automobile"] and c.preprocess["mode"] == "pixel-mean"
    assert c.meta["config"]["recipe"] in p.recipe


@pytest.mark.realdata
@pytest.mark.parametrize("model,tag", SHIPPED)
def test_shipped_weights_reproduce_their_errors_on_the_first_1000_test_images(model, tag, real_cifar):
    p = pretrained.resolve(model, tag)
    net = resnets.create_model(model, weights=tag).eval()
    c = load_checkpoint(pretrained.checked_path(model, tag), with_state=False)
    cifar = load_cifar("cifar10", root=str(real_cifar), progress=False)
    loader = DeviceLoader(cifar.test_images[:1000], cifar.test_labels[:1000], 500, "cpu", train=False,
                          normalizer=normalizer_from_checkpoint(c))
    with torch.no_grad():
        wrong = sum(int((net(x).argmax(1) != y).sum()) for x, y in loader)
    # another CPU's convolution kernels may flip a borderline image or two
    assert abs(wrong - p.errors_first_1000) <= 2, (wrong, p.errors_first_1000)


def test_cifar10_names_the_best_measured_weights():
    for model in ("resnet20", "plain20", "resnet32", "resnet44", "resnet56", "resnet110", "plain56"):
        best = min((p for p in pretrained.PRETRAINED.values() if p.model == model), key=lambda p: p.test_error)
        assert pretrained.resolve(model, "cifar10") == best
    assert pretrained.resolve("resnet20", "cifar10").tag == "cifar10-fast"
    a = resnets.create_model("resnet20", weights="cifar10").state_dict()
    b = resnets.create_model("resnet20", weights="cifar10-fast").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_models_listing_names_the_weights_that_load(capsys):
    """`resnets models` says which nets have weights: each shipped run with its measured error, torchvision's."""
    from resnets import cli

    assert cli.main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()[2:]
    rows = {r.split("|")[1].strip(): r.rstrip(" |").split("|")[-1].strip() for r in table}
    for (model, tag), p in pretrained.PRETRAINED.items():
        assert f"{p.test_error:.2f} ({tag})" in rows[model]
    assert rows["resnet20"] == "8.04 (cifar10-fast), 8.71 (cifar10-paper)"       # best first
    assert rows["resnet50"] == "torchvision" and rows["plain50"] == "-" and rows["resnet1202"] == "-"


def test_unknown_tag_and_mismatched_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="no shipped 'cifar10' weights for resnet1202.*resnet20:cifar10"):
        resnets.create_model("resnet1202", weights="cifar10")
    with pytest.raises(ValueError, match="drop .*num_classes"):
        resnets.create_model("resnet20", weights="cifar10", num_classes=100)


def test_damaged_or_missing_file_is_refused(tmp_path, monkeypatch):
    for f in pretrained.WEIGHTS_DIR.glob("*.safetensors"):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path)
    name = pretrained.resolve("resnet20", "cifar10").file
    data = bytearray((tmp_path / name).read_bytes())
    data[len(data) // 2] ^= 0x01                                 # one flipped bit in the weights
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged.*reinstall"):
        resnets.create_model("resnet20", weights="cifar10")
    (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match="missing.*reinstall"):
        resnets.create_model("resnet20", weights="cifar10")


@pytest.mark.realdata
def test_cli_evaluate_and_predict_with_shipped_weights(real_cifar, tmp_path, capsys):
    # in-process: `resnets` is cli.main; a new interpreter per command would prove nothing more here
    from resnets.cli import main
    assert main(["evaluate", "--model", "resnet20", "--weights", "cifar10", "--data", str(real_cifar), "--subset",
                 "1000", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    wrong = round(float(out.split("top-1 error ")[1].split("%")[0]) * 10)
    assert abs(wrong - pretrained.resolve("resnet20", "cifar10").errors_first_1000) <= 2
    from PIL import Image
    cifar = load_cifar("cifar10", root=str(real_cifar), progress=False)
    img = tmp_path / "ship.png"
    i = int(np.flatnonzero(cifar.test_labels == 8)[0])            # a ship
    Image.fromarray(cifar.test_images[i].transpose(1, 2, 0)).save(img)
    assert main(["predict", "--model", "resnet20", "--weights", "cifar10", str(img), "--json"]) == 0
    assert '"ship"' in capsys.readouterr().out
    try:
        code = main(["evaluate", "--model", "resnet20"])
    except SystemExit as e:                                       # argparse's own errors exit 2
        code = e.code
    err = capsys.readouterr().err
    assert code != 0 and "--weights" in err and "Traceback" not in err
