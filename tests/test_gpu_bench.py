"""bench/gpu_bench.py run as on a GPU host without the package installed: a subprocess that runs the
file (not the installed module) with ``lift_serve`` made unimportable from anywhere but the
checkout's folders, on the CPU with tiny backbones and sizes; plus the missing-timm message and
the wheels folder, in miniature."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_bench.py"
MODELS = ("lift-dino-vits16", "uplift-dinov2-s14")
# Tiny backbones and sides, one timed call budget of 10 ms, one training step; one thread, because
# on a shared 2-core machine more threads spin against other processes and a run takes many times longer.
TINY_RUN = ["--device", "cpu", "--quick", "--tiny", "--sizes", "16", "--batch-sizes", "1,2", "--precisions",
            "fp32,bf16", "--train-precisions", "fp32", "--case-seconds", "0.01", "--warmup", "0", "--train-steps",
            "1", "--train-batch", "2", "--train-size", "16", "--agree-size", "16", "--threads", "1"]

# Runs the script with top-level imports of ``lift_serve`` (so an installed copy cannot be used: only
# the script's own mapping of the checkout, which comes first, finds it) and of the names in argv[1]
# made to fail as if those packages were not installed.
LAUNCHER = """
import runpy, sys
blocked = {"lift_serve", *filter(None, sys.argv[1].split(","))}
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if path is None and name in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
script = sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def run_script(tmp_path: Path, *args: str, blocked: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LIFT_BENCH_WHEELS")}
    return subprocess.run([sys.executable, "-c", LAUNCHER, blocked, str(SCRIPT), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def no_nan(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_bench")
    out = tmp / "bench_gpu.json"
    result = run_script(tmp, *TINY_RUN, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return no_nan(out.read_text())


def test_runs_from_the_checkout_and_records_the_machine(report):
    assert report["code_from"] == str(ROOT / "model")
    assert report["settings"]["device"] == "cpu" and report["settings"]["quick"] and report["settings"]["tiny"]
    env = report["environment"]
    assert env["torch"] and env["timm"] and env["device"] == "cpu" and env["gpu"] is None
    assert "ONNX Runtime" in " ".join(report["what_it_cannot"]) and "gpu" in " ".join(report["what_it_cannot"])
    assert "autocast" in report["precision_method"] and report["cpu_note"]
    assert [m["model"] for m in report["models"]] == list(MODELS)
    assert {m["upsampler"]: m["density"] for m in report["models"]} == {"lift": "2x", "uplift": "4x"}


def test_every_throughput_case_is_there_and_positive(report):
    cases = {(r["model"], r["size"], r["precision"], r["batch_size"]): r for r in report["throughput"]}
    expected = {(m, side, p, b) for m, side in zip(MODELS, (16, 14), strict=True) for p in ("fp32", "bf16")
                for b in (1, 2)}
    assert set(cases) == expected
    for row in cases.values():
        assert row["status"] == "ok", row
        assert row["images_per_s"] > 0 and row["ms_per_batch_median"] > 0 and row["calls"] >= 3
        assert row["peak_memory_mb"] is None  # CUDA only


def test_training_steps_use_each_models_objective(report):
    rows = {r["model"]: r for r in report["train"]}
    assert set(rows) == set(MODELS)
    assert rows["lift-dino-vits16"]["loss"] == "cosine" and rows["uplift-dinov2-s14"]["loss"] == "l2"
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["precision"] == "fp32" and row["steps"] == 1 and row["loss_finite"]
        assert row["steps_per_s"] > 0 and row["images_per_s"] == pytest.approx(2 * row["steps_per_s"])


def test_agreement_fp32_is_exact_and_bf16_close(report):
    rows = {(r["model"], r["precision"]): r for r in report["agreement"]}
    assert set(rows) == {(m, p) for m in MODELS for p in ("fp32", "bf16")}
    for model in MODELS:
        exact, bf16 = rows[(model, "fp32")], rows[(model, "bf16")]
        assert exact["max_abs_error"] == 0 and exact["mean_abs_error"] == 0
        assert exact["cosine_min"] == pytest.approx(1.0, abs=1e-12)
        assert 0 < bf16["max_abs_error"] < 0.1 * bf16["reference_max_abs"]  # really bf16, and close
        assert 0.99 < bf16["cosine_mean"] <= 1 + 1e-12 and 0.9 < bf16["cosine_min"] <= bf16["cosine_mean"]
        assert bf16["nonfinite_values"] == 0 and bf16["reference"] == "fp32 strict"


def test_missing_timm_is_named_with_the_fix_at_once(tmp_path):
    started = time.monotonic()
    result = run_script(tmp_path, "--device", "cpu", "--quick", "--out", str(tmp_path / "x.json"), blocked="timm")
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model code needs timm" in result.stderr
    assert 'pip download "timm>=1.0.9,<2" --no-deps -d wheels/' in result.stderr
    assert "--wheels wheels/" in result.stderr
    assert not (tmp_path / "x.json").exists()


def test_a_wheels_folder_is_importable_without_installing(tmp_path, monkeypatch):
    from lift_serve.bench import gpu_bench

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gpubenchprobe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("gpubenchprobe/__init__.py", "VALUE = 42\n")
    with zipfile.ZipFile(wheels / "gpubenchother-1.0-cp27-cp27mu-manylinux1_x86_64.whl", "w") as wheel:
        wheel.writestr("gpubenchother/__init__.py", "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        assert gpu_bench.add_wheels(wheels) == ["gpubenchprobe-1.0-py3-none-any.whl"]
        import gpubenchprobe

        assert gpubenchprobe.VALUE == 42
    finally:
        sys.modules.pop("gpubenchprobe", None)
    with pytest.raises(gpu_bench.BenchSetupError, match="no .whl files"):
        gpu_bench.add_wheels(tmp_path / "empty")


def test_registered_as_lift_bench_gpu():
    from lift_serve import cli

    assert cli.COMMANDS["bench"]["gpu"] == "lift_serve.bench.gpu_bench"
