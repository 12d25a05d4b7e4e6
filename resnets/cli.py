"""The ``resnets`` command line. Each subcommand parses its arguments, builds a config and calls one function.

    resnets models                     the model zoo with params, multiply-adds and the paper's errors
    resnets train --model resnet56 --recipe cifar-paper [--data DIR] [--steps N] [--out runs/NAME]
    resnets evaluate --checkpoint PATH [--data DIR]
    resnets train --recipe imagenet-paper --data DIR            (DIR/train, DIR/val; under torchrun too)
    resnets evaluate --checkpoint PATH --data DIR [--ten-crop | --multi-scale]    (ImageFolder checkpoints)
    resnets reproduce cifar10 [--preset demo|paper] [--depths 20,32,44,56] [--seeds N] [--out DIR]
    resnets analyze responses --checkpoint PLAIN --checkpoint RESNET [--data DIR] [--out fig7.png]
    resnets analyze responses --model plain20 --model resnet20 --model resnet110   # shipped weights
    resnets export --checkpoint PATH --format onnx|torchscript --out FILE [--opset N] [--static-batch]
    resnets predict --checkpoint PATH IMAGE... [--top-k 5] [--json]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .models import create_model, get_spec, list_models, model_info
    from .models.pretrained import PRETRAINED
    from .models.registry import TORCHVISION_WEIGHTS

    def weights(name: str) -> str:
        """What ``weights=`` can load: our shipped runs with their measured test error, or torchvision's."""
        ours = sorted((p.test_error, p.tag) for (m, _), p in PRETRAINED.items() if m == name)
        shown = [f"{e:.2f} ({t})" for e, t in ours]
        if name in TORCHVISION_WEIGHTS:
            shown.append("torchvision")
        return ", ".join(shown) or "-"

    rows = []
    for name in list_models(args.family):
        spec = get_spec(name)
        with torch.device("meta"):  # shapes suffice to count; nothing is allocated
            m = create_model(name)
        info = model_info(m, spec.input_size)
        block = type(m.blocks()[0]).__name__
        variant = {"1x1": "v1 (1x1)", "3x3": "v1.5 (3x3)"}[m.stride_in] if block == "Bottleneck" else "-"
        err = f"{spec.paper_error[0]:.2f} ({spec.paper_error[1]})" if spec.paper_error else "-"
        rows.append((name, str(getattr(m, "depth", spec.defaults.get("depth", ""))), block,
                     m.shortcut if m.residual else "none (plain)", variant, f"{info['params'] / 1e6:.2f}M",
                     f"{info['macs'] / 1e9:.3f}G @{info['input_size'][-1]}px", err, weights(name)))
    header = ("name", "depth", "block", "shortcut", "stride", "params", "mult-adds", "paper error % (source)",
              "weights: our error % (tag)")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return 0


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--shortcut", choices=["A", "B", "C"], help="shortcut option (Sec. 3.3)")
    g.add_argument("--stride-in", choices=["1x1", "3x3"], help="bottleneck stride: 1x1 (paper, v1) or 3x3 (v1.5)")
    g.add_argument("--depth", type=int, help="any 6n+2 depth for the CIFAR nets")
    g.add_argument("--zero-init-residual", action="store_true", default=None, help="start each block as identity")
    g.add_argument("--num-classes", type=int, help="a check only: the head is sized from the data's classes")


def model_kwargs(args: argparse.Namespace) -> dict:
    kw = {"shortcut": args.shortcut, "stride_in": args.stride_in, "depth": args.depth,
          "zero_init_residual": args.zero_init_residual, "num_classes": getattr(args, "num_classes", None)}
    return {k: v for k, v in kw.items() if v is not None}


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(_csv_ints(text))


def flag_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields that are ``resnets train`` flags of their own: all but those whose metadata says
    "cli": "explicit" (recipe, model_kwargs: spelled below) or "none" (not a flag)."""
    from .config import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.metadata["cli"] == "flag"]


def add_field_flag(p: argparse._ActionsContainer, f: dataclasses.Field) -> None:
    """``--name-with-dashes`` for a TrainConfig field, typed by its annotation, with its metadata's help and choices.
    The default is None: a flag not given leaves the recipe's (or --config file's) value."""
    from .config import field_type

    kind, _ = field_type(f.name)
    kw: dict = {"dest": f.name, "default": None, "help": f.metadata["help"].replace("%", "%%")}
    if kind is bool:
        kw["action"] = argparse.BooleanOptionalAction     # --x / --no-x
    elif kind is tuple:
        kw["type"] = _int_tuple                            # tuple[int, ...]: 32000,48000
    elif kind in (int, float, str):
        kw["type"] = kind
        if f.metadata["choices"]:
            kw["choices"] = f.metadata["choices"]
    else:
        raise TypeError(f"TrainConfig.{f.name}: no flag for a {kind.__name__}; give it \"cli\": \"explicit\" or "
                        "\"none\" in its metadata")
    p.add_argument("--" + f.name.replace("_", "-"), **kw)


def add_train_args(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig

    meta = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    p.add_argument("--config", help="a JSON config, e.g. a run's config.json; the flags given override it")
    p.add_argument("--recipe", help=meta["recipe"]["help"])
    add_model_args(p)                                       # model_kwargs
    groups: dict = {None: p}
    for f in flag_fields():
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        add_field_flag(groups[group], f)
    groups[meta["warmup_lr"]["group"]].add_argument("--no-warmup", action="store_true",
                                                   help="no warm-up, whatever the depth")


def train_config(args: argparse.Namespace):
    """The TrainConfig of ``resnets train``: the recipe (or the --config file) with the fields of the flags given."""
    from .config import RECIPES, TrainConfig, recipe, scale_milestones

    overrides = {f.name: getattr(args, f.name) for f in flag_fields()}     # None: not given
    overrides["model_kwargs"] = model_kwargs(args)
    if args.config:
        base = TrainConfig.load(args.config)
        if args.recipe is not None and args.recipe != base.recipe:
            raise ValueError(f"--recipe {args.recipe} and --config {args.config} (recipe {base.recipe}) both give the "
                             f"base settings; drop --recipe, or the flags that differ change the file's settings")
        # as over a recipe: model flags add to the file's model arguments, and --steps replaces its epochs
        overrides["model_kwargs"] = {**base.model_kwargs, **overrides["model_kwargs"]}
        cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
        if overrides["steps"] is not None and overrides["epochs"] is None:
            cfg = dataclasses.replace(cfg, epochs=None)
        if overrides["steps"] is not None and overrides["milestones"] is None and cfg.lr_schedule == "step":
            late = [m for m in cfg.milestones if m >= cfg.steps]
            if cfg.resume is None:     # a new run from the file: as from a recipe, the lr drops at the same fractions
                cfg = dataclasses.replace(cfg, milestones=scale_milestones(base, cfg.steps))
            elif late:                 # a run taken on keeps its own milestones, reached or not
                warnings.warn(f"--steps {cfg.steps} with --resume: the run's lr milestones {list(cfg.milestones)} "
                              f"stay, and the lr will not drop at {late}; give --milestones to change them",
                              stacklevel=2)
    else:
        name = args.recipe or "cifar-paper"
        overrides["model"] = args.model or (RECIPES[name].model if name in RECIPES else "resnet20")
        overrides["out"] = args.out or f"runs/{overrides['model']}"
        cfg = recipe(name, **overrides)
    return dataclasses.replace(cfg, warmup_lr=None) if args.no_warmup else cfg


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = train_config(args)
    res = train(cfg)
    f = res.final
    if os.environ.get("RANK", "0") != "0":   # under torchrun, rank 0 reports
        return 0
    split = "val" if cfg.val_split or cfg.dataset == "imagefolder" else "test"
    evaluated = (f"{split} error {f['error']:.2f}% (top-5 {f['top5_error']:.2f}%)" if "error" in f
                 else "not evaluated (no val data)")
    train_err = f"{res.train_error:.2f}%" if res.train_error is not None else "-"
    print(f"{cfg.model}: {res.step} steps in {res.seconds:.0f} s; {evaluated}, last training error {train_err}; "
          f"run in {res.out}")
    return 0


def shipped_or_checkpoint(args: argparse.Namespace, command: str) -> str:
    """--checkpoint PATH, or --model NAME --weights TAG: the shipped weights file (SHA-256 checked)."""
    from .models import pretrained

    if args.checkpoint and (args.model or args.weights):
        raise ValueError(f"resnets {command}: give --checkpoint, or --model with --weights, not both")
    if args.checkpoint:
        return args.checkpoint
    if not (args.model and args.weights):
        raise ValueError(f"resnets {command}: give --checkpoint PATH, or --model NAME --weights TAG (shipped: "
                         f"{', '.join(pretrained.available()) or 'none'})")
    return str(pretrained.checked_path(args.model, args.weights))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .train.evaluate import evaluate_checkpoint
    args.checkpoint = shipped_or_checkpoint(args, "evaluate")
    from .train.evaluate import evaluate_imagefolder_checkpoint, is_imagefolder_checkpoint

    if (args.scales or args.flip) and not args.multi_scale:
        raise ValueError("--scales and --flip set up --multi-scale evaluation: add --multi-scale, or leave them out")
    imagefolder = is_imagefolder_checkpoint(args.checkpoint)
    if args.per_class and (imagefolder or args.ten_crop or args.multi_scale):
        raise ValueError("--per-class is for CIFAR checkpoints (centre evaluation of the test set); ImageFolder "
                         "evaluation reports top-1 and top-5 error only")
    if args.ten_crop or args.multi_scale or imagefolder:
        protocol = "ten-crop" if args.ten_crop else "multi-scale" if args.multi_scale else "center"
        r = evaluate_imagefolder_checkpoint(args.checkpoint, args.data, protocol=protocol, scales=args.scales,
                                            flip=args.flip, device=args.device, subset=args.subset,
                                            batch_size=args.batch_size, workers=args.workers)
        print(f"{r['model']} (step {r['step']}) on {r['n']} val images, {r['protocol']}: top-1 error "
              f"{r['error']:.2f}%, top-5 error {r['top5_error']:.2f}%, loss {r['loss']:.4f}")
        return 0
    r = evaluate_checkpoint(args.checkpoint, args.data, device=args.device, subset=args.subset,
                            progress=not args.no_progress, per_class=args.per_class)
    print(f"{r['model']} (step {r['step']}) on {r['n']} test images: top-1 error {r['error']:.2f}%, "
          f"top-5 error {r['top5_error']:.2f}%, loss {r['loss']:.4f}")
    if args.per_class:
        width = max(len(c) for c in r["per_class_error"])
        for name, err in r["per_class_error"].items():
            print(f"  {name:<{width}}  " + ("no test images" if err is None else f"{err:6.2f}%"))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments.reproduce import plot_progress, run_experiment

    if args.plot_only:
        out = args.out or f"runs/reproduce-cifar10-{args.preset}"
        print(f"Wrote {plot_progress(out)}")
        return 0

    overrides = {k: v for k, v in {"steps": args.steps, "device": args.device, "val_split": args.val_split,
                                   "compile": args.compile or None}.items() if v is not None}
    if args.steps is not None and args.preset == "paper":
        from .config import recipe
        overrides["milestones"] = recipe("cifar-paper", steps=args.steps).milestones
    out = args.out or f"runs/reproduce-cifar10-{args.preset}"
    res = run_experiment(args.preset, depths=args.depths, nets=args.nets, seeds=args.seeds, out=out,
                         data=args.data, overrides=overrides, progress=not args.no_progress, workers=args.workers,
                         stack=args.stack)
    print()
    print((Path(out) / "results.md").read_text().split("## What the numbers show")[0].rstrip())
    print("\nWhat the numbers show:")
    for line in res["interpretation"]:
        print(f"- {line}")
    print(f"\nWrote {out}/results.md, results.json, fig6.png{', fig7.png' if res.get('fig7') else ''} "
          f"in {res['wall_seconds']:.0f} s")
    return 0


def cmd_analyze_responses(args: argparse.Namespace) -> int:
    from .experiments.responses import analyze_checkpoints, plot_responses

    from .models import pretrained

    paths = list(args.checkpoint or [])
    for spec in args.model or []:
        name, _, tag = spec.partition(":")
        paths.append(str(pretrained.checked_path(name, tag or "cifar10")))
    if not paths:
        raise ValueError("resnets analyze responses: give --checkpoint PATH or --model NAME[:TAG] (shipped: "
                         f"{', '.join(pretrained.available()) or 'none'}), repeated for several nets")
    res = analyze_checkpoints(paths, args.data, subset=args.subset, device=args.device)
    path = plot_responses(res, args.out)
    for r in res:
        print(f"{r['label']:>12}: {len(r['std'])} layers, mean std {sum(r['std']) / len(r['std']):.4f}, "
              f"max {max(r['std']):.4f} ({r['checkpoint']})")
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    if args.batch_size is not None and not args.static_batch:
        raise ValueError("--batch-size fixes the batch of the exported model: give it with --static-batch")
    res = export(args.checkpoint, model=args.model, weights=args.weights, fmt=args.format, out=args.out,
                 opset=args.opset, dynamic_batch=not args.static_batch,
                 batch_size=1 if args.batch_size is None else args.batch_size,
                 image_size=args.image_size, tolerance=args.tolerance, verify=not args.no_verify,
                 stride_in=args.stride_in)
    print(res.summary(), file=sys.stdout if res.ok else sys.stderr)
    return 0 if res.ok else 1


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .predict import format_predictions, predict

    res = predict(shipped_or_checkpoint(args, "predict"), args.images, top_k=args.top_k, device=args.device)
    print(json.dumps(res, indent=2) if args.json else format_predictions(res))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnets", description="Deep residual networks (He et al. 2015).")
    p.add_argument("--version", action="version", version=f"resnets {__import__('resnets').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the networks with params, multiply-adds, the paper's errors and the "
                                     "weights that load with weights=")
    m.add_argument("--family", choices=["imagenet", "cifar", "cifar-resnext"], help="only this family")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a network with a recipe of the paper")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="top-1/top-5 test error of a checkpoint")
    e.add_argument("--checkpoint", help="checkpoint directory or model.safetensors")
    e.add_argument("--model", help="with --weights: a net with shipped weights (docs/models.md)")
    e.add_argument("--weights", help="with --model: shipped weights, e.g. cifar10 (docs/models.md)")
    e.add_argument("--data", help="directory with the data set")
    e.add_argument("--device", default="auto")
    e.add_argument("--subset", type=int, help="only N test images (CIFAR: the first N; ImageFolder: N spread over "
                   "every class)")
    e.add_argument("--per-class", action="store_true", help="CIFAR: also the top-1 error of each class")
    e.add_argument("--no-progress", action="store_true")
    ev = e.add_mutually_exclusive_group()
    ev.add_argument("--ten-crop", action="store_true", help="ImageFolder checkpoints: 10-crop testing (Sec. 3.4)")
    ev.add_argument("--multi-scale", action="store_true",
                    help="ImageFolder checkpoints: fully-convolutional scores averaged over --scales (Sec. 3.4)")
    e.add_argument("--scales", type=_csv_ints, help="shorter sides for --multi-scale (default 224,256,384,480,640)")
    e.add_argument("--flip", action="store_true", help="--multi-scale: also average over horizontal flips")
    e.add_argument("--batch-size", type=int, default=32, help="ImageFolder: images per batch (32)")
    e.add_argument("--workers", type=int, default=4, help="ImageFolder: DataLoader worker processes (4)")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("reproduce", help="the paper's CIFAR-10 experiments: degradation curves (Fig. 6), Table 6")
    r.add_argument("dataset", choices=["cifar10"])
    r.add_argument("--preset", choices=["demo", "paper"], default="demo",
                   help="demo: 20/56-layer nets, 250 steps (CPU, ~12 min); paper: Sec. 4.2's 64k-step recipe (GPU)")
    r.add_argument("--depths", type=_csv_ints, help="comma-separated 6n+2 depths, e.g. 20,32,44,56")
    r.add_argument("--nets", type=lambda t: [x for x in t.split(",") if x], help="plain,resnet (default both)")
    r.add_argument("--seeds", type=_positive_int, help="runs per net (mean and std are reported)")
    r.add_argument("--steps", type=int, help="iterations per run instead of the preset's")
    r.add_argument("--data", help="directory with CIFAR-10 (else RESNETS_DATA, the cache, or a download)")
    r.add_argument("--out", help="output directory (default runs/reproduce-cifar10-PRESET)")
    r.add_argument("--device", help="auto (default), cpu, cuda")
    r.add_argument("--val-split", type=int, help="hold out N training images for validation (5000: Sec. 4.2's "
                   "45k/5k split); test error from the final weights")
    r.add_argument("--workers", type=int, help="runs trained at once (default: one process per CPU core; on a GPU "
                   "all runs side by side, a CUDA stream each; 1: one after another)")
    r.add_argument("--stack", nargs="?", const="all", choices=["all", "depth"],
                   help="train the runs as one network of grouped convolutions: fewer, larger GPU kernels; agrees "
                   "with the runs alone to float rounding, not bit for bit. all (default): every depth in one "
                   "network (a net's stage ends before a deeper one's); depth: a network per depth")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile each net's (or the stack's) forward; on a GPU inside the captured step, where it "
                   "fuses BN, ReLU and the shortcut add (1.28x for ResNet-56 on an H200) for a one-off compile")
    r.add_argument("--plot-only", action="store_true",
                   help="train nothing: draw OUT/fig6-progress.png from the curves the runs have logged so far "
                   "(an experiment that was stopped or is still training)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_reproduce)

    a = sub.add_parser("analyze", help="analyses of trained nets")
    asub = a.add_subparsers(dest="analysis", required=True)
    ar = asub.add_parser("responses", help="Fig. 7: std of each 3x3 layer's response, plain vs ResNet")
    ar.add_argument("--checkpoint", action="append", help="a checkpoint (repeat for several nets)")
    ar.add_argument("--model", action="append", metavar="NAME[:TAG]",
                    help="a net's shipped weights (TAG defaults to cifar10; repeat for several nets)")
    ar.add_argument("--data", help="directory with the data set")
    ar.add_argument("--subset", type=int, help="only the first N test images")
    ar.add_argument("--device", default="auto")
    ar.add_argument("--out", default="fig7.png", help="figure path (a .json with the numbers is written beside it)")
    ar.set_defaults(func=cmd_analyze_responses)

    x = sub.add_parser("export", help="ONNX or TorchScript file of a network, checked against PyTorch")
    x.add_argument("--checkpoint", help="checkpoint directory, model.safetensors, or a torchvision .pth state_dict")
    x.add_argument("--model", help="a name from `resnets models` (without --checkpoint: random or --weights)")
    x.add_argument("--weights", help="with --model: shipped weights (e.g. cifar10), 'torchvision', "
                   "'torchvision:IMAGENET1K_V1', or a weights file")
    x.add_argument("--stride-in", choices=["1x1", "3x3"],
                   help="with --model: the bottleneck layout of a bare state dict, 1x1 (paper, v1) or 3x3 (v1.5)")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    x.add_argument("--out", required=True, help="file to write")
    x.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    xb = x.add_mutually_exclusive_group()
    xb.add_argument("--static-batch", action="store_true",
                    help="ONNX: fix the batch to --batch-size (default: any batch size)")
    # the default since the batch became dynamic; still accepted so that existing scripts keep working
    xb.add_argument("--dynamic-batch", action="store_true", help=argparse.SUPPRESS)
    x.add_argument("--batch-size", type=int, help="with --static-batch: the batch of the exported model (1)")
    x.add_argument("--image-size", type=int, help="input resolution (default: the training one, 32 or 224)")
    x.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |exported - PyTorch| (1e-4)")
    x.add_argument("--no-verify", action="store_true", help="do not run the exported file")
    x.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="top-5 classes of image files, with a trained checkpoint")
    pr.add_argument("--checkpoint", help="checkpoint directory or model.safetensors")
    pr.add_argument("--model", help="with --weights: a net with shipped weights")
    pr.add_argument("--weights", help="with --model: shipped weights, e.g. cifar10 (docs/models.md)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    pr.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    pr.add_argument("--json", action="store_true", help="JSON output")
    pr.add_argument("--device", default="cpu")
    pr.set_defaults(func=cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .train.rundir import StoppedBySignal
    try:
        return args.func(args)
    except StoppedBySignal as e:   # SIGTERM/SIGINT: checkpoint written, exit as the signal asked (143 / 130)
        print(f"resnets {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError) as e:
        print(f"resnets {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # Our own errors (missing or corrupt data, bad checkpoints, a NaN loss) carry their explanation.
        from .data import CorruptDataError, DataNotFoundError
        from .export import ExportError
        from .models import WeightsDownloadError
        from .train import CheckpointError, NonFiniteLossError
        from .train.rundir import RunDirError
        from .train.side_by_side import SideBySideError
        if isinstance(e, (CorruptDataError, DataNotFoundError, CheckpointError, NonFiniteLossError, ExportError,
                          WeightsDownloadError, RunDirError, SideBySideError)):
            print(f"resnets {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise
    except BrokenPipeError:  # e.g. `resnets models | head`
        return 0
    except OSError as e:  # disk full, permissions: say which file, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"resnets {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"resnets {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
