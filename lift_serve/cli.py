"""The `lift` command: one entry point, subcommands implemented by the packages that own them.

Each subcommand lives in a module that defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import torch, timm or onnxruntime only inside ``run`` so that
``lift --help`` and ``lift serve`` work in the API image, which has no torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module, or group -> {subcommand -> module}
COMMANDS: dict[str, str | dict[str, str]] = {
    "train": "lift_serve.training.cli",
    "export": "lift_serve.model.export_cli",
    "serve": "lift_serve.serve_cli",
    "models": "lift_serve.hub.models_cli",
    "extract": "lift_serve.extract_cli",
    "push": "lift_serve.hub.push_cli",
    "eval": {
        "recon": "lift_serve.bench.recon_cli",
        "spair": "lift_serve.bench.spair_cli",
        "warp": "lift_serve.bench.warp_cli",
        "cka": "lift_serve.bench.cka_cli",
        "flops": "lift_serve.bench.flops_cli",
    },
    "bench": {
        "export": "lift_serve.bench.export_bench",
        "serve": "lift_serve.bench.serve_bench",
        "decode": "lift_serve.bench.decode_bench",
        "upsamplers": "lift_serve.bench.upsampler_bench",
        "soak": "lift_serve.bench.soak_bench",
        "extract": "lift_serve.bench.extract_bench",
        "train": "lift_serve.training.bench_cli",
        "gpu": "lift_serve.bench.gpu_bench",
    },
}

GROUP_HELP = {
    "eval": "evaluate features: reconstruction, SPair-71k PCK, warp PCK, CKA, FLOPs",
    "bench": "speed benchmarks that write JSON",
}


def _add_command(subparsers, name: str, module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return  # not installed in this build; tests/test_cli.py insists every command exists
    parser = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lift",
        description="LiFT dense ViT features: train, export to an ONNX bundle, serve over HTTP, evaluate.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in COMMANDS.items():
        if isinstance(target, str):
            _add_command(subparsers, name, target)
            continue
        group = subparsers.add_parser(name, help=GROUP_HELP[name], description=GROUP_HELP[name])
        group_subparsers = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        for sub_name, module_name in target.items():
            _add_command(group_subparsers, sub_name, module_name)
        group.set_defaults(_group_parser=group)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Expected problems (missing file, bad option, inconsistent bundle) are raised as exception
        # classes marked ``user_facing = True`` whose message says what is wrong and what to do:
        # print that, without a traceback. Anything else is a bug and keeps its traceback.
        if not getattr(exc, "user_facing", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
