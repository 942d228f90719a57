"""Write a Triton model repository from a bundle (``lift export --format triton``); torch-free.

Layout (``PREFIX`` is ``--model-prefix``, default ``lift``)::

    REPO/
      manifest.json                    the bundle's manifest, byte for byte (what the service reads)
      lift_triton.json                 model prefix, the model of each graph, the options used
      PREFIX_backbone/
        config.pbtxt                   ONNX Runtime backend, dynamic batching, queue policy
        1/model.onnx                   the bundle's backbone.onnx (sha256 checked against the manifest)
      PREFIX_upsampler_prepare/ ...    the same for upsampler_prepare.onnx (bundles with an upsampler)
      PREFIX_upsampler_step/ ...       and for upsampler_step.onnx
      PREFIX_features_kK/              only with ensembles: backbone -> prepare -> K steps in one call
        config.pbtxt
        1/                             (empty: an ensemble has no file of its own)

One model per graph, chained by the service rather than by a Triton ensemble: the service keeps the
backbone features of an image in its cache and answers a new density with upsampler steps alone (no
backbone pass), which an ensemble, always running the whole chain, would hide. The ensembles, one
per offered density, are for clients that call Triton directly.

Batching is Triton's: the batch axis is implicit (``max_batch_size``), every other axis is the
graph's own (-1 where the graph leaves it free). The values that the service takes from
``LIFT_MAX_BATCH_SIZE``, ``LIFT_MAX_WAIT_MS``, ``LIFT_MAX_QUEUE`` and ``LIFT_REQUEST_TIMEOUT_S`` go
to ``max_batch_size``, ``max_queue_delay_microseconds``, ``max_queue_size`` and
``default_timeout_microseconds`` (``timeout_action: REJECT``), so a repository behaves as the
service's own batcher would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from lift_serve.bundle import MANIFEST_NAME, BundleError, GraphFile, Manifest, read_manifest
from lift_serve.bundle.publish import replace_directory
from lift_serve.triton_repo.layout import (
    CONFIG_TYPES,
    MODEL_FILE,
    MODEL_VERSION,
    REPOSITORY_FORMAT,
    REPOSITORY_INFO,
    ROLE_PARAMETER,
    SHA256_PARAMETER,
    check_prefix,
    ensemble_name,
    model_name,
)
from lift_serve.triton_repo.pbtxt import Enum, to_pbtxt

_ONNX_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16"}
_REEXPORT = "re-export the bundle with `lift export`"


class RepositoryError(ValueError):
    """The repository cannot be written as asked; the message says why and what to do."""

    user_facing = True


@dataclasses.dataclass(frozen=True)
class TritonOptions:
    """How the models are configured. The defaults are the service's own (``LIFT_*`` defaults)."""

    prefix: str = "lift"
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    request_timeout_s: float = 30.0
    instance_kind: str = "gpu"
    instances: int = 1
    tensorrt: bool = False
    tensorrt_precision: str = "fp16"
    tensorrt_workspace_bytes: int = 1 << 30
    ensembles: bool = False

    def checked(self) -> TritonOptions:
        try:
            check_prefix(self.prefix)
        except ValueError as exc:
            raise RepositoryError(f"--model-prefix: {exc}") from None
        problems = []
        if not 1 <= self.max_batch_size <= 256:
            problems.append(f"max_batch_size must be 1..256, got {self.max_batch_size}")
        if not 0 <= self.max_wait_ms <= 10_000:
            problems.append(f"max_wait_ms must be 0..10000, got {self.max_wait_ms}")
        if self.max_queue < 1:
            problems.append(f"max_queue must be >= 1, got {self.max_queue}")
        if not 0 < self.request_timeout_s <= 86_400:
            problems.append(f"request_timeout_s must be in (0, 86400], got {self.request_timeout_s}")
        if self.instance_kind not in ("gpu", "cpu"):
            problems.append(f"instance kind must be 'gpu' or 'cpu', got {self.instance_kind!r}")
        if not 1 <= self.instances <= 64:
            problems.append(f"instances must be 1..64, got {self.instances}")
        if self.tensorrt and self.instance_kind != "gpu":
            problems.append("the TensorRT accelerator runs on GPU instances only; drop --triton-tensorrt or use "
                            "--triton-instance-kind gpu")
        if self.tensorrt_precision not in ("fp16", "fp32"):
            problems.append(f"TensorRT precision must be fp16 or fp32, got {self.tensorrt_precision!r}")
        if problems:
            raise RepositoryError("; ".join(problems))
        return self


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # manifest dtype name: uint8, float32, float16
    shape: tuple  # ints for fixed axes, None for free ones, batch axis included


@dataclasses.dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]


def graph_signature(data: bytes, where: str) -> Signature:
    """Names, dtypes and shapes of an ONNX graph's inputs and outputs (read with ONNX Runtime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RepositoryError("writing a Triton repository reads the graphs' signatures with onnxruntime, which is "
                              "not installed; install the 'serve' or 'train' extra") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several private exception types for unreadable graphs
        raise BundleError(f"ONNX Runtime cannot read {where} ({str(exc)[:300]}); {_REEXPORT}") from None

    def tensors(items) -> tuple[Tensor, ...]:
        found = []
        for item in items:
            if item.type not in _ONNX_TYPES:
                raise BundleError(f"{where}: tensor {item.name!r} is {item.type}, not uint8, float or float16; "
                                  f"{_REEXPORT}")
            shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in item.shape)
            found.append(Tensor(item.name, _ONNX_TYPES[item.type], shape))
        return tuple(found)

    return Signature(tensors(session.get_inputs()), tensors(session.get_outputs()))


def read_graph(bundle_dir: Path, graph: GraphFile, role: str) -> bytes:
    """The graph's bytes, refused unless they are a plain file whose sha256 the manifest records."""
    path = bundle_dir / graph.file
    if path.is_symlink() or (path.exists() and path.resolve().parent != bundle_dir.resolve()):
        raise BundleError(f"graph file {path} is a link; a bundle's graphs must be plain files inside its directory "
                          "(their sha256 covers what is served); copy the files themselves")
    if not path.is_file():
        raise BundleError(f"graph file {path} listed in the manifest is missing (the {role} graph); copy the whole "
                          f"bundle directory or {_REEXPORT}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != graph.sha256:
        raise BundleError(f"graph file {path} has sha256 {digest[:12]}… but the manifest records {graph.sha256[:12]}…: "
                          "the file is truncated, corrupted or from another export; copy the bundle again or "
                          f"{_REEXPORT}; no repository was written")
    return data


def _check_signature(signature: Signature, graph: GraphFile, where: str) -> None:
    names = ([t.name for t in signature.inputs], [t.name for t in signature.outputs])
    if names != (graph.inputs, graph.outputs):
        raise BundleError(f"{where} has inputs {names[0]} and outputs {names[1]}, but the manifest names "
                          f"{graph.inputs} and {graph.outputs}; {_REEXPORT}")
    for tensor in (*signature.inputs, *signature.outputs):
        if len(tensor.shape) != 4:
            raise BundleError(f"{where}: {tensor.name!r} has {len(tensor.shape)} axes, a bundle's tensors have 4; "
                              f"{_REEXPORT}")
        if tensor.shape[0] is not None:
            raise BundleError(f"{where}: {tensor.name!r} has a fixed batch axis of {tensor.shape[0]}; Triton's "
                              f"dynamic batching needs a free first axis, as `lift export` writes; {_REEXPORT}")


def _dims(tensor: Tensor) -> list[int]:
    return [-1 if d is None else d for d in tensor.shape[1:]]


def _io(tensors: tuple[Tensor, ...]) -> list[dict]:
    return [{"name": t.name, "data_type": Enum(CONFIG_TYPES[t.dtype]), "dims": _dims(t)} for t in tensors]


def _preferred_batch_sizes(largest: int) -> list[int]:
    sizes = [2**i for i in range(1, 9) if 2**i < largest]
    return [*sizes, largest] if largest > 1 else []


def _parameters(values: dict[str, str]) -> list[dict]:
    return [{"key": key, "value": {"string_value": value}} for key, value in values.items()]


def model_config(name: str, role: str, graph: GraphFile, signature: Signature, options: TritonOptions) -> dict:
    """The model configuration (as a text-format message dict) of one graph."""
    config = {
        "name": name,
        "backend": "onnxruntime",
        "max_batch_size": options.max_batch_size,
        "input": _io(signature.inputs),
        "output": _io(signature.outputs),
        "version_policy": {"latest": {"num_versions": 1}},
        "dynamic_batching": {
            "preferred_batch_size": _preferred_batch_sizes(options.max_batch_size),
            "max_queue_delay_microseconds": int(round(options.max_wait_ms * 1000)),
            "default_queue_policy": {
                "timeout_action": Enum("REJECT"),
                "default_timeout_microseconds": int(round(options.request_timeout_s * 1_000_000)),
                "allow_timeout_override": True,
                "max_queue_size": options.max_queue,
            },
        },
        "instance_group": [{"count": options.instances, "kind": Enum(f"KIND_{options.instance_kind.upper()}")}],
        "parameters": _parameters({SHA256_PARAMETER: graph.sha256, ROLE_PARAMETER: role}),
    }
    if options.tensorrt:
        accelerator = {"name": "tensorrt", "parameters": [
            {"key": "precision_mode", "value": options.tensorrt_precision.upper()},
            {"key": "max_workspace_size_bytes", "value": str(options.tensorrt_workspace_bytes)},
        ]}
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [accelerator]}}
    return config


def ensemble_config(manifest: Manifest, iterations: int, options: TritonOptions,
                    signatures: dict[str, Signature]) -> dict:
    """An ensemble running backbone -> prepare -> ``iterations`` steps: features at that density."""
    backbone = signatures["backbone"]
    image, features = backbone.inputs[0], backbone.outputs[0]
    steps = [{"model_name": model_name(options.prefix, "backbone"), "model_version": -1,
              "input_map": [{"key": image.name, "value": "image"}],
              "output_map": [{"key": features.name, "value": "features" if iterations == 0 else "coarse_0"}]}]
    if iterations:
        prepare, step = signatures["upsampler_prepare"], signatures["upsampler_step"]
        steps.append({"model_name": model_name(options.prefix, "upsampler_prepare"), "model_version": -1,
                      "input_map": [{"key": prepare.inputs[0].name, "value": "image"}],
                      "output_map": [{"key": prepare.outputs[0].name, "value": "state_0"}]})
        (state_in, features_in), (state_out, features_out) = step.inputs, step.outputs
        for i in range(iterations):
            last = i == iterations - 1
            outputs = [{"key": features_out.name, "value": "features" if last else f"coarse_{i + 1}"}]
            if not last:  # the last step's state is not needed: an ensemble output must be consumed
                outputs.append({"key": state_out.name, "value": f"state_{i + 1}"})
            steps.append({"model_name": model_name(options.prefix, "upsampler_step"), "model_version": -1,
                          "input_map": [{"key": state_in.name, "value": f"state_{i}"},
                                        {"key": features_in.name, "value": f"coarse_{i}"}],
                          "output_map": outputs})
    final = signatures["upsampler_step"].outputs[1] if iterations else features
    return {
        "name": ensemble_name(options.prefix, iterations),
        "platform": "ensemble",
        "max_batch_size": options.max_batch_size,
        "input": [{"name": "image", "data_type": Enum(CONFIG_TYPES[image.dtype]), "dims": _dims(image)}],
        "output": [{"name": "features", "data_type": Enum(CONFIG_TYPES[final.dtype]),
                    "dims": [manifest.output.channels, -1, -1]}],
        "ensemble_scheduling": {"step": steps},
    }


def parse_config(text: str):
    """Parse ``text`` with Triton's own model-configuration schema (``tritonclient``'s protobuf module);
    returns the ``ModelConfig`` message. Raises ImportError without tritonclient[grpc], ValueError
    (``text_format.ParseError``) when the text does not fit the schema."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _validate(text: str, where: str) -> None:
    try:
        parse_config(text)
    except ImportError:
        return  # tritonclient[grpc] absent: the tests check every configuration this module writes
    except Exception as exc:
        raise RepositoryError(f"{where} does not fit Triton's model configuration schema ({exc}); this is a bug in "
                              "the repository writer, please report it") from None


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished repository into place; an earlier repository there is replaced, anything else kept."""
    replace_directory(tmp_dir, out_dir, REPOSITORY_INFO, lambda: RepositoryError(
        f"{out_dir} exists and is not a repository written by `lift export --format triton`; choose another "
        "--out or remove it first"))


def write_repository(bundle_dir: str | Path, out_dir: str | Path, options: TritonOptions = TritonOptions()) -> Path:
    """Convert the bundle at ``bundle_dir`` into a Triton model repository at ``out_dir``.

    Every graph's sha256 is checked against the manifest before it is copied; each configuration is
    parsed with Triton's schema when ``tritonclient[grpc]`` is installed. The repository appears in one
    rename (an earlier repository at ``out_dir`` is replaced). Returns ``out_dir``.

    Raises:
        BundleError: the bundle is missing, malformed, or a graph differs from its manifest.
        RepositoryError: bad options, or ``out_dir`` holds something else.
    """
    options = options.checked()
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    manifest = read_manifest(bundle_dir)
    if out_dir.resolve() == bundle_dir.resolve():
        raise RepositoryError(f"--out {out_dir} is the bundle itself; write the repository to another directory")
    graphs = {role: (graph, read_graph(bundle_dir, graph, role)) for role, graph in manifest.graph_files().items()}
    signatures = {}
    for role, (graph, data) in graphs.items():
        signatures[role] = graph_signature(data, str(bundle_dir / graph.file))
        _check_signature(signatures[role], graph, str(bundle_dir / graph.file))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o755)  # readable by the server's user, as any published directory
        models = {}
        for role, (graph, data) in graphs.items():
            name = model_name(options.prefix, role)
            config = model_config(name, role, graph, signatures[role], options)
            _write_model(tmp_dir / name, config, [f"The bundle's {role} graph ({graph.file}, sha256 "
                                                  f"{graph.sha256[:12]}...), written by `lift export --format "
                                                  "triton`."], data)
            models[role] = name
        ensembles = {}
        if options.ensembles:
            for k in sorted(manifest.iterations):
                config = ensemble_config(manifest, k, options, signatures)
                _write_model(tmp_dir / config["name"], config, [
                    f"Features at density {k} (stride {manifest.stride(k):g} px) in one call: backbone, then "
                    f"{k} upsampler step(s). The service calls the models one by one instead (its cache)."], None)
                ensembles[str(k)] = config["name"]
        shutil.copyfile(bundle_dir / MANIFEST_NAME, tmp_dir / MANIFEST_NAME)
        info = {"format": REPOSITORY_FORMAT, "model_prefix": options.prefix, "models": models,
                "ensembles": ensembles, "options": dataclasses.asdict(options)}
        (tmp_dir / REPOSITORY_INFO).write_text(json.dumps(info, indent=2) + "\n")
        _publish(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _write_model(model_dir: Path, config: dict, comments: list[str], data: bytes | None) -> None:
    text = to_pbtxt(config, comments)
    _validate(text, f"{model_dir.name}/config.pbtxt")
    (model_dir / MODEL_VERSION).mkdir(parents=True)
    for folder in (model_dir, model_dir / MODEL_VERSION):
        folder.chmod(0o755)
    (model_dir / "config.pbtxt").write_text(text)
    if data is not None:
        (model_dir / MODEL_VERSION / MODEL_FILE).write_bytes(data)
