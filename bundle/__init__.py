"""The bundle contract, owned by neither side: the typed manifest of an exported bundle, its JSON
Schema and its validation (pydantic; no torch, no numpy, no ONNX Runtime). The exporter
(``lift_serve.model``) writes it and the service (``lift_serve.service``) reads it; neither imports
the other. See :mod:`lift_serve.bundle.manifest` for the format.
"""

from lift_serve.bundle.manifest import (
    BACKBONE_GRAPH,
    CHAIN_PREPARE_THEN_STEPS,
    CHECKPOINT_FORMATS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PRECISIONS,
    PREPARE_GRAPH,
    STEP_GRAPH,
    BackboneInfo,
    BundleError,
    GraphFile,
    Manifest,
    ParityCase,
    UpsamplerInfo,
    json_schema,
    read_manifest,
    sha256_file,
    validate_manifest,
)

__all__ = ["BACKBONE_GRAPH", "CHAIN_PREPARE_THEN_STEPS", "CHECKPOINT_FORMATS", "FORMAT_VERSION", "MANIFEST_NAME",
           "PRECISIONS", "PREPARE_GRAPH", "STEP_GRAPH", "BackboneInfo", "BundleError", "GraphFile", "Manifest",
           "ParityCase", "UpsamplerInfo", "json_schema", "read_manifest", "sha256_file", "validate_manifest"]
