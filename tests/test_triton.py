"""Triton: the repository `lift export --format triton` writes, and the service's TritonRuntime.

The repository tests parse every config.pbtxt with Triton's own model-configuration schema (the
protobuf module of ``tritonclient[grpc]``) and check its values. The runtime tests run TritonRuntime
against :class:`KServeServer`, a KServe v2 HTTP server written here on the standard library (health,
metadata, model readiness and configuration, repository index, inference with the binary tensor data
extension), which loads the written repository and runs each model's ``1/model.onnx`` with ONNX
Runtime, as Triton's onnxruntime backend would. A real Triton server (nvidia-pytriton) cannot be in
the dev environment: the package pins numpy<2. With ``LIFT_TEST_PYTRITON_PYTHON`` set to the Python
of a separate environment that has nvidia-pytriton and onnxruntime, the same runtime tests also run
against a real Triton server started from there (docs/triton.md says how).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from lift_serve.bundle import BundleError
from lift_serve.service.ort_runtime import BundleRuntime
from lift_serve.service.triton_runtime import TritonError, TritonRuntime
from lift_serve.triton_repo import TritonOptions, parse_config, write_repository
from lift_serve.triton_repo.repository import RepositoryError
from service_helpers import encode, make_app, noise, started_client

from lift_serve import cli as lift_cli

ROLES = ("backbone", "upsampler_prepare", "upsampler_step")
PYTRITON_PYTHON = os.environ.get("LIFT_TEST_PYTRITON_PYTHON")
SERVERS = ["stdlib", *(["pytriton", "tritonserver"] if PYTRITON_PYTHON else [])]


def config_of(repo: Path, name: str):
    return parse_config((repo / name / "config.pbtxt").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a KServe v2 server on the standard library ------------------------------------------------
_NP = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16}
_KSERVE = {np.dtype(v).name: k for k, v in _NP.items()}


class KServeServer:
    """Serves the ONNX models of a Triton repository over KServe v2 HTTP on 127.0.0.1.

    ``hide``: model names left out (as if missing from the repository); ``edit``: name -> function
    changing the configuration it answers. ``count(model)``: its inference requests so far.
    """

    def __init__(self, repo: Path, hide=(), edit=None):
        import onnxruntime as ort
        from google.protobuf import json_format

        self.models, self.configs, self.calls, self.connections = {}, {}, {}, set()
        self.lock = threading.Lock()
        for folder in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()):
            config = config_of(repo, folder.name)
            if folder.name in hide or config.platform == "ensemble":
                continue
            answer = json_format.MessageToDict(config, preserving_proto_field_name=True)
            for tensor in (*answer.get("input", []), *answer.get("output", [])):
                tensor["dims"] = [int(d) for d in tensor["dims"]]  # Triton answers numbers, protobuf's JSON strings
            (edit or {}).get(folder.name, lambda c: None)(answer)
            self.configs[folder.name] = answer
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self.models[folder.name] = ort.InferenceSession(str(folder / "1" / "model.onnx"), options,
                                                            providers=["CPUExecutionProvider"])
            self.calls[folder.name] = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    ensembles = False  # skipped: the service never calls them

    def count(self, name: str) -> int:
        return self.calls[name]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        for connection in list(self.connections):  # keep-alive connections too: the server is gone
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)

    def infer(self, name: str, body: bytes, header_length: int | None) -> tuple[int, dict, bytes]:
        request = json.loads(body[:header_length] if header_length else body)
        offset, feeds = header_length or len(body), {}
        for tensor in request["inputs"]:
            dtype, shape = _NP[tensor["datatype"]], tuple(tensor["shape"])
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is None:
                feeds[tensor["name"]] = np.asarray(tensor["data"], dtype).reshape(shape)
            else:
                feeds[tensor["name"]] = np.frombuffer(body, dtype, int(np.prod(shape)), offset).reshape(shape)
                offset += size
        batch = next(iter(feeds.values())).shape[0]
        if batch > self.configs[name]["max_batch_size"]:
            return 400, {}, json.dumps({"error": f"inference request batch-size must be <= "
                                                 f"{self.configs[name]['max_batch_size']} for '{name}'"}).encode()
        with self.lock:
            self.calls[name] += 1
        session = self.models[name]
        names = [o["name"] for o in request.get("outputs", [])] or [o.name for o in session.get_outputs()]
        results = session.run(names, feeds)
        outputs, blobs = [], []
        for output_name, array in zip(names, results, strict=True):
            array = np.ascontiguousarray(array)
            outputs.append({"name": output_name, "datatype": _KSERVE[array.dtype.name], "shape": list(array.shape),
                            "parameters": {"binary_data_size": array.nbytes}})
            blobs.append(array.tobytes())
        head = json.dumps({"model_name": name, "model_version": "1", "outputs": outputs}).encode()
        return 200, {"Inference-Header-Content-Length": str(len(head)),
                     "Content-Type": "application/octet-stream"}, head + b"".join(blobs)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                server.connections.add(self.connection)

            def finish(self):
                server.connections.discard(self.connection)
                super().finish()

            def _send(self, status: int, payload=None, headers=None, raw: bytes | None = None):
                body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _model(self, parts: list[str]) -> str | None:
                return parts[2] if len(parts) >= 3 and parts[:2] == ["v2", "models"] else None

            def do_GET(self):  # noqa: N802 (http.server's name)
                parts = self.path.strip("/").split("/")
                if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
                    return self._send(200)
                if parts == ["v2"]:
                    return self._send(200, {"name": "triton", "version": "kserve-stdlib",
                                            "extensions": ["binary_tensor_data", "model_configuration"]})
                name = self._model(parts)
                if name not in server.configs:
                    return self._send(400, {"error": f"Request for unknown model: '{name}' is not found"})
                if parts[3:] == ["ready"]:
                    return self._send(200)
                if parts[3:] == ["config"]:
                    return self._send(200, server.configs[name])
                return self._send(404, {"error": "not found"})

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parts = self.path.strip("/").split("/")
                if parts == ["v2", "repository", "index"]:
                    return self._send(200, [{"name": n, "version": "1", "state": "READY"} for n in server.configs])
                name = self._model(parts)
                if name not in server.configs or parts[3:] != ["infer"]:
                    return self._send(400, {"error": f"Request for unknown model: '{name}' is not found"})
                length = self.headers.get("Inference-Header-Content-Length")
                status, headers, raw = server.infer(name, body, int(length) if length else None)
                return self._send(status, headers=headers, raw=raw)

        return Handler


# -- a real Triton server (nvidia-pytriton's), when a Python that has it is named ----------------
PYTRITON_SERVER = textwrap.dedent('''
    """Serve the ONNX models of a Triton repository as Python-backend models of the same names and
    signatures (pytriton), each running its graph with ONNX Runtime."""
    import os, sys, sysconfig
    from pathlib import Path
    # The Python backend's stub links libpython3.X.so: take this interpreter's own, not the system's.
    os.environ["LD_LIBRARY_PATH"] = sysconfig.get_config_var("LIBDIR") + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    import numpy as np, onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    repo, http_port, grpc_port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    NP = {model_config_pb2.TYPE_FP32: np.float32, model_config_pb2.TYPE_UINT8: np.uint8,
          model_config_pb2.TYPE_FP16: np.float16}

    def serving(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        @batch
        def infer(**inputs):
            return dict(zip(names, session.run(names, inputs)))
        return infer

    def tensors(items):
        return [Tensor(name=t.name, dtype=NP[t.data_type], shape=tuple(t.dims)) for t in items]

    config = TritonConfig(http_address="127.0.0.1", http_port=http_port, grpc_address="127.0.0.1",
                          grpc_port=grpc_port, allow_metrics=False, exit_on_error=True)
    with Triton(config=config) as triton:
        for folder in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()):
            cfg = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
            if cfg.platform != "ensemble":
                triton.bind(model_name=folder.name, infer_func=serving(folder / "1" / "model.onnx"),
                            inputs=tensors(cfg.input), outputs=tensors(cfg.output),
                            config=ModelConfig(max_batch_size=cfg.max_batch_size))
        triton.serve()
''')

# The repository's own config.pbtxt files loaded by the tritonserver binary that nvidia-pytriton ships,
# which has the Python backend only: each model's backend line becomes "python" and this model.py runs
# its model.onnx with ONNX Runtime (everything else in the configuration is as written, ensembles too).
PYTHON_BACKEND_MODEL = textwrap.dedent('''
    import sys
    sys.path.insert(0, SITE_PACKAGES)  # the stub's interpreter sees the environment that has onnxruntime
    from pathlib import Path
    import onnxruntime as ort
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            folder = Path(args["model_repository"]) / args["model_version"]
            self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.outputs = [o.name for o in self.session.get_outputs()]

        def execute(self, requests):
            answers = []
            for request in requests:
                feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
                results = self.session.run(self.outputs, feeds)
                tensors = [pb_utils.Tensor(n, r) for n, r in zip(self.outputs, results)]
                answers.append(pb_utils.InferenceResponse(tensors))
            return answers
''')
PYTRITON_PATHS = ("import json, pathlib, site, sys, sysconfig, pytriton; p = pathlib.Path(pytriton.__file__).parent; "
                  "print(json.dumps({'dist': str(p / 'tritonserver'), 'libs': str(p.parent / 'nvidia_pytriton.libs'), "
                  "'libdir': sysconfig.get_config_var('LIBDIR'), 'home': sys.base_prefix, "
                  "'site': site.getsitepackages()[0], "
                  "'version': '%d.%d' % sys.version_info[:2]}))")


class ExternalServer:
    """A real Triton server in a subprocess, on 127.0.0.1 (``ensembles``: it serves the repository's)."""

    def __init__(self, command: list[str], tmp_path: Path, env: dict | None = None, ensembles: bool = False):
        self.ensembles = ensembles
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = tmp_path / "server.log"
        self.command, self.env = [c.format(http=self.http_port, grpc=self.grpc_port) for c in command], env

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=self.env)
        deadline = time.monotonic() + 120
        while not all(_ready(f"{self.url}/v2/models/lift_{role}/ready") for role in ROLES):
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Triton server did not load the models within 120 s"
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()

    def count(self, name: str) -> int | None:
        """Successful requests of model ``name``; None where the server keeps its statistics to itself
        (pytriton asks for an access token)."""
        import httpx

        answer = httpx.get(f"{self.url}/v2/models/{name}/stats", timeout=10)
        if answer.status_code != 200:
            return None
        return sum(int(m["inference_stats"]["success"]["count"]) for m in answer.json()["model_stats"])


def pytriton_server(repo: Path, tmp_path: Path) -> ExternalServer:
    script = tmp_path / "pytriton_server.py"
    script.write_text(PYTRITON_SERVER)
    return ExternalServer([PYTRITON_PYTHON, str(script), str(repo), "{http}", "{grpc}"], tmp_path)


def tritonserver_on_the_repository(repo: Path, tmp_path: Path) -> ExternalServer:
    paths = json.loads(subprocess.run([PYTRITON_PYTHON, "-c", PYTRITON_PATHS], capture_output=True, text=True,
                                      check=True, timeout=120).stdout)
    dist = Path(paths["dist"])
    backend = tmp_path / "backends" / "python"
    backend.mkdir(parents=True)
    for item in (dist / "backends" / "python").iterdir():
        (backend / item.name).symlink_to(item)
    stub = dist / "python_backend_stubs" / paths["version"] / "triton_python_backend_stub"
    (backend / "triton_python_backend_stub").symlink_to(stub)
    served = Path(shutil.copytree(repo, tmp_path / "repo"))
    for config in served.glob("*/config.pbtxt"):
        text = config.read_text()
        if 'backend: "onnxruntime"' in text:
            config.write_text(text.replace('backend: "onnxruntime"', 'backend: "python"'))
            model = PYTHON_BACKEND_MODEL.replace("SITE_PACKAGES", repr(paths["site"]))
            (config.parent / "1" / "model.py").write_text(model)
    # The stub embeds the libpython3.X of LD_LIBRARY_PATH; PATH and PYTHONHOME give it that build's Python.
    env = {"PATH": f"{paths['home']}/bin:/usr/bin:/bin", "LD_LIBRARY_PATH": f"{paths['libs']}:{paths['libdir']}",
           "PYTHONHOME": paths["home"]}
    return ExternalServer([str(dist / "bin" / "tritonserver"), "--model-repository", str(served),
                           "--backend-directory", str(tmp_path / "backends"), "--http-address", "127.0.0.1",
                           "--http-port", "{http}", "--grpc-address", "127.0.0.1", "--grpc-port", "{grpc}",
                           "--allow-metrics", "false"], tmp_path, env, ensembles=True)


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tiny_bundle, tmp_path_factory):
    """The tiny bundle as a repository with the defaults (GPU instances; the test servers run on CPU)."""
    return write_repository(tiny_bundle, tmp_path_factory.mktemp("triton") / "repo")


@pytest.fixture(scope="module")
def small_batch_repo(tiny_bundle, tmp_path_factory):
    """max_batch_size 2, so a batch of 3 goes in two parts."""
    return write_repository(tiny_bundle, tmp_path_factory.mktemp("triton") / "repo2",
                            TritonOptions(max_batch_size=2, instance_kind="cpu", ensembles=True))


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    return BundleRuntime(tiny_bundle, providers=["cpu"], intra_op_threads=1)


@pytest.fixture(scope="module", params=SERVERS)
def server(request, small_batch_repo, tmp_path_factory):
    """The stdlib server; with LIFT_TEST_PYTRITON_PYTHON also a real Triton, twice: pytriton's models
    of the same names and signatures, and the tritonserver binary on the repository's own configs."""
    if request.param == "stdlib":
        server = KServeServer(small_batch_repo)
    else:
        start = pytriton_server if request.param == "pytriton" else tritonserver_on_the_repository
        server = start(small_batch_repo, tmp_path_factory.mktemp(request.param))
    with server as running:
        yield running


@pytest.fixture(scope="module")
def triton(server, small_batch_repo):
    runtime = TritonRuntime(small_batch_repo, server.url, startup_timeout_s=5)
    yield runtime
    runtime.close()


# -- the repository --------------------------------------------------------------------------------
def test_repository_layout(repo, tiny_bundle):
    from lift_serve.bundle import read_manifest

    manifest = read_manifest(tiny_bundle)
    assert (repo / "manifest.json").read_bytes() == (tiny_bundle / "manifest.json").read_bytes()
    assert read_manifest(repo) == manifest  # `lift serve --bundle REPO` reads the same manifest
    info = json.loads((repo / "lift_triton.json").read_text())
    assert info["model_prefix"] == "lift" and info["models"] == {r: f"lift_{r}" for r in ROLES}
    assert info["ensembles"] == {}
    for role, graph in manifest.graph_files().items():
        model = repo / f"lift_{role}"
        assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) == [
            "1", "1/model.onnx", "config.pbtxt"]
        assert (model / "1" / "model.onnx").read_bytes() == (tiny_bundle / graph.file).read_bytes()
    assert sorted(p.name for p in repo.iterdir()) == ["lift_backbone", "lift_triton.json", "lift_upsampler_prepare",
                                                      "lift_upsampler_step", "manifest.json"]
    assert not list(repo.parent.glob(".repo.*")), "temporary directory left behind"


def test_configurations_follow_triton_schema_and_the_manifest(repo):
    from tritonclient.grpc import model_config_pb2 as pb

    queue = pb.ModelQueuePolicy
    for role in ROLES:
        config = config_of(repo, f"lift_{role}")
        assert config.name == f"lift_{role}" and config.backend == "onnxruntime"
        assert config.max_batch_size == 8
        batching = config.dynamic_batching
        assert list(batching.preferred_batch_size) == [2, 4, 8]
        assert batching.max_queue_delay_microseconds == 5_000
        policy = batching.default_queue_policy
        assert (policy.max_queue_size, policy.default_timeout_microseconds) == (64, 30_000_000)
        assert policy.timeout_action == queue.REJECT and policy.allow_timeout_override
        assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, 1)]
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator
        assert config.parameters["lift_role"].string_value == role
    backbone, prepare, step = (config_of(repo, f"lift_{r}") for r in ROLES)
    io = lambda tensors: [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in tensors]  # noqa: E731
    assert io(backbone.input) == [("image", "TYPE_UINT8", [-1, -1, 3])]
    assert io(backbone.output) == [("features", "TYPE_FP32", [32, -1, -1])]
    assert io(prepare.input) == [("image", "TYPE_UINT8", [-1, -1, 3])]
    assert io(prepare.output) == [("state", "TYPE_FP32", [3, -1, -1])]
    assert io(step.input) == [("state", "TYPE_FP32", [3, -1, -1]), ("features", "TYPE_FP32", [32, -1, -1])]
    assert io(step.output) == [("next_state", "TYPE_FP32", [3, -1, -1]), ("next_features", "TYPE_FP32", [32, -1, -1])]
    manifest = json.loads((repo / "manifest.json").read_text())
    assert backbone.parameters["lift_graph_sha256"].string_value == manifest["backbone"]["graph"]["sha256"]


def test_options_reach_the_configurations(tiny_bundle, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    options = TritonOptions(prefix="dino", max_batch_size=4, max_wait_ms=2.5, max_queue=10, request_timeout_s=7,
                            instance_kind="cpu", instances=2, ensembles=True)
    repo = write_repository(tiny_bundle, tmp_path / "repo", options)
    step = config_of(repo, "dino_upsampler_step")
    assert step.max_batch_size == 4 and list(step.dynamic_batching.preferred_batch_size) == [2, 4]
    assert step.dynamic_batching.max_queue_delay_microseconds == 2_500
    assert step.dynamic_batching.default_queue_policy.max_queue_size == 10
    assert step.dynamic_batching.default_queue_policy.default_timeout_microseconds == 7_000_000
    assert [(g.kind, g.count) for g in step.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 2)]
    # The ensembles: one per density, chaining backbone -> prepare -> k steps.
    k0, k1 = config_of(repo, "dino_features_k0"), config_of(repo, "dino_features_k1")
    assert k1.platform == "ensemble" and k1.max_batch_size == 4 and (repo / "dino_features_k1" / "1").is_dir()
    assert [s.model_name for s in k1.ensemble_scheduling.step] == [
        "dino_backbone", "dino_upsampler_prepare", "dino_upsampler_step"]
    assert [s.model_name for s in k0.ensemble_scheduling.step] == ["dino_backbone"]
    assert dict(k1.ensemble_scheduling.step[2].input_map) == {"state": "state_0", "features": "coarse_0"}
    assert dict(k1.ensemble_scheduling.step[2].output_map) == {"next_features": "features"}
    assert json.loads((repo / "lift_triton.json").read_text())["ensembles"] == {"0": "dino_features_k0",
                                                                                "1": "dino_features_k1"}
    trt = write_repository(tiny_bundle, tmp_path / "trt", TritonOptions(tensorrt=True, tensorrt_precision="fp16"))
    (accelerator,) = config_of(trt, "lift_backbone").optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30)}


def test_defaults_are_the_services_own():
    from lift_serve.service.settings import Settings

    defaults, settings = TritonOptions(), Settings()
    assert (defaults.max_batch_size, defaults.max_wait_ms, defaults.max_queue, defaults.request_timeout_s) == (
        settings.max_batch_size, settings.max_wait_ms, settings.max_queue, settings.request_timeout_s)
    assert defaults.prefix == settings.triton_model_prefix


def test_a_tampered_bundle_is_refused_and_nothing_is_written(tiny_bundle, tmp_path):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    data = bytearray((bundle / "upsampler_step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "upsampler_step.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"upsampler_step.onnx has sha256 \w+… but the manifest records .*"
                                          r"no repository was written"):
        write_repository(bundle, tmp_path / "repo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("options, message", [
    (TritonOptions(instance_kind="cpu", tensorrt=True), "TensorRT accelerator runs on GPU instances only"),
    (TritonOptions(prefix="a/b"), "model prefix 'a/b' must be"),
    (TritonOptions(max_batch_size=0), "max_batch_size must be 1..256"),
])
def test_bad_options_are_refused(tiny_bundle, tmp_path, options, message):
    with pytest.raises(RepositoryError, match=message):
        write_repository(tiny_bundle, tmp_path / "repo", options)


def test_an_existing_directory_that_is_no_repository_is_kept(tiny_bundle, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "notes.txt").write_text("mine")
    with pytest.raises(RepositoryError, match="exists and is not a repository"):
        write_repository(tiny_bundle, tmp_path / "repo")
    assert (tmp_path / "repo" / "notes.txt").read_text() == "mine"
    again = write_repository(tiny_bundle, tmp_path / "repo2")
    assert write_repository(tiny_bundle, again) == again  # an earlier repository is replaced


def test_text_format_strings_are_escaped():
    from lift_serve.triton_repo.pbtxt import Enum, to_pbtxt

    text = to_pbtxt({"name": 'a "quoted" \\ name', "platform": "ensemble", "max_batch_size": 2,
                     "instance_group": [{"kind": Enum("KIND_CPU")}]}, ["a comment"])
    config = parse_config(text)
    assert config.name == 'a "quoted" \\ name' and config.max_batch_size == 2 and text.startswith("# a comment\n")
    with pytest.raises(ValueError, match="control character"):
        to_pbtxt({"name": "two\nlines"})


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_converts_an_existing_bundle(tiny_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LIFT_MAX_WAIT_MS", "1.5")
    monkeypatch.setenv("LIFT_MAX_QUEUE", "12")
    out = tmp_path / "repo"
    code = lift_cli.main(["export", "--format", "triton", "--bundle", str(tiny_bundle), "--out", str(out),
                          "--model-prefix", "tiny", "--triton-max-batch-size", "4", "--triton-instance-kind", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"Triton model repository written to {out}" in printed and "tiny_upsampler_step" in printed
    step = config_of(out, "tiny_upsampler_step")
    assert step.max_batch_size == 4 and step.dynamic_batching.max_queue_delay_microseconds == 1_500
    assert step.dynamic_batching.default_queue_policy.max_queue_size == 12


@pytest.mark.parametrize("args, message", [
    (["--bundle", "B"], "--bundle converts an existing bundle: add --format triton"),
    (["--triton-tensorrt"], "--triton-tensorrt need --format triton"),
    (["--format", "triton", "--bundle", "B", "--demo"], "--bundle converts an existing bundle; drop --demo"),
])
def test_cli_refuses_options_that_do_not_fit(tmp_path, capsys, args, message):
    args = [a.replace("B", str(tmp_path / "b")) if a == "B" else a for a in args]
    assert lift_cli.main(["export", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_names_a_tampered_bundle(tiny_bundle, tmp_path, capsys):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    (bundle / "backbone.onnx").write_bytes((bundle / "backbone.onnx").read_bytes()[:1000])
    code = lift_cli.main(["export", "--format", "triton", "--bundle", str(bundle), "--out", str(tmp_path / "repo")])
    err = capsys.readouterr().err
    assert code == 2 and "backbone.onnx has sha256" in err and "Traceback" not in err
    assert not (tmp_path / "repo").exists()


def test_cli_exports_the_bundle_then_the_repository(tmp_path, capsys):
    from conftest import tiny_spec_dict

    spec = tiny_spec_dict()
    out = tmp_path / "repo"
    code = lift_cli.main(["export", "--format", "triton", "--backbone", spec["name"], "--backbone-weights", "random",
                          "--seed", str(spec["seed"]), "--backbone-kwargs", json.dumps(spec["model_kwargs"]),
                          "--lift-iterations", "0", "--sizes", "64", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    bundle = tmp_path / "repo_bundle"  # beside the repository: Triton would try to load a folder inside it
    assert (bundle / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["lift_backbone", "lift_triton.json", "manifest.json"]
    assert f"bundle written to {bundle}" in capsys.readouterr().out


# -- the runtime against a KServe v2 server ---------------------------------------------------------
def test_runtime_agrees_with_onnx_runtime(triton, reference, server):
    assert triton.active_providers == ["triton"] and triton.max_batch_size == 2
    assert (triton.sizes, triton.iterations, triton.channels) == (reference.sizes, reference.iterations, 32)
    assert triton.describe()["strides"] == reference.describe()["strides"]
    assert triton.describe()["triton"]["models"] == {r: f"lift_{r}" for r in ROLES}
    rng = np.random.default_rng(3)
    worst = 0.0
    for height, width in reference.sizes:
        images = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)  # 3 > max_batch_size: two parts
        coarse = triton.embed(images)
        np.testing.assert_allclose(coarse, reference.embed(images), atol=1e-5, rtol=0)
        for k in reference.iterations:
            found, expected = triton.upsample(images, coarse, k), reference.upsample(images, reference.embed(images), k)
            assert found.shape == expected.shape == (3, 32, *reference.feature_size(height, width, k))
            assert found.dtype == np.float32 and found.flags.writeable
            worst = max(worst, float(np.abs(found - expected).max()))
        np.testing.assert_allclose(triton.run(images), reference.run(images), atol=1e-5, rtol=0)
    assert worst <= 1e-5
    print(f"max abs difference Triton vs ONNX Runtime: {worst:.3g}")
    if server.ensembles:  # a real tritonserver on the repository's configs: the ensembles chain the same graphs
        import httpx

        images = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
        for k in reference.iterations:
            request = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "UINT8",
                                   "data": images.ravel().tolist()}]}
            answer = httpx.post(f"{server.url}/v2/models/lift_features_k{k}/infer", json=request, timeout=30).json()
            (output,) = answer["outputs"]
            found = np.asarray(output["data"], np.float32).reshape(output["shape"])
            np.testing.assert_allclose(found, reference.run(images, k), atol=1e-5, rtol=0)


def test_runtime_refuses_what_ort_refuses(triton):
    with pytest.raises(ValueError, match="32x32 .* not supported"):
        triton.embed(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="LiFT iterations 2 not offered"):
        triton.run(np.zeros((1, 64, 64, 3), np.uint8), iterations=2)


def test_the_service_fronts_triton(triton, small_batch_repo, reference, server):
    image = noise(64, 96, seed=4)
    with started_client(make_app(small_batch_repo, triton, max_wait_ms=0)) as client:
        models = client.get("/v1/models").json()
        r = client.post("/v1/features?iterations=0", content=encode(image), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        features = np.load(io.BytesIO(r.content), allow_pickle=False)
        np.testing.assert_allclose(features, reference.run(image[None], 0)[0], atol=1e-5, rtol=0)
        before = {name: server.count(name) for name in ("lift_backbone", "lift_upsampler_step")}
        # Another density of the same image: the cached backbone features, upsampler steps only.
        sim = client.post(f"/v1/similarity?feature_id={r.headers['x-feature-id']}&x=10&y=10&iterations=1&format=npy")
        assert sim.status_code == 200, sim.text
        if None not in before.values():
            assert server.count("lift_backbone") == before["lift_backbone"]
            assert server.count("lift_upsampler_step") == before["lift_upsampler_step"] + 1
    assert "triton" in json.dumps(models)


def test_lift_runtime_triton_opens_the_repository_from_the_settings(small_batch_repo, server):
    """LIFT_RUNTIME=triton, LIFT_TRITON_URL, LIFT_TRITON_MODEL_PREFIX and LIFT_BUNDLE=REPO: the app loads
    TritonRuntime itself (through open_runtime) and serves."""
    from lift_serve.service.app import create_app
    from lift_serve.service.settings import Settings

    settings = Settings(bundle=small_batch_repo, runtime="triton", triton_url=server.url, triton_model_prefix="lift",
                        max_wait_ms=0)
    with started_client(create_app(settings)) as client:
        r = client.post("/v1/features?iterations=1", content=encode(noise(64, 64, seed=6)),
                        headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.headers["x-feature-shape"] == "32,8,8"
        assert isinstance(client.app.state.service.runtime, TritonRuntime)


# -- the runtime's refusals ---------------------------------------------------------------------
def test_a_server_that_is_down_is_named_with_what_to_do(small_batch_repo):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(BundleError, match=rf"the Triton server at {url} is unreachable .* start it with "
                                          r"`tritonserver --model-repository REPO`.* LIFT_TRITON_URL"):
        TritonRuntime(small_batch_repo, url, startup_timeout_s=0.6)
    assert time.monotonic() - started < 10


def test_a_missing_model_is_named(small_batch_repo):
    with KServeServer(small_batch_repo, hide={"lift_upsampler_step"}) as server:
        with pytest.raises(BundleError, match=r"model 'lift_upsampler_step' \(the upsampler_step graph\) is not "
                                              r"in its repository \(the server has lift_backbone, "
                                              r"lift_upsampler_prepare\)"):
            TritonRuntime(small_batch_repo, server.url, startup_timeout_s=0)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["output"][0].update(data_type="TYPE_FP16"), "declares output 'features' as TYPE_FP16"),
    (lambda c: c["output"][0].update(dims=[16, -1, -1]), "has 16 channels in output 'features', not 32"),
    (lambda c: c["parameters"]["lift_graph_sha256"].update(string_value="0" * 64), "holds the graph with sha256 000"),
    (lambda c: c.update(max_batch_size=0), "has max_batch_size 0"),
])
def test_a_model_that_disagrees_with_the_manifest_is_refused(small_batch_repo, edit, message):
    with KServeServer(small_batch_repo, edit={"lift_backbone": edit}) as server:
        with pytest.raises(BundleError, match=f"model 'lift_backbone' {message}.*the server holds another export"):
            TritonRuntime(small_batch_repo, server.url, startup_timeout_s=0)


def test_a_prefix_other_than_the_repositorys_is_refused(small_batch_repo):
    with pytest.raises(BundleError, match="names its models lift_\\*, but the model prefix is 'dino'; set "
                                          "LIFT_TRITON_MODEL_PREFIX=lift"):
        TritonRuntime(small_batch_repo, "http://127.0.0.1:9", model_prefix="dino")
    with pytest.raises(BundleError, match="must be the server's HTTP endpoint"):
        TritonRuntime(small_batch_repo, "127.0.0.1:8000")


def test_a_server_lost_while_serving_is_a_triton_error(small_batch_repo):
    with KServeServer(small_batch_repo) as server:
        runtime = TritonRuntime(small_batch_repo, server.url, startup_timeout_s=0, warmup=False)
    with pytest.raises(TritonError, match=f"Triton at {runtime.url} cannot be reached for model 'lift_backbone'"):
        runtime.embed(np.zeros((1, 64, 64, 3), np.uint8))
    # Through the service: 503 + Retry-After, without the server's address or its text; the log has them.
    with started_client(make_app(small_batch_repo, runtime, max_wait_ms=0)) as client:
        r = client.post("/v1/features", content=encode(noise(64, 64, seed=5)), headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "inference_unavailable" and runtime.url not in r.text
    runtime.close()


def test_the_runtime_imports_neither_torch_nor_tritonclient(small_batch_repo):
    probe = ("import sys\n"
             "for name in ('torch', 'timm', 'tritonclient', 'gevent'):\n"
             "    sys.modules[name] = None\n"
             "import lift_serve.service.triton_runtime, lift_serve.triton_repo\n"
             "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
