"""CIFAR runs trained as one stacked network (issue 15): the stacked net computes each net's own function, of one
depth or of several, the stacked SGD is torch's SGD per net, and stacked runs train like the runs alone (to float
rounding), keep their own schedules, logs and checkpoints, and resume after a kill -9 or a SIGTERM bit-identical to
an unbroken stacked run."""
import contextlib
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resnets.data import load_cifar
from resnets.models import CifarResNet, create_model
from resnets.models.stacked import StackedCifarNets, can_stack, stack_inputs
from resnets.train import load_checkpoint, read_log, train
from resnets.train.side_by_side import train_side_by_side
from resnets.train.stacked import StackedSGD

from test_side_by_side import STEPS, assert_same_run, cfgs, train_and_kill_9


def _nets(kinds, dtype=torch.float64):
    """A net per (depth, residual)."""
    torch.manual_seed(0)
    return [CifarResNet(depth, residual=residual).to(dtype) for depth, residual in kinds]


@pytest.mark.parametrize("kinds", [[(8, True), (8, False), (8, True)], [(20, True), (14, False), (8, True), (8, False)]],
                         ids=["one-depth", "depths-20-14-8"])
def test_stacked_net_is_each_net_forward_backward_and_statistics(kinds):
    """float64, so that only a wrong formula could show a difference: plain and residual nets mixed, option A
    shortcuts growing channels, nets of one depth or of several (a net's stage ends before a deeper net's),
    logits, every gradient and the BN running statistics."""
    nets = _nets(kinds)
    k_all = len(nets)
    stacked = StackedCifarNets(nets)
    xs = [torch.randn(6, 3, 32, 32, dtype=torch.float64) for _ in nets]
    ys = [torch.randint(0, 10, (6,)) for _ in nets]
    logits = stacked(stack_inputs(xs))
    assert logits.shape == (6, k_all, 10)
    sum(F.cross_entropy(logits[:, k], ys[k]) for k in range(k_all)).backward()
    grads = dict(stacked.named_parameters())
    for k, net in enumerate(nets):
        out = net(xs[k])
        F.cross_entropy(out, ys[k]).backward()
        torch.testing.assert_close(logits[:, k], out, rtol=1e-12, atol=1e-12)
        for name, p in net.named_parameters():
            torch.testing.assert_close(grads[name].grad.chunk(stacked.groups[name])[k], p.grad, rtol=1e-10,
                                       atol=1e-12)
    for k, state in enumerate(stacked.unstack()):
        assert state.keys() == nets[k].state_dict().keys()
        for name, t in nets[k].state_dict().items():
            if not name.endswith("num_batches_tracked"):
                torch.testing.assert_close(state[name], t, rtol=1e-12, atol=1e-12)
    if k_all == 4:   # depths 20, 14, 8, 8: the third block of a stage is the first net's, the second two nets'
        assert [b.k for b in stacked.layer2] == [4, 2, 1]
        stacked.bind(nets)
        assert nets[1].layer3[1].conv2.weight.data_ptr() == stacked.layer3[1].conv2.weight.chunk(2)[1].data_ptr()


def test_bind_makes_each_net_a_view_of_the_stack():
    nets = _nets([(8, True), (8, False)], dtype=torch.float32)
    stacked = StackedCifarNets(nets)
    stacked.bind(nets)
    with torch.no_grad():
        stacked.layer2[0].conv1.weight.add_(1.0)
        stacked.fc.bias.copy_(torch.arange(20.0))
    w = stacked.layer2[0].conv1.weight
    assert torch.equal(nets[1].layer2[0].conv1.weight, w.chunk(2)[1])
    assert nets[1].layer2[0].conv1.weight.data_ptr() == w.data_ptr() + w[:32].numel() * w.element_size()
    assert nets[1].fc.bias.tolist() == list(range(10, 20))
    assert set(nets[0].state_dict()) == set(CifarResNet(8).state_dict())   # names (and checkpoints) unchanged


@pytest.mark.parametrize("nets, why", [
    (lambda: [CifarResNet(8), CifarResNet(14)], "deepest first"),
    (lambda: [CifarResNet(14), CifarResNet(8, widths=(16, 32, 32))], "different shapes"),
    (lambda: [CifarResNet(8), CifarResNet(8, num_classes=100)], "different shapes"),
    (lambda: [CifarResNet(8, shortcut="B")], "only option A"),
    (lambda: [create_model("resnet18")], "only CIFAR ResNets"),
])
def test_what_cannot_stack_says_why(nets, why):
    assert can_stack(nets())[1].startswith(why) or why in can_stack(nets())[1]
    with pytest.raises(ValueError, match=why):
        StackedCifarNets(nets())


@pytest.mark.parametrize("nesterov", [False, True])
def test_stacked_sgd_is_torch_sgd_per_net_with_its_own_lr(nesterov):
    """ResNet-14 and plain-8: the deeper net's last blocks of each stage are a stack of one."""
    nets = _nets([(14, True), (8, False)])
    ref = _nets([(14, True), (8, False)])
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=nesterov) for n in nets]
    refs = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=nesterov) for n in ref]
    stacked = StackedCifarNets(nets)
    stacked.bind(nets)
    sgd = StackedSGD(stacked, nets, opts, 0.9, 1e-4, nesterov)
    for step, lrs in enumerate([(0.1, 0.01), (0.1, 0.01), (0.01, 0.1)]):
        xs = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in nets]
        ys = [torch.randint(0, 10, (4,)) for _ in nets]
        sgd.set_lr(lrs)
        sgd.zero_grad()
        logits = stacked(stack_inputs(xs))
        sum(F.cross_entropy(logits[:, k], ys[k]) for k in range(2)).backward()
        sgd.step()
        for k, (net, opt) in enumerate(zip(ref, refs)):
            opt.param_groups[0]["lr"] = lrs[k]
            opt.zero_grad()
            F.cross_entropy(net(xs[k]), ys[k]).backward()
            opt.step()
    for k in range(2):
        for (name, p), q in zip(nets[k].named_parameters(), ref[k].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
            # the run's own optimizer holds its momentum, as a view of the stacked buffer
            torch.testing.assert_close(opts[k].state[p]["momentum_buffer"], refs[k].state[q]["momentum_buffer"],
                                       rtol=1e-9, atol=1e-12)


def _close_runs(a: Path, b: Path, later: float = 5e-2) -> None:
    """Same log records (steps, splits, learning rates); the losses of the first 4 steps within 1e-4, later
    ones within ``later`` (5%): a different order of float sums grows, chaotically, over a few dozen steps at batch 32
    (measured: up to 3% by step 20 between two correct runs; a wrong batch or lr differs at step 1)."""
    la, lb = read_log(a / "log.jsonl"), read_log(b / "log.jsonl")
    assert [(r["step"], r["split"], r.get("lr")) for r in la] == [(r["step"], r["split"], r.get("lr")) for r in lb]
    for ra, rb in zip(la, lb):
        if "loss" in ra:
            tol = 1e-4 if ra["step"] <= 4 else later
            assert abs(ra["loss"] - rb["loss"]) <= tol * max(1.0, abs(ra["loss"])), (a.name, ra, rb)
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == sorted(p.name for p in (b / "checkpoints").iterdir())


def _same_steps(tiny_cifar, root: Path):
    """r8, p8 and r14 with one length (r14 keeps its validation split): one stack of two depths. At lr 0.02:
    at 0.1 ResNet-14 on 320 images is unstable and a different order of float sums grows chaotically (measured:
    1e-4 at step 4, 30% by step 20, between runs that agree to 5 digits throughout in float64)."""
    r8, p8, r14 = cfgs(tiny_cifar, root, steps=STEPS)
    r14 = r14.__class__(**{**r14.to_dict(), "steps": STEPS})
    return [c.__class__(**{**c.to_dict(), "milestones": tuple(r8.milestones), "lr": 0.02}) for c in (r8, p8, r14)]


@pytest.fixture(scope="module")
def stacked(tiny_cifar, tmp_path_factory):
    root = tmp_path_factory.mktemp("stacked")
    data = load_cifar("cifar10", root=str(tiny_cifar), progress=False)
    return train_side_by_side(cfgs(tiny_cifar, root, steps=STEPS), data=data, stack=True)


@contextlib.contextmanager
def _stacks_seen():
    """The run names of every stack built inside, in stack order."""
    from resnets.train import stacked as module
    seen: list[list[str]] = []
    init = module._Stack.__init__

    def spy(self, runs):
        seen.append([Path(r.cfg.out).name for r in runs])
        init(self, runs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module._Stack, "__init__", spy)
        yield seen


@pytest.fixture(scope="module")
def depths(tiny_cifar, tmp_path_factory):
    """(alone, stacked, stacks): r8, p8 and r14 of one length, each trained alone, and the three as one stack."""
    alone = [train(c) for c in _same_steps(tiny_cifar, tmp_path_factory.mktemp("alone-same-steps"))]
    with _stacks_seen() as seen:
        together = train_side_by_side(_same_steps(tiny_cifar, tmp_path_factory.mktemp("depths")), stack=True)
    return alone, together, seen


def test_runs_of_several_depths_stack_and_train_like_the_runs_alone(depths):
    """ResNet-14 stacks with ResNet-8 and plain-8 (given shallowest first: the stack puts it first); its losses,
    on r14's own validation split too, are the run's alone within 1% (measured: 0.3% at most)."""
    alone, together, seen = depths
    assert seen == [["r14", "r8", "p8"]]
    for a, s in zip(alone, together):
        _close_runs(a.out, s.out, later=1e-2)
        assert s.step == a.step == STEPS


def test_stack_by_depth_leaves_another_depth_alone_bit_for_bit(tiny_cifar, depths, tmp_path):
    alone = depths[0]
    with _stacks_seen() as seen:
        together = train_side_by_side(_same_steps(tiny_cifar, tmp_path), stack="depth")
    assert seen == [["r8", "p8"]]
    for a, s in zip(alone[:2], together[:2]):
        _close_runs(a.out, s.out, later=1e-2)
    assert_same_run(alone[2].out, together[2].out)
    with pytest.raises(ValueError, match="stack must be"):
        train_side_by_side(_same_steps(tiny_cifar, tmp_path / "x"), stack="yes")


def test_a_net_that_does_not_stack_trains_alone_beside_a_stack(tiny_cifar, tmp_path):
    """ResNet-18 (an ImageNet net, no ``depth`` attribute) with stack=True: it trains on its own, as without
    stacking; the two CIFAR runs stack."""
    r8, p8, _ = cfgs(tiny_cifar, tmp_path, steps=8)
    r18 = r8.__class__(**{**r8.to_dict(), "milestones": tuple(r8.milestones), "model": "resnet18",
                          "model_kwargs": {}, "out": str(tmp_path / "r18")})
    with _stacks_seen() as seen:
        results = train_side_by_side([r18, r8, p8], stack=True)
    assert seen == [["r8", "p8"]] and [r.step for r in results] == [8, 8, 8]


def test_stacked_runs_train_like_the_runs_alone(tiny_cifar, stacked, tmp_path_factory):
    """r8 and p8 (ResNet-8, plain-8) stack; r14 (another length) trains beside them as before, bit for bit."""
    alone = [train(c) for c in cfgs(tiny_cifar, tmp_path_factory.mktemp("alone"), steps=STEPS)]
    for a, s in zip(alone[:2], stacked[:2]):
        _close_runs(a.out, s.out)
        assert s.step == a.step
        ck = load_checkpoint(s.out / "checkpoints" / f"step-{STEPS:08d}")
        assert ck.meta["model"] == load_checkpoint(a.out / "checkpoints" / f"step-{STEPS:08d}").meta["model"]
        # a run's checkpoint holds its own momentum only, not the whole stack's
        for t in ck.state["optimizer"]["state"].values():
            buf = t["momentum_buffer"]
            assert buf.untyped_storage().nbytes() == buf.numel() * buf.element_size()
        model = create_model(ck.meta["model"], **ck.meta["model_kwargs"])
        model.load_state_dict(ck.weights)    # an ordinary checkpoint of an ordinary net
    assert_same_run(alone[2].out, stacked[2].out)


def test_stacked_runs_keep_their_own_learning_rate(tiny_cifar, tmp_path):
    """A run warming up at lr 0.01 (Sec. 4.2, ResNet-110) and one that does not, stacked: each logs its own lr,
    as when trained alone, and the warm-up ends by its own test."""
    def two(root):
        a, b, _ = cfgs(tiny_cifar, root, steps=16)
        a = a.__class__(**{**a.to_dict(), "milestones": tuple(a.milestones), "warmup_lr": 0.01,
                           "warmup_until_error": 0.5, "warmup_max_steps": 12})
        return [a, b]
    alone = [train(c) for c in two(tmp_path / "alone")]
    together = train_side_by_side(two(tmp_path / "stacked"), stack=True)
    for a, s in zip(alone, together):
        _close_runs(a.out, s.out)
    lrs = [{r["lr"] for r in read_log(s.out / "log.jsonl") if r["split"] == "train"} for s in together]
    assert 0.01 in lrs[0] and 0.01 not in lrs[1]


def test_kill_9_then_resume_of_stacked_runs_is_bit_identical(tiny_cifar, stacked, tmp_path):
    """As the side-by-side test: kill -9 once every run logged step 20 (checkpoints at 16), resume all: the
    stacked runs stack again from their checkpoints and end bit-identical to the unbroken stacked runs."""
    root = tmp_path / "together"
    train_and_kill_9(tiny_cifar, root, stack=True)
    resumed = train_side_by_side([c.__class__(**{**c.to_dict(), "milestones": tuple(c.milestones), "resume": "auto"})
                                  for c in cfgs(tiny_cifar, root, steps=STEPS)], stack=True)
    for s, t in zip(stacked, resumed):
        assert_same_run(Path(s.out), Path(t.out))


def test_a_run_that_cannot_start_does_not_stop_a_stack(tiny_cifar, tmp_path):
    from resnets.train.side_by_side import SideBySideError
    r8, p8, bad = cfgs(tiny_cifar, tmp_path, steps=12)
    bad = bad.__class__(**{**bad.to_dict(), "milestones": tuple(bad.milestones), "model": "no-such-net"})
    with pytest.raises(SideBySideError, match="no-such-net") as e:
        train_side_by_side([r8, bad, p8], stack=True)
    assert list(e.value.errors) == [bad.out]
    assert not Path(bad.out).exists()        # it made its directory for its lock only, and removed it
    for c in (r8, p8):
        assert (Path(c.out) / "summary.json").exists()


def test_sigterm_stops_a_stack_at_one_step_and_the_resume_is_bit_identical(tiny_cifar, depths, tmp_path):
    """SIGTERM while a stack of two depths trains: every run of it checkpoints after the same step and the call
    raises StoppedBySignal; resuming (the runs stack again) ends bit-identical to the unbroken stacked runs. The
    signal arrives during p8's bookkeeping of step 12, after r14's and r8's: the stack decides once per step, so
    all stop at 13 (deciding per run, the two before p8 would stop at 13 and p8 at 12, and they would no longer
    stack on resume)."""
    from resnets.train.rundir import StoppedBySignal
    runs = _same_steps(tiny_cifar, tmp_path)

    def on_log(cfg, record):
        if Path(cfg.out).name == "p8" and record["split"] == "train" and record["step"] == 12:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(StoppedBySignal):
        train_side_by_side(runs, stack=True, on_log=on_log)
    last = {n: sorted(p.name for p in (tmp_path / n / "checkpoints").glob("step-*"))[-1] for n in ("r8", "p8", "r14")}
    assert last == {"r8": "step-00000013", "p8": "step-00000013", "r14": "step-00000013"}
    resumed = train_side_by_side([c.__class__(**{**c.to_dict(), "milestones": tuple(c.milestones), "resume": "auto"})
                                  for c in runs], stack=True)
    for s, t in zip(depths[1], resumed):
        # the same log and weights; the resumed runs also keep their step-13 checkpoint, which takes no step out
        ls, lt = ([{k: v for k, v in r.items() if k not in ("img_per_s", "elapsed_s")} for r in read_log(d / "log.jsonl")]
                  for d in (s.out, t.out))
        assert ls == lt
        for name in ("best", f"step-{s.step:08d}"):
            ws, wt = (load_checkpoint(d / "checkpoints" / name).weights for d in (s.out, t.out))
            assert all(torch.equal(ws[k], wt[k]) for k in ws), (s.out.name, name)
