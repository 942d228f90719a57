"""The bundle contract (``lift_serve.bundle``): its published JSON Schema is current, a manifest the
exporter writes validates against it, and the contract itself needs neither torch nor numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lift_serve.bundle import BundleError, Manifest, json_schema, read_manifest, validate_manifest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "docs" / "bundle-manifest.schema.json"


def test_published_schema_is_current():
    assert json.loads(SCHEMA.read_text()) == json_schema(), (
        "docs/bundle-manifest.schema.json is stale: regenerate it with "
        "`python -m lift_serve.bundle > docs/bundle-manifest.schema.json`")


def test_exported_manifest_validates_against_the_published_schema(tiny_bundle):
    import jsonschema
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    broken = {**data, "iterations": "0,1"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


def test_manifest_round_trips_and_answers_geometry(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    assert isinstance(manifest, Manifest)
    assert validate_manifest(json.loads(manifest.model_dump_json())) == manifest
    assert [manifest.stride(k) for k in manifest.iterations] == [16.0, 8.0]
    assert set(manifest.graph_files()) == {"backbone", "upsampler_prepare", "upsampler_step"}


def test_unknown_field_is_refused_by_name(tiny_bundle):
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    data["backbone"]["heads"] = 6
    with pytest.raises(BundleError, match="field 'backbone.heads': Extra inputs are not permitted"):
        validate_manifest(data)


def test_contract_imports_neither_torch_nor_numpy():
    probe = ("import sys\n"
             "for name in ('torch', 'numpy', 'onnxruntime'):\n"
             "    sys.modules[name] = None\n"
             "import lift_serve.bundle\n"
             "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
