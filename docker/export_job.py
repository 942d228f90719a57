"""The compose ``export`` job: write the bundle that the api serves, unless it is already there.

Configured by environment variables (docker-compose passes them from ``.env``; see .env.example):

=========================  ==============================================================  ==========================
variable                   meaning                                                         default
=========================  ==============================================================  ==========================
EXPORT_BUNDLE_DIR          bundle directory on the bundle volume (the api's LIFT_BUNDLE)   /bundles/model
EXPORT_DEMO                true: the untrained demo bundle (random ViT-S/16, no
                           checkpoint; meaningless features, for trying the stack)         false
EXPORT_BACKBONE            timm model name (empty: named by a .safetensors sidecar)        vit_small_patch16_224.dino
EXPORT_BACKBONE_WEIGHTS    hub (Hugging Face, cached on a volume), random, or a file path  hub
EXPORT_SEED / EXPORT_LAYER / EXPORT_FACET / EXPORT_BACKBONE_KWARGS   as ``lift export``'s flags  (lift export's)
EXPORT_CHECKPOINT          LiFT checkpoint (mounted from ./checkpoints), or "none"         /checkpoints/lift.pth
EXPORT_LIFT_ITERATIONS     LiFT rounds, one graph each                                     0,1
EXPORT_DEFAULT_ITERATIONS  rounds used when a request does not say                         (lift export's)
EXPORT_SIZES               supported input sizes                                           224,448
EXPORT_PRECISION           fp32 or fp16                                                    fp32
EXPORT_OPSET               ONNX opset                                                      (lift export's)
EXPORT_FORCE               true: export even if the bundle matches                         false
=========================  ==============================================================  ==========================

"Matches" means: the bundle's manifest.json is unchanged since this job wrote it, and the request
(every variable above, the sha256 of the checkpoint and of a backbone weights file, the installed
lift-serve, torch, timm and onnx versions and a hash of the exporter's source files) equals the
one recorded then, in
``.<bundle name>.export-request.json`` beside the bundle. Anything else re-exports; ``lift export``
replaces the old bundle atomically, so the api never sees half a bundle. Hub weights are recorded
by name: set EXPORT_FORCE=true after the hub's weights for that name changed.

Exit status: 0 exported or skipped; 2 with an "error: ..." line for a configuration problem (for
example a missing checkpoint); otherwise ``lift export``'s status.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

DEFAULTS = {
    "EXPORT_BUNDLE_DIR": "/bundles/model",
    "EXPORT_DEMO": "false",
    "EXPORT_BACKBONE": "vit_small_patch16_224.dino",
    "EXPORT_BACKBONE_WEIGHTS": "hub",
    "EXPORT_SEED": "",
    "EXPORT_LAYER": "",
    "EXPORT_FACET": "",
    "EXPORT_BACKBONE_KWARGS": "",
    "EXPORT_CHECKPOINT": "/checkpoints/lift.pth",
    "EXPORT_LIFT_ITERATIONS": "0,1",
    "EXPORT_DEFAULT_ITERATIONS": "",
    "EXPORT_SIZES": "224,448",
    "EXPORT_PRECISION": "fp32",
    "EXPORT_OPSET": "",
    "EXPORT_FORCE": "false",
}
# variable -> `lift export` flag, passed only when the variable is set (else lift export's default)
FLAGS = {
    "EXPORT_BACKBONE": "--backbone",
    "EXPORT_BACKBONE_WEIGHTS": "--backbone-weights",
    "EXPORT_SEED": "--seed",
    "EXPORT_LAYER": "--layer",
    "EXPORT_FACET": "--facet",
    "EXPORT_BACKBONE_KWARGS": "--backbone-kwargs",
    "EXPORT_LIFT_ITERATIONS": "--lift-iterations",
    "EXPORT_DEFAULT_ITERATIONS": "--default-iterations",
    "EXPORT_SIZES": "--sizes",
    "EXPORT_PRECISION": "--precision",
    "EXPORT_OPSET": "--opset",
}
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class JobError(Exception):
    """A configuration problem; the message says what is wrong and what to do."""


def read_config(environ: Mapping[str, str]) -> dict[str, str]:
    """The job's variables: DEFAULTS overridden by ``environ``, surrounding blanks stripped."""
    return {name: environ.get(name, default).strip() for name, default in DEFAULTS.items()}


def flag(config: Mapping[str, str], name: str) -> bool:
    value = config[name].lower()
    if value not in TRUE | FALSE:
        raise JobError(f"{name}={config[name]!r}: use true or false")
    return value in TRUE


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def needs_lift(config: Mapping[str, str]) -> bool:
    """True when some requested graph applies LiFT (iterations > 0), i.e. a checkpoint is needed."""
    try:
        return any(int(k) > 0 for k in config["EXPORT_LIFT_ITERATIONS"].split(",") if k.strip())
    except ValueError:
        return True  # malformed: let `lift export` explain the problem


def checkpoint_path(config: Mapping[str, str]) -> Path | None:
    """The checkpoint to export, or None; raises JobError when a needed one is missing."""
    value = config["EXPORT_CHECKPOINT"]
    if flag(config, "EXPORT_DEMO") or value.lower() in {"", "none"}:
        if value.lower() in {"", "none"} and needs_lift(config) and not flag(config, "EXPORT_DEMO"):
            raise JobError(
                f"EXPORT_CHECKPOINT is {value or 'empty'} but EXPORT_LIFT_ITERATIONS="
                f"{config['EXPORT_LIFT_ITERATIONS']} applies LiFT: name a checkpoint, or set "
                "EXPORT_LIFT_ITERATIONS=0 for backbone features only"
            )
        return None
    path = Path(value)
    if not path.is_file():
        raise JobError(
            f"LiFT checkpoint {path} not found. Put the checkpoint file into ./checkpoints/ next to "
            f"docker-compose.yml (it is mounted at /checkpoints) and set EXPORT_CHECKPOINT in .env to "
            f"/checkpoints/<file name> (the authors' .pth or our .safetensors + .json), or train one "
            f"with `docker compose --profile train run --rm train`; EXPORT_DEMO=true exports an "
            f"untrained demo bundle instead"
        )
    return path


def versions() -> dict[str, str | None]:
    found = {}
    for dist in ("lift-serve", "torch", "timm", "onnx", "onnxscript"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def exporter_code_sha256() -> str | None:
    """sha256 over the installed exporter's sources (``lift_serve.model`` and the bundle contract
    ``lift_serve.bundle``): a rebuilt image with a changed exporter re-exports even when the
    lift-serve version number stayed the same. Found without importing them (no torch needed)."""
    digest = hashlib.sha256()
    files = []
    for package, pattern in (("lift_serve.model", "*.py"), ("lift_serve.bundle", "*.py")):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for location in spec.submodule_search_locations:
            files += sorted(Path(location).glob(pattern))
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build_request(config: Mapping[str, str]) -> dict:
    """What the bundle would be made from: compared with the record of the last export."""
    checkpoint = checkpoint_path(config)
    request = {name: value for name, value in config.items() if name not in {"EXPORT_FORCE"}}
    request["checkpoint_sha256"] = None if checkpoint is None else sha256_file(checkpoint)
    weights = Path(config["EXPORT_BACKBONE_WEIGHTS"])
    request["backbone_weights_sha256"] = (
        sha256_file(weights) if config["EXPORT_BACKBONE_WEIGHTS"] not in {"hub", "random"} and weights.is_file()
        else None)
    request["versions"] = versions()
    request["exporter_code_sha256"] = exporter_code_sha256()
    return request


def export_command(config: Mapping[str, str]) -> list[str]:
    """The ``lift export`` argument list (after ``lift export``) for this configuration."""
    args = ["--out", config["EXPORT_BUNDLE_DIR"]]
    if flag(config, "EXPORT_DEMO"):
        return args + ["--demo"]
    for name, option in FLAGS.items():
        if config[name]:
            args += [option, config[name]]
    checkpoint = checkpoint_path(config)
    if checkpoint is not None:
        args += ["--checkpoint", str(checkpoint)]
    return args


def record_path(bundle: Path) -> Path:
    # Beside the bundle, not inside: `lift export` replaces the bundle directory as a whole.
    return bundle.parent / f".{bundle.name}.export-request.json"


def is_current(bundle: Path, request: dict) -> bool:
    """True when ``bundle`` was written by this job from exactly ``request`` and is untouched."""
    manifest = bundle / "manifest.json"
    record = record_path(bundle)
    if not manifest.is_file() or not record.is_file():
        return False
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(saved, dict):  # valid JSON of another shape: not our record, so export again
        return False
    return saved.get("request") == request and saved.get("manifest_sha256") == sha256_file(manifest)


def run_lift_export(args: list[str]) -> int:
    return subprocess.run([sys.executable, "-m", "lift_serve.cli", "export", *args]).returncode


def main(environ: Mapping[str, str] | None = None,
         runner: Callable[[list[str]], int] = run_lift_export) -> int:
    config = read_config(os.environ if environ is None else environ)
    try:
        bundle = Path(config["EXPORT_BUNDLE_DIR"])
        request = build_request(config)
        if not flag(config, "EXPORT_FORCE") and is_current(bundle, request):
            print(f"bundle {bundle} matches the requested configuration; nothing to export "
                  "(EXPORT_FORCE=true exports anyway)", flush=True)
            return 0
        args = export_command(config)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exporting: lift export {' '.join(args)}", flush=True)
    status = runner(args)
    if status != 0:
        print(f"error: lift export failed (exit status {status}); the bundle volume was left as it was",
              file=sys.stderr)
        return status
    if not (bundle / "manifest.json").is_file():
        print(f"error: lift export succeeded but {bundle}/manifest.json is missing", file=sys.stderr)
        return 1
    record = {"request": request, "manifest_sha256": sha256_file(bundle / "manifest.json")}
    record_path(bundle).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"bundle {bundle} exported", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
