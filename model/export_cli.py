"""`lift export`: write an ONNX bundle (graphs + manifest.json) for the service, or, with
``--format triton``, a Triton model repository (from a bundle exported first, or from ``--bundle``).

Torch is imported only inside :func:`run`, and not at all to convert an existing bundle
(``--format triton --bundle DIR``), so ``lift --help`` and the conversion work without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from lift_serve.model.options import (
    OptionError,
    add_backbone_arguments,
    add_checkpoint_argument,
    backbone_spec_unless_sidecar,
    resolve_checkpoint_option,
)

HELP = "export backbone + LiFT to an ONNX bundle (backbone graph, upsampler graphs, manifest) with parity measured"
DEFAULT_OUT = "bundles/model"
DEFAULT_TRITON_OUT = "bundles/triton"
# --triton-* option -> (the service's variable it defaults to, type, TritonOptions field): the
# repository batches and queues as the service's own batcher would with the same environment.
TRITON_FROM_ENV = {
    "triton_max_batch_size": ("LIFT_MAX_BATCH_SIZE", int, "max_batch_size"),
    "triton_max_wait_ms": ("LIFT_MAX_WAIT_MS", float, "max_wait_ms"),
    "triton_max_queue": ("LIFT_MAX_QUEUE", int, "max_queue"),
    "triton_request_timeout_s": ("LIFT_REQUEST_TIMEOUT_S", float, "request_timeout_s"),
}
TRITON_ONLY = ("bundle", "model_prefix", *TRITON_FROM_ENV, "triton_instance_kind", "triton_instances",
               "triton_tensorrt", "triton_tensorrt_precision", "triton_ensembles")

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"224,448"`` -> squares ``[(224, 224), (448, 448)]``; ``"224x320"`` -> ``[(224, 320)]``
    (height x width). Raises OptionError on anything else."""
    sizes = []
    for part in text.split(","):
        match = _SIZE.match(part)
        if not match:
            raise OptionError(
                f"--sizes: cannot read {part.strip()!r}; give comma-separated sizes, each N (an N x N square) "
                "or HxW (height x width), e.g. --sizes 224,448 or --sizes 224x320"
            )
        height = int(match.group(1))
        width = int(match.group(2) or height)
        if height <= 0 or width <= 0:
            raise OptionError(f"--sizes: {part.strip()!r} must be positive")
        sizes.append((height, width))
    return sizes


def parse_iterations(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    problem = f"--lift-iterations must be comma-separated integers >= 0, e.g. 0,1,2; got {text!r}"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(problem) from None
    if not values or min(values) < 0:
        raise OptionError(problem)
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backbone_arguments(parser)
    # No --backbone means: the sidecar of our checkpoint names it, else the default backbone.
    parser.set_defaults(backbone=None)
    for action in parser._actions:
        if action.dest == "backbone":
            action.help = ("timm model name, optionally with a pretrained tag (default: the one named in "
                           "the sidecar of a .safetensors --checkpoint, else vit_small_patch16_224.dino)")
    add_checkpoint_argument(parser)
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="export a named model (`lift models`): its backbone, upsampler weights (or "
                             "--checkpoint for the LiFT models), densities and sizes; the backbone options and "
                             "--lift-iterations/--sizes are then the model's. Without --out it goes to the models "
                             "cache, reused when it is already there")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="bundle directory to write; an existing bundle there is replaced atomically "
                             f"(default: {DEFAULT_OUT}, or the models cache with --model)")
    parser.add_argument("--lift-iterations", default="1", metavar="K[,K...]",
                        help="densities the service offers, as LiFT rounds (0 = backbone features only, 1 = 2x denser, "
                             "2 = 4x); every value shares the one backbone graph and the one step graph, "
                             "applied k times. Example: 0,1,2 (default: %(default)s)")
    parser.add_argument("--default-iterations", type=int, default=None, metavar="K",
                        help="iterations the service uses when a request does not say (default: 1 if "
                             "exported, else the largest)")
    parser.add_argument("--sizes", default="224", metavar="SIZES",
                        help="input sizes the bundle supports, comma-separated; N is an N x N square, HxW is "
                             "height H by width W, e.g. 224,448 or 224x320. Each must be a multiple of the "
                             "patch size; each is verified against PyTorch (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="fp16 halves weights and activations (for GPUs; output float16); parity must "
                             "reach cosine 0.999 instead of 0.9999 (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--demo", action="store_true",
                        help="write the demo bundle instead (random ViT-S/16 + untrained LiFT, sizes 224 and "
                             "448, iterations 0,1); other model options are ignored")
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                        help="after a successful export, publish the bundle on the Hugging Face Hub as this model "
                             "repository (as `lift push`; token from HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true",
                        help="with --push-to-hub: create the repository private")
    parser.add_argument("--format", choices=("bundle", "triton"), default="bundle",
                        help="bundle: the ONNX bundle `lift serve` runs with ONNX Runtime; triton: a Triton Inference "
                             "Server model repository (one model per graph, ONNX Runtime backend) plus the manifest, "
                             "for `LIFT_RUNTIME=triton lift serve --bundle REPO`. The bundle is exported first to "
                             "OUT_bundle beside --out, unless --bundle names one (default: %(default)s)")
    triton = parser.add_argument_group("Triton model repository (--format triton)")
    triton.add_argument("--bundle", default=None, metavar="DIR",
                        help="convert this existing bundle (no export; torch is not needed)")
    triton.add_argument("--model-prefix", default=None, metavar="PREFIX",
                        help="model names PREFIX_backbone, PREFIX_upsampler_prepare, PREFIX_upsampler_step "
                             "(LIFT_TRITON_MODEL_PREFIX of the service; default: lift)")
    triton.add_argument("--triton-max-batch-size", type=int, default=None, metavar="N",
                        help="max_batch_size of each model (default: LIFT_MAX_BATCH_SIZE, else 8)")
    triton.add_argument("--triton-max-wait-ms", type=float, default=None, metavar="MS",
                        help="dynamic batching's max_queue_delay (default: LIFT_MAX_WAIT_MS, else 5)")
    triton.add_argument("--triton-max-queue", type=int, default=None, metavar="N",
                        help="requests queued per model before Triton rejects (default: LIFT_MAX_QUEUE, else 64)")
    triton.add_argument("--triton-request-timeout-s", type=float, default=None, metavar="S",
                        help="queue timeout, then REJECT (default: LIFT_REQUEST_TIMEOUT_S, else 30)")
    triton.add_argument("--triton-instance-kind", choices=("gpu", "cpu"), default=None,
                        help="instance_group kind: KIND_GPU or KIND_CPU (default: gpu)")
    triton.add_argument("--triton-instances", type=int, default=None, metavar="N",
                        help="instances of each model (per GPU with gpu; default: 1)")
    triton.add_argument("--triton-tensorrt", action="store_true", default=None,
                        help="ONNX Runtime's TensorRT execution accelerator on the GPU instances (engines are built "
                             "when the server loads or first sees a shape)")
    triton.add_argument("--triton-tensorrt-precision", choices=("fp16", "fp32"), default=None,
                        help="with --triton-tensorrt: its precision_mode (default: fp16)")
    triton.add_argument("--triton-ensembles", action="store_true", default=None,
                        help="also write one ensemble per density, PREFIX_features_kK (image -> features in one call), "
                             "for clients that call Triton directly; the service chains the models itself")


def _print_summary(out, manifest) -> None:
    """The bundle's files and its parity table (ONNX Runtime vs PyTorch fp32) on stdout."""
    backbone = manifest.backbone
    print(f"bundle written to {out} (format {manifest.format_version})")
    print(f"  backbone {backbone.timm_name} ({backbone.weights}), channels {manifest.output.channels}, "
          f"facet {backbone.facet} ({backbone.channel_layout}), position rule {backbone.pos_interpolation}, "
          f"precision {manifest.onnx.precision}, opset {manifest.onnx.opset}")
    upsampler = manifest.upsampler
    if upsampler is not None:
        detected = {"ours": "ours (.safetensors + .json sidecar)",
                    "authors": f"the authors' {upsampler.kind} file (no sidecar; kind told by its keys)"}
        print(f"  upsampler {upsampler.kind} {upsampler.parameters}, "
              f"densities {manifest.iterations} (default {manifest.default_iterations})")
        print(f"  checkpoint: {detected.get(upsampler.checkpoint_format, 'none')}; channel layout "
              f"{backbone.channel_layout}")
    if manifest.random_weights:
        print(f"  WARNING: random or untrained weights: {', '.join(manifest.random_weights)}; the service will say "
              "its features are meaningless")
    for role, graph in manifest.graph_files().items():
        size = (Path(out) / graph.file).stat().st_size
        print(f"  {graph.file:<24} {role:<18} {size / 1e6:8.1f} MB")
    print(f"  {'parity case':<22}{'stride':>7}  {'size':<10}{'batch':>6}  {'max abs err':>12}  {'min cosine':>13}")
    for case in manifest.parity.cases:
        name = case.graph if case.graph != "chain" else f"chain k={case.iterations}"
        size = f"{case.size[0]}x{case.size[1]}"
        print(f"  {name:<22}{manifest.stride(case.iterations):>7g}  {size:<10}{case.batch:>6}  "
              f"{case.max_abs_err:>12.3g}  {case.min_cosine:>13.9f}")


def _export(args: argparse.Namespace, out: str | Path | None) -> Path:
    """Export the bundle the model options describe to ``out`` (None: the default place)."""
    from lift_serve.model.demo import export_demo_bundle
    from lift_serve.model.export import export_bundle

    if args.demo and args.model:
        raise OptionError("--demo and --model exclude each other")
    if args.demo:
        return export_demo_bundle(out or DEFAULT_OUT)
    if args.model:
        from lift_serve.hub.models import named_model
        from lift_serve.model.named import export_named

        return export_named(named_model(args.model), args.checkpoint, args.precision, out)
    resolve_checkpoint_option(args)
    return export_bundle(
        out or DEFAULT_OUT, backbone_spec_unless_sidecar(args), args.checkpoint,
        lift_iterations=parse_iterations(args.lift_iterations),
        sizes=parse_sizes(args.sizes), precision=args.precision, opset=args.opset,
        default_iterations=args.default_iterations,
    )


def triton_options(args: argparse.Namespace):
    """The repository's options from the --triton-* flags, else the service's LIFT_* variables."""
    from lift_serve.triton_repo import DEFAULT_PREFIX, TritonOptions

    values = {"prefix": getattr(args, "model_prefix", None) or DEFAULT_PREFIX}
    for dest, (variable, kind, field) in TRITON_FROM_ENV.items():
        value = getattr(args, dest, None)
        if value is None and os.environ.get(variable, "").strip():
            try:
                value = kind(os.environ[variable])
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise OptionError(f"{variable}={os.environ[variable]!r} is not {what}; fix it or pass "
                                  f"--{dest.replace('_', '-')}") from None
        if value is not None:
            values[field] = value
    for dest, field in (("triton_instance_kind", "instance_kind"), ("triton_instances", "instances"),
                        ("triton_tensorrt", "tensorrt"), ("triton_tensorrt_precision", "tensorrt_precision"),
                        ("triton_ensembles", "ensembles")):
        if getattr(args, dest, None) is not None:
            values[field] = getattr(args, dest)
    return TritonOptions(**values)


def _print_repository(out: Path, bundle: Path) -> None:
    import json

    from lift_serve.triton_repo import REPOSITORY_INFO

    info = json.loads((out / REPOSITORY_INFO).read_text())
    options = info["options"]
    print(f"Triton model repository written to {out} (from the bundle {bundle})")
    for role, name in info["models"].items():
        size = (out / name / "1" / "model.onnx").stat().st_size
        print(f"  {name:<32} {role:<18} {size / 1e6:8.1f} MB")
    for k, name in info["ensembles"].items():
        print(f"  {name:<32} ensemble, density {k}")
    accelerator = f", TensorRT {options['tensorrt_precision']}" if options["tensorrt"] else ""
    print(f"  max_batch_size {options['max_batch_size']}, queue delay {options['max_wait_ms']:g} ms, queue "
          f"{options['max_queue']}, timeout {options['request_timeout_s']:g} s, {options['instances']} "
          f"{options['instance_kind'].upper()} instance(s){accelerator}")
    prefix = "" if info["model_prefix"] == "lift" else f" LIFT_TRITON_MODEL_PREFIX={info['model_prefix']}"
    print(f"  serve it: tritonserver --model-repository {out.resolve()}\n"
          f"  then:     LIFT_RUNTIME=triton LIFT_TRITON_URL=http://HOST:8000{prefix} lift serve --bundle {out}")


def _run_triton(args: argparse.Namespace) -> int:
    from lift_serve.triton_repo import write_repository

    if getattr(args, "push_to_hub", None):
        raise OptionError("--push-to-hub publishes a bundle; export with --format bundle to push it")
    options = triton_options(args)  # bad options fail before an export
    out = Path(args.out or DEFAULT_TRITON_OUT)
    if args.bundle:
        for flag, given in (("--demo", args.demo), ("--model", args.model), ("--checkpoint", args.checkpoint)):
            if given:
                raise OptionError(f"--bundle converts an existing bundle; drop {flag}, or drop --bundle to export "
                                  "the bundle first")
        bundle = Path(args.bundle)
    else:
        # Beside the repository, not inside it: Triton loads every folder of its repository as a model.
        bundle = _export(args, out.parent / f"{out.name}_bundle")
        from lift_serve.bundle import read_manifest

        _print_summary(bundle, read_manifest(bundle))
    _print_repository(write_repository(bundle, out, options), bundle)
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lift").setLevel(logging.INFO)
    from lift_serve.bundle import read_manifest

    if getattr(args, "format", "bundle") == "triton":
        return _run_triton(args)
    if getattr(args, "bundle", None):
        raise OptionError("--bundle converts an existing bundle: add --format triton (a bundle is already a bundle)")
    given = [f"--{name.replace('_', '-')}" for name in TRITON_ONLY if getattr(args, name, None) is not None]
    if given:
        raise OptionError(f"{', '.join(given)} need --format triton")
    out = _export(args, args.out)
    _print_summary(out, read_manifest(out))
    if args.push_to_hub:
        from lift_serve.hub.push_cli import push_and_report

        push_and_report(out, args.push_to_hub, private=args.private, after_export=True)
    return 0
