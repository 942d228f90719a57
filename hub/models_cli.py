"""`lift models`: the named models, what each needs, and whether its bundle is already exported."""

from __future__ import annotations

import argparse

HELP = "list the named models (lift serve --model NAME / lift export --model NAME) and what each needs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="report the cached export at this precision (default: %(default)s)")


def _cached(model, precision: str) -> str:
    """Where the model's bundle is, if exported, without fetching anything or needing the network."""
    from lift_serve.hub.models import models_cache_dir

    found = sorted(models_cache_dir().glob(f"{model.name}-{precision}-*/manifest.json"))
    return str(found[-1].parent) if found else "not exported yet"


def run(args: argparse.Namespace) -> int:
    from lift_serve.hub.models import REGISTRY, models_cache_dir

    print(f"named models (bundles exported once into {models_cache_dir()}, LIFT_MODELS_CACHE):")
    for model in REGISTRY.values():
        strides = ", ".join(str(k) for k in model.iterations)
        print(f"\n  {model.name}\n    {model.summary}")
        print(f"    backbone {model.backbone}, upsampler {model.upsampler}, iterations {strides} "
              f"(default {model.default_iterations}), sizes {', '.join(map(str, model.sizes))}")
        print(f"    needs: {model.needs}")
        print(f"    licence: {model.licence}")
        print(f"    bundle: {_cached(model, args.precision)}")
    print("\nserve one: lift serve --model NAME [--checkpoint PATH|hf://...]  (exports it on first use)")
    return 0
