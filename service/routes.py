"""HTTP routes: parse the request, call the feature pipeline, encode the answer.

Bodies are read by :func:`read_upload` (size cap, content type, empty body, unknown fields) rather
than by FastAPI's form machinery so that every failure gets the documented status and message; the
multipart schemas are still declared for ``/docs``. Unknown query parameters are refused (422) so a
typo such as ``?iteration=2`` is not silently ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from lift_serve.service.cache import FeatureEntry
from lift_serve.service.codec import ImageError, decode_image, encode_json, encode_npy, encode_png
from lift_serve.service.density import check_one_density
from lift_serve.service.errors import ServiceError, error_body
from lift_serve.service.features import FeatureService, request_of
from lift_serve.service.pca import pca_image, side_by_side
from lift_serve.service.predictor import DensePredictor, Matches
from lift_serve.service.render import colour_range, heatmap_png_image, match_png_image
from lift_serve.service.schemas import (
    FEATURE_HEADERS,
    MATCH_HEADERS,
    SIMILARITY_HEADERS,
    VISUALIZE_HEADERS,
    ErrorBody,
    FeaturesJSON,
    Health,
    MatchJSON,
    Models,
    Ready,
    SimilarityJSON,
)
from lift_serve.service.settings import Settings, get_settings
from lift_serve.service.state import STATIC_DIR, ServiceState, weights_warning
from lift_serve.service.timing import timed
from starlette.requests import ClientDisconnect

router = APIRouter()

NPY = "application/x-npy"
MAX_JSON_VALUES = 20_000_000

ERROR_RESPONSES = {
    status: {"description": text, "model": ErrorBody, "content": {"application/json": {
        "example": error_body(code, "what went wrong and what to do")}}}
    for status, code, text in [
        (400, "empty_body", "empty body, missing image, corrupt image"),
        (404, "unknown_feature_id", "feature id unknown or evicted: send the image again"),
        (413, "payload_too_large", "body over LIFT_MAX_UPLOAD_BYTES or image over LIFT_MAX_PIXELS"),
        (415, "not_an_image", "wrong content type or bytes that are not an image"),
        (422, "invalid_parameter", "bad or unknown parameter, point outside the image"),
        (429, "queue_full", "queue full; honour Retry-After"),
        (503, "not_ready", "model not loaded yet; honour Retry-After"),
        (504, "timeout", "no result within LIFT_REQUEST_TIMEOUT_S"),
    ]
}


# -- dependencies -----------------------------------------------------------------------------------
def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def ready_pipeline(state: StateDep) -> FeatureService:
    return state.require_ready()


PipelineDep = Annotated[FeatureService, Depends(ready_pipeline)]


def ready_predictor(pipeline: PipelineDep) -> DensePredictor:
    return DensePredictor(pipeline)


PredictorDep = Annotated[DensePredictor, Depends(ready_predictor)]


# Numbers in the query are read strictly, before FastAPI's lenient parsing (which takes "1_0" as 10,
# " 5 " as 5, "1.0" as an integer and "nan" or "1e999" as floats): plain decimal digits only.
INTEGER_PARAMETERS = {"iterations", "max_matches"}
FLOAT_PARAMETERS = {"x", "y", "alpha", "min_score", "stride"}
_INTEGER = re.compile(r"-?[0-9]{1,9}")
_FLOAT = re.compile(r"-?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][-+]?[0-9]{1,3})?")


def _check_number(name: str, value: str) -> None:
    if name in INTEGER_PARAMETERS and not _INTEGER.fullmatch(value):
        raise ServiceError(422, "invalid_parameter", f"query parameter {name}={value[:40]!r} must be a whole number "
                           "written with digits only, e.g. 1")
    if name in FLOAT_PARAMETERS and not (_FLOAT.fullmatch(value) and math.isfinite(float(value))):
        raise ServiceError(422, "invalid_parameter", f"query parameter {name}={value[:40]!r} must be a finite number "
                           "written with digits, e.g. 120.5")


def only_query(*allowed: str):
    """A dependency refusing query parameters outside ``allowed`` (422 naming them), repeated ones,
    and numbers that are not plain finite decimals."""
    allowed_set = set(allowed)

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params.keys()) - allowed_set)
        if unknown:
            raise ServiceError(422, "unknown_parameter",
                               f"unknown query parameter(s) {unknown}; this endpoint accepts {sorted(allowed_set)}")
        for name in request.query_params.keys():
            if len(request.query_params.getlist(name)) > 1:
                raise ServiceError(422, "invalid_parameter", f"query parameter {name!r} is given more than once")
            _check_number(name, request.query_params[name])

    return Depends(check)


def multipart_doc(files: dict[str, str], fields: dict[str, str], raw: bool) -> dict:
    """OpenAPI ``requestBody`` for the hand-parsed bodies."""
    properties = {name: {"type": "string", "format": "binary", "description": text} for name, text in files.items()}
    properties.update({name: {"type": "string", "description": text} for name, text in fields.items()})
    content = {"multipart/form-data": {"schema": {"type": "object", "properties": properties}}}
    if raw:
        content["image/*"] = {"schema": {"type": "string", "format": "binary",
                                         "description": "the image file itself as the whole body"}}
    return {"requestBody": {"content": content, "required": False}}


# -- body -------------------------------------------------------------------------------------------
class Upload:
    """A parsed request body: image files and text fields by name."""

    def __init__(self, files: dict[str, list[bytes]], fields: dict[str, str]):
        self.files = files
        self.fields = fields

    def one_file(self, name: str) -> bytes | None:
        found = self.files.get(name, [])
        if len(found) > 1:
            raise ServiceError(422, "invalid_parameter", f"send at most one {name!r} file")
        return found[0] if found else None


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, "payload_too_large",
                           f"the body is {int(declared)} bytes, more than the limit of {limit} "
                           "(LIFT_MAX_UPLOAD_BYTES); send a smaller image")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ServiceError(413, "payload_too_large",
                                   f"the body exceeds the limit of {limit} bytes (LIFT_MAX_UPLOAD_BYTES); "
                                   "send a smaller image")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServiceError(499, "client_closed_request", "the client disconnected while sending") from None
    body = b"".join(chunks)
    request._body = body  # Starlette's form parser reads a cached body (Request.stream yields _body)
    return body


def _query_names(request: Request) -> set[str]:
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    return {p.name for p in dependant.query_params} if dependant is not None else set()


async def read_upload(request: Request, settings: Settings, files: set[str], fields: set[str],
                      raw_field: str | None) -> Upload:
    """Parse a multipart body (``files``/``fields`` allowed) or a raw ``image/*`` body (as ``raw_field``).

    An empty body yields an empty :class:`Upload` (routes decide whether that is an error).
    """
    body = await _read_capped(request, settings.max_upload_bytes)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body:
        return Upload({}, {})
    # A feature id alone arrives as an url-encoded form (what HTTP clients send for fields without files).
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=settings.max_images_per_request + 2, max_fields=64)
        except Exception as exc:
            if "too many files" in str(exc).lower():
                raise ServiceError(413, "too_many_images", "more files in one request than "
                                   f"LIFT_MAX_IMAGES_PER_REQUEST={settings.max_images_per_request} allows; "
                                   "send them in several requests") from None
            raise ServiceError(400, "bad_multipart",
                               f"the multipart body could not be parsed: {str(exc)[:200]}") from None
        out_files: dict[str, list[bytes]] = {}
        out_fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                if name in files:  # e.g. curl -F image=photo.jpg: the @ that uploads the file is missing
                    raise ServiceError(422, "not_a_file", f"form field {name!r} holds text ({value[:60]!r}), not a "
                                       f"file; upload the file itself, e.g. curl -F {name}=@photo.jpg")
                if name not in fields:
                    if name in _query_names(request):  # e.g. curl -F x=10: x belongs in the URL
                        raise ServiceError(422, "unknown_field", f"{name!r} is a query parameter, not a form "
                                           f"field: put it in the URL, e.g. {request.url.path}?{name}={value[:20]}")
                    if content_type == "application/x-www-form-urlencoded" and not name.isprintable():
                        # curl -d @cat.jpg: the file's bytes arrive as url-encoded form text
                        raise ServiceError(422, "unknown_field", "the body is an url-encoded form holding binary "
                                           "data, not an image upload (curl -d/--data sends a file this way); "
                                           f"send it as a file: curl -F {raw_field or sorted(files)[0]}=@photo.jpg, "
                                           "or the raw bytes with --data-binary @photo.jpg -H 'Content-Type: "
                                           "image/jpeg'")
                    raise ServiceError(422, "unknown_field", f"unknown form field {name[:60]!r}; accepted: "
                                       f"files {sorted(files)}, fields {sorted(fields)}")
                out_fields[name] = value
            else:
                if name not in files:
                    raise ServiceError(422, "unknown_field", f"unknown file field {name!r}; accepted: "
                                       f"files {sorted(files)}")
                out_files.setdefault(name, []).append(await value.read())
        await form.close()
        return Upload(out_files, out_fields)
    if raw_field is not None and (content_type.startswith("image/") or content_type == "application/octet-stream"):
        return Upload({raw_field: [body]}, {})
    accepted = "multipart/form-data" + (", image/* or application/octet-stream" if raw_field else "")
    raise ServiceError(415, "unsupported_media_type",
                       f"content type {content_type or '(none)'!r} is not accepted; send {accepted} "
                       f"(e.g. curl -F {next(iter(sorted(files)))}=@photo.jpg)")


def _pick(upload: Upload, request: Request, file_name: str, id_name: str) -> tuple[bytes | None, str | None]:
    """An image file or a feature id (form field or query), not both, and the id in one place only."""
    data = upload.one_file(file_name)
    if id_name in upload.fields and id_name in request.query_params:
        raise ServiceError(422, "invalid_parameter", f"{id_name!r} is given both in the query and as a form field; "
                           "send it once, in either place")
    fid = upload.fields.get(id_name) or request.query_params.get(id_name)
    if data is not None and fid:
        raise ServiceError(422, "invalid_parameter", f"send either a {file_name!r} file or {id_name!r}, not both")
    return data, fid


async def _entry(predictor: DensePredictor, request: Request, data: bytes | None, fid: str | None,
                 density: tuple[int | None, float | None], what: str) -> FeatureEntry:
    """Features of one image (``data``, or the feature id ``fid``) at ``density`` = (iterations, stride)."""
    if not fid and not data:
        raise ServiceError(400, "empty_image" if data is not None else "missing_image",
                           f"the {what} image is missing or empty; send it as a multipart file (or its feature id)")
    return await predictor.embed(data, fid, *density, is_gone=request.is_disconnected)


def _density(iterations: int | None, stride: float | None) -> tuple[int | None, float | None]:
    check_one_density(iterations, stride)  # before the body is read
    return iterations, stride


def _size_text(entry: FeatureEntry) -> tuple[str, str]:
    """(model input, original image) sizes for the headers: WIDTHxHEIGHT, the one convention of every
    size header (an image's own order; array shapes such as X-Feature-Shape stay C,h,w)."""
    g = entry.geometry
    return f"{g.input_width}x{g.input_height}", f"{g.width}x{g.height}"


# -- info -------------------------------------------------------------------------------------------
@router.get("/healthz", tags=["health"], summary="Liveness: the process answers", response_model=Health)
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: model loaded and warmed (503 until then)",
            response_model=Ready, responses={503: ERROR_RESPONSES[503]})
async def readyz(state: StateDep):
    state.require_ready()
    providers = list(getattr(state.runtime, "active_providers", []) or [])
    return {"status": "ready", "demo": bool(state.runtime.demo), "provider": providers[0] if providers else None}


@router.get("/metrics", tags=["health"], summary="Prometheus metrics (text format)")
async def metrics(state: StateDep) -> Response:
    state.metrics.cache_bytes.set(state.features.cache.bytes_used if state.features else 0)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.get("/", include_in_schema=False)
async def index():
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise ServiceError(404, "not_found", "no page is installed in this build; the API reference is at /docs")
    return FileResponse(page)


@router.get("/v1/models", tags=["model"], summary="What is loaded and which request parameters are allowed",
            dependencies=[only_query()], response_model=Models, responses={503: ERROR_RESPONSES[503]})
async def models(state: StateDep, pipeline: PipelineDep):
    runtime, settings = state.runtime, state.settings
    manifest = runtime.manifest
    return {
        "model": {
            "backbone": manifest.backbone.model_dump(),
            "upsampler": manifest.upsampler.model_dump() if manifest.upsampler else None,
            "input_sizes": [{"height": h, "width": w} for h, w in runtime.sizes],
            "channels": runtime.channels,
            "patch_size": runtime.patch_size,
            "strides": {str(k): runtime.stride(k) for k in runtime.iterations},
            "iterations": runtime.iterations,
            "default_iterations": runtime.default_iterations,
            "providers": runtime.active_providers,
            "parity": manifest.parity.model_dump(),
            "resize_policy": settings.resize_policy,
        },
        "demo": bool(runtime.demo),
        "random_weights": list(getattr(manifest, "random_weights", []) or []),
        "warning": weights_warning(runtime),
        "parameters": {
            "iterations": {"allowed": runtime.iterations, "default": runtime.default_iterations},
            "stride": {"min": min(runtime.stride(k) for k in runtime.iterations),
                       "max": max(runtime.stride(k) for k in runtime.iterations),
                       "rule": "input pixels per cell; an offered density's stride, or any stride in between that "
                               "gives whole cells on the model input (resampled from the next finer density)"},
            "max_response_bytes": pipeline.max_response_bytes, "cache_bytes": pipeline.cache_bytes,
            "features.format": ["npy", "json"], "features.dtype": ["float32", "float16"],
            "similarity.format": ["png", "npy", "json"], "similarity.alpha": {"min": 0.0, "max": 1.0, "default": 0.6},
            "similarity.overlay": {"default": False}, "similarity.scale": ["auto", "absolute"],
            "match.format": ["json", "png"], "match.max_matches": {"min": 1, "max": 10000, "default": 200},
            "match.min_score": {"min": -1.0, "max": 1.0, "default": 0.0},
            "max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
            "max_batch_size": settings.effective_batch_size,
        },
    }


# -- features ---------------------------------------------------------------------------------------
ITERATIONS_QUERY = Query(None, ge=0, le=8, description="upsampler steps (each doubles the density); one of the "
                         "bundle's offered values (GET /v1/models), default = the bundle's default", examples=[1])
STRIDE_QUERY = Query(None, gt=0, le=1024, description="instead of iterations: input pixels per feature cell, e.g. "
                     "1 for pixel-dense; an offered density's stride, or one between them that gives whole cells "
                     "(resampled, antialiased bilinear, from the next finer density)", examples=[1])


@router.post(
    "/v1/features", tags=["features"], summary="Dense descriptors of one or more images",
    description=(
        "Send images as multipart fields named `image` (repeatable) or one image as the raw body "
        "(`Content-Type: image/*`). `npy` (default): one image -> `[C, h, w]`, several -> `[N, C, h, w]` "
        "(all must get the same model input size; else use json). Headers: `X-Feature-Shape` (body shape, "
        "comma-separated), `X-Feature-Stride` (input pixels per cell), `X-Input-Size` (model input `WxH`), "
        "`X-Image-Size` (original `WxH`), `X-Feature-Id` (comma-separated for several). `json`: "
        '`{"features": [{"id", "shape", "stride", "input_size", "image_size", "geometry", "dtype", "data"}]}` '
        "with `data` nested lists `[C][h][w]`."),
    dependencies=[only_query("format", "dtype", "iterations", "stride")],
    openapi_extra=multipart_doc({"image": "an image file; repeat the field for several"}, {}, raw=True),
    response_model=None,
    responses={200: {"content": {NPY: {"schema": {"type": "string", "format": "binary"}}, "application/json": {}},
                     "model": FeaturesJSON, "headers": FEATURE_HEADERS,
                     "description": "features as .npy (default) or JSON"}, **ERROR_RESPONSES},
)
async def features(
    request: Request,
    settings: SettingsDep,
    pipeline: PipelineDep,
    predictor: PredictorDep,
    format: Literal["npy", "json"] = Query("npy", description="response encoding", examples=["npy"]),
    dtype: Literal["float32", "float16"] = Query("float32", description="descriptor precision in the response",
                                                   examples=["float16"]),
    iterations: int | None = ITERATIONS_QUERY,
    stride: float | None = STRIDE_QUERY,
):
    density = _density(iterations, stride)
    upload = await read_upload(request, settings, files={"image"}, fields=set(), raw_field="image")
    images = upload.files.get("image", [])
    if not images:
        raise ServiceError(400, "empty_body", "no image was sent: use multipart field 'image' (repeatable) "
                           "or a raw image/* body, e.g. curl -F image=@photo.jpg")
    if len(images) > settings.max_images_per_request:
        raise ServiceError(413, "too_many_images", f"{len(images)} images in one request, more than "
                           f"LIFT_MAX_IMAGES_PER_REQUEST={settings.max_images_per_request}; "
                           "send them in several requests")
    await _check_answer_size(pipeline, images, density, dtype)
    # A request's images enter the queue a batch at a time: with all of them at once, a request with more
    # images than LIFT_MAX_QUEUE would be refused (429) by its own back-pressure, on every retry.
    admit = asyncio.Semaphore(max(1, min(settings.effective_batch_size, settings.max_queue)))
    entries = await asyncio.gather(*(_numbered_entry(predictor, request, data, density, i, len(images), admit)
                                     for i, data in enumerate(images)))
    if format == "json":
        total = sum(e.features.size for e in entries)
        if total > MAX_JSON_VALUES:
            raise ServiceError(422, "too_large_for_json", f"{total} values are too many for JSON; use format=npy")
        with timed("encode"):
            payload = await asyncio.to_thread(_features_json, entries, dtype)
        headers = {"X-Feature-Id": ",".join(e.id for e in entries)}
        return Response(payload, media_type="application/json", headers=headers)
    shapes = {e.features.shape for e in entries}
    if len(shapes) > 1:
        raise ServiceError(422, "mixed_input_sizes",
                           f"the images map to different feature shapes {sorted(shapes)}, which one .npy array "
                           "cannot hold; use format=json or one request per image")
    stacked = entries[0].features if len(entries) == 1 else np.stack([e.features for e in entries])
    with timed("encode"):
        body = await asyncio.to_thread(encode_npy, stacked.astype(dtype, copy=False))
    sizes = [_size_text(e) for e in entries]
    headers = {
        "X-Feature-Shape": ",".join(str(n) for n in stacked.shape),
        "X-Feature-Stride": f"{entries[0].geometry.stride:g}",
        "X-Input-Size": ",".join(s[0] for s in sizes),
        "X-Image-Size": ",".join(s[1] for s in sizes),
        "X-Feature-Id": ",".join(e.id for e in entries),
    }
    return Response(body, media_type=NPY, headers=headers)


async def _check_answer_size(pipeline: FeatureService, images: list[bytes],
                             density: tuple[int | None, float | None], dtype: str) -> None:
    """422 ``response_too_large`` before any decode or inference when the answer would exceed the
    limit: each image's grid follows from its header and the density alone."""
    itemsize = np.dtype(dtype).itemsize
    if len(images) * pipeline.largest_answer_bytes // 4 * itemsize <= pipeline.max_response_bytes:
        return  # even at the bundle's densest density this answer fits: no header to read

    def cells() -> int:
        total = 0
        for index, data in enumerate(images):
            with _naming_image(index, len(images)):
                total += pipeline.planned_cells(data, *density)
        return total
    answer_bytes = await asyncio.to_thread(cells) * pipeline.runtime.channels * itemsize
    if answer_bytes > pipeline.max_response_bytes:
        raise ServiceError(422, "response_too_large",
                           f"the features would take {answer_bytes} bytes, more than LIFT_MAX_RESPONSE_BYTES="
                           f"{pipeline.max_response_bytes}; ask for dtype=float16, a coarser density (fewer "
                           "iterations or a larger stride) or fewer images, or raise the limit")


async def _numbered_entry(predictor: DensePredictor, request: Request, data: bytes,
                          density: tuple[int | None, float | None], index: int,
                          count: int, admit: asyncio.Semaphore) -> FeatureEntry:
    """:func:`_entry` for image ``index`` of ``count`` once ``admit`` lets it in; errors name the image."""
    with _naming_image(index, count):
        async with admit:
            return await _entry(predictor, request, data, None, density, "uploaded")


@contextlib.contextmanager
def _naming_image(index: int, count: int):
    """Errors raised inside name the image they are about, when the request carries several."""
    try:
        yield
    except (ServiceError, ImageError) as exc:
        if count > 1:
            exc.message = f"image {index + 1} of {count} (multipart field 'image' #{index + 1}): {exc.message}"
        raise


def _features_json(entries: list[FeatureEntry], dtype: str) -> bytes:
    items = []
    for e in entries:
        g = e.geometry.describe()
        items.append({"id": e.id, "shape": list(e.features.shape), "stride": e.geometry.stride,
                      "input_size": g["input_size"], "image_size": g["image_size"], "geometry": g,
                      "iterations": e.iterations, "density": e.density.label, "dtype": dtype,
                      "data": np.ascontiguousarray(e.features, dtype=dtype)})
    return encode_json({"features": items})


# -- similarity -------------------------------------------------------------------------------------
@router.post(
    "/v1/similarity", tags=["similarity"], summary="Cosine-similarity map of a clicked point",
    description=(
        "The descriptor of the feature cell containing the point (`x`, `y`) in the ORIGINAL image's pixels "
        "(source: multipart `image` or a raw image body, or `feature_id`) is compared with every cell of the "
        "`target` image (multipart `target` or `target_id`; default the same image). The queried cell's own "
        "similarity is exactly 1. `png` (default): colour-mapped heat map at the target's original size "
        "(blended over it with `overlay=true`); `npy`: the `[h, w]` map on the feature grid; `json`: the "
        "map plus how the grid maps onto the images. Headers `X-Feature-Id` / `X-Target-Feature-Id` let the "
        "next click skip the upload; `X-Query-Cell` is `row=R,col=C`; `X-Feature-Stride`, `X-Input-Size` (`WxH`) "
        "and `X-Image-Size` (`WxH`) describe the target's grid as in /v1/features."),
    dependencies=[only_query("x", "y", "format", "overlay", "alpha", "scale", "iterations", "stride", "feature_id",
                             "target_id")],
    openapi_extra=multipart_doc({"image": "source image (or feature_id)", "target": "optional target image"},
                                {"feature_id": "id from an earlier response instead of `image`",
                                 "target_id": "id instead of `target`"}, raw=True),
    response_model=None,
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                 NPY: {"schema": {"type": "string", "format": "binary"}}, "application/json": {}},
                     "model": SimilarityJSON, "headers": SIMILARITY_HEADERS,
                     "description": "heat map PNG (default), .npy map or JSON"}, **ERROR_RESPONSES},
)
async def similarity(
    request: Request,
    settings: SettingsDep,
    predictor: PredictorDep,
    x: float = Query(..., description="point x in the ORIGINAL source image's pixels, 0 <= x < width",
                     examples=[120.5]),
    y: float = Query(..., description="point y in the ORIGINAL source image's pixels, 0 <= y < height",
                     examples=[80.0]),
    format: Literal["png", "npy", "json"] = Query("png", description="response encoding", examples=["png"]),
    overlay: bool = Query(False, description="png only: blend the heat map over the target image (slower: an "
                          "RGB PNG of the photo instead of a palette PNG)", examples=[True]),
    alpha: float = Query(0.6, ge=0.0, le=1.0, description="png overlay opacity of the heat map", examples=[0.6]),
    scale: Literal["auto", "absolute"] = Query("auto", description="png colours: auto = the map's own range, "
                                               "absolute = cosine -1 to 1 (comparable between maps); the range "
                                               "is in X-Colour-Range", examples=["absolute"]),
    iterations: int | None = ITERATIONS_QUERY,
    stride: float | None = STRIDE_QUERY,
    feature_id: str | None = Query(None, description="source features from an earlier response (X-Feature-Id)",
                                    examples=["3f7a0c1e9b2d4c5a8e6f1a2b3c4d5e6f-k1-sq-224x224"]),
    target_id: str | None = Query(None, description="target features from an earlier response",
                                   examples=["3f7a0c1e9b2d4c5a8e6f1a2b3c4d5e6f-k1-sq-224x224"]),
):
    upload = await read_upload(request, settings, files={"image", "target"}, fields={"feature_id", "target_id"},
                               raw_field="image")
    data, fid = _pick(upload, request, "image", "feature_id")
    target_data, target_fid = _pick(upload, request, "target", "target_id")
    if data is None and not fid:
        raise ServiceError(400, "missing_image", "send the source image (multipart 'image' or a raw image body) "
                           "or the feature_id of an earlier response")
    source = await _entry(predictor, request, data, fid, _density(iterations, stride), "source")
    target = source
    if target_data is not None or target_fid:
        # The target is compared at the source's density, whatever density its id was issued for.
        target = await _entry(predictor, request, target_data, target_fid, request_of(source.density), "target")
    result = predictor.similarity(source, x, y, target)
    sim, (row, col) = result.map, result.cell
    input_size, image_size = _size_text(target)
    # The map is on the TARGET's grid: these say how that grid lies on the target image (as /v1/features).
    low, high = colour_range(sim, target.geometry, scale)
    headers = {"X-Feature-Id": source.id, "X-Target-Feature-Id": target.id, "X-Query-Cell": f"row={row},col={col}",
               "X-Feature-Stride": f"{target.geometry.stride:g}", "X-Input-Size": input_size,
               "X-Image-Size": image_size, "X-Colour-Range": f"{low:.6g},{high:.6g}"}
    with timed("encode"):
        if format == "npy":
            return Response(encode_npy(sim), media_type=NPY, headers=headers)
        if format == "json":
            return Response(encode_json({
                "similarity": np.ascontiguousarray(sim, np.float32), "shape": list(sim.shape),
                "query": {"x": x, "y": y, "cell": [row, col], "cell_center": list(result.cell_center)},
                "colour_range": {"scale": scale, "low": low, "high": high},
                "source": source.geometry.describe(), "target": target.geometry.describe(),
                "feature_id": source.id, "target_feature_id": target.id,
            }), media_type="application/json", headers=headers)
        png = await asyncio.to_thread(_similarity_png, sim, target, overlay, alpha, (low, high), settings.max_pixels)
    return Response(png, media_type="image/png", headers=headers)


def _similarity_png(sim: np.ndarray, target: FeatureEntry, overlay: bool, alpha: float, span: tuple[float, float],
                    max_pixels: int) -> bytes:
    image = decode_image(target.image_bytes, max_pixels) if overlay else None
    return encode_png(heatmap_png_image(sim, target.geometry, image, alpha, span))


# -- visualize --------------------------------------------------------------------------------------
@router.post(
    "/v1/visualize", tags=["visualize"], summary="Dense features as a picture: 3 principal components -> RGB",
    description=(
        "The first three principal components of the image's features (multipart `image`, a raw image body, "
        "or `feature_id`) at the density asked for, mapped to RGB at the image's original size, one block of "
        "colour per feature cell. The basis is fitted on this image, or on the features of `basis_id` (another "
        "image's id, taken at the same density) so that two images are coloured comparably. `compare=true`: "
        "the backbone's own features (left) next to these (right), in the same basis. `format=json`: the basis "
        "(mean, components, colour bounds, explained variance) instead of the picture."),
    dependencies=[only_query("method", "format", "compare", "iterations", "stride", "feature_id", "basis_id")],
    openapi_extra=multipart_doc({"image": "the image (or feature_id)"},
                                {"feature_id": "id from an earlier response instead of `image`",
                                 "basis_id": "fit the colours on these features instead"}, raw=True),
    response_model=None,
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                 "application/json": {}},
                     "headers": VISUALIZE_HEADERS, "description": "PNG (default) or the basis as JSON"},
               **ERROR_RESPONSES},
)
async def visualize(
    request: Request,
    settings: SettingsDep,
    pipeline: PipelineDep,
    predictor: PredictorDep,
    method: Literal["pca"] = Query("pca", description="how features become colours"),
    format: Literal["png", "json"] = Query("png", description="the picture, or the basis as JSON"),
    compare: bool = Query(False, description="png: the backbone's features (left) next to these (right)"),
    iterations: int | None = ITERATIONS_QUERY,
    stride: float | None = STRIDE_QUERY,
    feature_id: str | None = Query(None, description="features from an earlier response (X-Feature-Id)"),
    basis_id: str | None = Query(None, description="fit the basis on these features (another image's id)"),
):
    upload = await read_upload(request, settings, files={"image"}, fields={"feature_id", "basis_id"},
                               raw_field="image")
    data, fid = _pick(upload, request, "image", "feature_id")
    if "basis_id" in upload.fields and basis_id:
        raise ServiceError(422, "invalid_parameter", "'basis_id' is given both in the query and as a form field")
    basis_id = upload.fields.get("basis_id") or basis_id
    if data is None and not fid:
        raise ServiceError(400, "missing_image", "send the image (multipart 'image' or a raw image body) or the "
                           "feature_id of an earlier response")
    entry = await _entry(predictor, request, data, fid, _density(iterations, stride), "image")
    source = entry if not basis_id else await _entry(predictor, request, None, basis_id, request_of(entry.density),
                                                     "basis")
    basis = await asyncio.to_thread(lambda: source.pca_basis)
    headers = {"X-Feature-Id": entry.id, "X-Basis-Feature-Id": source.id,
               "X-PCA-Explained-Variance": ",".join(f"{v:.4f}" for v in basis.explained),
               "X-Feature-Stride": f"{entry.geometry.stride:g}"}
    if format == "json":
        return JSONResponse({"method": method, "feature_id": entry.id, "basis_feature_id": source.id,
                             "grid": list(entry.features.shape[1:]), "basis": basis.describe()}, headers=headers)
    coarse = None
    if compare:
        if 0 not in pipeline.runtime.iterations:
            raise ServiceError(422, "invalid_parameter", "compare=true needs the backbone's own features, which this "
                               "bundle does not offer (iterations 0 is not among "
                               f"{pipeline.runtime.iterations})")
        coarse = await _entry(predictor, request, None, entry.id, (0, None), "image")

    def draw() -> bytes:
        picture = pca_image(entry.features, entry.geometry, basis)
        if coarse is not None:
            picture = side_by_side(pca_image(coarse.features, coarse.geometry, basis), picture)
        return encode_png(picture)

    return Response(await asyncio.to_thread(draw), media_type="image/png", headers=headers)


# -- match ------------------------------------------------------------------------------------------
@router.post(
    "/v1/match", tags=["match"], summary="Keypoint matches between two images",
    description=(
        "Mutual nearest neighbours on L2-normalised descriptors, best score first. Send multipart files "
        "`image_a` and `image_b` (or `feature_id_a` / `feature_id_b`). Coordinates are feature-cell CENTRES "
        "mapped to each ORIGINAL image's pixels. `json` (default): "
        '`{"matches": [{"a": [x, y], "b": [x, y], "score": s}], "count", "image_a_size", "image_b_size", '
        '"feature_id_a", "feature_id_b"}`; `png`: both images side by side with a line per match.'),
    dependencies=[only_query("format", "max_matches", "min_score", "iterations", "stride", "feature_id_a",
                             "feature_id_b")],
    openapi_extra=multipart_doc({"image_a": "first image", "image_b": "second image"},
                                {"feature_id_a": "id instead of image_a", "feature_id_b": "id instead of image_b"},
                                raw=False),
    response_model=None,
    responses={200: {"content": {"application/json": {},
                                 "image/png": {"schema": {"type": "string", "format": "binary"}}},
                     "model": MatchJSON, "headers": MATCH_HEADERS,
                     "description": "matches as JSON (default) or a PNG drawing"}, **ERROR_RESPONSES},
)
async def match(
    request: Request,
    settings: SettingsDep,
    pipeline: PipelineDep,
    predictor: PredictorDep,
    format: Literal["json", "png"] = Query("json", description="response encoding", examples=["json"]),
    max_matches: int = Query(200, ge=1, le=10000, description="keep at most this many (best first)",
                             examples=[100]),
    min_score: float = Query(0.0, ge=-1.0, le=1.0, description="drop matches with lower cosine "
                              "similarity", examples=[0.5]),
    iterations: int | None = ITERATIONS_QUERY,
    stride: float | None = STRIDE_QUERY,
    feature_id_a: str | None = Query(None, description="features of image A from an earlier response",
                                      examples=["3f7a0c1e9b2d4c5a8e6f1a2b3c4d5e6f-k1-sq-224x224"]),
    feature_id_b: str | None = Query(None, description="features of image B from an earlier response",
                                      examples=["3f7a0c1e9b2d4c5a8e6f1a2b3c4d5e6f-k1-sq-224x224"]),
):
    upload = await read_upload(request, settings, files={"image_a", "image_b"},
                               fields={"feature_id_a", "feature_id_b"}, raw_field=None)
    picks = [_pick(upload, request, "image_a", "feature_id_a"), _pick(upload, request, "image_b", "feature_id_b")]
    for (data, fid), name in zip(picks, ("image_a", "image_b"), strict=True):
        if data is None and not fid:
            raise ServiceError(400, "missing_image", f"{name} is missing: send two multipart files 'image_a' and "
                               "'image_b' (or feature_id_a / feature_id_b)")
    # Both sides at one density: `iterations` or `stride`, else that of the first feature id sent, else
    # the default.
    density = _density(iterations, stride)
    if density == (None, None):
        issued = next((pipeline.id_density(fid) for data, fid in picks if fid and data is None), None)
        density = request_of(issued) if issued else density
    a, b = await asyncio.gather(*(_entry(predictor, request, data, fid, density, name)
                                  for (data, fid), name in zip(picks, ("image_a", "image_b"), strict=True)))
    found: Matches = await asyncio.to_thread(predictor.matches, a, b, max_matches, min_score)
    headers = {"X-Feature-Id-A": a.id, "X-Feature-Id-B": b.id}
    if format == "png":
        with timed("encode"):
            png = await asyncio.to_thread(_match_png, a, b, found.points_a, found.points_b, found.scores,
                                          settings.max_pixels)
        return Response(png, media_type="image/png", headers=headers)
    return JSONResponse({
        "matches": [{"a": [float(pa[0]), float(pa[1])], "b": [float(pb[0]), float(pb[1])], "score": float(s)}
                    for pa, pb, s in zip(found.points_a, found.points_b, found.scores, strict=True)],
        "count": len(found.scores),
        "image_a_size": a.geometry.describe()["image_size"],
        "image_b_size": b.geometry.describe()["image_size"],
        "feature_id_a": a.id, "feature_id_b": b.id,
    }, headers=headers)


def _match_png(a: FeatureEntry, b: FeatureEntry, points_a, points_b, scores, max_pixels: int) -> bytes:
    image_a, image_b = decode_image(a.image_bytes, max_pixels), decode_image(b.image_bytes, max_pixels)
    return encode_png(match_png_image(image_a, image_b, points_a, points_b, scores))


__all__ = ["router"]
