"""LiFT checkpoints: ours (safetensors + JSON sidecar) and the authors' plain ``.pth`` state dicts.

Our format is two files side by side::

    lift.safetensors   the LiFT state dict
    lift.json          CheckpointMeta: backbone spec, channels, patch, mean/std, training facts,
                       and the sha256 of the .safetensors file

The sidecar carries everything needed to rebuild the backbone the weights belong to (timm name,
weights source, seed if random, block, facet), so export never re-guesses it.

The authors' checkpoints are plain state dicts of their ``LiFT`` module, sometimes saved from
``DataParallel`` with a ``module.`` prefix; they say nothing about the backbone, which the user
therefore names. They were trained on the ``interleaved`` facet channel layout
(``model.backbone``), which is what a spec without an explicit layout gets for them.

Sidecars record the backbone spec, including its ``channel_layout`` and ``pos_interpolation``;
a sidecar written before those fields existed is read with their old meanings
(``BackboneSpec.from_stored``), so its weights give exactly the features they gave. No weights are
converted: a layout is a property of what the LiFT was trained on, recorded beside it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from lift_serve.bundle import sha256_file
from lift_serve.model.lift import LiFT
from torch import nn

FORMAT_VERSION = 2  # 2: the backbone spec records channel_layout and pos_interpolation
AUTHORS_CHANNEL_LAYOUT = "interleaved"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit; the message names expected vs found."""

    user_facing = True


@dataclasses.dataclass
class CheckpointMeta:
    backbone: dict[str, Any]
    channels: int
    patch_size: int
    mean: list[float]
    std: list[float]
    image_size: int | None = None
    epochs: int | None = None
    steps: int | None = None
    loss: str | None = None
    sha256: str | None = None
    upsampler: str = "lift"  # registry kind (model.upsampler); sidecars before it were LiFT
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = required - set(data)
        if missing:
            raise CheckpointError(f"checkpoint sidecar lacks fields {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def sidecar_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def is_ours(path: str | Path) -> bool:
    """Our format: a ``.safetensors`` file with its sidecar. Anything else is an authors' file (the
    LiFT authors' ``.pth``, the UPLiFT authors' released ``.safetensors``), which records no backbone."""
    path = Path(path)
    return path.suffix == ".safetensors" and sidecar_path(path).is_file()


def authors_kind(state: dict) -> str:
    """Which upsampler an authors' state dict is: UPLiFT's has an attender, LiFT's does not."""
    return "uplift" if any(k.removeprefix("module.").startswith("attender.") for k in state) else "lift"


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix that DataParallel/DDP adds to every key."""
    return {(k.removeprefix("module.")): v for k, v in state.items()}


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly; on any mismatch raise naming each key with expected vs found.

    ``num_batches_tracked`` buffers may be absent (older exports drop them); everything else must match.
    """
    expected = module.state_dict()
    problems = []
    for key, tensor in expected.items():
        if key not in state:
            if not key.endswith("num_batches_tracked"):
                problems.append(f"missing key {key} (expected shape {tuple(tensor.shape)})")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(
                f"{key}: expected shape {tuple(tensor.shape)}, found {tuple(state[key].shape)}"
            )
    problems += [f"unexpected key {key} (shape {tuple(state[key].shape)})" for key in state if key not in expected]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(
            f"{source} does not fit LiFT({module.in_channels}, {module.patch_size}): {shown}. "
            "Check that the checkpoint was trained for this backbone (channels and patch size)."
        )
    module.load_state_dict(state, strict=False)


def save_lift_checkpoint(path: str | Path, lift: LiFT, meta: CheckpointMeta) -> Path:
    """Write ``path`` (.safetensors) and its .json sidecar; returns the weights path.

    Files are written to temporary names and renamed, so an interrupted save never leaves a
    half-written checkpoint under the final name.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in strip_module_prefix(lift.state_dict()).items()}
    save_file(state, str(tmp))
    meta = dataclasses.replace(meta, sha256=sha256_file(tmp), channels=lift.in_channels,
                               patch_size=lift.patch_size)
    side_tmp = sidecar_path(path).with_name(sidecar_path(path).name + ".tmp")
    side_tmp.write_text(json.dumps(meta.to_dict(), indent=2))
    tmp.replace(path)
    side_tmp.replace(sidecar_path(path))
    return path


def read_checkpoint_meta(path: str | Path) -> CheckpointMeta:
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(
            f"checkpoint sidecar {side} is missing; our checkpoints are a .safetensors file plus a .json "
            "file of the same name. For the authors' .pth checkpoints pass the .pth file and name the backbone."
        )
    try:
        data = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint sidecar {side} is not valid JSON: {exc}") from None
    return CheckpointMeta.from_dict(data)


def _build(kind: str, channels: int, patch_size: int):
    from lift_serve.model.upsampler import build_upsampler

    try:
        return build_upsampler(kind, {"in_channels": channels, "patch_size": patch_size})
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's upsampler cannot be built: {exc}") from None


def load_lift_checkpoint(
    path: str | Path, channels: int | None = None, patch_size: int | None = None
) -> tuple[LiFT, CheckpointMeta | None]:
    """Load a LiFT module from our checkpoint or the authors' ``.pth``.

    Args:
        path: ``*.safetensors`` with its sidecar (ours), or an authors' state dict: the LiFT
            authors' ``*.pth``, or the UPLiFT authors' released ``*.safetensors`` (no sidecar); the
            upsampler kind is told by its keys (:func:`authors_kind`).
        channels, patch_size: what the backbone produces. Required for ``.pth``; for ours, when
            given, they are checked against the sidecar.

    Returns:
        (lift in eval mode, meta or None for an authors' checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"LiFT checkpoint {path} does not exist; train one with `lift train`, or download the "
            "authors' .pth for your backbone, and pass its path"
        )
    if is_ours(path):
        from safetensors.torch import load_file

        meta = read_checkpoint_meta(path)
        actual = sha256_file(path)
        if meta.sha256 and meta.sha256 != actual:
            raise CheckpointError(
                f"{path} has sha256 {actual[:12]}… but its sidecar records {meta.sha256[:12]}…: the "
                "weights and sidecar do not belong together (partial copy?)"
            )
        for name, wanted, found in (("channels", channels, meta.channels), ("patch size", patch_size, meta.patch_size)):
            if wanted is not None and wanted != found:
                raise CheckpointError(f"checkpoint {path} is for {name} {found}, but the backbone has {wanted}")
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for damaged files
            raise CheckpointError(
                f"cannot read {path} as safetensors ({str(exc)[:200]}); the file is damaged: copy it "
                "again or re-train"
            ) from None
        lift = _build(meta.upsampler, meta.channels, meta.patch_size)
        load_state_dict_checked(lift, strip_module_prefix(state), str(path))
        return lift.eval(), meta
    if channels is None or patch_size is None:
        raise CheckpointError(
            f"{path} is an authors'-format state dict, which does not record its backbone; name the "
            "backbone (e.g. --backbone vit_small_patch16_224.dino) so channels and patch size are known"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # Not the reader's own text: torch's explains its weights_only option for a page.
        raise CheckpointError(f"cannot read {path} as a state dict (not a readable PyTorch or safetensors file: "
                              f"{type(exc).__name__}); pass a PyTorch .pth/.pt state dict or a .safetensors file"
                              ) from None
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} holds a {type(raw).__name__} that is not a state dict of tensors")
    lift = _build(authors_kind(raw), channels, patch_size)
    load_state_dict_checked(lift, strip_module_prefix(raw), str(path))
    return lift.eval(), None
