"""The ``resnets`` command line. Each subcommand parses its arguments, builds a config and calls one function.

    resnets models                     the model zoo with params, multiply-adds and the paper's errors
"""
from __future__ import annotations

import argparse
import sys


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .models import create_model, get_spec, list_models, model_info

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
                     f"{info['macs'] / 1e9:.3f}G @{info['input_size'][-1]}px", err))
    header = ("name", "depth", "block", "shortcut", "stride", "params", "mult-adds", "paper error % (source)")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnets", description="Deep residual networks (He et al. 2015).")
    p.add_argument("--version", action="version", version=f"resnets {__import__('resnets').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the networks with params, multiply-adds and the paper's errors")
    m.add_argument("--family", choices=["imagenet", "cifar", "cifar-resnext"], help="only this family")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"resnets {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `resnets models | head`
        return 0
    except KeyboardInterrupt:
        print(f"resnets {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
