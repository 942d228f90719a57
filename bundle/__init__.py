"""The bundle contract, owned by neither side: the manifest schema and its validation (no torch,
no numpy, no ONNX Runtime). The exporter (`lift_serve.model`) writes it and the service
(`lift_serve.service`) reads it; neither imports the other.

A bundle is a directory written by ``lift export``::

    manifest.json      this schema (format_version 1)
    model_k0.onnx      one ONNX graph per LiFT iteration count offered (k = 0 is the backbone alone)
    model_k1.onnx
    ...

Every graph has the same contract: input ``image`` uint8 ``[B, H, W, 3]`` RGB (NHWC, pixels
0..255; mean/std normalisation happens inside the graph) with ``(H, W)`` one of ``input.sizes``;
output ``features`` ``[B, C, h, w]`` (NCHW) with ``h = H / stride``, ``w = W / stride``, where
``stride = patch_size / 2**iterations`` input pixels per feature cell.

The exporter (``model/export.py``) builds the manifest with :func:`validate_manifest` and the
runtime (``service/runtime.py``) reads it with :func:`read_manifest`, so both sides share this one
schema. Problems raise :class:`BundleError` naming the field and what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = {"fp32": "float32", "fp16": "float16"}
CHECKPOINT_FORMATS = ("ours", "authors")

_REEXPORT = "re-export the bundle with `lift export`"


class BundleError(ValueError):
    """A bundle is missing, incomplete or inconsistent; the message names the problem and the fix."""

    user_facing = True


def graph_file_name(iterations: int) -> str:
    """File name of the graph computing ``iterations`` LiFT rounds (``model_k{iterations}.onnx``)."""
    return f"model_k{iterations}.onnx"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# field path -> accepted Python types. ``None`` in a tuple means the field may be null.
_NUMBER = (int, float)
_SCHEMA: dict[str, tuple] = {
    "format_version": (int,),
    "created": (str,),
    "demo": (bool,),
    "backbone": (dict,),
    "backbone.timm_name": (str,),
    "backbone.weights": (str,),
    "backbone.seed": (int,),
    "backbone.patch_size": (int,),
    "backbone.embed_dim": (int,),
    "backbone.layer": (int,),
    "backbone.facet": (str,),
    "backbone.model_kwargs": (dict,),
    "lift": (dict,),
    "lift.iterations": (list,),
    "lift.default_iterations": (int,),
    "lift.checkpoint_sha256": (str, type(None)),
    "lift.checkpoint_format": (str, type(None)),
    "input": (dict,),
    "input.name": (str,),
    "input.sizes": (list,),
    "input.dtype": (str,),
    "input.layout": (str,),
    "input.color": (str,),
    "input.mean": (list,),
    "input.std": (list,),
    "input.multiple": (int,),
    "output": (dict,),
    "output.name": (str,),
    "output.channels": (int,),
    "output.dtype": (str,),
    "output.layout": (str,),
    "graphs": (list,),
    "onnx": (dict,),
    "onnx.opset": (int,),
    "onnx.precision": (str,),
    "onnx.exporter": (str,),
    "onnx.torch_version": (str,),
    "parity": (dict,),
}
# Fields added after format 1 was first written: absent in older bundles, which are read with the
# meaning those had (facet channels in timm's head-concatenated order, timm's position resampling).
_OPTIONAL_CHOICES: dict[str, tuple[str, ...]] = {
    "backbone.channel_layout": ("interleaved", "concatenated"),
    "backbone.pos_interpolation": ("dino", "timm"),
}
_GRAPH_SCHEMA: dict[str, tuple] = {"iterations": (int,), "file": (str,), "stride": _NUMBER, "sha256": (str,)}


def _lookup(manifest: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _type_names(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_types(manifest: dict, where: str) -> None:
    for dotted, types in _SCHEMA.items():
        present, value = _lookup(manifest, dotted)
        if not present:
            raise BundleError(f"{where} lacks field '{dotted}'; {_REEXPORT}")
        # bool is an int subclass in Python; a manifest saying `"seed": true` is still wrong.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise BundleError(
                f"{where}: field '{dotted}' must be {_type_names(types)}, found {type(value).__name__} "
                f"{value!r:.60}; {_REEXPORT}"
            )


def _check_graphs(manifest: dict, where: str) -> None:
    patch = manifest["backbone"]["patch_size"]
    seen = []
    for index, graph in enumerate(manifest["graphs"]):
        if not isinstance(graph, dict):
            raise BundleError(f"{where}: graphs[{index}] must be an object; {_REEXPORT}")
        for key, types in _GRAPH_SCHEMA.items():
            if key not in graph:
                raise BundleError(f"{where} lacks field 'graphs[{index}].{key}'; {_REEXPORT}")
            if not isinstance(graph[key], types) or isinstance(graph[key], bool):
                raise BundleError(f"{where}: 'graphs[{index}].{key}' must be {_type_names(types)}; {_REEXPORT}")
        k = graph["iterations"]
        if abs(graph["stride"] - patch / 2**k) > 1e-9:
            raise BundleError(
                f"{where}: graphs[{index}] has stride {graph['stride']} but {k} LiFT rounds on patch "
                f"{patch} give {patch / 2**k}; {_REEXPORT}"
            )
        if Path(graph["file"]).name != graph["file"]:
            raise BundleError(f"{where}: graph file {graph['file']!r} must be a plain file name in the bundle")
        seen.append(k)
    offered = manifest["lift"]["iterations"]
    if sorted(seen) != sorted(offered) or len(set(seen)) != len(seen):
        raise BundleError(
            f"{where}: lift.iterations {offered} do not match the graphs listed (iterations {seen}); {_REEXPORT}"
        )


def validate_manifest(manifest: Any, where: str = MANIFEST_NAME) -> dict:
    """Check every field's presence, type and cross-field consistency; return the manifest.

    Checks that need the ONNX graph itself (input/output names, dtypes, channels) live in
    ``service.runtime``; this function needs only the JSON.
    """
    if not isinstance(manifest, dict):
        raise BundleError(f"{where} must hold a JSON object, found {type(manifest).__name__}; {_REEXPORT}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{where} has format_version {version!r}; this runtime reads version {FORMAT_VERSION}; {_REEXPORT}"
        )
    _check_types(manifest, where)
    for dotted, choices in _OPTIONAL_CHOICES.items():
        present, value = _lookup(manifest, dotted)
        if present and value not in choices:
            raise BundleError(f"{where}: field '{dotted}' must be one of {list(choices)}, found {value!r:.60}; "
                              f"{_REEXPORT}")
    inp, out, lift, onnx_info = manifest["input"], manifest["output"], manifest["lift"], manifest["onnx"]
    fixed = {"input.dtype": (inp["dtype"], "uint8"), "input.layout": (inp["layout"], "NHWC"),
             "input.color": (inp["color"], "RGB"), "output.layout": (out["layout"], "NCHW")}
    for name, (found, wanted) in fixed.items():
        if found != wanted:
            raise BundleError(f"{where}: {name} is {found!r}, this runtime supports only {wanted!r}; {_REEXPORT}")
    if onnx_info["precision"] not in PRECISIONS:
        raise BundleError(f"{where}: onnx.precision {onnx_info['precision']!r} is not one of {sorted(PRECISIONS)}")
    if out["dtype"] != PRECISIONS[onnx_info["precision"]]:
        raise BundleError(
            f"{where}: output.dtype {out['dtype']!r} disagrees with precision {onnx_info['precision']!r}"
        )
    for key in ("mean", "std"):
        values = inp[key]
        if len(values) != 3 or not all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in values):
            raise BundleError(f"{where}: input.{key} must be 3 numbers (RGB), found {values!r}")
    if any(v <= 0 for v in inp["std"]):
        raise BundleError(f"{where}: input.std must be positive, found {inp['std']!r}")
    if inp["multiple"] != manifest["backbone"]["patch_size"]:
        raise BundleError(
            f"{where}: input.multiple {inp['multiple']} != backbone.patch_size "
            f"{manifest['backbone']['patch_size']}; {_REEXPORT}"
        )
    sizes = inp["sizes"]
    if not sizes:
        raise BundleError(f"{where}: input.sizes is empty; {_REEXPORT} with --sizes")
    for size in sizes:
        ok = (isinstance(size, list) and len(size) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size))
        if not ok:
            raise BundleError(f"{where}: input.sizes entries must be [height, width] integers, found {size!r}")
        if size[0] % inp["multiple"] or size[1] % inp["multiple"]:
            raise BundleError(f"{where}: size {size} is not a multiple of input.multiple {inp['multiple']}")
    if out["channels"] != manifest["backbone"]["embed_dim"]:
        raise BundleError(
            f"{where}: output.channels {out['channels']} != backbone.embed_dim "
            f"{manifest['backbone']['embed_dim']}; {_REEXPORT}"
        )
    if lift["default_iterations"] not in lift["iterations"]:
        raise BundleError(
            f"{where}: lift.default_iterations {lift['default_iterations']} is not among "
            f"lift.iterations {lift['iterations']}"
        )
    if lift["checkpoint_format"] not in (*CHECKPOINT_FORMATS, None):
        raise BundleError(f"{where}: lift.checkpoint_format must be one of {CHECKPOINT_FORMATS} or null")
    _check_graphs(manifest, where)
    return manifest


def read_manifest(bundle_dir: str | Path) -> dict:
    """Load and validate ``bundle_dir/manifest.json``.

    Raises:
        BundleError: the directory or manifest is missing, not JSON, or fails :func:`validate_manifest`.
    """
    bundle_dir = Path(bundle_dir)
    if bundle_dir.is_file():
        raise BundleError(
            f"{bundle_dir} is a file, but a bundle is a directory holding manifest.json and the ONNX graphs; "
            "pass the directory that `lift export --out DIR` wrote"
        )
    if not bundle_dir.is_dir():
        raise BundleError(
            f"bundle directory {bundle_dir} does not exist; create one with `lift export --out {bundle_dir}` "
            "(or `lift serve --demo` for a demo bundle)"
        )
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a complete bundle; {_REEXPORT}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); {_REEXPORT}") from None
    return validate_manifest(manifest, str(path))
