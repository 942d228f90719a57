"""The model card (README.md) published with a bundle on the Hugging Face Hub.

Everything on the card is read from the bundle's validated :class:`~lift_serve.bundle.Manifest`, so
the card cannot describe another model than the graphs beside it. The license in the front matter is
chosen from where the weights came from, by the small explicit tables below; when the manifest does
not say enough to be sure, the card says ``license: other`` and a sentence why, instead of guessing.
"""

from __future__ import annotations

import json
from pathlib import PurePath

from lift_serve.bundle import Manifest

_DINOV3_LICENSE = {
    "license": "other",
    "license_name": "dinov3-license",
    "license_link": "https://ai.meta.com/resources/models-and-libraries/dinov3-license/",
}
_UNSURE = {"license": "other"}

# Backbone family -> (front matter, sentence). Families are told from the timm name (and the name of
# a local weights file): DINOv3 and DINOv2 by those words, DINO v1 by any other "dino" (".dino" tags,
# the release file dino_deitsmall16_pretrain.pth).
BACKBONE_LICENSES: dict[str, tuple[dict[str, str], str]] = {
    "DINOv3": (_DINOV3_LICENSE, "DINOv3 weights are released under the DINOv3 License "
                                f"({_DINOV3_LICENSE['license_link']}); its terms apply to this bundle."),
    "DINOv2": ({"license": "apache-2.0"}, "DINOv2 weights (facebookresearch/dinov2) are released under Apache-2.0."),
    "DINO v1": ({"license": "apache-2.0"}, "DINO v1 weights (facebookresearch/dino) are released under Apache-2.0."),
}
# (upsampler kind, checkpoint format) -> (front matter, sentence), for the authors' released weights.
UPSAMPLER_LICENSES: dict[tuple[str, str], tuple[dict[str, str], str]] = {
    ("uplift", "authors"): ({"license": "mit"}, "the UPLiFT authors' released weights; the authors' repository "
                                                "is MIT-licensed."),
    ("lift", "authors"): (_UNSURE, "the LiFT authors' released weights: see the LiFT authors' repository for the "
                                   "terms they are released under."),
}
SERVICE_URL = "http://127.0.0.1:8000"


def backbone_family(name: str) -> str | None:
    """``"DINOv3"``, ``"DINOv2"``, ``"DINO v1"`` or None, from a timm name or a weights file name."""
    name = name.lower()
    for word, family in (("dinov3", "DINOv3"), ("dinov2", "DINOv2"), ("dino", "DINO v1")):
        if word in name:
            return family
    return None


def untrained_parts(manifest: Manifest) -> set[str]:
    """``"backbone"`` and/or ``"upsampler"``: the parts whose weights are random or untrained.

    ``random_weights`` says so in newer manifests; older ones only through ``demo``, a ``random``
    backbone and an upsampler without a checkpoint, which count as well.
    """
    parts = set(getattr(manifest, "random_weights", None) or ())
    if manifest.demo:
        parts |= {"backbone", "upsampler"}
    if manifest.backbone.weights == "random":
        parts.add("backbone")
    if manifest.upsampler is None:
        parts.discard("upsampler")
    elif manifest.upsampler.checkpoint_sha256 is None:
        parts.add("upsampler")
    return parts


def _backbone_part(manifest: Manifest) -> tuple[dict[str, str] | None, str]:
    """(front matter or None when the weights are random, sentence) for the backbone's weights."""
    backbone = manifest.backbone
    if "backbone" in untrained_parts(manifest):
        what = f"random weights (seed {backbone.seed})" if backbone.weights == "random" else "untrained weights"
        return None, (f"backbone: {backbone.timm_name} with {what}, no pretrained weights; nothing to license, "
                      "and the features are meaningless.")
    family = backbone_family(backbone.timm_name)
    source = "timm's pretrained weights" if backbone.weights == "hub" else f"the file {PurePath(backbone.weights).name}"
    if backbone.weights != "hub" and backbone_family(PurePath(backbone.weights).name) != family:
        family = None  # a local file that does not name the family may be anyone's weights
    if family is None:
        return _UNSURE, (f"backbone: {backbone.timm_name} with {source}; this card cannot tell their license. "
                         "Check the weights' source and set `license` above.")
    meta, sentence = BACKBONE_LICENSES[family]
    return meta, f"backbone: {backbone.timm_name} with {source}. {sentence}"


def _upsampler_part(manifest: Manifest) -> tuple[dict[str, str] | None, str] | None:
    """As :func:`_backbone_part` for the upsampler's weights; None for a backbone-only bundle."""
    upsampler = manifest.upsampler
    if upsampler is None:
        return None
    if "upsampler" in untrained_parts(manifest):
        return None, f"upsampler: {upsampler.kind}, untrained weights; nothing to license."
    known = UPSAMPLER_LICENSES.get((upsampler.kind, upsampler.checkpoint_format or ""))
    if known is not None:
        return known[0], f"upsampler: {known[1]}"
    if upsampler.checkpoint_format == "ours":
        return _UNSURE, (f"upsampler: {upsampler.kind} weights trained with `lift train`; their license is the "
                         "publisher's to choose (and may be bound by the backbone's): set `license` above.")
    return _UNSURE, f"upsampler: {upsampler.kind} weights of unknown origin; set `license` above."


def license_metadata(manifest: Manifest) -> tuple[dict[str, str], list[str]]:
    """The card's license front matter and one sentence per part (backbone, upsampler) plus the verdict.

    One license only when every licensed part agrees; DINOv3's terms govern a bundle whose other parts
    are under known permissive licenses; any part of unknown terms, or a mix, gives ``other``.
    """
    parts = [p for p in (_backbone_part(manifest), _upsampler_part(manifest)) if p is not None]
    sentences = [sentence for _, sentence in parts]
    licensed = [meta for meta, _ in parts if meta is not None]
    if not licensed:
        return dict(_UNSURE), [*sentences, "No pretrained weights are included; the graphs were made by "
                                           "lift-serve (MIT)."]
    if _UNSURE in licensed:
        return dict(_UNSURE), [*sentences, "At least one part's terms are not known to this card: `license: other` "
                                           "until the publisher sets it."]
    if _DINOV3_LICENSE in licensed:
        return dict(_DINOV3_LICENSE), [*sentences, "The DINOv3 License covers this bundle; the other parts' "
                                                   "licenses apply as well."]
    distinct = {json.dumps(meta, sort_keys=True) for meta in licensed}
    if len(distinct) == 1:
        return dict(licensed[0]), sentences
    return dict(_UNSURE), [*sentences, "The parts carry different licenses; all of them apply (`license: other`)."]


def _front_matter(manifest: Manifest, license_meta: dict[str, str]) -> str:
    # Strings as JSON strings: a JSON string is a valid YAML double-quoted scalar.
    tags = ["dense-features", "onnx", "vit"] + ([manifest.upsampler.kind] if manifest.upsampler else [])
    lines = ["---", "library_name: lift-serve"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in license_meta.items()]
    lines += ["pipeline_tag: image-feature-extraction", "tags:"] + [f"- {json.dumps(tag)}" for tag in tags]
    return "\n".join([*lines, "---", ""])


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _warnings(manifest: Manifest) -> list[str]:
    """Prominent notes for weights whose features mean nothing, and for an unchecked bundle."""
    notes, untrained = [], untrained_parts(manifest)
    if manifest.demo:
        notes.append("**Demo bundle (untrained weights): its features are meaningless; it exists to try the "
                     "service, not to use the features.**")
    elif "backbone" in untrained:
        seed = f" (seed {manifest.backbone.seed})" if manifest.backbone.weights == "random" else ""
        notes.append(f"**Random (untrained) backbone weights{seed}: the features are meaningless.**")
    if not manifest.demo and "upsampler" in untrained:
        notes.append("**Untrained upsampler weights: its denser features are meaningless.**")
    if not manifest.parity.checked:
        notes.append("**Parity was not measured at export: nothing below shows that the graphs match PyTorch.**")
    return [f"> {note}" for note in notes] + ([""] if notes else [])


def _model_section(manifest: Manifest) -> list[str]:
    backbone, upsampler = manifest.backbone, manifest.upsampler
    lines = ["## Model", "",
             f"- **Backbone**: `{backbone.timm_name}` (weights: {backbone.weights}), patch {backbone.patch_size}, "
             f"{manifest.output.channels} channels, layer {backbone.layer}, facet `{backbone.facet}` "
             f"({backbone.channel_layout} channels, position rule `{backbone.pos_interpolation}`)"]
    if backbone.model_kwargs:
        lines.append(f"- Backbone arguments: `{json.dumps(backbone.model_kwargs, sort_keys=True)}`")
    if upsampler is None:
        lines.append("- **Upsampler**: none (backbone features only)")
    else:
        checkpoint = (f"checkpoint sha256 `{upsampler.checkpoint_sha256}` ({upsampler.checkpoint_format})"
                      if upsampler.checkpoint_sha256 else "no checkpoint (untrained)")
        lines.append(f"- **Upsampler**: `{upsampler.kind}` {json.dumps(upsampler.parameters, sort_keys=True)}, "
                     f"{upsampler.scale_per_step}x per step, max steps {upsampler.max_steps}, {checkpoint}")
    sizes = ", ".join(f"{h}x{w}" for h, w in manifest.input.sizes)
    lines += [f"- **Input sizes** (height x width): {sizes}; `{manifest.input.name}` is {manifest.input.dtype} "
              f"{manifest.input.layout} {manifest.input.color}, normalised inside the graphs",
              f"- **Precision**: {manifest.onnx.precision} (features {manifest.output.dtype} "
              f"{manifest.output.layout}), ONNX opset {manifest.onnx.opset}", ""]
    rows = []
    for k in sorted(manifest.iterations):
        grids = ", ".join(f"{h // backbone.patch_size * 2**k}x{w // backbone.patch_size * 2**k}"
                          for h, w in manifest.input.sizes)
        rows.append([f"{k}{' (default)' if k == manifest.default_iterations else ''}", f"{manifest.stride(k):g}",
                     grids])
    return lines + ["Densities (stride = input pixels per feature cell):", "",
                    *_table(["iterations", "stride", "feature grid per input size"], rows), ""]


def _parity_section(manifest: Manifest) -> list[str]:
    parity = manifest.parity
    lines = ["## Parity", ""]
    if not parity.cases:
        return lines + ["No parity cases are recorded in the manifest.", ""]
    worst = "" if parity.min_cosine is None else (f" Worst case: max abs error {parity.max_abs_err:.3g}, "
                                                  f"min cosine {parity.min_cosine:.12g}.")
    lines += [f"{parity.runtime} against {parity.reference}, measured by `lift export`; every case had to reach a "
              f"per-cell cosine of {parity.min_cosine_required}.{worst}", ""]
    rows = [[case.graph, case.iterations, f"{case.size[0]}x{case.size[1]}", case.batch, f"{case.max_abs_err:.3g}",
             f"{case.min_cosine:.12g}"] for case in parity.cases]
    return lines + _table(["graph", "iterations", "size", "batch", "max_abs_err", "min_cosine"], rows) + [""]


def _files_section(manifest: Manifest) -> list[str]:
    rows = [[f"`{graph.file}`", role, f"`{graph.sha256}`"] for role, graph in manifest.graph_files().items()]
    return ["## Files", "", "`manifest.json` describes the graphs below; the service checks each sha256 before "
            "loading it.", "", *_table(["file", "role", "sha256"], rows), ""]


def _serve_section(manifest: Manifest, repo_id: str) -> list[str]:
    k = manifest.default_iterations
    return ["## Serve it", "", "With lift-serve installed (its `serve` extra), the service downloads the bundle "
            "from the Hub once and serves it from the cache:", "", "```bash",
            f"lift serve --bundle hf://{repo_id}        # {SERVICE_URL}",
            f"curl -s -F image=@cat.jpg '{SERVICE_URL}/v1/features?iterations={k}' -D - -o cat.npy",
            f"curl -s -F image=@cat.jpg '{SERVICE_URL}/v1/similarity?x=120&y=80' -o heat.png",
            "```", ""]


def _made_section(manifest: Manifest) -> list[str]:
    onnx = manifest.onnx
    return ["## How it was made", "",
            f"`lift export` (lift-serve) on {manifest.created}: bundle format {manifest.format_version}, exported "
            f"with {onnx.exporter}, torch {onnx.torch_version}, ONNX opset {onnx.opset}.", ""]


def model_card(manifest: Manifest, repo_id: str) -> str:
    """README.md for ``repo_id`` holding the bundle described by ``manifest``: YAML front matter
    (library, license, tags) and a body that says what the features are, how well the graphs match
    PyTorch, and how to serve them."""
    license_meta, license_sentences = license_metadata(manifest)
    backbone = manifest.backbone
    how = ("the backbone graph runs once per image and each upsampler step doubles the feature density"
           if manifest.upsampler else "backbone features only, one graph run per image")
    upsampler = f" and the `{manifest.upsampler.kind}` upsampler" if manifest.upsampler else ""
    lines = [_front_matter(manifest, license_meta), f"# {repo_id.split('/')[-1]}", "",
             *_warnings(manifest),
             f"Dense ViT features from `{backbone.timm_name}`{upsampler}, as a lift-serve ONNX bundle: {how}.", "",
             *_model_section(manifest), *_parity_section(manifest), *_files_section(manifest),
             *_serve_section(manifest, repo_id), *_made_section(manifest),
             "## License", "", *[f"- {s}" for s in license_sentences], ""]
    return "\n".join(lines)
