"""Which grid a request asks for: ``iterations`` upsampler steps, or an explicit ``stride`` (input
pixels per cell) resolved to the steps that reach it and, between the bundle's own strides, a
resampling to exactly that stride. Shared by the service (:mod:`.features`) and ``lift extract``.
"""

from __future__ import annotations

import math

from lift_serve.service.cache import Density
from lift_serve.service.errors import ServiceError

_TOLERANCE = 1e-6


def _whole(value: float) -> bool:
    return abs(value - round(value)) <= _TOLERANCE * max(1.0, abs(value))


def offered_iterations(runtime, requested: int | None) -> int:
    """``requested`` if the bundle has graphs for it (422 otherwise); None = the bundle's default."""
    if requested is None:
        return runtime.default_iterations
    if requested not in runtime.iterations:
        raise ServiceError(422, "invalid_parameter",
                           f"iterations={requested} is not offered by this bundle; choose one of "
                           f"{runtime.iterations} (see GET /v1/models)")
    return requested


def check_one_density(iterations: int | None, stride: float | None) -> None:
    if iterations is not None and stride is not None:
        raise ServiceError(422, "conflicting_parameters", "send either iterations or stride, not both: "
                           "stride is input pixels per feature cell, iterations the upsampler steps behind it")


def resolve_density(runtime, iterations: int | None, stride: float | None, input_size: tuple[int, int]) -> Density:
    """The density asked for by ``iterations`` or by an explicit ``stride`` (input pixels per
    cell) for a model input of ``input_size`` (height, width); neither = the bundle's default.

    A stride equal to an offered density's is that density. Another stride between the finest
    and the coarsest offered runs the steps of the first density at least as fine and resamples
    to exactly that stride, which must give whole cells on both sides of the input (422 else).
    """
    check_one_density(iterations, stride)
    if stride is None:
        return Density(offered_iterations(runtime, iterations))
    if not (math.isfinite(stride) and stride > 0):
        raise ServiceError(422, "invalid_parameter", f"stride={stride!r} must be a positive number of input "
                           "pixels per feature cell, e.g. 1 for pixel-dense features")
    height, width = input_size
    native = {k: runtime.stride(k) for k in runtime.iterations}
    finest, coarsest = min(native.values()), max(native.values())
    offered = ", ".join(f"{v:g}" for v in sorted(native.values(), reverse=True))
    if stride < finest * (1 - _TOLERANCE) or stride > coarsest * (1 + _TOLERANCE):
        raise ServiceError(422, "invalid_parameter",
                           f"stride={stride:g} is outside this bundle's range: from {coarsest:g} (backbone grid) "
                           f"to {finest:g} input pixels per cell (its densities: {offered})")
    for k, value in sorted(native.items()):
        if abs(value - stride) <= _TOLERANCE * value:
            return Density(k)
    if not (_whole(height / stride) and _whole(width / stride)):
        raise ServiceError(422, "invalid_parameter",
                           f"stride={stride:g} does not give whole cells on the {height}x{width} model input "
                           f"({height / stride:.4g} x {width / stride:.4g}); choose a stride that divides both "
                           f"sides, e.g. one of the bundle's own ({offered})")
    k = min(k for k, value in native.items() if value <= stride)
    return Density(k, float(stride))
