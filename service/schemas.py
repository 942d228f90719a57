"""Response models: the shape of every JSON answer, declared so that ``/docs`` and
``/openapi.json`` show it (binary answers, .npy and PNG, are described with their headers)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="stable snake_case code, e.g. unknown_feature_id", examples=["queue_full"])
    message: str = Field(description="what went wrong and what to do")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    status: str = Field(examples=["ready"])
    demo: bool
    provider: str | None = Field(None, description="the ONNX Runtime provider the model runs on",
                                 examples=["CUDAExecutionProvider"])


class InputSize(BaseModel):
    height: int
    width: int


class ModelInfo(BaseModel):
    backbone: dict[str, Any] = Field(description="the manifest's backbone (timm name, weights, layer, facet, ...)")
    upsampler: dict[str, Any] | None = Field(description="the manifest's upsampler (kind, parameters, graphs)")
    input_sizes: list[InputSize]
    channels: int
    patch_size: int
    strides: dict[str, float] = Field(description="input pixels per feature cell, by iterations")
    iterations: list[int]
    default_iterations: int
    providers: list[str] = Field(description="ONNX Runtime execution providers in use, first = active")
    parity: dict[str, Any] = Field(description="ONNX Runtime vs PyTorch, measured at export")
    resize_policy: str


class Models(BaseModel):
    model: ModelInfo
    demo: bool
    random_weights: list[str] = Field(default_factory=list, description="parts of the bundle with random or "
                                      "untrained weights (then `warning` says its features are meaningless)")
    warning: str | None
    parameters: dict[str, Any] = Field(description="allowed request parameters and their ranges")


class Size(BaseModel):
    width: int
    height: int


class Geometry(BaseModel):
    """How an image maps onto its feature grid (also in the X-* headers)."""

    model_config = {"extra": "allow"}

    image_size: Size
    input_size: Size
    stride: float


class FeatureItem(BaseModel):
    id: str = Field(description="feature id for later requests (any density)")
    shape: list[int] = Field(description="[C, h, w]")
    stride: float
    input_size: Size
    image_size: Size
    geometry: dict[str, Any]
    iterations: int
    dtype: str
    data: list[list[list[float]]] = Field(description="[C][h][w]")


class FeaturesJSON(BaseModel):
    features: list[FeatureItem]


class SimilarityQuery(BaseModel):
    x: float
    y: float
    cell: list[int] = Field(description="[row, col] of the queried cell")
    cell_center: list[float] = Field(description="its centre in the source's original pixels [x, y]")


class SimilarityJSON(BaseModel):
    similarity: list[list[float]] = Field(description="[h][w] on the target's grid, in [-1, 1]")
    shape: list[int]
    query: SimilarityQuery
    source: dict[str, Any]
    target: dict[str, Any]
    feature_id: str
    target_feature_id: str


class Match(BaseModel):
    a: list[float] = Field(description="[x, y] in image A's original pixels (a cell centre)")
    b: list[float] = Field(description="[x, y] in image B's original pixels")
    score: float = Field(description="cosine similarity in [-1, 1]")


class MatchJSON(BaseModel):
    matches: list[Match]
    count: int
    image_a_size: Size
    image_b_size: Size
    feature_id_a: str
    feature_id_b: str


def header(description: str, example: str) -> dict:
    return {"description": description, "schema": {"type": "string"}, "example": example}


FEATURE_HEADERS = {
    "X-Feature-Id": header("feature id(s), comma-separated; usable at any density", "3f7a…-k1-sq-224x224"),
    "X-Feature-Shape": header(".npy shape, comma-separated", "384,28,28"),
    "X-Feature-Stride": header("input pixels per feature cell", "8"),
    "X-Input-Size": header("model input WIDTHxHEIGHT, comma-separated per image", "320x224"),
    "X-Image-Size": header("original image WIDTHxHEIGHT, comma-separated per image", "640x480"),
}
SIMILARITY_HEADERS = {
    "X-Feature-Id": header("the source's feature id", "3f7a…-k1-sq-224x224"),
    "X-Target-Feature-Id": header("the target's feature id", "3f7a…-k1-sq-224x224"),
    "X-Query-Cell": header("the queried source cell, labelled", "row=12,col=7"),
    "X-Feature-Stride": header("input pixels per cell of the target's grid", "8"),
    "X-Input-Size": header("the target's model input WIDTHxHEIGHT", "320x224"),
    "X-Image-Size": header("the target's original WIDTHxHEIGHT", "640x480"),
    "X-Colour-Range": header("similarities at the two ends of the PNG's colour ramp: low,high", "0.12,1"),
}
VISUALIZE_HEADERS = {
    "X-Feature-Id": header("the image's feature id", "3f7a…-k1-sq-224x224"),
    "X-Basis-Feature-Id": header("the features the PCA basis was fitted on", "9c1d…-k1-sq-224x224"),
    "X-PCA-Explained-Variance": header("share of the variance of each of the 3 components, comma-separated",
                                       "0.31,0.12,0.07"),
    "X-Feature-Stride": header("input pixels per cell of the coloured grid", "8"),
}
MATCH_HEADERS = {
    "X-Feature-Id-A": header("feature id of image A", "3f7a…-k1-sq-224x224"),
    "X-Feature-Id-B": header("feature id of image B", "9c1d…-k1-sq-224x224"),
}
