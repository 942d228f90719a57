"""The Triton implementation of the service's :class:`~lift_serve.service.runtime.Runtime`: the
service's batches sent to a Triton Inference Server over its HTTP/REST (KServe v2) API.

The server holds the repository ``lift export --format triton`` wrote (one model per graph, see
:mod:`lift_serve.triton_repo.repository`); the service reads the same repository's ``manifest.json``
for sizes, densities, channels and strides, exactly as the ONNX Runtime implementation does (both
share :class:`~lift_serve.service.runtime_base.ManifestRuntime`), and chains the models itself:
backbone once per image, then ``prepare`` and ``k`` upsampler steps, so that its feature cache
answers a new density with upsampler steps alone.

At start (bounded by ``startup_timeout_s``): the server must be live and speak the binary tensor
data extension; each model must be ready (or become ready while loading), and its configuration
must agree with the manifest (tensor names, dtypes, axes, channels, and the graph's sha256 that the
repository writer records); then every graph is warmed at every listed size, as ``ort_runtime`` does. Every problem is a
:class:`~lift_serve.bundle.BundleError` naming the URL, the model and what to do; a failure while
serving is a :class:`TritonError` (no stack trace reaches a client either way).

Tensors travel with the KServe v2 *binary tensor data* extension: a JSON header, then the raw bytes
of each tensor (``Inference-Header-Content-Length`` says where the header ends), both ways, so no
array is ever turned into JSON numbers.

The client is httpx with this small protocol written here, not ``tritonclient.http``: httpx is
already a dependency of the service (and thread-safe with a connection pool, which the batcher's
worker threads share), while ``tritonclient.http`` brings gevent and geventhttpclient into the
serving image, and gevent's monkey-patching and hub do not belong inside uvicorn's asyncio process.
The part of the protocol the service needs (health, model readiness and configuration, inference)
is a few requests.

What runs where: the test suite runs this class against a KServe v2 server written on the standard
library (``tests/test_triton.py``: http.server, binary tensors, the repository's graphs run with ONNX
Runtime). A real Triton server (2.51.0, the binary nvidia-pytriton ships: Python backend, CPU) was
run by hand with the same tests (``LIFT_TEST_PYTRITON_PYTHON``, see ``docs/triton.md``); Triton's
ONNX Runtime backend, GPUs and TensorRT were not.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
from lift_serve.bundle import BundleError, read_manifest
from lift_serve.service.runtime_base import ManifestRuntime
from lift_serve.triton_repo.layout import (
    CONFIG_TYPES,
    KSERVE_TYPES,
    REPOSITORY_INFO,
    SHA256_PARAMETER,
    check_prefix,
    model_name,
)

logger = logging.getLogger("lift.runtime")

_NUMPY_TYPES = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16}
_HEADER_LENGTH = "Inference-Header-Content-Length"
_MAX_HEADER_BYTES = 1 << 20
_POLL_S = 0.5
_WRITE_REPOSITORY = "write the repository with `lift export --format triton --bundle BUNDLE --out REPO`"


class TritonError(RuntimeError):
    """Triton failed a request while serving (server gone, model unloaded, queue full, timeout).

    ``status``/``code``/``message`` follow the service's domain errors, so the app can answer 503.
    """

    user_facing = True
    status = 503
    code = "inference_unavailable"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _import_httpx():
    try:
        import httpx
    except ImportError:
        raise BundleError("the triton runtime needs httpx; install the 'serve' or 'gpu' extra") from None
    return httpx


class TritonRuntime(ManifestRuntime):
    """A bundle served by a Triton server, checked and warmed.

    Args:
        bundle_dir: the Triton repository ``lift export --format triton`` wrote (or the bundle it was
            written from): its ``manifest.json`` gives sizes, densities, channels, strides.
        url: the server's HTTP endpoint, e.g. ``http://127.0.0.1:8000`` (``LIFT_TRITON_URL``).
        model_prefix: prefix of the model names (``--model-prefix`` of the export, ``LIFT_TRITON_MODEL_PREFIX``).
        timeout_s: limit of one HTTP request while serving.
        startup_timeout_s: how long the start waits for the server and its models to be ready (a
            server still loading, or building TensorRT engines), and the limit of each warm-up call.
        warmup: run every graph once at every listed size (batch 1) before returning.

    Attributes: those of the ``Runtime`` protocol; ``active_providers`` is ``["triton"]``,
    ``max_batch_size`` the smallest of the models' (larger batches are sent in parts).

    Raises:
        BundleError: no manifest, an unreachable or not-ready server, a missing model, or a model
            whose configuration disagrees with the manifest.
    """

    def __init__(self, bundle_dir, url: str = "http://127.0.0.1:8000", model_prefix: str = "lift",
                 timeout_s: float = 30.0, startup_timeout_s: float = 60.0, warmup: bool = True):
        httpx = _import_httpx()
        self.bundle_dir = Path(bundle_dir)
        self._adopt(read_manifest(self.bundle_dir))
        self.url = _check_url(url)
        try:
            self.model_prefix = check_prefix(model_prefix)
        except ValueError as exc:
            raise BundleError(f"LIFT_TRITON_MODEL_PREFIX: {exc}") from None
        self._check_repository_prefix()
        if not timeout_s > 0 or not startup_timeout_s >= 0:
            raise BundleError(f"timeout_s must be > 0 and startup_timeout_s >= 0, got {timeout_s}, {startup_timeout_s}")
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.models = {role: model_name(self.model_prefix, role) for role in self.manifest.graph_files()}
        self.active_providers = ["triton"]
        self._httpx = httpx
        self._client = httpx.Client(
            base_url=self.url, trust_env=False,  # inference traffic never goes through an environment's proxy
            timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 5.0)),
            # No compression: float tensors compress poorly, and compressing costs both sides CPU time.
            headers={"Accept-Encoding": "identity"},
        )
        try:
            deadline = time.monotonic() + self.startup_timeout_s
            self.server_version = self._wait_for_server(deadline)
            configs = {role: self._wait_for_model(role, deadline) for role in self.models}
            self.max_batch_size = min(self._check_config(role, config) for role, config in configs.items())
            logger.info("bundle %s served by Triton %s at %s (models %s, densities %s, sizes %s)", self.bundle_dir,
                        self.server_version, self.url, ", ".join(self.models.values()), self.iterations, self.sizes)
            if warmup:
                self._request_timeout = max(self.timeout_s, self.startup_timeout_s)
                try:
                    self.warmup()
                finally:
                    del self._request_timeout
        except BaseException:
            self._client.close()
            raise

    _request_timeout: float | None = None

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    # -- start: server, models, configurations -------------------------------------------------
    def _check_repository_prefix(self) -> None:
        path = self.bundle_dir / REPOSITORY_INFO
        if not path.is_file():
            return  # a bundle directory, or a repository laid out by hand: the prefix is as told
        try:
            prefix = json.loads(path.read_text()).get("model_prefix")
        except (ValueError, AttributeError, OSError):
            raise BundleError(f"{path} is not the JSON object `lift export --format triton` writes; "
                              f"{_WRITE_REPOSITORY}") from None
        if prefix != self.model_prefix:
            raise BundleError(f"the repository {self.bundle_dir} names its models {prefix}_*, but the model prefix is "
                              f"{self.model_prefix!r}; set LIFT_TRITON_MODEL_PREFIX={prefix}")

    def _get(self, path: str):
        return self._client.get(path, timeout=min(self.timeout_s, 10.0))

    def _wait_for_server(self, deadline: float) -> str:
        """Wait until the server is live; returns its version. Readiness is then checked per model
        (a server is not ready while any of its models, maybe not ours, failed to load)."""
        problem, said = "", 0.0
        while True:
            try:
                live = self._get("/v2/health/live")
                if live.status_code == 200:
                    version = self._check_server_metadata()
                    if self._get("/v2/health/ready").status_code != 200:
                        logger.info("the Triton server at %s is live but not ready (a model is loading or failed to "
                                    "load); checking the service's models", self.url)
                    return version
                problem = f"not live (HTTP {live.status_code} on /v2/health/live)"
            except self._httpx.HTTPError as exc:
                problem = f"unreachable ({type(exc).__name__}: {str(exc)[:200] or 'no answer'})"
            now = time.monotonic()
            if now >= deadline:
                raise BundleError(
                    f"the Triton server at {self.url} is {problem}; start it with `tritonserver --model-repository "
                    f"REPO` on the repository written by `lift export --format triton`, and set LIFT_TRITON_URL to "
                    "its HTTP endpoint (port 8000 by default; 8001 is gRPC)")
            if now - said >= 10:
                logger.info("waiting for the Triton server at %s: %s (%.0f s left)", self.url, problem, deadline - now)
                said = now
            time.sleep(min(_POLL_S, max(deadline - now, 0.0)))

    def _check_server_metadata(self) -> str:
        try:
            metadata = self._get("/v2").json()
            extensions = metadata.get("extensions", [])
            version = str(metadata.get("version", "?"))
        except (ValueError, AttributeError, self._httpx.HTTPError):
            raise BundleError(f"{self.url}/v2 does not answer as a KServe v2 (Triton) server does; check "
                              "LIFT_TRITON_URL: it must be Triton's HTTP endpoint (port 8000 by default)") from None
        if "binary_tensor_data" not in extensions:
            raise BundleError(f"the server at {self.url} (version {version}) lacks the binary_tensor_data extension "
                              f"(it lists {extensions}), which the service needs; use Triton Inference Server")
        return version

    def _repository_state(self, name: str) -> tuple[str | None, str]:
        """``(state, reason)`` of model ``name`` from the repository index; state None when not listed."""
        try:
            index = self._client.post("/v2/repository/index", json={}, timeout=min(self.timeout_s, 10.0)).json()
            for entry in index:
                if entry.get("name") == name:
                    return entry.get("state"), entry.get("reason", "")
            names = sorted({str(entry.get("name")) for entry in index})
            return None, f"the server has {', '.join(names) or 'no models'}"
        except (ValueError, AttributeError, TypeError, self._httpx.HTTPError):
            return None, ""

    def _wait_for_model(self, role: str, deadline: float) -> dict:
        name = self.models[role]
        while True:
            try:
                ready = self._get(f"/v2/models/{quote(name)}/ready").status_code == 200
                config = self._get(f"/v2/models/{quote(name)}/config") if ready else None
            except self._httpx.HTTPError as exc:
                raise BundleError(f"the Triton server at {self.url} stopped answering while model {name!r} was checked "
                                  f"({type(exc).__name__}); see the server's log") from None
            if config is not None:
                return self._config_json(name, config)
            state, reason = self._repository_state(name)
            if state != "LOADING" or time.monotonic() >= deadline:
                what = f"is {state}" if state else "is not in its repository"
                raise BundleError(
                    f"Triton at {self.url}: model {name!r} (the {role} graph) {what}"
                    f"{f' ({reason})' if reason else ''}; start the server on the repository written by "
                    f"`lift export --format triton` from this bundle, or set LIFT_TRITON_MODEL_PREFIX to the "
                    f"--model-prefix it was written with (now {self.model_prefix!r})")
            time.sleep(_POLL_S)

    def _config_json(self, name: str, response) -> dict:
        if response.status_code != 200:
            raise BundleError(f"Triton at {self.url}: model {name!r} is ready but its configuration cannot be read "
                              f"(HTTP {response.status_code}: {_error_text(response)})")
        try:
            config = response.json()
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise BundleError(f"Triton at {self.url}: model {name!r} answered a configuration that is not a JSON "
                              "object; check LIFT_TRITON_URL")
        return config

    def _check_config(self, role: str, config: dict) -> int:
        """Check one model's configuration against the manifest; returns its max_batch_size."""
        name, graph = self.models[role], self.manifest.graph_files()[role]

        def refuse(problem: str) -> BundleError:
            return BundleError(f"Triton at {self.url}: model {name!r} {problem}, but the manifest of "
                               f"{self.bundle_dir} says otherwise; the server holds another export than the service "
                               f"reads: {_WRITE_REPOSITORY} and serve that repository on both sides")

        try:
            batch = int(config.get("max_batch_size", 0))
            tensors = {"input": config.get("input", []), "output": config.get("output", [])}
            found = {kind: {t["name"]: (t.get("data_type"), [int(d) for d in t.get("dims", [])]) for t in items}
                     for kind, items in tensors.items()}
            parameters = config.get("parameters") or {}
            digest = (parameters.get(SHA256_PARAMETER) or {}).get("string_value")
        except (AttributeError, KeyError, TypeError, ValueError):
            raise BundleError(f"Triton at {self.url}: the configuration of model {name!r} is not one Triton "
                              "answers; check LIFT_TRITON_URL") from None
        if batch < 1:
            raise refuse(f"has max_batch_size {batch} (no batch axis); the service sends batches along Triton's "
                         "implicit batch axis, which a repository written by `lift export --format triton` has")
        in_types, out_types = self.expected_types(role)
        for kind, names, types in (("input", graph.inputs, in_types), ("output", graph.outputs, out_types)):
            if set(found[kind]) != set(names):
                raise refuse(f"has {kind}s {sorted(found[kind])}, not {names}")
            for tensor, dtype in zip(names, types, strict=True):
                data_type, dims = found[kind][tensor]
                if data_type != CONFIG_TYPES[dtype] or len(dims) != 3:
                    raise refuse(f"declares {kind} {tensor!r} as {data_type} {dims}, expected {CONFIG_TYPES[dtype]} "
                                 "with 3 axes after the batch")
        channels = ([("output", graph.outputs[0])] if role == "backbone" else
                    [("input", graph.inputs[1]), ("output", graph.outputs[1])] if role == "upsampler_step" else [])
        for kind, tensor in channels:
            if found[kind][tensor][1][0] not in (-1, self.channels):
                raise refuse(f"has {found[kind][tensor][1][0]} channels in {kind} {tensor!r}, not {self.channels}")
        if role != "upsampler_step" and found["input"][graph.inputs[0]][1][-1] not in (-1, 3):
            raise refuse(f"takes images of {found['input'][graph.inputs[0]][1][-1]} colour channels, not 3 (RGB)")
        if digest is not None and digest != graph.sha256:
            raise refuse(f"holds the graph with sha256 {digest[:12]}… ({graph.file} in the manifest: "
                         f"{graph.sha256[:12]}…)")
        return batch

    # -- inference -----------------------------------------------------------------------------
    def _infer(self, role: str, inputs: list[tuple[str, np.ndarray]], outputs: list[str]) -> list[np.ndarray]:
        """One inference request with binary tensors both ways; the outputs in the order asked."""
        name = self.models[role]
        arrays = [np.ascontiguousarray(array) for _, array in inputs]
        header = {
            "inputs": [{"name": tensor, "shape": list(array.shape), "datatype": KSERVE_TYPES[array.dtype.name],
                        "parameters": {"binary_data_size": array.nbytes}}
                       for (tensor, _), array in zip(inputs, arrays, strict=True)],
            "outputs": [{"name": tensor, "parameters": {"binary_data": True}} for tensor in outputs],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        body = b"".join([head, *(memoryview(array).cast("B") for array in arrays)])
        timeout = self._request_timeout or self.timeout_s
        try:
            with self._client.stream("POST", f"/v2/models/{quote(name)}/infer", content=body, timeout=timeout,
                                     headers={_HEADER_LENGTH: str(len(head)),
                                              "Content-Type": "application/octet-stream"}) as response:
                if response.status_code != 200:
                    response.read()
                    raise TritonError(f"Triton at {self.url}: model {name!r} failed the request (HTTP "
                                      f"{response.status_code}: {_error_text(response)})")
                try:
                    head_bytes, data = _read_body(response)
                except ValueError as exc:
                    raise TritonError(f"Triton at {self.url}: model {name!r} answered a body the service cannot "
                                      f"read ({exc})") from None
        except self._httpx.TimeoutException:
            raise TritonError(f"Triton at {self.url}: model {name!r} gave no answer within {timeout:g} s") from None
        except self._httpx.HTTPError as exc:
            raise TritonError(f"Triton at {self.url} cannot be reached for model {name!r} ({type(exc).__name__}); "
                              "check that the server runs") from None
        return self._decode(name, head_bytes, data, outputs, batch=arrays[0].shape[0])

    def _decode(self, name: str, head: bytes, data: np.ndarray, wanted: list[str], batch: int) -> list[np.ndarray]:
        try:
            answer = json.loads(head)
            found, offset = {}, 0
            for output in answer["outputs"]:
                dtype = np.dtype(_NUMPY_TYPES[output["datatype"]])
                shape = tuple(int(d) for d in output["shape"])
                size = (output.get("parameters") or {}).get("binary_data_size")
                if size is None:  # a server may answer in JSON although asked for binary
                    found[output["name"]] = np.asarray(output["data"], dtype).reshape(shape)
                    continue
                if int(size) != math.prod(shape) * dtype.itemsize or offset + int(size) > data.nbytes:
                    raise ValueError(f"{output['name']}: {size} bytes for shape {list(shape)}")
                found[output["name"]] = data[offset:offset + int(size)].view(dtype).reshape(shape)
                offset += int(size)
            arrays = [found[tensor] for tensor in wanted]
        except (ValueError, KeyError, TypeError) as exc:
            raise TritonError(f"Triton at {self.url}: model {name!r} answered what the service cannot read "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None
        for tensor, array in zip(wanted, arrays, strict=True):
            if array.ndim != 4 or array.shape[0] != batch:
                raise TritonError(f"Triton at {self.url}: model {name!r} answered {tensor!r} of shape "
                                  f"{list(array.shape)} for a batch of {batch}")
        return arrays

    def _parts(self, count: int) -> list[slice]:
        """Batches beyond the models' max_batch_size are sent in parts."""
        step = self.max_batch_size
        return [slice(start, start + step) for start in range(0, count, step)]

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Backbone features ``[B, C, H/P, W/P]`` in the bundle's precision (:attr:`feature_dtype`)."""
        images = self.check_images(images)
        graph = self.manifest.backbone.graph
        parts = [self._infer("backbone", [(graph.inputs[0], images[part])], graph.outputs)[0]
                 for part in self._parts(len(images))]
        return self._as_features(parts)

    def _steps(self, images: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
        # prepare, then each step, one Triton request each (per part of at most max_batch_size)
        graphs = self.manifest.upsampler.graphs
        state_name, features_name = graphs.step.inputs
        parts = []
        for part in self._parts(len(images)):
            (state,) = self._infer("upsampler_prepare", [(graphs.prepare.inputs[0], images[part])],
                                   graphs.prepare.outputs)
            dense = features[part]
            for _ in range(k):
                state, dense = self._infer("upsampler_step", [(state_name, state), (features_name, dense)],
                                           graphs.step.outputs)
            parts.append(dense)
        return self._as_features(parts)

    def _as_features(self, parts: list[np.ndarray]) -> np.ndarray:
        if len(parts) > 1:
            return np.concatenate(parts).astype(self.feature_dtype, copy=False)
        features = parts[0]
        if features.base is not None and features.base.nbytes > features.nbytes:
            # A view into an answer that also holds the upsampler's state: the cache keeps only the features.
            features = features.copy()
        return features.astype(self.feature_dtype, copy=False)

    def _warmup_error(self, problem: str, exc: Exception) -> BundleError:
        return BundleError(f"{problem}, fails on the Triton server at {self.url}: {str(exc)[:400]}; see the "
                           f"server's log, and {_WRITE_REPOSITORY} from this bundle")

    def describe(self) -> dict:
        return super().describe() | {"runtime": "triton", "triton": {"server_version": self.server_version,
                                                                      "models": self.models}}


def _check_url(url: str) -> str:
    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise BundleError(f"LIFT_TRITON_URL {url!r} must be the server's HTTP endpoint, http(s)://HOST:PORT "
                          "(port 8000 by default), e.g. http://127.0.0.1:8000")
    return str(url).rstrip("/")


def _error_text(response) -> str:
    """Triton's own error text (``{"error": "..."}``), shortened."""
    try:
        return str(response.json().get("error", ""))[:300] or response.reason_phrase
    except (ValueError, AttributeError):
        return (response.text or response.reason_phrase)[:300]


def _read_body(response) -> tuple[bytes, np.ndarray]:
    """The JSON header and the binary part of an inference answer. The binary part is read straight
    into one aligned numpy buffer, so each output is a view with no copy."""
    header_length = response.headers.get(_HEADER_LENGTH)
    length = response.headers.get("Content-Length")
    if header_length is None:  # all JSON
        return response.read(), np.empty(0, np.uint8)
    header_length = int(header_length)
    if not 0 < header_length <= _MAX_HEADER_BYTES:
        raise ValueError(f"{_HEADER_LENGTH} {header_length}")
    chunks = response.iter_bytes()
    head = bytearray()
    rest = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= header_length:
            head, rest = head[:header_length], bytes(head[header_length:])
            break
    if length is None or response.headers.get("Content-Encoding", "identity") != "identity":
        tail = rest + b"".join(chunks)
        return bytes(head), np.frombuffer(tail, np.uint8).copy()
    data = np.empty(int(length) - header_length, np.uint8)
    view, filled = memoryview(data), 0
    for piece in itertools.chain([rest], chunks):
        if filled + len(piece) > len(data):
            raise ValueError("more bytes than Content-Length")
        view[filled:filled + len(piece)] = piece
        filled += len(piece)
    if filled != len(data):
        raise ValueError(f"{filled} of {len(data)} bytes")
    return bytes(head), data
