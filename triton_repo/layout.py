"""Names shared by the repository writer and the service's Triton runtime (no heavy imports).

A repository written by ``lift export --format triton`` holds, at its top level, the bundle's
``manifest.json`` (copied unchanged, so ``lift serve --bundle REPO`` reads the sizes, densities and
strides from it) and ``lift_triton.json`` (:data:`REPOSITORY_INFO`: the model prefix and the model
of each graph); Triton loads only the sub-directories, one per model.
"""

from __future__ import annotations

REPOSITORY_INFO = "lift_triton.json"
REPOSITORY_FORMAT = 1
DEFAULT_PREFIX = "lift"
# The model's file inside its version directory: the onnxruntime backend's default name.
MODEL_FILE = "model.onnx"
MODEL_VERSION = "1"
# A model config parameter holding the sha256 of the graph bytes: the service compares it with the
# manifest, so a server holding another export's graphs is refused at start.
SHA256_PARAMETER = "lift_graph_sha256"
ROLE_PARAMETER = "lift_role"

# Manifest / numpy dtype name -> Triton model-config type and KServe v2 tensor datatype.
CONFIG_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
KSERVE_TYPES = {"uint8": "UINT8", "float32": "FP32", "float16": "FP16"}


def model_name(prefix: str, role: str) -> str:
    """Triton model name of graph ``role`` (``backbone``, ``upsampler_prepare``, ``upsampler_step``)."""
    return f"{prefix}_{role}"


def ensemble_name(prefix: str, iterations: int) -> str:
    """Name of the optional ensemble that returns features at density ``iterations`` in one call."""
    return f"{prefix}_features_k{iterations}"


def check_prefix(prefix: str) -> str:
    """A model prefix must make directory and URL-safe model names; returns it or raises ValueError."""
    if not prefix or len(prefix) > 64 or not all(c.isalnum() or c in "_-" for c in prefix) or prefix[0] in "-_":
        raise ValueError(f"model prefix {prefix!r} must be 1-64 letters, digits, '_' or '-', starting with a letter "
                         "or digit (it names Triton models and their directories)")
    return prefix
