"""A small typed Python client for the lift-serve HTTP API (httpx; no torch, no onnxruntime).

>>> from lift_serve.client import LiftClient
>>> with LiftClient("http://127.0.0.1:8000") as client:
...     feats = client.features("cat.jpg")                 # [C, h, w] float32
...     heat = client.similarity("cat.jpg", x=120, y=80)   # [h, w] cosine similarities
...     matches = client.match("cat.jpg", "cat2.jpg")      # list[Match], best first

Images may be given as a path (``str`` / ``os.PathLike``), encoded bytes (PNG, JPEG, ...), a PIL
image or a NumPy ``uint8`` array (``[H, W]`` grey, ``[H, W, 3]`` RGB or ``[H, W, 4]`` RGBA; arrays
and PIL images are sent as lossless PNG, so Pillow is needed only for those two kinds).

Coordinates are always in the ORIGINAL image's pixels: ``x`` to the right, ``y`` down, origin at the
top-left corner of the top-left pixel (the server applies EXIF orientation before anything else, so
"original" means as an image viewer shows it).

Every failure the server reports (and a connection failure) is raised as :class:`LiftAPIError`
carrying the HTTP status, the server's snake_case error code and its message. Responses 429 and 503
are retried up to ``retries`` times, each after the server's ``Retry-After`` (capped by
``max_retry_wait``; 0.5 s when the header is absent).

Feature re-use: the server caches features by image content; the client remembers the
``X-Feature-Id`` it got for each image it sent (by the sha256 of the bytes and the iterations), so
a second :meth:`LiftClient.similarity` or :meth:`LiftClient.match` on the same image sends only the
id. If the server has evicted it (404 ``unknown_feature_id``) the client sends the image again, once.

Routing behind several replicas: every request carries ``X-Lift-Route``, the content digest of its
first image (the first 32 hex digits of the bytes' sha256, which is also how that image's feature ids
begin), whether the image is uploaded or named by id. A balancer that hashes on it (the nginx
configuration of ``docker-compose.scale.yml``, the Kubernetes router) sends an upload and every
later click by id to the same replica, the one whose cache holds the features.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email.utils
import hashlib
import io
import itertools
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, Union

import httpx
import numpy as np

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]
"""A path, encoded image bytes, a PIL image, or a uint8 array ([H,W], [H,W,3] or [H,W,4])."""

RETRY_STATUSES = (429, 503)
DEFAULT_RETRY_WAIT_S = 0.5
_ID_MEMORY = 256  # image digests whose feature ids are remembered (LRU)

T = TypeVar("T")


class LiftAPIError(Exception):
    """The one error type of this client.

    Attributes:
        status: HTTP status (0 when the server could not be reached or did not answer in time).
        code: the server's snake_case error code (e.g. ``unsupported_media_type``,
            ``unknown_feature_id``), or ``connection_error`` / ``timeout`` / ``http_<status>`` when
            the response carried no error JSON.
        message: the server's human-readable message.
        retry_after: seconds from ``Retry-After`` when the server sent one, else None.
    """

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Match:
    """One keypoint correspondence.

    Attributes:
        a: (x, y) in image A's original pixels (the centre of the matched feature cell).
        b: (x, y) in image B's original pixels.
        score: cosine similarity of the two descriptors, in [-1, 1].
    """

    a: tuple[float, float]
    b: tuple[float, float]
    score: float


@dataclasses.dataclass(frozen=True)
class Features:
    """Dense descriptors of one image with the server's mapping information.

    Attributes:
        array: [C, h, w] descriptors (float16 or float32 as requested).
        feature_id: id to pass as ``feature_id`` to later calls (valid while the server caches it).
        stride: input pixels per feature cell (model input frame).
        input_size: (height, width) of the model input the image was resized to.
        image_size: (width, height) of the original (EXIF-oriented) image.
    """

    array: np.ndarray
    feature_id: str | None
    stride: float | None
    input_size: tuple[int, int] | None
    image_size: tuple[int, int] | None


# ---------------------------------------------------------------------------------------------
# Turning the caller's image into bytes


def image_bytes(image: ImageInput) -> bytes:
    """Encoded image bytes for any accepted input (see :data:`ImageInput`).

    Raises:
        FileNotFoundError: a path that does not exist.
        TypeError / ValueError: an input of another kind, or an array that is not uint8 [H,W(,3|4)].
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty")
        return data
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as fh:
            return fh.read()
    if isinstance(image, np.ndarray):
        return _array_png(image)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image, without importing PIL
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(
        f"cannot send {type(image).__name__} as an image: pass a path, encoded bytes, a PIL image or a "
        "uint8 numpy array [H,W], [H,W,3] or [H,W,4]"
    )


def _array_png(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise ValueError(
            f"numpy images must be uint8 (0..255), got {array.dtype}; convert with "
            "(arr * 255).clip(0, 255).astype(np.uint8) if it holds 0..1 floats"
        )
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"numpy images must be [H,W], [H,W,3] or [H,W,4], got shape {array.shape}")
    from PIL import Image  # only needed for array / PIL inputs

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


ROUTE_HEADER = "X-Lift-Route"
_ROUTE = re.compile(r"[0-9a-f]{32}")


def route_key(image: bytes | None = None, feature_id: str | None = None) -> str | None:
    """The route key of an image: its feature id's first 32 hex digits, else its bytes' digest's."""
    if feature_id:
        return feature_id[:32] if _ROUTE.fullmatch(feature_id[:32]) else None
    return _digest(image)[:32] if image is not None else None


# ---------------------------------------------------------------------------------------------
# Requests and responses shared by the sync and async clients


@dataclasses.dataclass
class _Call:
    """One HTTP request, rebuilt identically on each retry."""

    method: str
    path: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, str] | None = None
    reused_ids: bool = False  # a remembered feature id stands in for an image the caller gave
    route: str | None = None  # X-Lift-Route: the content digest of the request's first image

    def kwargs(self) -> dict[str, Any]:
        params = {k: _param(v) for k, v in self.params.items() if v is not None}
        out: dict[str, Any] = {"params": params}
        if self.route:
            out["headers"] = {ROUTE_HEADER: self.route}
        if self.files:
            out["files"] = self.files
        if self.data:
            out["data"] = self.data
        return out


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _file(field: str, data: bytes) -> tuple[str, tuple[str, bytes, str]]:
    # The server sniffs the format from the bytes; the name and type only help logs and proxies.
    return (field, (f"{field}.bin", data, "application/octet-stream"))


def _auth_headers(api_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer`` for a server started with LIFT_API_KEYS; the key defaults to the
    ``LIFT_API_KEY`` environment variable. Never logged."""
    key = api_key if api_key is not None else os.environ.get("LIFT_API_KEY", "")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # an HTTP date; anything else (a proxy's odd value) counts as no header
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:  # RFC 9110 dates are GMT
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, parsed.timestamp() - time.time())


def _error_from(response: httpx.Response) -> LiftAPIError:
    code, message = f"http_{response.status_code}", response.reason_phrase or "request failed"
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code", code))
            message = str(error.get("message", message))
        elif isinstance(body, dict) and "detail" in body:  # a framework default, should it leak
            message = json.dumps(body["detail"]) if not isinstance(body["detail"], str) else body["detail"]
    except ValueError:
        text = response.text.strip()
        if text:
            message = text[:300]
    return LiftAPIError(response.status_code, code, message, _retry_after(response))


def _transport_error(exc: httpx.TransportError, base_url: str) -> LiftAPIError:
    if isinstance(exc, httpx.TimeoutException):
        return LiftAPIError(0, "timeout", f"no answer from {base_url} in time ({exc}); raise timeout=")
    return LiftAPIError(0, "connection_error", f"cannot reach {base_url}: {exc}; is `lift serve` running?")


def _retry_wait(error: LiftAPIError, cap: float) -> float:
    wait = DEFAULT_RETRY_WAIT_S if error.retry_after is None else error.retry_after
    return min(wait, cap)


def _load_npy(response: httpx.Response) -> np.ndarray:
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def _ints(header: str | None, sep: str) -> tuple[int, ...] | None:
    if not header:
        return None
    try:
        return tuple(int(v) for v in header.split(sep))
    except ValueError:
        return None


def _features_result(response: httpx.Response) -> list[Features]:
    array = _load_npy(response)
    arrays = [array] if array.ndim == 3 else list(array)
    # Several images: each header holds one comma-separated value per image, in request order.
    ids = _split(response.headers.get("x-feature-id"))
    input_sizes = _split(response.headers.get("x-input-size"))
    image_sizes = _split(response.headers.get("x-image-size"))
    stride = response.headers.get("x-feature-stride")
    out = []
    for i, arr in enumerate(arrays):
        # Every size header is WIDTHxHEIGHT; input_size keeps the array order (height, width).
        input_wh = _ints(input_sizes[i] if i < len(input_sizes) else None, "x")
        input_hw = (input_wh[1], input_wh[0]) if input_wh and len(input_wh) == 2 else None
        image_wh = _ints(image_sizes[i] if i < len(image_sizes) else None, "x")
        out.append(
            Features(
                array=arr,
                feature_id=ids[i] if i < len(ids) and ids[i] else None,
                stride=float(stride) if stride else None,
                input_size=input_hw if input_hw and len(input_hw) == 2 else None,  # type: ignore[arg-type]
                image_size=image_wh if image_wh and len(image_wh) == 2 else None,  # type: ignore[arg-type]
            )
        )
    return out


def _split(header: str | None) -> list[str]:
    return [part.strip() for part in header.split(",")] if header else []


def _matches(response: httpx.Response) -> list[Match]:
    body = response.json()
    return [
        Match(a=(float(m["a"][0]), float(m["a"][1])), b=(float(m["b"][0]), float(m["b"][1])), score=float(m["score"]))
        for m in body.get("matches", [])
    ]


Density = tuple[int | None, float | None]  # (iterations, stride): at most one is set


def _density(iterations: int | None, stride: float | None) -> Density:
    """The density a call asks for: ``iterations`` upsampler steps or an explicit ``stride`` (input
    pixels per feature cell), not both (the server refuses both with 422)."""
    if iterations is not None and stride is not None:
        raise ValueError("give iterations or stride, not both")
    return iterations, stride


def _density_params(density: Density) -> dict[str, Any]:
    return {"iterations": density[0], "stride": density[1]}


class _Core:
    """State and request building shared by :class:`LiftClient` and :class:`AsyncLiftClient`."""

    def __init__(self, base_url: str, retries: int, max_retry_wait: float, reuse_features: bool):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.reuse_features = reuse_features
        self._ids: OrderedDict[tuple[str, Density], str] = OrderedDict()

    # feature-id memory -----------------------------------------------------------------------
    def remembered(self, data: bytes, density: Density) -> str | None:
        if not self.reuse_features:
            return None
        key = (_digest(data), density)
        fid = self._ids.get(key)
        if fid is not None:
            self._ids.move_to_end(key)
        return fid

    def remember(self, data: bytes, density: Density, feature_id: str | None) -> None:
        if not (self.reuse_features and feature_id):
            return
        key = (_digest(data), density)
        self._ids[key] = feature_id
        self._ids.move_to_end(key)
        while len(self._ids) > _ID_MEMORY:
            self._ids.popitem(last=False)

    def forget(self) -> None:
        self._ids.clear()

    # retries ---------------------------------------------------------------------------------
    def retry_wait(self, response: httpx.Response, attempt: int) -> float:
        """Seconds to wait before retrying failed ``response`` (``attempt`` retries so far); raises if not retried."""
        error = _error_from(response)
        if response.status_code not in RETRY_STATUSES or attempt >= self.retries:
            raise error
        return _retry_wait(error, self.max_retry_wait)

    # request builders ------------------------------------------------------------------------
    @staticmethod
    def features_call(datas: Sequence[bytes], dtype: str, density: Density) -> _Call:
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        return _Call(
            "POST", "/v1/features", {"format": "npy", "dtype": dtype, **_density_params(density)},
            files=[_file("image", d) for d in datas], route=route_key(datas[0]) if datas else None,
        )

    def similarity_call(
        self, image: bytes | None, feature_id: str | None, target: bytes | None, target_id: str | None,
        x: float, y: float, fmt: str, overlay: bool, alpha: float, density: Density, reuse: bool,
        scale: str = "auto",
    ) -> _Call:
        if fmt not in ("npy", "png"):
            raise ValueError(f"format must be 'npy' or 'png', got {fmt!r}")
        if image is None and feature_id is None:
            raise ValueError("give an image or a feature_id")
        params: dict[str, Any] = {"x": x, "y": y, "format": fmt, **_density_params(density)}
        if fmt == "png":
            params.update(overlay=overlay, alpha=alpha, scale=scale)
        call = _Call("POST", "/v1/similarity", params)
        self._attach(call, "image", "feature_id", image, feature_id, density, reuse)
        if target is not None or target_id is not None:
            self._attach(call, "target", "target_id", target, target_id, density, reuse)
        return call

    def match_call(
        self, a: bytes | None, b: bytes | None, feature_id_a: str | None, feature_id_b: str | None,
        fmt: str, max_matches: int | None, min_score: float | None, density: Density, reuse: bool,
    ) -> _Call:
        if fmt not in ("json", "png"):
            raise ValueError(f"format must be 'json' or 'png', got {fmt!r}")
        params = {"format": fmt, "max_matches": max_matches, "min_score": min_score,
                  **_density_params(density)}
        call = _Call("POST", "/v1/match", params)
        for name, img, fid in (("a", a, feature_id_a), ("b", b, feature_id_b)):
            if img is None and fid is None:
                raise ValueError(f"give image {name} or feature_id_{name}")
            self._attach(call, f"image_{name}", f"feature_id_{name}", img, fid, density, reuse)
        return call

    def visualize_call(self, image: bytes | None, feature_id: str | None, basis_id: str | None, compare: bool,
                       density: Density, reuse: bool) -> _Call:
        if image is None and feature_id is None:
            raise ValueError("give an image or a feature_id")
        params = {"method": "pca", "format": "png", "compare": compare, "basis_id": basis_id,
                  **_density_params(density)}
        call = _Call("POST", "/v1/visualize", params)
        self._attach(call, "image", "feature_id", image, feature_id, density, reuse)
        return call

    def _attach(self, call: _Call, file_field: str, id_field: str, image: bytes | None, feature_id: str | None,
                density: Density, reuse: bool) -> None:
        """Add an image to ``call``: the caller's id, else a remembered id, else the bytes. The first
        image added gives the call its route key."""
        if call.route is None:
            call.route = route_key(image, feature_id)
        if feature_id:
            call.data = {**(call.data or {}), id_field: feature_id}
            return
        remembered = self.remembered(image, density) if reuse and image is not None else None
        if remembered:
            call.data = {**(call.data or {}), id_field: remembered}
            call.reused_ids = True
        else:
            call.files = [*(call.files or []), _file(file_field, image)]  # type: ignore[arg-type]

    def learn_similarity(self, response: httpx.Response, image: bytes | None, target: bytes | None,
                         density: Density) -> None:
        if image is not None:
            self.remember(image, density, response.headers.get("x-feature-id"))
        if target is not None:
            self.remember(target, density, response.headers.get("x-target-feature-id"))

    def learn_match(self, response: httpx.Response, a: bytes | None, b: bytes | None,
                    density: Density) -> None:
        if a is not None:
            self.remember(a, density, response.headers.get("x-feature-id-a"))
        if b is not None:
            self.remember(b, density, response.headers.get("x-feature-id-b"))

    def features_array(self, response: httpx.Response, datas: Sequence[bytes], density: Density,
                       many: bool) -> np.ndarray:
        """The descriptors of a ``/v1/features`` answer ([N, C, h, w] if ``many``), each image's id remembered."""
        results = _features_result(response)
        for data, result in zip(datas, results, strict=True):
            self.remember(data, density, result.feature_id)
        return np.stack([r.array for r in results]) if many else results[0].array

    def similarity_result(self, response: httpx.Response, fmt: str) -> np.ndarray | bytes:
        return response.content if fmt == "png" else _load_npy(response)


def _image_list(image: ImageInput | Sequence[ImageInput]) -> tuple[list[bytes], bool]:
    """The bytes of one image, or of each image of a list/tuple; and whether a list/tuple was given."""
    many = isinstance(image, (list, tuple))
    return ([image_bytes(i) for i in image] if many else [image_bytes(image)]), many


def _optional_bytes(image: ImageInput | None) -> bytes | None:
    return None if image is None else image_bytes(image)


def _is_stale_id(error: LiftAPIError) -> bool:
    return error.status == 404 and error.code == "unknown_feature_id"


# ---------------------------------------------------------------------------------------------
# The clients


class LiftClient:
    """Synchronous client. Use as a context manager, or call :meth:`close`.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        timeout: seconds for each HTTP request (connect, read, write).
        retries: how many times a 429/503 answer is retried (0 = never).
        max_retry_wait: upper bound in seconds on one wait between retries, whatever Retry-After says.
        reuse_features: remember feature ids per image and send the id instead of the image.
        transport: an httpx transport to use instead of the network (e.g. ``httpx.MockTransport``).
        api_key: sent as ``Authorization: Bearer`` (default: ``$LIFT_API_KEY``; none if unset).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 30.0, retries: int = 3,
                 max_retry_wait: float = 10.0, reuse_features: bool = True,
                 transport: httpx.BaseTransport | None = None, api_key: str | None = None):
        self._core = _Core(base_url, retries, max_retry_wait, reuse_features)
        self._http = httpx.Client(base_url=self._core.base_url, timeout=timeout, transport=transport,
                                  headers=_auth_headers(api_key))

    def __enter__(self) -> LiftClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        for attempt in itertools.count():
            try:
                response = self._http.request(call.method, call.path, **call.kwargs())
            except httpx.TransportError as exc:
                raise _transport_error(exc, self._core.base_url) from exc
            if response.is_success:
                return response
            time.sleep(self._core.retry_wait(response, attempt))

    def _with_fresh_ids(self, build: Callable[[bool], _Call]) -> httpx.Response:
        """Send with remembered ids; if the server forgot one, send the images again (once)."""
        call = build(True)
        try:
            return self._send(call)
        except LiftAPIError as error:
            if not (call.reused_ids and _is_stale_id(error)):
                raise
            self._core.forget()
            return self._send(build(False))

    def models(self) -> dict:
        """``GET /v1/models``: the loaded model, demo flag/warning and the allowed request parameters."""
        return self._send(_Call("GET", "/v1/models")).json()

    def ready(self) -> bool:
        """True when ``GET /readyz`` answers 200 (model loaded and warmed)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def extract(self, image: ImageInput, dtype: str = "float32", iterations: int | None = None,
                stride: float | None = None) -> Features:
        """Descriptors of one image plus the server's mapping info (see :class:`Features`)."""
        density = _density(iterations, stride)
        data = image_bytes(image)
        result = _features_result(self._send(self._core.features_call([data], dtype, density)))[0]
        self._core.remember(data, density, result.feature_id)
        return result

    def features(self, image: ImageInput | Sequence[ImageInput], dtype: str = "float32",
                 iterations: int | None = None, stride: float | None = None) -> np.ndarray:
        """``POST /v1/features``: dense descriptors.

        Args:
            image: one image, or a list/tuple of images sent in one request.
            dtype: ``float32`` or ``float16`` (half the bytes on the wire).
            iterations: upsampler steps (None = the bundle's default); the stride halves per step.
            stride: instead of ``iterations``, input pixels per feature cell (e.g. 1 = pixel-dense);
                a stride between the bundle's own is resampled by the server (see ``/v1/models``).

        Returns:
            [C, h, w] for one image, [N, C, h, w] for a list (all images must map to the same
            model input size for the stack; otherwise send them one by one).
        """
        density = _density(iterations, stride)
        datas, many = _image_list(image)
        response = self._send(self._core.features_call(datas, dtype, density))
        return self._core.features_array(response, datas, density, many)

    def similarity(self, image: ImageInput | None, x: float, y: float, target: ImageInput | None = None,
                   format: Literal["npy", "png"] = "npy", overlay: bool = False, alpha: float = 0.6,
                   iterations: int | None = None, stride: float | None = None, feature_id: str | None = None,
                   target_id: str | None = None, scale: Literal["auto", "absolute"] = "auto") -> np.ndarray | bytes:
        """``POST /v1/similarity``: cosine similarity of the descriptor at (x, y) to every cell.

        Args:
            image: the queried image (or None with ``feature_id``).
            x, y: the point in the queried image's original pixels.
            target: compare against this image instead of the queried one (or ``target_id``).
            format: ``npy`` -> [h, w] float32 map on the target's feature grid; ``png`` -> PNG bytes
                of the colour-mapped map at the target's original size.
            overlay, alpha: PNG only: blend the map over the target image with this opacity (default
                off, as the server's).
            scale: PNG only: ``auto`` colours the map's own range, ``absolute`` cosine -1 to 1.
            iterations, stride: the density, as for :meth:`features`.
            feature_id, target_id: ids from earlier calls, instead of the images.
        """
        density = _density(iterations, stride)
        img, tgt = _optional_bytes(image), _optional_bytes(target)

        def build(reuse: bool) -> _Call:
            return self._core.similarity_call(img, feature_id, tgt, target_id, x, y, format, overlay, alpha,
                                              density, reuse, scale)

        response = self._with_fresh_ids(build)
        self._core.learn_similarity(response, img, tgt, density)
        return self._core.similarity_result(response, format)

    def match(self, a: ImageInput | None, b: ImageInput | None, max_matches: int | None = None,
              min_score: float | None = None, iterations: int | None = None, stride: float | None = None,
              feature_id_a: str | None = None, feature_id_b: str | None = None) -> list[Match]:
        """``POST /v1/match``: mutual nearest neighbours between two images, best score first.

        Coordinates of each :class:`Match` are feature-cell centres in each original image's pixels.
        """
        density = _density(iterations, stride)
        return _matches(self._match(a, b, "json", max_matches, min_score, density, feature_id_a, feature_id_b))

    def match_image(self, a: ImageInput | None, b: ImageInput | None, max_matches: int | None = None,
                    min_score: float | None = None, iterations: int | None = None,
                    stride: float | None = None) -> bytes:
        """``POST /v1/match?format=png``: PNG of both images side by side with the matches drawn."""
        density = _density(iterations, stride)
        return self._match(a, b, "png", max_matches, min_score, density, None, None).content

    def visualize(self, image: ImageInput | None = None, feature_id: str | None = None, compare: bool = False,
                  basis_id: str | None = None, iterations: int | None = None, stride: float | None = None) -> bytes:
        """``POST /v1/visualize``: PNG of the features' first 3 principal components as RGB, at the
        image's size; ``basis_id`` colours with another image's basis, ``compare`` puts the
        backbone's own features on the left."""
        density = _density(iterations, stride)
        img = _optional_bytes(image)
        response = self._with_fresh_ids(
            lambda reuse: self._core.visualize_call(img, feature_id, basis_id, compare, density, reuse))
        if img is not None:
            self._core.remember(img, density, response.headers.get("x-feature-id"))
        return response.content

    def _match(self, a, b, fmt, max_matches, min_score, density, fid_a, fid_b) -> httpx.Response:
        da, db = _optional_bytes(a), _optional_bytes(b)
        response = self._with_fresh_ids(
            lambda reuse: self._core.match_call(da, db, fid_a, fid_b, fmt, max_matches, min_score, density, reuse)
        )
        self._core.learn_match(response, da, db, density)
        return response


class AsyncLiftClient:
    """Asynchronous twin of :class:`LiftClient` (same arguments, same methods, awaitable).

    Use as ``async with AsyncLiftClient(url) as client: await client.features(img)``.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 30.0, retries: int = 3,
                 max_retry_wait: float = 10.0, reuse_features: bool = True,
                 transport: httpx.AsyncBaseTransport | None = None, api_key: str | None = None):
        self._core = _Core(base_url, retries, max_retry_wait, reuse_features)
        self._http = httpx.AsyncClient(base_url=self._core.base_url, timeout=timeout, transport=transport,
                                       headers=_auth_headers(api_key))

    async def __aenter__(self) -> AsyncLiftClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        for attempt in itertools.count():
            try:
                response = await self._http.request(call.method, call.path, **call.kwargs())
            except httpx.TransportError as exc:
                raise _transport_error(exc, self._core.base_url) from exc
            if response.is_success:
                return response
            await asyncio.sleep(self._core.retry_wait(response, attempt))

    async def _with_fresh_ids(self, build: Callable[[bool], _Call]) -> httpx.Response:
        call = build(True)
        try:
            return await self._send(call)
        except LiftAPIError as error:
            if not (call.reused_ids and _is_stale_id(error)):
                raise
            self._core.forget()
            return await self._send(build(False))

    async def models(self) -> dict:
        """See :meth:`LiftClient.models`."""
        return (await self._send(_Call("GET", "/v1/models"))).json()

    async def ready(self) -> bool:
        """See :meth:`LiftClient.ready`."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def extract(self, image: ImageInput, dtype: str = "float32", iterations: int | None = None,
                      stride: float | None = None) -> Features:
        """See :meth:`LiftClient.extract`."""
        density = _density(iterations, stride)
        data = image_bytes(image)
        result = _features_result(await self._send(self._core.features_call([data], dtype, density)))[0]
        self._core.remember(data, density, result.feature_id)
        return result

    async def features(self, image: ImageInput | Sequence[ImageInput], dtype: str = "float32",
                       iterations: int | None = None, stride: float | None = None) -> np.ndarray:
        """See :meth:`LiftClient.features`: [C, h, w], or [N, C, h, w] for a list."""
        density = _density(iterations, stride)
        datas, many = _image_list(image)
        response = await self._send(self._core.features_call(datas, dtype, density))
        return self._core.features_array(response, datas, density, many)

    async def similarity(self, image: ImageInput | None, x: float, y: float, target: ImageInput | None = None,
                         format: Literal["npy", "png"] = "npy", overlay: bool = False, alpha: float = 0.6,
                         iterations: int | None = None, stride: float | None = None, feature_id: str | None = None,
                         target_id: str | None = None,
                         scale: Literal["auto", "absolute"] = "auto") -> np.ndarray | bytes:
        """See :meth:`LiftClient.similarity`: [h, w] float32 map, or PNG bytes."""
        density = _density(iterations, stride)
        img, tgt = _optional_bytes(image), _optional_bytes(target)

        def build(reuse: bool) -> _Call:
            return self._core.similarity_call(img, feature_id, tgt, target_id, x, y, format, overlay, alpha,
                                              density, reuse, scale)

        response = await self._with_fresh_ids(build)
        self._core.learn_similarity(response, img, tgt, density)
        return self._core.similarity_result(response, format)

    async def match(self, a: ImageInput | None, b: ImageInput | None, max_matches: int | None = None,
                    min_score: float | None = None, iterations: int | None = None, stride: float | None = None,
                    feature_id_a: str | None = None, feature_id_b: str | None = None) -> list[Match]:
        """See :meth:`LiftClient.match`."""
        density = _density(iterations, stride)
        return _matches(await self._match(a, b, "json", max_matches, min_score, density, feature_id_a,
                                          feature_id_b))

    async def match_image(self, a: ImageInput | None, b: ImageInput | None, max_matches: int | None = None,
                          min_score: float | None = None, iterations: int | None = None,
                          stride: float | None = None) -> bytes:
        """See :meth:`LiftClient.match_image`."""
        density = _density(iterations, stride)
        return (await self._match(a, b, "png", max_matches, min_score, density, None, None)).content

    async def visualize(self, image: ImageInput | None = None, feature_id: str | None = None,
                        compare: bool = False, basis_id: str | None = None, iterations: int | None = None,
                        stride: float | None = None) -> bytes:
        """See :meth:`LiftClient.visualize`."""
        density = _density(iterations, stride)
        img = _optional_bytes(image)
        response = await self._with_fresh_ids(
            lambda reuse: self._core.visualize_call(img, feature_id, basis_id, compare, density, reuse))
        if img is not None:
            self._core.remember(img, density, response.headers.get("x-feature-id"))
        return response.content

    async def _match(self, a, b, fmt, max_matches, min_score, density, fid_a, fid_b) -> httpx.Response:
        da, db = _optional_bytes(a), _optional_bytes(b)
        response = await self._with_fresh_ids(
            lambda reuse: self._core.match_call(da, db, fid_a, fid_b, fmt, max_matches, min_score, density, reuse)
        )
        self._core.learn_match(response, da, db, density)
        return response


__all__ = ["AsyncLiftClient", "Features", "ImageInput", "LiftAPIError", "LiftClient", "Match", "image_bytes"]
