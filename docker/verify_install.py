"""Check an image's Python environment (run by docker/install.sh after installing, in CI and in
the Docker build): the right packages are there, the wrong ones are not, and ``lift`` starts.

    python docker/verify_install.py TARGET                 check the running interpreter's environment
    python docker/verify_install.py TARGET --report FILE   check a ``pip install --dry-run --report``

TARGET is ``export``, ``api`` or ``api-cpu``. The api images must not contain torch (nor timm,
torchvision or triton, which would drag it in): the service never imports it, and a CUDA torch
would add gigabytes. ``onnxruntime`` and ``onnxruntime-gpu`` install the same Python package, so
exactly one of them may be present. Standard library only: this runs before anything is known
to work.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

TORCH_SIDE = {"torch", "torchvision", "timm", "triton"}
RULES = {
    # target: (must be present, must be absent)
    "export": ({"torch", "timm", "onnx", "onnxscript", "onnxruntime", "safetensors"}, {"onnxruntime-gpu"}),
    "api": ({"onnxruntime-gpu", "fastapi", "uvicorn", "pydantic-settings", "prometheus-client"},
            TORCH_SIDE | {"onnxruntime"}),
    "api-trt": ({"onnxruntime-gpu", "tensorrt-cu13-libs", "fastapi", "uvicorn", "pydantic-settings",
                 "prometheus-client"}, TORCH_SIDE | {"onnxruntime"}),
    "api-cpu": ({"onnxruntime", "fastapi", "uvicorn", "pydantic-settings", "prometheus-client"},
                TORCH_SIDE | {"onnxruntime-gpu"}),
}


class VerifyError(Exception):
    pass


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def check_names(target: str, names: set[str], where: str) -> None:
    """Raise VerifyError naming every required package missing and every forbidden one present."""
    required, forbidden = RULES[target]
    problems = []
    if missing := sorted(required - names):
        problems.append(f"missing {', '.join(missing)}")
    if extra := sorted(forbidden & names):
        problems.append(f"must not contain {', '.join(extra)}")
    if problems:
        raise VerifyError(f"{target} image ({where}): " + "; ".join(problems))


def names_from_report(path: Path) -> set[str]:
    return {normalise(item["metadata"]["name"]) for item in json.loads(path.read_text())["install"]}


def installed_names() -> set[str]:
    return {normalise(dist.metadata["Name"]) for dist in importlib.metadata.distributions()}


def check_runtime(target: str) -> list[str]:
    """Import-level checks in this interpreter; returns lines to print."""
    lines = []
    if target == "export":
        import torch

        if torch.version.cuda is None:
            raise VerifyError("the export image needs a CUDA build of torch, got a CPU-only one")
        lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    else:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        # Lists what the wheel was built with, so this holds without a GPU; the CUDA libraries
        # themselves are only loaded when a session asks for the provider.
        if target in ("api", "api-trt") and "CUDAExecutionProvider" not in providers:
            raise VerifyError(f"onnxruntime-gpu offers no CUDAExecutionProvider (has {providers})")
        lines.append(f"onnxruntime {onnxruntime.__version__}, providers {providers}")
    return lines


def check_cli(target: str) -> list[str]:
    """``lift --help`` (and ``lift serve --help`` where the service is installed) must work.

    Run in a fresh interpreter so that what ``lift`` imports is measured alone: in the api images
    building the parser must not import torch (it is not even installed there).
    """
    probe = (
        "import sys\nfrom lift_serve import cli\n"
        "cli.build_parser()\n"
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))\n"
    )
    # From a neutral directory, so the installed package is what gets imported, not a source tree.
    neutral = sys.prefix
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=neutral)
    if done.returncode != 0:
        raise VerifyError(f"building the `lift` command line failed:\n{done.stderr.strip()}")
    imported = done.stdout.strip()
    if target != "export" and imported != "[]":
        raise VerifyError(f"`lift` imported {imported} at start-up in the {target} image")
    lines = ["lift --help: ok"]
    if importlib.util.find_spec("lift_serve.serve_cli") is not None:
        serve = subprocess.run([sys.executable, "-m", "lift_serve.cli", "serve", "--help"], capture_output=True,
                               text=True, cwd=neutral)
        if serve.returncode != 0:
            raise VerifyError(f"`lift serve --help` failed:\n{serve.stderr.strip()}")
        lines.append("lift serve --help: ok")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(RULES))
    parser.add_argument("--report", type=Path, help="check this pip --report JSON instead of the environment")
    args = parser.parse_args(argv)
    try:
        if args.report is not None:
            names = names_from_report(args.report)
            check_names(args.target, names, "resolved requirements")
            print(f"{args.target}: {len(names)} packages resolved; torch-side packages: "
                  f"{sorted(TORCH_SIDE & names) or 'none'}")
            return 0
        names = installed_names()
        check_names(args.target, names, sys.prefix)
        for line in check_runtime(args.target) + check_cli(args.target):
            print(f"{args.target}: {line}")
        print(f"{args.target}: {len(names)} packages installed in {sys.prefix}, verified")
        return 0
    except VerifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
