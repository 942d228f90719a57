"""Runtime side: loading, input checks, refusals of broken bundles, providers, and no torch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from lift_serve.bundle import BundleError, read_manifest, sha256_file
from lift_serve.service.ort_runtime import BundleRuntime, resolve_providers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    return BundleRuntime(tiny_bundle, providers=["cpu"], intra_op_threads=1)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the tiny bundle to damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_attributes_and_geometry(runtime):
    assert runtime.sizes == [(64, 64), (64, 96)]
    assert runtime.iterations == [0, 1] and runtime.default_iterations == 1
    assert (runtime.channels, runtime.patch_size, runtime.demo) == (32, 16, False)
    assert runtime.active_providers == ["CPUExecutionProvider"]
    assert runtime.stride() == 8.0 and runtime.stride(0) == 16.0
    assert runtime.feature_size(64, 96) == (8, 12) and runtime.feature_size(64, 96, 0) == (4, 6)
    out = runtime.run(np.zeros((2, 64, 96, 3), np.uint8))
    assert out.shape == (2, 32, 8, 12) and out.dtype == np.float32
    assert runtime.describe()["strides"] == {"0": 16.0, "1": 8.0}


@pytest.mark.parametrize("images, message", [
    (np.zeros((1, 64, 64, 3), np.float32), "must be uint8 pixels 0..255, found dtype float32"),
    (np.zeros((64, 64, 3), np.uint8), r"shape \[B,H,W,3\] .* found \[64, 64, 3\]"),
    (np.zeros((1, 3, 64, 64), np.uint8), r"found \[1, 3, 64, 64\]"),
    (np.zeros((1, 32, 32, 3), np.uint8), "32x32 .* not supported .* supported: 64x64, 64x96"),
    (np.zeros((1, 96, 64, 3), np.uint8), "96x64 .*not supported"),  # height x width, not transposed
    ([[1, 2, 3]], "numpy array"),
])
def test_run_rejects_bad_input_naming_expected_and_found(runtime, images, message):
    with pytest.raises(ValueError, match=message):
        runtime.run(images)


def test_run_rejects_iterations_not_offered(runtime):
    with pytest.raises(ValueError, match=r"LiFT iterations 2 not offered .* \[0, 1\]"):
        runtime.run(np.zeros((1, 64, 64, 3), np.uint8), iterations=2)


def test_concurrent_runs_agree_with_sequential(runtime):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (1, 64, 96, 3), dtype=np.uint8) for _ in range(6)]
    sequential = [runtime.run(b) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(runtime.run, batches))
    for a, b in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(sequential[0], sequential[1])  # different inputs give different features


def test_missing_bundle_dir(tmp_path):
    with pytest.raises(BundleError, match="bundle directory .*nowhere does not exist.*lift export"):
        BundleRuntime(tmp_path / "nowhere")


def test_a_file_given_as_bundle_is_named_as_a_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a bundle")
    with pytest.raises(BundleError, match="model.onnx is a file, but a bundle is a directory"):
        read_manifest(path)


def test_missing_manifest(bundle_copy):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        BundleRuntime(bundle_copy)


def test_manifest_not_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundle_copy)


@pytest.mark.parametrize("path", [
    "input.sizes", "output.channels", "backbone.patch_size", "onnx.opset", "upsampler.max_steps", "iterations",
    "backbone.graph.sha256", "upsampler.graphs.step",
])
def test_manifest_missing_field(bundle_copy, path):
    def drop(m):
        *parents, last = path.split(".")
        for part in parents:
            m = m[part]
        m.pop(last)

    edit_manifest(bundle_copy, drop)
    with pytest.raises(BundleError, match=f"lacks field '{path}'.*lift export"):
        BundleRuntime(bundle_copy)


def test_manifest_wrong_type_and_inconsistency(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["input"].update(sizes="224"))
    with pytest.raises(BundleError, match="field 'input.sizes': Input should be a valid list, found str '224'"):
        read_manifest(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m["input"].update(sizes=[[64, 64]]) or m.update(iterations=[0, 1, 3]))
    with pytest.raises(BundleError, match=r"iterations \[0, 1, 3\] exceed upsampler.max_steps 1"):
        read_manifest(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m.update(iterations=[0, 1], default_iterations=2))
    with pytest.raises(BundleError, match=r"default_iterations 2 is not among iterations \[0, 1\]"):
        read_manifest(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m.update(default_iterations=1) or m["backbone"]["graph"].update(
        file="../elsewhere.onnx"))
    with pytest.raises(BundleError, match="field 'backbone.graph.file'"):
        read_manifest(bundle_copy)


def test_format_1_bundle_is_refused_with_the_command_that_remakes_it(bundle_copy):
    old = {"format_version": 1, "backbone": {"timm_name": "vit_small_patch16_224.dino", "weights": "hub", "seed": 0,
                                             "layer": -1, "facet": "key", "model_kwargs": {}},
           "lift": {"iterations": [0, 1], "checkpoint_sha256": "ab" * 32},
           "input": {"sizes": [[224, 224], [448, 448]]}, "onnx": {"precision": "fp32"}}
    (bundle_copy / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(BundleError) as caught:
        BundleRuntime(bundle_copy)
    message = str(caught.value)
    assert "format-1 bundle" in message
    for part in ("lift export --checkpoint", "sha256 abababababab", "--backbone vit_small_patch16_224.dino",
                 "--backbone-weights hub", "--channel-layout concatenated", "--pos-interpolation timm",
                 "--lift-iterations 0,1", "--sizes 224x224,448x448", "--precision fp32"):
        assert part in message, part


def test_manifest_input_name_disagrees_with_graph(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["backbone"]["graph"].update(inputs=["pixels"]))
    with pytest.raises(BundleError, match=r"takes inputs \['image'\], but the manifest says \['pixels'\]"):
        BundleRuntime(bundle_copy)


def test_manifest_output_name_disagrees_with_graph(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["upsampler"]["graphs"]["step"].update(outputs=["state", "descriptors"]))
    with pytest.raises(BundleError, match=r"has outputs \['next_state', 'next_features'\], but the manifest names "
                       r"\['state', 'descriptors'\]"):
        BundleRuntime(bundle_copy)


def test_manifest_channels_disagree_with_graph(bundle_copy):
    def claim_64(m):
        m["output"]["channels"] = 64
        m["backbone"]["embed_dim"] = 64

    edit_manifest(bundle_copy, claim_64)
    with pytest.raises(BundleError, match="has 32 channels, the manifest says 64"):
        BundleRuntime(bundle_copy)


def test_manifest_dtype_disagrees_with_graph(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["output"].update(dtype="float16") or m["onnx"].update(precision="fp16"))
    with pytest.raises(BundleError, match=r"is tensor\(float\) .* manifest expects float16"):
        BundleRuntime(bundle_copy)


def test_missing_graph_file(bundle_copy):
    (bundle_copy / "upsampler_step.onnx").unlink()
    with pytest.raises(BundleError, match="upsampler_step.onnx listed in the manifest is missing"):
        BundleRuntime(bundle_copy)


def test_truncated_graph_refused_by_checksum(bundle_copy):
    path = bundle_copy / "backbone.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match="backbone.onnx has sha256 .* truncated"):
        BundleRuntime(bundle_copy)


def test_truncated_graph_refused_by_onnxruntime_even_with_matching_checksum(bundle_copy):
    path = bundle_copy / "backbone.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    edit_manifest(bundle_copy, lambda m: m["backbone"]["graph"].update(sha256=sha256_file(path)))
    with pytest.raises(BundleError, match="ONNX Runtime cannot load .*backbone.onnx"):
        BundleRuntime(bundle_copy)


def test_providers_fall_back_to_cpu_with_reasons(caplog):
    with caplog.at_level(logging.INFO, logger="lift.runtime"):
        chosen = resolve_providers(["tensorrt", "cuda", "cpu"], ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    assert "provider tensorrt skipped: not available" in caplog.text
    assert "provider cuda skipped: not available" in caplog.text
    assert {r.levelname for r in caplog.records if "skipped" in r.getMessage()} == {"WARNING"}  # a fallback
    assert resolve_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    # TensorRT is opt-in: the default preference never includes it.
    assert resolve_providers(("cuda", "cpu"), ["TensorrtExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]
    with pytest.raises(BundleError, match="unknown execution provider 'gpu'"):
        resolve_providers(["gpu"], ["CPUExecutionProvider"])


def test_runtime_logs_active_provider_and_rejects_bad_options(tiny_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="lift.runtime"):
        BundleRuntime(tiny_bundle, warmup=False, graph_optimization="basic", inter_op_threads=1)
    assert "runs on CPUExecutionProvider" in caplog.text
    with pytest.raises(BundleError, match="graph_optimization must be one of"):
        BundleRuntime(tiny_bundle, graph_optimization="max")
    with pytest.raises(BundleError, match="intra_op_threads must be an integer >= 0"):
        BundleRuntime(tiny_bundle, intra_op_threads=-1)


def test_runtime_works_where_torch_cannot_be_imported(tiny_bundle, runtime):
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    np.save(tiny_bundle.parent / "images.npy", images)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None   # any `import torch` now raises ImportError
        sys.modules["timm"] = None
        import numpy as np
        from lift_serve.service.ort_runtime import BundleRuntime
        runtime = BundleRuntime({str(tiny_bundle)!r})
        out = runtime.run(np.load({str(tiny_bundle.parent / "images.npy")!r}), 0)
        np.save({str(tiny_bundle.parent / "out.npy")!r}, out)
        print("ok", out.shape, "torch" in sys.modules and sys.modules["torch"] is not None)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok (2, 32, 4, 6) False"
    np.testing.assert_array_equal(np.load(tiny_bundle.parent / "out.npy"), runtime.run(images, 0))


def test_manifest_multiple_must_be_the_patch_size(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["input"].update(multiple=8))
    with pytest.raises(BundleError, match="input.multiple 8 != backbone.patch_size 16"):
        read_manifest(bundle_copy)


def test_graph_that_cannot_run_a_listed_size_is_refused(bundle_copy):
    # A graph fixed to 64x64 (as a TorchScript export would be) in a manifest that also lists 64x96:
    # warm-up used to end in ONNX Runtime's own exception instead of a BundleError.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["t"], ["p"], kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Conv", ["p", "w"], ["features"]),
    ]
    weight = numpy_helper.from_array(np.ones((32, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        nodes, "fixed", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["B", 64, 64, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", 32, 4, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, bundle_copy / "backbone.onnx")

    def only_k0(m):
        m["backbone"]["graph"]["sha256"] = sha256_file(bundle_copy / "backbone.onnx")
        m.update(upsampler=None, iterations=[0], default_iterations=0)

    edit_manifest(bundle_copy, only_k0)
    with pytest.raises(BundleError, match="the backbone graph cannot run at 64x96"):
        BundleRuntime(bundle_copy, providers=["cpu"])


def test_a_required_provider_that_is_not_active_stops_the_start(tiny_bundle):
    from lift_serve.service.app import ConfigError, check_required_provider

    check_required_provider("", ["CPUExecutionProvider"])
    check_required_provider("cpu", ["CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="LIFT_REQUIRE_PROVIDER=cuda, but ONNX Runtime runs on CPUExecutionProvider"):
        check_required_provider("cuda", ["CPUExecutionProvider"])


def test_lift_serve_with_a_required_provider_it_cannot_have_exits_naming_it(tiny_bundle, capsys, monkeypatch):
    from lift_serve import cli

    monkeypatch.setenv("LIFT_REQUIRE_PROVIDER", "cuda")
    monkeypatch.setenv("LIFT_PORT", "0")
    assert cli.main(["serve", "--bundle", str(tiny_bundle), "--log-level", "warning"]) == 2
    assert "LIFT_REQUIRE_PROVIDER=cuda, but ONNX Runtime runs on CPUExecutionProvider" in capsys.readouterr().err


class _OrtAsIfOnTensorRT:
    """onnxruntime as a GPU build would look to the runtime: TensorRT and CUDA listed and reported
    active, while every session really runs on the CPU. Records what each session was given and the
    batch size of every backbone and step call."""

    def __init__(self):
        import onnxruntime

        self._ort = onnxruntime
        self.created: list[list] = []
        self.batches: dict[str, list[int]] = {}

    def __getattr__(self, name):
        return getattr(self._ort, name)

    def get_available_providers(self):
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, data, sess_options=None, providers=None):  # noqa: N802 - ORT's name
        self.created.append(providers)
        real = self._ort.InferenceSession(data, sess_options=sess_options, providers=["CPUExecutionProvider"])
        outer = self

        class Session:
            def __getattr__(self, name):
                return getattr(real, name)

            def get_providers(self):
                return [name for name, _ in providers]

            def get_provider_options(self):
                return dict(providers)

            def run(self, names, feeds):
                first = real.get_inputs()[0].name
                graph = ",".join(o.name for o in real.get_outputs())
                outer.batches.setdefault(graph, []).append(int(feeds[first].shape[0]))
                return real.run(names, feeds)

        return Session()


def test_tensorrt_and_cuda_options_reach_every_session_and_warmup_covers_every_batch(tiny_bundle, monkeypatch,
                                                                                       tmp_path):
    from lift_serve.service import ort_runtime
    from lift_serve.service.ort_options import GpuOptions

    fake = _OrtAsIfOnTensorRT()
    monkeypatch.setattr(ort_runtime, "_import_onnxruntime", lambda: fake)
    options = GpuOptions(max_batch_size=3, trt_engine_cache_dir=tmp_path / "trt", cudnn_conv_algo_search="HEURISTIC")
    runtime = BundleRuntime(tiny_bundle, providers="tensorrt,cuda,cpu", gpu_options=options, io_binding=False)
    assert runtime.active_providers[0] == "TensorrtExecutionProvider"
    assert len(fake.created) == len(read_manifest(tiny_bundle).graph_files())
    for role, session in runtime._sessions.items():
        providers = session.get_provider_options()  # what ONNX Runtime was given for this session
        assert list(providers) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        trt, cuda = providers["TensorrtExecutionProvider"], providers["CUDAExecutionProvider"]
        assert trt["trt_fp16_enable"] == "1" and trt["trt_engine_cache_enable"] == "1"
        assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(tmp_path / "trt")
        assert cuda == {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "1"}
        if role == "upsampler_step":  # its inputs' shapes are the upsampler's own: no explicit profile
            assert not any(key.startswith("trt_profile") for key in trt)
        else:  # one engine for batch 1 at the smallest size .. batch 3 at the largest (sizes 64x64, 64x96)
            name = read_manifest(tiny_bundle).graph_files()[role].inputs[0]
            assert (trt["trt_profile_min_shapes"], trt["trt_profile_opt_shapes"], trt["trt_profile_max_shapes"]) == (
                f"{name}:1x64x64x3", f"{name}:3x64x64x3", f"{name}:3x64x96x3")
    # The warm-up ran every batch size the batcher can form (1..3) at both sizes, backbone and steps.
    assert runtime.warmup_batch_sizes == [1, 2, 3]
    graphs = read_manifest(tiny_bundle).graph_files()
    for role in ("backbone", "upsampler_step"):  # the tiny bundle offers densities 0 and 1: one step each
        assert sorted(fake.batches[",".join(graphs[role].outputs)]) == [1, 1, 2, 2, 3, 3], role


def test_cpu_warms_batch_1_and_the_io_bound_chain_equals_the_plain_one(tiny_bundle):
    runtime = BundleRuntime(tiny_bundle, providers="cpu", io_binding=True)
    assert runtime.warmup_batch_sizes == [1] and runtime.io_device == "cpu"
    images = np.random.default_rng(3).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    coarse, features = runtime.embed_and_upsample(images, 1)
    np.testing.assert_array_equal(coarse, runtime.embed(images))
    np.testing.assert_array_equal(features, runtime.upsample(images, runtime.embed(images), 1))
    assert BundleRuntime(tiny_bundle, providers="cpu", warmup=False).io_device is None  # off on the CPU by default


def test_lift_trt_settings_become_the_runtimes_gpu_options(tiny_bundle, monkeypatch, tmp_path):
    from lift_serve.service.app import runtime_options
    from lift_serve.service.settings import Settings

    for name, value in {"LIFT_TRT_FP16": "false", "LIFT_TRT_ENGINE_CACHE_DIR": str(tmp_path),
                        "LIFT_TRT_PROFILES": "false", "LIFT_CUDNN_CONV_ALGO_SEARCH": "DEFAULT",
                        "LIFT_MAX_BATCH_SIZE": "16", "LIFT_WARMUP": "all", "LIFT_CUDA_DEVICE_ID": "1",
                        "LIFT_ORT_SPINNING": "true"}.items():
        monkeypatch.setenv(name, value)
    options = runtime_options(Settings(bundle=tiny_bundle))
    gpu = options["gpu_options"]
    assert (gpu.trt_fp16, gpu.trt_engine_cache_dir, gpu.trt_profiles, gpu.cudnn_conv_algo_search,
            gpu.max_batch_size, gpu.cuda_device_id) == (False, tmp_path, False, "DEFAULT", 16, 1)
    assert options["warmup_mode"] == "all" and options["spinning"] is True
    # ONNX Runtime's threads sleep rather than spin unless asked (they would compete with the server's).
    import onnxruntime
    from lift_serve.service.ort_runtime import _session_options

    for spinning, value in ((False, "0"), (True, "1")):
        made = _session_options(onnxruntime, 0, 0, "all", spinning)
        assert made.get_session_config_entry("session.intra_op.allow_spinning") == value
    monkeypatch.setenv("LIFT_CUDNN_CONV_ALGO_SEARCH", "FASTEST")
    with pytest.raises(ValueError, match="cudnn_conv_algo_search"):
        Settings(bundle=tiny_bundle)
