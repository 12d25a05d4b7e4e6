"""The ``resnets train`` flags come from TrainConfig's fields (issue 14): every field is a flag or explicitly not
one, every flag sets its field, every flag of earlier versions still parses to the same value, and config files of
earlier versions (channels_last "auto", cuda_graph "off") still load. In-process: parsing only, no training."""
import dataclasses
import json
from pathlib import Path

import pytest

from resnets import cli, config
from resnets.config import RECIPES, TrainConfig, field_type, recipe

# `resnets train --help` before the flags were derived from TrainConfig (commit 268aed1): all must still parse.
OLD_FLAGS = [
    "--batch-size", "--checkpoint-every", "--checkpoint-minutes", "--compile", "--config", "--crop", "--data",
    "--dataset", "--depth", "--device", "--epochs", "--eval-every", "--eval-resize", "--eval-subset", "--help",
    "--keep-last", "--label-smoothing", "--lighting", "--log-every", "--log-format", "--lr", "--lr-schedule",
    "--lr-warmup", "--milestones", "--model", "--momentum", "--nesterov", "--no-augment", "--no-channels-last",
    "--no-compile", "--no-cuda-graph", "--no-progress", "--no-warmup", "--normalize", "--on-nan", "--out",
    "--overwrite", "--precision", "--recipe", "--resize-max", "--resize-min", "--resume", "--seed", "--shortcut",
    "--steps", "--stride-in", "--sync-bn", "--tensorboard", "--threads", "--val-split", "--warmup-lr",
    "--weight-decay", "--workers", "--zero-init-residual",
]
EXPLICIT = {"recipe": ["--recipe"], "model_kwargs": ["--shortcut", "--stride-in", "--depth", "--zero-init-residual"]}
FIELDS = dataclasses.fields(TrainConfig)
REPO = Path(__file__).resolve().parents[1]


def train_parser():
    return cli.build_parser()._subparsers._group_actions[0].choices["train"]


def parse(*argv: str) -> TrainConfig:
    return cli.train_config(cli.build_parser().parse_args(["train", *argv]))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_field_is_a_flag_or_explicitly_not():
    options = train_parser()._option_string_actions
    for f in FIELDS:
        meta = f.metadata
        assert meta.get("help"), f"TrainConfig.{f.name} has no help text in its metadata"
        assert meta.get("cli") in ("flag", "explicit", "none"), f.name
        if meta["cli"] == "flag":
            action = options[flag(f.name)]
            assert action.dest == f.name and action.default is None     # None: the recipe's (or the file's) value
            assert action.help.replace("%%", "%") == meta["help"]        # the help text is the field's
            assert tuple(action.choices or ()) == tuple(meta["choices"] or ())
        elif meta["cli"] == "explicit":
            assert all(o in options for o in EXPLICIT[f.name]), f.name
        else:
            assert flag(f.name) not in options, f.name
    assert {f.name for f in FIELDS if f.metadata["cli"] == "explicit"} == set(EXPLICIT)


def test_old_flags_are_all_still_there():
    missing = sorted(set(OLD_FLAGS) - set(train_parser()._option_string_actions))
    assert not missing, missing


def sample(f: dataclasses.Field, base: TrainConfig) -> tuple[list[str], object]:
    """argv setting field f to a value other than base's, and that value (valid: validate() accepts it)."""
    kind, _ = field_type(f.name)
    now = getattr(base, f.name)
    if kind is bool:
        value = now is not True          # "auto" (cuda_graph) -> True
        return [flag(f.name) if value else "--no-" + f.name.replace("_", "-")], value
    if kind is tuple:
        return [flag(f.name), "7,9"], (7, 9)
    if f.metadata["choices"]:
        value = next(c for c in f.metadata["choices"] if c != now)
    elif kind is str:
        value = f"x-{f.name}"
    elif kind is int:
        value = now + 1 if isinstance(now, int) else 3
    elif kind is float:
        value = now / 2 if isinstance(now, float) and now else 0.5
    else:
        raise AssertionError(f"no sample value for {f.name}: {kind}")
    assert value != now
    return [flag(f.name), str(value)], value


@pytest.mark.parametrize("name", [f.name for f in FIELDS if f.metadata["cli"] == "flag"])
def test_each_flag_sets_its_field(name, tmp_path):
    f = next(f for f in FIELDS if f.name == name)
    # on top of a recipe: as recipe() with that override
    base = parse()
    argv, value = sample(f, base)
    cfg = parse(*argv)
    assert getattr(cfg, name) == value
    model = value if name == "model" else "resnet20"
    assert cfg == recipe("cifar-paper", **{"model": model, "out": f"runs/{model}", name: value})
    # (--freeze is only valid with --weights: validate() checks the pair)
    (dataclasses.replace(cfg, weights="cifar10") if name == "freeze" else cfg).validate()
    # on top of a config file: that one field replaced, all else the file's
    file_cfg = dataclasses.replace(RECIPES["cifar-fast"], out="runs/file", model_kwargs={"depth": 8}, seed=5)
    (tmp_path / "c.json").write_text(file_cfg.to_json())
    argv, value = sample(f, file_cfg)
    also = {"epochs": None} if name == "steps" else {}       # --steps replaces the file's epochs, as a recipe's
    assert parse("--config", str(tmp_path / "c.json"), *argv) == dataclasses.replace(file_cfg, **{name: value}, **also)


@pytest.mark.parametrize("argv,expected", [
    ([], {"augment": True, "warmup_lr": "auto", "channels_last": True, "cuda_graph": "auto", "progress": True,
          "compile": False, "milestones": (32000, 48000), "model": "resnet20", "out": "runs/resnet20"}),
    (["--no-augment"], {"augment": False}),
    (["--no-warmup"], {"warmup_lr": None}),
    (["--warmup-lr", "0.02", "--no-warmup"], {"warmup_lr": None}),
    (["--warmup-lr", "0.02"], {"warmup_lr": 0.02}),
    (["--no-channels-last"], {"channels_last": False}),
    (["--no-cuda-graph"], {"cuda_graph": False}),
    (["--no-progress"], {"progress": False}),
    (["--compile"], {"compile": True}),
    (["--recipe", "cifar-fast"], {"compile": True, "nesterov": True, "epochs": 50, "lr_schedule": "one-cycle"}),
    (["--recipe", "cifar-fast", "--no-compile"], {"compile": False}),
    (["--recipe", "cifar-fast", "--steps", "100"], {"steps": 100, "epochs": None, "milestones": ()}),
    (["--steps", "640"], {"steps": 640, "milestones": (320, 480)}),
    (["--milestones", "32000,48000"], {"milestones": (32000, 48000)}),
    (["--milestones", ""], {"milestones": ()}),
    (["--overwrite"], {"overwrite": True}),
    (["--tensorboard", "--sync-bn", "--nesterov"], {"tensorboard": True, "sync_bn": True, "nesterov": True}),
    (["--depth", "8", "--shortcut", "B", "--stride-in", "3x3", "--zero-init-residual"],
     {"model_kwargs": {"depth": 8, "shortcut": "B", "stride_in": "3x3", "zero_init_residual": True}}),
    (["--recipe", "imagenet-modern", "--depth", "101"],
     {"model": "resnet50", "out": "runs/resnet50", "model_kwargs": {"zero_init_residual": True, "depth": 101}}),
    (["--model", "plain20", "--lr", "0.05", "--epochs", "2.5", "--precision", "bf16", "--threads", "2"],
     {"model": "plain20", "out": "runs/plain20", "lr": 0.05, "epochs": 2.5, "precision": "bf16", "threads": 2}),
])
def test_old_spellings_parse_as_before(argv, expected):
    cfg = parse(*argv)
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_config_file_flags_override_it(tmp_path):
    f = tmp_path / "config.json"
    saved = dataclasses.replace(RECIPES["cifar-fast"], out="runs/saved", model_kwargs={"depth": 8}, steps=77,
                                epochs=None, milestones=(10, 20), seed=3, channels_last=False)
    f.write_text(saved.to_json())
    assert parse("--config", str(f)) == saved
    cfg = parse("--config", str(f), "--steps", "5", "--no-compile", "--channels-last", "--depth", "14",
                "--no-warmup", "--recipe", "cifar-fast")      # the file's own recipe: nothing to choose between
    assert cfg == dataclasses.replace(saved, steps=5, compile=False, channels_last=True, model_kwargs={"depth": 14},
                                      warmup_lr=None)
    # another recipe beside --config would be silently one or the other: refused, naming both
    with pytest.raises(ValueError, match="--recipe imagenet-paper and --config .* \\(recipe cifar-fast\\)"):
        parse("--config", str(f), "--recipe", "imagenet-paper")


def test_config_files_of_earlier_versions_still_load(tmp_path):
    old = {**TrainConfig().to_dict(), "channels_last": "auto", "cuda_graph": "off", "out": "runs/old"}
    f = tmp_path / "config.json"
    f.write_text(json.dumps(old))
    cfg = TrainConfig.load(f)
    assert cfg.channels_last is True and cfg.cuda_graph is False
    assert parse("--config", str(f)) == cfg
    assert TrainConfig.from_dict({"cuda_graph": "auto"}).cuda_graph == "auto"
    # the run directories shipped in docs/ were written by an earlier version ("channels_last": "auto")
    shipped = sorted(REPO.glob("docs/**/config.json"))
    assert shipped
    for path in shipped:
        assert TrainConfig.load(path).channels_last is True, path
    # in Python the aliases are gone: validate() names them
    for field, bad in (("channels_last", "auto"), ("cuda_graph", "off"), ("progress", 1)):
        with pytest.raises(ValueError, match=f"--{field.replace('_', '-')}"):
            dataclasses.replace(cfg, **{field: bad}).validate()


def test_choices_are_checked_once_for_files_and_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["train", "--lr-schedule", "linear"])
    assert e.value.code == 2 and "invalid choice: 'linear'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"lr_schedule \(--lr-schedule\) must be one of step, cosine, one-cycle"):
        dataclasses.replace(TrainConfig(), lr_schedule="linear").validate()
    for argv, name in ((["--gamma", "0"], "--gamma"), (["--warmup-max-steps", "-1"], "--warmup-max-steps")):
        with pytest.raises(ValueError, match=name):
            parse(*argv).validate()


def test_a_new_field_becomes_a_flag_without_a_cli_edit(monkeypatch):
    grown = dataclasses.make_dataclass(
        "TrainConfig", [("dropout", float, config._field(0.0, "dropout before the classifier", "recipe overrides"))],
        bases=(TrainConfig,))
    monkeypatch.setattr(config, "TrainConfig", grown)
    config._hints.cache_clear()
    try:
        p = cli.build_parser()
        assert "dropout before the classifier" in p._subparsers._group_actions[0].choices["train"].format_help()
        monkeypatch.setattr(config, "RECIPES", {"cifar-paper": grown()})
        cfg = cli.train_config(p.parse_args(["train", "--dropout", "0.25"]))
        assert isinstance(cfg, grown) and cfg.dropout == 0.25
    finally:
        monkeypatch.undo()
        config._hints.cache_clear()


def test_config_file_flags_add_to_its_model_arguments_and_steps_replace_its_epochs(tmp_path):
    """Over a --config as over a recipe: --shortcut keeps the file's zero_init_residual, --steps its epochs."""
    f = tmp_path / "config.json"
    saved = dataclasses.replace(RECIPES["imagenet-modern"], out="runs/saved", epochs=90)
    assert saved.model_kwargs == {"zero_init_residual": True}
    f.write_text(saved.to_json())
    cfg = parse("--config", str(f), "--shortcut", "C", "--steps", "40")
    assert cfg.model_kwargs == {"zero_init_residual": True, "shortcut": "C"}
    assert (cfg.steps, cfg.epochs) == (40, None)
    assert parse("--config", str(f), "--steps", "40", "--epochs", "3").epochs == 3


def test_fp16_training_is_refused_with_the_reason(capsys):
    """fp16 autocast without loss scaling lets small gradients underflow; bf16 has fp32's range."""
    with pytest.raises(SystemExit):
        parse("--precision", "fp16")
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    assert "loss scaling" in dataclasses.fields(TrainConfig)[[f.name for f in dataclasses.fields(TrainConfig)]
                                                             .index("precision")].metadata["help"]


def test_steps_over_a_config_file_scale_its_milestones_for_a_new_run_and_keep_them_for_a_resumed_one(tmp_path):
    """A new run from a config file with another --steps keeps the lr schedule's shape, as over a recipe; a run
    taken on keeps its own milestones, with a warning for those it will not reach."""
    f = tmp_path / "config.json"
    f.write_text(dataclasses.replace(RECIPES["cifar-paper"], out="runs/saved").to_json())
    assert parse("--config", str(f), "--steps", "2000").milestones == (1000, 1500)
    assert parse("--config", str(f), "--steps", "2000", "--milestones", "500,600").milestones == (500, 600)
    assert parse("--config", str(f), "--steps", "80000", "--resume", "auto").milestones == (32000, 48000)
    with pytest.warns(UserWarning, match=r"lr will not drop at \[48000\]"):
        assert parse("--config", str(f), "--steps", "40000", "--resume", "auto").milestones == (32000, 48000)
