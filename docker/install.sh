#!/usr/bin/env bash
# Install lift-serve's Python environment for one image, exactly as the Dockerfile does; CI runs
# the same script, so a broken install step fails CI before anyone builds an image.
#
#   docker/install.sh TARGET VENV            create VENV (if needed), install, then verify
#   docker/install.sh --dry-run TARGET       resolve only (no download of wheels where the index
#                                            serves metadata) and check the resolved set
#
# TARGET   extra     image
# export   train     the export/train job: CUDA PyTorch (the PyPI torch wheel, CUDA 13), timm, onnx
# api      gpu       the HTTP service on an NVIDIA GPU: onnxruntime-gpu, no torch
# api-trt  gpu,tensorrt  the same plus TensorRT 10's libraries for the TensorRT provider
# api-cpu  serve     the HTTP service on CPU: onnxruntime, no torch (laptops, CI)
#
# Versions come from docker/constraints.txt (regenerate with `python docker/lock.py`). The project
# is installed as a regular (non-editable) package, as in the image. PYTHON picks the interpreter
# that creates the venv (default python3; onnxruntime-gpu needs >= 3.11).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-python3}"

usage() {
    echo "usage: $0 TARGET VENV | $0 --dry-run TARGET   (TARGET: export, api, api-trt or api-cpu)" >&2
    exit 2
}

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
target="${1:-}"
case "$target" in
    export) extra=train ;;
    api) extra=gpu ;;
    api-trt) extra=gpu,tensorrt ;;
    api-cpu) extra=serve ;;
    *) usage ;;
esac

if [ "$dry_run" = 1 ]; then
    [ $# -eq 1 ] || usage
    report="$(mktemp)"
    trap 'rm -f "$report"' EXIT
    echo "resolving lift-serve[$extra] for the $target image"
    # --ignore-installed resolves as into an empty environment, whatever this interpreter has.
    PIP_CONSTRAINT="$here/constraints.txt" \
        "$PYTHON" -m pip install --quiet --dry-run --ignore-installed --report "$report" "${root}[${extra}]"
    "$PYTHON" "$here/verify_install.py" "$target" --report "$report"
    exit 0
fi

[ $# -eq 2 ] || usage
venv="$2"
if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv"
fi
echo "installing lift-serve[$extra] into $venv for the $target image"
# PIP_CONSTRAINT (rather than --constraint) also pins the build backend that pip fetches into its
# isolated build environment to build lift-serve itself. pip's cache stays on: the Dockerfile
# mounts it as a build cache outside the image layers (set PIP_NO_CACHE_DIR=1 to turn it off).
# api-trt: tensorrt-cu13-libs on PyPI is a stub that fetches the real wheel from NVIDIA's index.
extra_index=()
if [ "$target" = api-trt ]; then
    extra_index=(--extra-index-url https://pypi.nvidia.com)
fi
PIP_CONSTRAINT="$here/constraints.txt" \
    "$venv/bin/python" -m pip install --quiet "${extra_index[@]}" "${root}[${extra}]"
"$venv/bin/python" "$here/verify_install.py" "$target"
