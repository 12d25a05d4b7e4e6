"""The model zoo against the paper (Table 1, Table 6), torchvision, and Xie et al. 2017."""
import pickle

import pytest
import torch
import torchvision

import resnets
from resnets.models import BasicBlock, Bottleneck, ZeroPadShortcut, create_model, from_torchvision, model_info
from resnets.models import paper

CIFAR_PARAMS_M = paper.TABLE6_PARAMS_M


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110, 1202])
def test_cifar_params_match_table6(depth):
    params = model_info(f"resnet{depth}")["params"]
    # Table 6 rounds to two significant digits below 1M and to 0.1M above.
    digits = 2 if params < 1e6 else 1
    assert round(params / 1e6, digits) == CIFAR_PARAMS_M[depth]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_has_exactly_resnet_params_with_option_a(depth):
    assert model_info(f"plain{depth}")["params"] == model_info(f"resnet{depth}")["params"]


def _projection_params(model):
    return sum(p.numel() for b in model.blocks() if b.downsample is not None for p in b.downsample.parameters())


@pytest.mark.parametrize("option", ["B", "C"])
def test_options_b_c_add_exactly_the_projections(option):
    a = create_model("resnet20", shortcut="A")
    m = create_model("resnet20", shortcut=option)
    assert sum(p.numel() for p in a.parameters()) == 269722
    n_proj = sum(b.downsample is not None for b in m.blocks())
    assert n_proj == (2 if option == "B" else 9)
    assert resnets.models.count_params(m) == resnets.models.count_params(a) + _projection_params(m)
    # each projection is a 1x1 conv (no bias) + BN (weight, bias)
    expected = sum(b.conv1.in_channels * b.conv2.out_channels + 2 * b.conv2.out_channels
                   for b in m.blocks() if b.downsample is not None)
    assert _projection_params(m) == expected


@pytest.mark.parametrize("name,count", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
                                        ("resnet101", 44_549_160), ("resnet152", 60_192_808)])
def test_imagenet_params_equal_torchvision(name, count):
    assert model_info(name)["params"] == count
    assert sum(p.numel() for p in getattr(torchvision.models, name)().parameters()) == count


@pytest.mark.parametrize("name,millions", [("resnext29_8x64d", 34.4), ("resnext29_16x64d", 68.1)])
def test_resnext29_params_match_xie_table7(name, millions):
    # Our counts, fc included: 34,426,698 and 68,155,210; the paper's one-decimal figures are within 0.1%.
    params = model_info(name)["params"]
    assert abs(params / 1e6 - millions) / millions < 1e-3


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_mult_adds_within_3pct_of_table1(depth):
    macs = model_info(f"resnet{depth}")["macs"]
    assert abs(macs - paper.TABLE1_MULT_ADDS[depth]) / paper.TABLE1_MULT_ADDS[depth] < 0.03


def test_macs_counted_not_looked_up():
    # Convolutions scale with the pixels, the fc layer (64 x 10 multiply-adds) does not.
    fc = 64 * 10
    assert model_info("resnet20", input_size=(1, 3, 64, 64))["macs"] - fc == 4 * (model_info("resnet20")["macs"] - fc)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                  "resnext50_32x4d", "wide_resnet50_2"])
def test_from_torchvision_outputs_equal(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)().eval()
    # Random running statistics so BN is not the identity in eval mode.
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    ours = from_torchvision(tv).eval()
    assert ours.model_name == name
    ours_sd = from_torchvision(tv.state_dict()).eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        ref = tv(x)
        assert torch.allclose(ours(x), ref, atol=1e-5, rtol=0)
        assert torch.allclose(ours_sd(x), ref, atol=1e-5, rtol=0)
    # the same keys as torchvision, so its checkpoints load into create_model directly
    assert set(ours.state_dict()) == set(tv.state_dict())


def test_torchvision_checkpoint_loads_into_create_model():
    tv = torchvision.models.resnet50()
    ours = create_model("resnet50", stride_in="3x3")
    ours.load_state_dict(tv.state_dict())  # strict


def test_option_a_hand_computed():
    sc = ZeroPadShortcut(2, 4, stride=2)
    assert list(sc.parameters()) == []
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    expected = torch.zeros(1, 4, 2, 2)
    expected[0, 0] = torch.tensor([[0.0, 2.0], [8.0, 10.0]])
    expected[0, 1] = torch.tensor([[16.0, 18.0], [24.0, 26.0]])
    assert torch.equal(sc(x), expected)

    block = BasicBlock(2, 4, stride=2, downsample=sc).eval()
    with torch.no_grad():
        fx = block.residual_function(x)
        assert torch.equal(block(x), torch.relu(fx + expected))


def test_option_a_net_has_no_shortcut_params():
    m = create_model("resnet56")
    for b in m.blocks():
        assert b.downsample is None or isinstance(b.downsample, ZeroPadShortcut)
        if b.downsample is not None:
            assert list(b.downsample.parameters()) == []


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_plain_block_has_no_path_except_through_f(block):
    torch.manual_seed(0)
    b = block(16, 4 if block is Bottleneck else 16, residual=False).eval()
    # Zero the last BN's affine output: F(x) == 0 for every x, so a plain block must output exactly 0.
    torch.nn.init.zeros_(b.last_bn().weight)
    torch.nn.init.zeros_(b.last_bn().bias)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    y = b(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # The residual version with the same F is the identity path: relu(0 + x).
    r = block(16, 4 if block is Bottleneck else 16, residual=True).eval()
    r.load_state_dict(b.state_dict())
    assert torch.equal(r(x), torch.relu(x))


def test_plain_net_has_no_shortcut_modules():
    for name in ["plain20", "plain34", "plain50"]:
        m = create_model(name)
        assert all(b.downsample is None and not b.residual for b in m.blocks())


def test_stride_variant_in_repr_and_shapes():
    v1 = create_model("resnet50")
    v15 = create_model("resnet50", stride_in="3x3")
    assert "v1, paper" in repr(v1) and "v1.5" in repr(v15)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)


def test_cifar_structure():
    m = create_model("resnet56")
    assert len(m.blocks()) == 27 and m.conv1.out_channels == 16
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert create_model("resnet20", depth=14).depth == 14
    assert create_model("resnet20", num_classes=100).fc.out_features == 100


def test_default_init_and_zero_init_residual():
    m = create_model("resnet20")
    conv = m.layer2[0].conv1
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.2 * (2 / fan_out) ** 0.5
    assert torch.all(m.bn1.weight == 1) and torch.all(m.bn1.bias == 0)
    z = create_model("resnet20", zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for b in z.blocks())
    assert torch.all(z.layer1[0].bn1.weight == 1)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "resnext29_8x64d"])
def test_models_pickle(name):
    m = create_model(name)
    pickle.loads(pickle.dumps(m))


def test_list_models_has_the_paper_names():
    names = set(resnets.list_models())
    required = {f"resnet{d}" for d in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110, 1202)}
    required |= {f"plain{d}" for d in (18, 34, 20, 32, 44, 56, 110)}
    required |= {"resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "resnext29_8x64d", "resnext29_16x64d"}
    assert required <= names


@pytest.mark.parametrize("make,message", [
    (lambda: create_model("resnet65"), "did you mean resnet56"),
    (lambda: create_model("resnet20", depth=21), "6n\\+2"),
    (lambda: create_model("resnet20", shortcut="D"), "unknown shortcut option 'D'"),
    (lambda: create_model("resnet50", shortcut="D"), "unknown shortcut option 'D'"),
    (lambda: create_model("resnet50", stride_in="2x2"), "unknown stride_in '2x2'"),
    (lambda: create_model("resnet18", stride_in="3x3"), "bottleneck nets \\(depth >= 50\\) only"),
    (lambda: create_model("resnet20", stride_in="3x3"), "CIFAR ResNets use basic blocks"),
    (lambda: create_model("resnext29_8x64d", stride_in="1x1"), "stride_in must be '3x3'"),
    (lambda: create_model("resnet20")(torch.randn(1, 1, 32, 32)), "expects input \\(N, 3, H, W\\)"),
    (lambda: create_model("resnet50", depth=42), "Table 1"),
    (lambda: create_model("resnet20", colour="blue"), "unknown argument"),
])
def test_bad_input_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()
