"""UPLiFT (Walmer et al., CVPR 2026): iterative 2x feature upsampling with a Local Attender.

Written from the paper and the behaviour of the authors' public code; submodule names follow
theirs, so their released state dicts (``uplift_dinov2-s14``, ``uplift_dinov3-splus16``, 72
tensors, 789,521 parameters for 384 channels) load unchanged. Both releases are this network:

* **Image encoder**, run once per image: five ``SingleConv`` blocks (3x3 conv without bias, BN,
  ReLU, 1x1 conv with bias, plus a parameter-free skip) 3 -> 16 -> 32 -> 64 -> 128 -> 128, all at the
  image's resolution. For a patch size other than 16 the image is first resized bilinearly to 16
  pixels a feature cell (patch 14: 224 -> 256), so both releases see 16 encoder pixels a cell. Only
  the last two levels (E3, E4) are used.
* **Decoder step** on features ``x`` ``[B, C, h, w]``: ``[x, E4 at h x w]`` -> ``DoubleConv`` 512 ->
  64 -> 64; a 2x2/2 transposed conv plus a bilinear (``align_corners=True``) 2x skip; ``[that, E3 at
  2h x 2w]`` -> ``DoubleConv`` 192 -> 64 -> 64: the guide. Encoder maps reach each grid by nearest
  sampling (PyTorch's ``nearest``: the top-left pixel of each block at integer ratios).
* **Local Attender**: logits = 1x1 conv (64 -> 17) of the guide plus its first 17 channels; a
  softmax over the 17; each output cell is that convex combination of 17 cells of the step's
  *input* features around its parent cell (the 3x3 neighbourhood and the 3x3 at dilation 2),
  borders replicated. So every output is a mix of the backbone's own vectors: iterating does not
  drift away from them.

The skips of ``SingleConv``/``DoubleConv`` need no weights: equal channels are added, more
channels are cut to the first ones, fewer are zero-padded at the end (the authors' rule).

Iteration (``step``): each step doubles the grid; step ``k + 1`` takes step ``k``'s output as
input and as the attender's values; the encoder maps are shared. With patch 16, 4 steps reach
the image's pixels; with patch 14 they reach 16/14 of them and :func:`resize_features` (bilinear,
antialiased, as the authors' ``outsize``) gives any exact size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_CHANNELS = (16, 32, 64, 128, 128)
DECODER_CHANNELS = 64
ENCODER_PIXELS_PER_CELL = 16
# (row, column) offsets in low-resolution cells, in the order of the attender's 17 logits.
ATTENDER_OFFSETS = ((-2, -2), (-2, 0), (-2, 2), (-1, -1), (-1, 0), (-1, 1), (0, -2), (0, -1), (0, 0),
                    (0, 1), (0, 2), (1, -1), (1, 0), (1, 1), (2, -2), (2, 0), (2, 2))
ATTENDER_PAD = 2


def channel_skip(skip: torch.Tensor, channels: int) -> torch.Tensor:
    """``skip`` brought to ``channels`` without weights: cut to its first ones, or zero-padded at the end."""
    have = skip.shape[1]
    if have >= channels:
        return skip[:, :channels]
    return F.pad(skip, (0, 0, 0, 0, 0, channels - have))


class _Block(nn.Module):
    """A conv stack ``conv`` (an ``nn.Sequential``) plus the parameter-free channel skip."""

    def __init__(self, layers: list[nn.Module], out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + channel_skip(x, self.out_channels)


def single_conv(in_channels: int, out_channels: int) -> _Block:
    return _Block([nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                   nn.ReLU(inplace=True), nn.Conv2d(out_channels, out_channels, 1)], out_channels)


def double_conv(in_channels: int, out_channels: int) -> _Block:
    return _Block([nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                   nn.ReLU(inplace=True),
                   nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                   nn.ReLU(inplace=True), nn.Conv2d(out_channels, out_channels, 1)], out_channels)


class _Group(nn.Module):
    """One configured block group (state-dict level ``blocks.0``: the authors' groups hold a list)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _Up(nn.Module):
    """2x: a 2x2/2 transposed conv plus the bilinear (``align_corners=True``) upsampled input."""

    def __init__(self, channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x) + F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class UPLiFTEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        channels = (3, *ENCODER_CHANNELS)
        for level in range(len(ENCODER_CHANNELS)):
            self.add_module(f"block_{level}", _Group(single_conv(channels[level], channels[level + 1])))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        levels, x = [], image
        for level in range(len(ENCODER_CHANNELS)):
            x = getattr(self, f"block_{level}")(x)
            levels.append(x)
        return levels


class UPLiFTDecoder(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.block_0 = _Group(double_conv(in_channels + ENCODER_CHANNELS[4], DECODER_CHANNELS))
        self.up_1 = _Up(DECODER_CHANNELS)
        self.block_1 = _Group(double_conv(DECODER_CHANNELS + ENCODER_CHANNELS[3], DECODER_CHANNELS))

    def forward(self, x: torch.Tensor, e3: torch.Tensor, e4: torch.Tensor) -> torch.Tensor:
        """The guide ``[B, 64, 2h, 2w]`` for features ``x`` ``[B, C, h, w]``."""
        h, w = x.shape[-2:]
        z = self.block_0(torch.cat([x, F.interpolate(e4, size=(h, w), mode="nearest")], dim=1))
        z = self.up_1(z)
        return self.block_1(torch.cat([z, F.interpolate(e3, size=(2 * h, 2 * w), mode="nearest")], dim=1))


class LocalAttender(nn.Module):
    def __init__(self, guide_channels: int = DECODER_CHANNELS):
        super().__init__()
        self.conv1 = nn.Conv2d(guide_channels, len(ATTENDER_OFFSETS), 1)

    def weights(self, guide: torch.Tensor) -> torch.Tensor:
        """``[B, 17, H, W]`` softmax weights of the neighbours, per output cell."""
        logits = self.conv1(guide) + channel_skip(guide, len(ATTENDER_OFFSETS))
        return logits.softmax(dim=1)

    def forward(self, guide: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Each cell of the ``2h x 2w`` output: its softmax mix of the 17 neighbours of its parent
        cell in ``values`` ``[B, C, h, w]``. Computed on the ``[h, 2, w, 2]`` view of the output,
        so that no upsampled copy of the values is made: memory is the output plus the weights."""
        b, c, h, w = values.shape
        weights = self.weights(guide).reshape(b, len(ATTENDER_OFFSETS), h, 2, w, 2)
        padded = F.pad(values, (ATTENDER_PAD,) * 4, mode="replicate")
        shifted = [padded[:, :, ATTENDER_PAD + dy: ATTENDER_PAD + dy + h, ATTENDER_PAD + dx: ATTENDER_PAD + dx + w]
                   for dy, dx in ATTENDER_OFFSETS]
        if torch.onnx.is_in_onnx_export():
            return self._exportable(shifted, weights).reshape(b, c, 2 * h, 2 * w)
        out = None
        for index, neighbour in enumerate(shifted):
            neighbour, weight = neighbour[:, :, :, None, :, None], weights[:, index: index + 1]
            # accumulate in place: one output-sized tensor, not a new one per neighbour
            out = neighbour * weight if out is None else out.addcmul_(neighbour, weight)
        return out.reshape(b, c, 2 * h, 2 * w)

    @staticmethod
    def _exportable(shifted: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """The same sums for the ONNX graph, ``[B, C, h, 2, w, 2]``: one ``[B, C, h, w]`` accumulator
        per sub-cell position, then two stacks. An exported in-place accumulation into the strided
        view becomes scatters whose temporaries ONNX Runtime keeps alive together (7 GB for one
        448 x 448 pixel-dense step); this keeps the step's memory a few times its output."""
        rows = []
        for y in (0, 1):
            columns = []
            for x in (0, 1):
                acc = None
                for index, neighbour in enumerate(shifted):
                    term = neighbour * weights[:, index: index + 1, :, y, :, x]
                    acc = term if acc is None else acc + term
                columns.append(acc)
            rows.append(torch.stack(columns, dim=-1))  # [B, C, h, w, 2]
        return torch.stack(rows, dim=3)  # [B, C, h, 2, w, 2]


class UPLiFT(nn.Module):
    """UPLiFT for ``in_channels``-channel features of a ViT with ``patch_size`` (released: 384, 14 or 16)."""

    kind = "uplift"

    def __init__(self, in_channels: int, patch_size: int):
        super().__init__()
        if in_channels < DECODER_CHANNELS:
            raise ValueError(f"UPLiFT needs at least {DECODER_CHANNELS} feature channels, got {in_channels}")
        if not 1 <= patch_size <= 64:
            raise ValueError(f"UPLiFT needs a patch size between 1 and 64, got {patch_size}")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.encoder = UPLiFTEncoder()
        self.decoder = UPLiFTDecoder(in_channels)
        self.attender = LocalAttender()

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "patch_size": self.patch_size}

    @staticmethod
    def state_layout(patch_size: int) -> tuple[int, int, bool]:
        """The step state (encoder levels 3 and 4): 256 channels, 16 pixels a backbone cell, the
        same for every round."""
        return ENCODER_CHANNELS[3] + ENCODER_CHANNELS[4], ENCODER_PIXELS_PER_CELL, False

    def encoder_image(self, image: torch.Tensor) -> torch.Tensor:
        """The image at 16 pixels a cell (bilinear; unchanged for patch 16)."""
        if self.patch_size == ENCODER_PIXELS_PER_CELL:
            return image
        h, w = image.shape[-2:]
        size = (h * ENCODER_PIXELS_PER_CELL // self.patch_size, w * ENCODER_PIXELS_PER_CELL // self.patch_size)
        return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """Per-image state: encoder levels 3 and 4 ``[B, 256, 16h, 16w]``, computed once."""
        levels = self.encoder(self.encoder_image(image))
        return torch.cat([levels[3], levels[4]], dim=1)

    def step(self, state: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One 2x round; the encoder state is shared by every round."""
        e3, e4 = state[:, : ENCODER_CHANNELS[3]], state[:, ENCODER_CHANNELS[3]:]
        guide = self.decoder(features, e3, e4)
        return state, self.attender(guide, features)

    def forward(self, image: torch.Tensor, features: torch.Tensor, steps: int = 1) -> torch.Tensor:
        state = self.prepare(image)
        for _ in range(steps):
            state, features = self.step(state, features)
        return features


def resize_features(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Features at an exact ``(height, width)``: bilinear, antialiased (the authors' ``outsize``)."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False, antialias=True)
