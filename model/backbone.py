"""A frozen timm backbone (VisionTransformer: DINO v1, DINOv2; Eva: DINOv3): dense features of one
block and facet.

Facets follow the usage of dense-ViT-feature work (and the LiFT authors, who use DINO's last-block
``key``): ``query``/``key``/``value`` are the thirds of ``attn.qkv(norm1(x))`` of the chosen block;
``token`` is that block's output. Prefix tokens (CLS, registers) are dropped and the patch tokens
are laid out as a map.

Two choices decide whether a LiFT trained elsewhere sees the features it was trained on:

* ``channel_layout`` of a query/key/value facet. ``interleaved`` (the default) is the LiFT
  authors' order, inherited from dino-vit-features: the facet ``[B, heads, T, head_dim]`` is
  flattened as ``.permute(0, 2, 3, 1).flatten(-2)``, so channel ``c = d * heads + h`` (head_dim
  major, heads interleaved). ``concatenated`` is timm's own order, ``c = h * head_dim + d`` (heads
  side by side), which this project used before the layout was recorded: checkpoints and bundles
  that do not record a layout are read as ``concatenated`` (:meth:`BackboneSpec.from_stored`), so
  they keep giving exactly the features they gave. ``token`` has no head structure; its layout is
  recorded but means nothing.
* ``pos_interpolation``: how the position embeddings reach a grid other than the native one.
  ``dino`` is DINO's ``interpolate_pos_encoding`` (which the LiFT authors run): bicubic with
  ``scale_factor = (grid + 0.1) / native``, no antialiasing, and the embeddings untouched at the
  native square grid. ``timm`` is timm's ``resample_abs_pos_embed`` (bicubic to the exact size,
  antialiased). ``auto`` (the default) picks ``dino`` for DINO v1 releases (a timm name tagged
  ``.dino`` or a weights file named ``dino_*``) and ``timm`` otherwise; stored specs without the
  field are read as ``timm``.

Weights come from one of three sources, recorded in :class:`BackboneSpec` so that training, export
and serving rebuild the identical network:

* ``hub``: timm's pretrained weights for ``name`` (needs the Hugging Face hub or its local cache);
* a path to a local file: a timm state dict (``.safetensors``/``.pth``) or an original DINO
  checkpoint (``teacher``/``student``/``module.``/``backbone.`` wrappers are unwrapped, and timm's
  own ``checkpoint_filter_fn`` maps the rest);
* ``random``: timm's initialisation under ``torch.manual_seed(seed)``; tests and demos use this.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FACETS = ("key", "query", "value", "token", "token_norm")
QKV_FACETS = ("query", "key", "value")
DEFAULT_BACKBONE = "vit_small_patch16_224.dino"
CHANNEL_LAYOUTS = ("interleaved", "concatenated")
POS_INTERPOLATIONS = ("dino", "timm")
# What a spec stored before these fields existed meant: features must not change when it is re-read.
LEGACY_FIELDS = {"channel_layout": "concatenated", "pos_interpolation": "timm"}


class BackboneError(ValueError):
    """A backbone cannot be built as asked; the message says why and what to do."""

    user_facing = True


@dataclasses.dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone bit-for-bit.

    Attributes:
        name: timm model name, optionally with a pretrained tag (``vit_small_patch16_224.dino``).
        weights: ``"hub"``, ``"random"`` or a path to a local weights file.
        seed: RNG seed used when ``weights == "random"``.
        layer: block index whose features are returned; negative counts from the end (-1 = last).
        facet: one of ``key``, ``query``, ``value``, ``token``, ``token_norm``; None: the family's
            default (:func:`default_facet`).
        model_kwargs: extra ``timm.create_model`` keyword arguments (e.g. ``depth`` and
            ``embed_dim`` for the tiny test models).
        channel_layout: ``interleaved`` (the LiFT authors' order) or ``concatenated`` (timm's) for
            the query/key/value facets; see the module docstring. None: the LiFT checkpoint's
            layout (decided in ``model.factory``), else ``interleaved``.
        pos_interpolation: ``dino``, ``timm`` or ``auto`` (resolved when the backbone is built).
    """

    name: str = DEFAULT_BACKBONE
    weights: str = "hub"
    seed: int = 0
    layer: int = -1
    facet: str | None = None
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    channel_layout: str | None = "interleaved"
    pos_interpolation: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        """A spec from its fields; absent fields take today's defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BackboneError(f"unknown backbone fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        spec = cls(**data)
        spec.check_choices()
        return spec

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> BackboneSpec:
        """A spec read back from a checkpoint sidecar or a bundle: fields it predates take the
        meaning they had then (:data:`LEGACY_FIELDS`), so old files give the same features."""
        return cls.from_dict({**LEGACY_FIELDS, **data})

    def check_choices(self) -> None:
        if self.facet not in (*FACETS, None):
            raise BackboneError(f"facet must be one of {FACETS}, got {self.facet!r}")
        if self.channel_layout not in (*CHANNEL_LAYOUTS, None):
            raise BackboneError(f"channel_layout must be one of {CHANNEL_LAYOUTS}, got {self.channel_layout!r}")
        if self.pos_interpolation not in (*POS_INTERPOLATIONS, "auto"):
            raise BackboneError(
                f"pos_interpolation must be one of {(*POS_INTERPOLATIONS, 'auto')}, got {self.pos_interpolation!r}"
            )

    def resolved(self) -> BackboneSpec:
        """This spec with ``pos_interpolation='auto'`` replaced by the rule it stands for, and an
        unset ``channel_layout`` (None: "the checkpoint's", decided by the factory) by the default."""
        self.check_choices()
        spec = self
        if spec.facet is None:
            spec = dataclasses.replace(spec, facet=default_facet(spec.name))
        if spec.channel_layout is None:
            spec = dataclasses.replace(spec, channel_layout="interleaved")
        if spec.pos_interpolation == "auto":
            spec = dataclasses.replace(spec, pos_interpolation="dino" if is_dino_v1_release(spec) else "timm")
        return spec


def default_facet(name: str) -> str:
    """The facet used when none is asked for: DINOv2 and DINOv3 (``*dinov2*``, ``*dinov3*`` timm
    names) give their normalised last-block patch tokens, what their users and UPLiFT take;
    everything else, DINO v1 first, gives the ``key`` facet the LiFT paper uses."""
    base = name.partition(".")[0]
    return "token_norm" if "dinov2" in base or "dinov3" in base else "key"


def is_dino_v1_release(spec: BackboneSpec) -> bool:
    """A DINO v1 release: timm's ``.dino`` pretrained tag, or an original DINO file (``dino_*.pth``
    as published, e.g. ``dino_deitsmall16_pretrain.pth``)."""
    tag = spec.name.partition(".")[2]
    if tag == "dino":
        return True
    if spec.weights not in ("hub", "random"):
        return Path(os.path.expanduser(spec.weights)).name.lower().startswith("dino_")
    return False


def _create_timm_model(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    import timm

    kwargs = dict(spec.model_kwargs)
    kwargs.setdefault("num_classes", 0)
    kwargs["dynamic_img_size"] = True
    try:
        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise BackboneError(f"timm has no model named {spec.name!r}: {exc}") from None
        raise
    except TypeError as exc:
        # timm passes every keyword to the model class: an unknown --backbone-kwargs entry, or a
        # model that is not a VisionTransformer (no dynamic_img_size), lands here.
        raise BackboneError(
            f"timm cannot build {spec.name!r} with arguments {kwargs}: {exc}. The backbone must be a timm "
            "VisionTransformer or Eva, and --backbone-kwargs may only hold arguments its constructor accepts"
        ) from None


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the ViT state dict inside a timm or original-DINO checkpoint."""
    for key in ("teacher", "model", "state_dict", "student"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError("the weights file holds no state dict of tensors")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if key.startswith("head."):
            continue  # classifier or DINO projection head: not part of the feature extractor
        state[key] = value
    return state


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local timm or DINO weights file into ``model``, or raise naming the mismatch.

    The file may hold timm's keys or an original release's (DINO v1 ``teacher``/``module.``
    wrappers; DINOv2's ``register_tokens``; DINOv3's ``storage_tokens`` and rope layout): timm's own
    ``checkpoint_filter_fn`` of the model's family maps those to timm's.
    """
    from timm.models import eva, vision_transformer

    checkpoint_filter_fn = (eva.checkpoint_filter_fn if isinstance(model, eva.Eva)
                            else vision_transformer.checkpoint_filter_fn)

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors each raise their own types for a bad file
        raise BackboneError(
            f"cannot read backbone weights file {path} ({type(exc).__name__}: {str(exc)[:200]}); pass "
            "--backbone-weights with a timm state dict (.pth/.safetensors) or an original DINO checkpoint"
        ) from None
    state = checkpoint_filter_fn(_unwrap_state_dict(raw), model)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = model.state_dict()
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(v.shape)}"
             for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise BackboneError(
            f"weights file {path} does not fit backbone {model.default_cfg.get('architecture')} "
            f"({len(wrong)} tensors differ in shape: {'; '.join(wrong[:4])}); check --backbone and "
            "--backbone-kwargs against the weights"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"weights file {path} does not fit backbone {model.default_cfg.get('architecture')}: "
            f"missing keys {missing[:8]}, unexpected keys {list(result.unexpected_keys)[:8]}"
        )


def build_vit(spec: BackboneSpec) -> nn.Module:
    """Create the timm ViT described by ``spec`` with its weights loaded."""
    if spec.weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            return _create_timm_model(spec, pretrained=False)
    if spec.weights == "hub":
        from lift_serve.hub.refs import cache_only_when_unreachable

        with cache_only_when_unreachable() as cache_only:
            try:
                return _create_timm_model(spec, pretrained=True)
            except BackboneError:
                raise
            except Exception as exc:  # network, hub cache or auth failures surface as many types
                where = "the Hugging Face cache (the Hub does not answer)" if cache_only else \
                    "the timm/Hugging Face hub"
                raise BackboneError(
                    f"could not obtain pretrained weights for {spec.name!r} from {where} "
                    f"({type(exc).__name__}: {str(exc)[:200]}). Point at a local copy with "
                    "--backbone-weights PATH or hf://ORG/NAME/FILE (a timm state dict or the original DINO "
                    "checkpoint), or pre-populate the Hugging Face cache (HF_HOME) on a machine with internet "
                    "access."
                ) from None
    from lift_serve.hub.refs import is_hub_ref, resolve_file

    path = resolve_file(spec.weights) if is_hub_ref(spec.weights) else Path(os.path.expanduser(spec.weights))
    if not path.is_file():
        raise BackboneError(
            f"backbone weights file {path} does not exist; pass --backbone-weights with the path of "
            "a timm state dict or original DINO checkpoint, 'hub' for timm's pretrained weights, or "
            "'random' for an untrained network"
        )
    model = _create_timm_model(spec, pretrained=False)
    load_weights_file(model, path)
    return model


class TimmBackbone(nn.Module):
    """Frozen timm network returning ``[B, C, H/P, W/P]`` features of one block and facet, through
    timm's public ``forward_intermediates()``; a family subclass says which networks it takes and
    how a block's attention projects its input into query/key/value.

    * ``token``: the block's output (``forward_intermediates(indices=[layer])``);
    * ``token_norm``: the same through the network's final norm (``norm=True``): for the last
      block, what DINOv2/DINOv3 users call the patch features;
    * ``query``/``key``/``value``: the block's attention input, ``norm1`` of the previous block's
      output tokens (``forward_intermediates(indices=[layer - 1])``, prefix tokens included; for
      block 0 a forward pre-hook on its attention takes it), projected by the family's ``_qkv``.
      The chosen block itself is not run (except block 0). Prefix tokens (CLS, registers) are dropped in every facet.

    The network is kept in eval mode with gradients off: LiFT is always trained against a fixed
    backbone, and BatchNorm-free ViTs behave identically in eval mode.
    """

    def __init__(self, vit: nn.Module, spec: BackboneSpec):
        super().__init__()
        spec = spec.resolved()
        depth = len(vit.blocks)
        if not -depth <= spec.layer < depth:
            raise BackboneError(f"layer {spec.layer} is out of range for a {depth}-block ViT")
        patch = vit.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise BackboneError(f"only square patches are supported, got {patch}")
        self.vit = vit.eval().requires_grad_(False)
        self.spec = spec
        self.layer_index = spec.layer % depth
        self.facet = spec.facet
        self.patch_size = int(patch[0])
        self.embed_dim = int(vit.embed_dim)
        cfg = getattr(vit, "pretrained_cfg", None) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
        self.num_heads = int(vit.blocks[self.layer_index].attn.num_heads)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 0))
        self.channel_layout = spec.channel_layout
        self.pos_interpolation = spec.pos_interpolation
        self._captured: torch.Tensor | None = None
        if self.facet in QKV_FACETS and self.layer_index == 0:
            vit.blocks[0].attn.register_forward_pre_hook(self._capture_attention_input)

    @classmethod
    def from_spec(cls, spec: BackboneSpec) -> TimmBackbone:
        return cls(build_vit(spec), spec)

    @staticmethod
    def accepts(network: nn.Module) -> bool:
        raise NotImplementedError

    def _qkv(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, 3C]`` query|key|value of attention input ``x``, channels (third, head, dim)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> TimmBackbone:
        # Always frozen: switching the parent module to train mode must not touch the ViT.
        super().train(False)
        return self

    def check_image_size(self, height: int, width: int) -> None:
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"image sides must be multiples of the patch size {p}, got {height}x{width}; "
                f"resize or pad to {-(-height // p) * p}x{-(-width // p) * p}"
            )

    def _capture_attention_input(self, module: nn.Module, args: tuple) -> None:
        self._captured = args[0]

    def _qk_normed(self, attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
        """Apply the attention's per-head query/key norms (identity in DINO v1/v2/v3) as it does."""
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if all(n is None or isinstance(n, nn.Identity) for n in (q_norm, k_norm)):
            return qkv
        b, n, _ = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).unbind(2)
        return torch.stack([q_norm(q), k_norm(k), v], dim=2).reshape(b, n, -1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Dense features.

        Args:
            image: [B,3,H,W] normalised image, H and W multiples of the patch size P.

        Returns:
            [B,C,H/P,W/P] features of block ``layer_index`` and facet ``facet``.
        """
        b, _, h, w = image.shape
        if not torch.compiler.is_compiling() and isinstance(h, int):
            self.check_image_size(h, w)
        options = dict(indices=[self.layer_index], stop_early=True, output_fmt="NCHW", intermediates_only=True)
        if self.facet not in QKV_FACETS:
            return self.vit.forward_intermediates(image, norm=self.facet == "token_norm", **options)[0]
        block = self.vit.blocks[self.layer_index]
        if self.layer_index == 0:
            # Block 0's attention input, taken by the hook; block 0 runs to its end, unused (an
            # exception from the hook would stop it, but torch.export cannot follow that).
            self.vit.forward_intermediates(image, **options)
            x, self._captured = self._captured, None
        else:
            # The previous block's output tokens, prefix tokens included, then this block's norm1:
            # the chosen block's MLP and attention are never run.
            previous = dict(options, indices=[self.layer_index - 1], output_fmt="NLC")
            if self.num_prefix_tokens:
                spatial, prefix = self.vit.forward_intermediates(image, return_prefix_tokens=True, **previous)[0]
                tokens = torch.cat([prefix, spatial], dim=1)
            else:
                tokens = self.vit.forward_intermediates(image, **previous)[0]
            x = block.norm1(tokens)
        attn = block.attn
        qkv = self._qk_normed(attn, self._qkv(attn, x))
        third = QKV_FACETS.index(self.facet)
        x = qkv[..., third * self.embed_dim : (third + 1) * self.embed_dim]
        if self.channel_layout == "interleaved":
            n = x.shape[1]
            heads = self.num_heads
            x = x.reshape(b, n, heads, self.embed_dim // heads).transpose(2, 3).reshape(b, n, self.embed_dim)
        x = x[:, self.num_prefix_tokens :]
        return x.transpose(1, 2).reshape(b, self.embed_dim, h // self.patch_size, w // self.patch_size)


class ViTBackbone(TimmBackbone):
    """timm ``VisionTransformer``: DINO v1, DINOv2 (with or without registers), and any other ViT.

    ``pos_interpolation='dino'`` replaces the network's ``_pos_embed`` (the step
    ``forward_intermediates`` calls) by :func:`dino_pos_embed` on this instance only.
    """

    def __init__(self, vit: nn.Module, spec: BackboneSpec):
        super().__init__(vit, spec)
        if self.pos_interpolation == "dino":
            check_dino_position_embedding(vit)
            vit._pos_embed = functools.partial(dino_pos_embed, vit)

    @staticmethod
    def accepts(network: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(network, VisionTransformer)

    def _qkv(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return attn.qkv(x)


class EvaBackbone(TimmBackbone):
    """timm ``Eva``: DINOv3 (rotary position embeddings, registers), EVA-02 and kin.

    Query and key are taken **before** the rotary embedding is applied. The rotation turns each
    channel pair by an angle that depends only on the token's position, so rotated keys of the same
    content at two places differ; the unrotated ones are the content descriptors that
    correspondence and upsampling want (and what a hook on the projection gives).
    """

    def __init__(self, vit: nn.Module, spec: BackboneSpec):
        super().__init__(vit, spec)
        if self.pos_interpolation == "dino":
            raise BackboneError("pos_interpolation 'dino' is for absolute position embeddings; an Eva network "
                                "uses rotary embeddings: choose --pos-interpolation timm (auto does)")

    @staticmethod
    def accepts(network: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(network, Eva)

    def _qkv(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # As EvaAttention.forward: one fused projection whose biases (if any) live outside it, or
        # three separate ones.
        if attn.qkv is not None:
            bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            return torch.nn.functional.linear(x, attn.qkv.weight, bias)
        return torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)


# -- DINO's position-embedding interpolation ----------------------------------------------------
# DINO's rule is a call of F.interpolate with a scale factor computed from the grid size. Written
# as two interpolation matrices instead, it is the same arithmetic (PyTorch's bicubic kernel:
# A = -0.75, half-pixel centres, clamped borders, the given scale not recomputed) but stays one
# graph for every input size when exported with dynamic height and width; the scale-factor call
# would be specialised to the example size by the exporter.
DINO_GRID_OFFSET = 0.1
CUBIC_A = -0.75


def check_dino_position_embedding(vit: nn.Module) -> None:
    pos = getattr(vit, "pos_embed", None)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    if pos is None or getattr(vit, "no_embed_class", False) or prefix != 1:
        raise BackboneError(
            "pos_interpolation 'dino' needs a DINO v1-style ViT (one class token with its own position "
            "embedding, no registers); choose --pos-interpolation timm for this backbone"
        )
    grid = pos.shape[1] - 1
    side = math.isqrt(grid)
    if side * side != grid:
        raise BackboneError(f"pos_interpolation 'dino' needs a square position grid, found {grid} positions")


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """PyTorch's bicubic coefficients for the taps at offsets -1, 0, 1, 2 from floor(source)."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _length_tensor(size, device: torch.device) -> torch.Tensor:
    """``size`` (an int, or a symbolic size under torch.export) as a float64 scalar tensor: arithmetic
    and comparisons on it stay in the graph instead of specialising the export to one size."""
    return torch.ones(size, device=device, dtype=torch.float64).sum()


def dino_resample_matrix(out_size, in_size: int, device: torch.device) -> torch.Tensor:
    """``[out_size, in_size]`` float32 matrix: DINO's bicubic resampling of one axis of the grid.

    Output position ``o`` samples source ``s = (o + 0.5) / scale - 0.5`` with
    ``scale = (out_size + 0.1) / in_size``; at ``out_size == in_size`` the caller decides whether
    DINO leaves the grid as it is (only when both axes are native).
    """
    dst = torch.arange(out_size, device=device, dtype=torch.float32)
    count = _length_tensor(out_size, device)
    step = (in_size / (count + DINO_GRID_OFFSET)).to(torch.float32)
    src = (dst + 0.5) * step - 0.5
    base = torch.floor(src)
    weights = _cubic_weights(src - base)
    columns = torch.arange(in_size, device=device)
    matrix = torch.zeros(dst.shape[0], in_size, device=device, dtype=torch.float32)
    for offset, weight in zip((-1, 0, 1, 2), weights, strict=True):
        tap = (base.long() + offset).clamp(0, in_size - 1)
        matrix = matrix + weight[:, None] * (tap[:, None] == columns[None, :]).to(torch.float32)
    return matrix


def dino_pos_embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``_pos_embed`` for ``[B, H, W, C]`` patch embeddings, with DINO's interpolation rule.

    Returns ``[B, 1 + H*W, C]``: the class token, then the patch tokens, position embeddings added.
    """
    b, h, w, c = x.shape
    pos = vit.pos_embed
    native = math.isqrt(pos.shape[1] - 1)
    grid = pos[0, 1:].reshape(native, native, c).permute(2, 0, 1).float()  # [C, n, n]
    rows = dino_resample_matrix(h, native, x.device)
    cols = dino_resample_matrix(w, native, x.device)
    # DINO returns its embeddings untouched when the grid is the native square; expressed as a
    # select on tensors so that an exported graph keeps both cases.
    eye_rows = (torch.arange(h, device=x.device)[:, None] == torch.arange(native, device=x.device)[None]).float()
    eye_cols = (torch.arange(w, device=x.device)[:, None] == torch.arange(native, device=x.device)[None]).float()
    is_native = (_length_tensor(h, x.device) == native) & (_length_tensor(w, x.device) == native)
    rows = torch.where(is_native, eye_rows, rows)
    cols = torch.where(is_native, eye_cols, cols)
    patch_pos = torch.einsum("hi,cij,wj->hwc", rows, grid, cols).reshape(1, h * w, c).to(pos.dtype)
    tokens = torch.cat([vit.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
    pos_full = torch.cat([pos[:, :1], patch_pos], dim=1)
    return vit.pos_drop(tokens + pos_full)


# -- the backbone registry ------------------------------------------------------------------------
# family -> wrapper class. A family wraps one kind of timm network (``accepts``) and returns
# ``[B, C, H/P, W/P]`` features of one block and facet. Adding a family (e.g. timm's Eva for DINOv3)
# is one class with ``accepts(network)`` and ``__init__(network, spec)`` plus one registration.
BACKBONE_FAMILIES: dict[str, type[nn.Module]] = {}


def register_backbone_family(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    BACKBONE_FAMILIES[name] = cls
    return cls


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """The frozen backbone ``spec`` describes, wrapped by the family that handles its network."""
    network = build_vit(spec)
    for cls in BACKBONE_FAMILIES.values():
        if cls.accepts(network):
            return cls(network, spec)
    raise BackboneError(
        f"timm's {spec.name!r} is a {type(network).__name__}, which no backbone family handles "
        f"(registered: {sorted(BACKBONE_FAMILIES)})"
    )


register_backbone_family("vit", ViTBackbone)
register_backbone_family("eva", EvaBackbone)
