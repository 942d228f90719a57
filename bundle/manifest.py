"""The bundle manifest, format 2: typed pydantic models, their validation, and reading from disk.

A bundle is a directory written by ``lift export``::

    manifest.json            this schema (format_version 2; JSON Schema in docs/bundle-manifest.schema.json)
    backbone.onnx            uint8 [B, H, W, 3] RGB image -> features [B, C, H/P, W/P] (normalisation inside)
    upsampler_prepare.onnx   image -> the upsampler's per-image state, run once per image
    upsampler_step.onnx      (state, features) -> (next state, 2x features), applied k times

The backbone runs once per image; features at density ``k`` (``stride = patch_size / 2**k`` input
pixels per cell) cost ``prepare`` plus ``k`` steps, so a service that keeps the backbone features
(and the model-input pixels the upsampler needs) answers a new density without the backbone. The
upsampler is described generically (``kind``, ``parameters``, its graphs and how they chain), not
by name: LiFT's state is its guide image, normalised (prepare) and bilinearly doubled each step.

Problems raise :class:`BundleError` naming the field, what was found and what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
PRECISIONS = {"fp32": "float32", "fp16": "float16"}
CHECKPOINT_FORMATS = ("ours", "authors")
BACKBONE_GRAPH = "backbone.onnx"
PREPARE_GRAPH = "upsampler_prepare.onnx"
STEP_GRAPH = "upsampler_step.onnx"
# The chain every upsampler of format 2 follows (the only one so far; a new chain is a new value).
CHAIN_PREPARE_THEN_STEPS = "prepare-once-then-step-k-times"
_REEXPORT = "re-export the bundle with `lift export`"
# Ranges a manifest must stay in, checked before any number is used: a tampered or damaged
# manifest cannot make the service allocate, loop or wait without bound.
MAX_MANIFEST_BYTES = 4 << 20
MAX_SIZES = 64
MAX_SIDE = 8192
MAX_PATCH = 64
MAX_CHANNELS = 16384
MAX_STEPS_LIMIT = 8
MAX_PARITY_CASES = 10_000


class BundleError(ValueError):
    """A bundle is missing, malformed or inconsistent; the message names the problem and the fix."""

    user_facing = True


Number = Annotated[StrictInt, Field(ge=-(2**63), le=2**63)] | StrictFloat
Sha256 = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex sha256 of the file")]
PositiveInt = Annotated[StrictInt, Field(gt=0, le=2**31)]
Side = Annotated[StrictInt, Field(gt=0, le=MAX_SIDE)]


class _Strict(BaseModel):
    # NaN and infinities are refused everywhere (mean, std, parity figures ...).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GraphFile(_Strict):
    """One ONNX file of the bundle and its tensor names (checked against the graph when loaded)."""

    file: Annotated[StrictStr, Field(pattern=r"^[^/\\]+$", description="a plain file name inside the bundle")]
    sha256: Sha256
    inputs: list[StrictStr]
    outputs: list[StrictStr]


class BackboneInfo(_Strict):
    """What computes the coarse features: enough to rebuild it with the same weights."""

    timm_name: StrictStr
    weights: StrictStr = Field(description="'hub', 'random' or the weights file used at export")
    seed: Annotated[StrictInt, Field(ge=0, le=2**63)]
    patch_size: Annotated[StrictInt, Field(gt=0, le=MAX_PATCH)]
    embed_dim: Annotated[StrictInt, Field(gt=0, le=MAX_CHANNELS)]
    layer: Annotated[StrictInt, Field(ge=-1024, le=1024)]
    facet: Literal["key", "query", "value", "token", "token_norm"]
    model_kwargs: dict[str, Any]
    channel_layout: Literal["interleaved", "concatenated"]
    pos_interpolation: Literal["dino", "timm"]
    graph: GraphFile


class UpsamplerGraphs(_Strict):
    prepare: GraphFile = Field(description="image -> state; once per image")
    step: GraphFile = Field(description="(state, features) -> (next state, features at twice the density)")


class UpsamplerInfo(_Strict):
    """The upsampler, generically: its kind and parameters, its graphs and how they chain."""

    kind: StrictStr = Field(description="registry name of the upsampler, e.g. 'lift'")
    parameters: dict[str, Any] = Field(description="constructor parameters of the upsampler module")
    checkpoint_sha256: Sha256 | None
    checkpoint_format: Literal["ours", "authors"] | None
    chain: Literal["prepare-once-then-step-k-times"]
    scale_per_step: Literal[2]
    max_steps: Annotated[StrictInt, Field(gt=0, le=MAX_STEPS_LIMIT)]
    graphs: UpsamplerGraphs


class InputInfo(_Strict):
    name: StrictStr
    sizes: Annotated[list[tuple[Side, Side]], Field(min_length=1, max_length=MAX_SIZES, description="[height, width]")]
    dtype: Literal["uint8"]
    layout: Literal["NHWC"]
    color: Literal["RGB"]
    mean: tuple[Number, Number, Number]
    std: tuple[Number, Number, Number]
    multiple: Annotated[StrictInt, Field(gt=0, le=MAX_PATCH)]


class OutputInfo(_Strict):
    name: StrictStr
    channels: Annotated[StrictInt, Field(gt=0, le=MAX_CHANNELS)]
    dtype: Literal["float32", "float16"]
    layout: Literal["NCHW"]


class OnnxInfo(_Strict):
    opset: Annotated[StrictInt, Field(gt=0, le=1000)]
    precision: Literal["fp32", "fp16"]
    exporter: StrictStr
    torch_version: StrictStr


class ParityCase(_Strict):
    """ONNX Runtime against PyTorch fp32 for one graph or chained density, size and batch."""

    graph: Literal["backbone", "upsampler_step", "chain"]
    iterations: Annotated[StrictInt, Field(ge=0, le=MAX_STEPS_LIMIT)]
    size: tuple[Side, Side]
    batch: PositiveInt
    inputs: list[StrictStr]
    max_abs_err: Number
    min_cosine: Number
    max_abs_ref: Number


class ParityInfo(_Strict):
    checked: StrictBool
    reference: StrictStr
    runtime: StrictStr
    min_cosine_required: Number
    max_abs_err: Number | None
    min_cosine: Number | None
    cases: Annotated[list[ParityCase], Field(max_length=MAX_PARITY_CASES)]


class Manifest(_Strict):
    """manifest.json of a format-2 bundle."""

    format_version: Literal[2]
    created: StrictStr
    demo: StrictBool = Field(description="an untrained demo bundle: its features are meaningless")
    random_weights: list[Literal["backbone", "upsampler"]] = Field(
        default_factory=list, description="parts whose weights are random or untrained (the service warns as for "
        "a demo bundle); bundles made before this field existed read as []")
    backbone: BackboneInfo
    upsampler: UpsamplerInfo | None = Field(description="null: backbone features only (iterations [0])")
    iterations: Annotated[list[Annotated[StrictInt, Field(ge=0, le=MAX_STEPS_LIMIT)]],
                          Field(min_length=1, max_length=MAX_STEPS_LIMIT + 1)]
    default_iterations: Annotated[StrictInt, Field(ge=0, le=MAX_STEPS_LIMIT)]
    input: InputInfo
    output: OutputInfo
    onnx: OnnxInfo
    parity: ParityInfo

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        problems = []
        if self.input.multiple != self.backbone.patch_size:
            problems.append(f"input.multiple {self.input.multiple} != backbone.patch_size {self.backbone.patch_size}")
        for height, width in self.input.sizes:
            if height % self.input.multiple or width % self.input.multiple:
                problems.append(f"size {[height, width]} is not a multiple of input.multiple {self.input.multiple}")
        if any(v <= 0 for v in self.input.std):
            problems.append(f"input.std must be positive, found {list(self.input.std)}")
        if self.output.channels != self.backbone.embed_dim:
            problems.append(f"output.channels {self.output.channels} != backbone.embed_dim {self.backbone.embed_dim}")
        if self.output.dtype != PRECISIONS[self.onnx.precision]:
            problems.append(f"output.dtype {self.output.dtype!r} disagrees with onnx.precision {self.onnx.precision!r}")
        if len(set(self.iterations)) != len(self.iterations):
            problems.append(f"iterations {self.iterations} repeat a value")
        if self.default_iterations not in self.iterations:
            problems.append(f"default_iterations {self.default_iterations} is not among iterations {self.iterations}")
        most = max(self.iterations)
        if most > 0 and self.upsampler is None:
            problems.append(f"iterations {self.iterations} need an upsampler, but upsampler is null")
        if self.upsampler is not None and most > self.upsampler.max_steps:
            problems.append(f"iterations {self.iterations} exceed upsampler.max_steps {self.upsampler.max_steps}")
        files = [g.file for g in self.graph_files().values()]
        if len(set(files)) != len(files):
            problems.append(f"graph files {files} repeat a name")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def graph_files(self) -> dict[str, GraphFile]:
        """Every graph of the bundle by role: backbone, and the upsampler's prepare/step if any."""
        graphs = {"backbone": self.backbone.graph}
        if self.upsampler is not None:
            graphs |= {"upsampler_prepare": self.upsampler.graphs.prepare, "upsampler_step": self.upsampler.graphs.step}
        return graphs

    def stride(self, iterations: int) -> float:
        """Input pixels per feature cell at ``iterations`` upsampler steps."""
        return self.backbone.patch_size / 2**iterations


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _field(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _explain(exc: ValidationError, where: str) -> str:
    first = exc.errors()[0]
    loc = _field(first["loc"])
    if first["type"] == "missing":
        return f"{where} lacks field '{loc}'; {_REEXPORT}"
    if first["type"] == "value_error":  # the cross-field checks above
        return f"{where}: {str(first['msg']).removeprefix('Value error, ')}; {_REEXPORT}"
    found = first.get("input")
    shown = f"{type(found).__name__} {found!r:.60}" if found is not None else "null"
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"{where}: field '{loc}': {first['msg']}, found {shown}{more}; {_REEXPORT}"


def format1_reexport_command(data: dict) -> str:
    """The `lift export` command that makes a format-2 bundle from what a format-1 manifest records."""
    backbone, lift, inp = data.get("backbone", {}), data.get("lift", {}), data.get("input", {})
    iterations = ",".join(str(k) for k in lift.get("iterations", [0]))
    sizes = ",".join(f"{h}x{w}" for h, w in inp.get("sizes", [[224, 224]]))
    checkpoint = lift.get("checkpoint_sha256")
    parts = ["lift export"]
    if checkpoint:
        parts.append(f"--checkpoint LIFT_CHECKPOINT (the file with sha256 {checkpoint[:12]}…)")
    parts += [f"--backbone {backbone.get('timm_name', 'NAME')}", f"--backbone-weights {backbone.get('weights', 'hub')}"]
    if backbone.get("weights") == "random":
        parts.append(f"--seed {backbone.get('seed', 0)}")
    if backbone.get("model_kwargs"):
        parts.append(f"--backbone-kwargs '{json.dumps(backbone['model_kwargs'])}'")
    parts += [f"--layer {backbone.get('layer', -1)}", f"--facet {backbone.get('facet', 'key')}",
              f"--channel-layout {backbone.get('channel_layout', 'concatenated')}",
              f"--pos-interpolation {backbone.get('pos_interpolation', 'timm')}",
              f"--lift-iterations {iterations}", f"--sizes {sizes}",
              f"--precision {data.get('onnx', {}).get('precision', 'fp32')}", "--out NEW_BUNDLE_DIR"]
    return " ".join(parts)


def validate_manifest(data: Any, where: str = MANIFEST_NAME) -> Manifest:
    """Parse and check a manifest (presence, types, ranges, cross-field consistency).

    Checks that need the ONNX graphs themselves (tensor names, dtypes, channels) belong to the runtime.
    """
    if isinstance(data, Manifest):
        return data
    if not isinstance(data, dict):
        raise BundleError(f"{where} must hold a JSON object, found {type(data).__name__}; {_REEXPORT}")
    version = data.get("format_version")
    if version == 1:
        try:
            command = format1_reexport_command(data)
        except Exception:  # a damaged format-1 manifest: the general advice instead of a command
            command = "lift export --checkpoint LIFT_CHECKPOINT --backbone NAME ... --out NEW_BUNDLE_DIR"
        raise BundleError(
            f"{where} is a format-1 bundle (one fused graph per density); this version reads format "
            f"{FORMAT_VERSION} (the backbone once, the upsampler on demand). Re-export it: {command}"
        )
    if version != FORMAT_VERSION:
        raise BundleError(f"{where} has format_version {version!r}; this runtime reads version {FORMAT_VERSION}; "
                          f"{_REEXPORT}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(_explain(exc, where)) from None
    except RecursionError:
        raise BundleError(f"{where} nests values beyond any manifest; {_REEXPORT}") from None


def read_manifest(bundle_dir: str | Path) -> Manifest:
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
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is {path.stat().st_size} bytes, more than a manifest can be "
                          f"({MAX_MANIFEST_BYTES}); {_REEXPORT}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); {_REEXPORT}") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits, arrays nested beyond any use
        raise BundleError(f"{path} holds a number or a nesting too large for a manifest; {_REEXPORT}") from None
    return validate_manifest(data, str(path))


def json_schema() -> dict:
    """The JSON Schema of :class:`Manifest` (published as docs/bundle-manifest.schema.json)."""
    return Manifest.model_json_schema()
