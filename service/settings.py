"""Service configuration: ``LIFT_*`` environment variables, read once by pydantic-settings.

Every field below is one environment variable (``bundle`` <- ``LIFT_BUNDLE`` ...). The README's
"Serve" section lists them with their defaults; ``lift serve`` flags override them. Routes receive
the one :class:`Settings` object through the :func:`get_settings` dependency.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1 << 20


class Settings(BaseSettings):
    """What the service loads and how it serves it (env prefix ``LIFT_``)."""

    model_config = SettingsConfigDict(env_prefix="LIFT_", extra="ignore", frozen=True)

    bundle: Path | None = Field(None, description="bundle directory written by `lift export`, or "
                                "hf://ORG/NAME[@REVISION][/PATH] for one on the Hugging Face Hub")
    demo: bool = Field(False, description="serve an untrained demo bundle (meaningless features)")
    demo_dir: Path = Field(Path("~/.cache/lift-serve/demo-bundle").expanduser(),
                           description="where the demo bundle is exported once and reused")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_size: int = Field(8, ge=1, le=256, description="largest batch one ONNX Runtime call runs")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long the first request waits for company")
    max_queue: int = Field(64, ge=1, description="requests waiting for inference before answering 429")
    request_timeout_s: float = Field(30.0, gt=0, description="queue + inference time limit per image (504)")
    batching: bool = Field(True, description="false = batch size 1 (for comparisons)")
    cache_bytes: int | None = Field(None, ge=0, description="feature cache budget in bytes (0 = no cache); unset = "
                                    "the larger of 256 MiB and two images at the bundle's densest density")
    max_upload_bytes: int = Field(20 * MIB, ge=1, description="largest request body in bytes (413)")
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image, width x height (413)")
    decode_concurrency: int = Field(2, ge=1, le=64, description="image decodes running at once; more wait")
    decode_pixel_budget: int = Field(120_000_000, ge=1, description="decoded pixels of all uploads being decoded "
                                     "or waiting; beyond it 503 + Retry-After")
    max_images_per_request: int = Field(64, ge=1, le=1024, description="most images one /v1/features request "
                                        "may carry (413)")
    max_response_bytes: int | None = Field(None, ge=1, description="largest /v1/features answer, checked before "
                                           "any inference (422 naming the limit); unset = the larger of 256 MiB "
                                           "and one image's float32 features at the bundle's densest density")
    resize_policy: Literal["square", "keep_aspect"] = "square"
    runtime: Literal["onnxruntime", "triton"] = Field(
        "onnxruntime", description="what runs the bundle's graphs: ONNX Runtime in this process, or a Triton "
        "server holding the repository `lift export --format triton` wrote (LIFT_TRITON_URL)")
    triton_url: str = Field("http://127.0.0.1:8000", description="the Triton server's HTTP (KServe v2) endpoint, "
                            "for LIFT_RUNTIME=triton")
    triton_model_prefix: str = Field("lift", description="prefix of the model names in the Triton repository "
                                     "(`lift export --format triton --model-prefix`)")
    triton_startup_timeout_s: float = Field(60.0, gt=0, le=3600, description="how long the start waits for the "
                                            "Triton server and its models to be ready")
    providers: str = Field("cuda,cpu", description="ONNX Runtime providers in preference order")
    require_provider: Literal["", "cpu", "cuda", "tensorrt"] = Field(
        "", description="set: start-up fails unless ONNX Runtime really runs on this provider (no silent fallback)")
    trt_fp16: bool = Field(True, description="TensorRT provider: fp16 kernels")
    trt_engine_cache_dir: Path | None = Field(None, description="TensorRT provider: engine and timing caches here "
                                              "(a volume: later starts load engines instead of building them)")
    trt_max_workspace_bytes: int = Field(2 << 30, ge=1 << 20, description="TensorRT provider: builder workspace")
    trt_profiles: bool = Field(True, description="TensorRT provider: explicit min/opt/max shape profiles from the "
                               "bundle's sizes x LIFT_MAX_BATCH_SIZE (one engine for every batch)")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE", description="CUDA provider: how cuDNN picks convolution algorithms (once per shape, in the "
        "warm-up)")
    cuda_device_id: int = Field(0, ge=0, description="CUDA/TensorRT provider: the GPU to run on")
    warmup: Literal["auto", "all", "one"] = Field(
        "auto", description="start-up warm-up batch sizes: auto = every batch size the batcher can form on a GPU, "
        "batch 1 on the CPU; all = every batch size; one = batch 1")
    intra_op_threads: int = Field(0, ge=0, description="0 = ONNX Runtime default (one per core)")
    inter_op_threads: int = Field(0, ge=0)
    ort_spinning: bool = Field(False, description="let ONNX Runtime's threads spin while waiting for work (its "
                               "default; off here: on a shared host they spin against the server's own threads)")
    max_header_bytes: int = Field(65536, ge=1024, le=1 << 20, description="largest request head (line + "
                                  "headers); beyond it the connection is refused")
    max_connections: int = Field(512, ge=1, description="connections and requests at once; beyond it new "
                                 "ones get 503 (keeps file descriptors for everyone else)")
    keep_alive_s: float = Field(5.0, gt=0, le=600, description="idle keep-alive connections are closed after this")
    head_timeout_s: float = Field(10.0, gt=0, le=600, description="a connection that has not sent a whole request "
                                  "head (line + headers) this long after connecting or its last answer is closed")
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description="a request whose body is not complete this long "
                                  "after its head is closed (slow uploads cannot hold connections)")
    graceful_shutdown_s: float = Field(20.0, gt=0, le=600, description="on SIGTERM, time for running requests "
                                       "before the process exits (below compose's 30 s grace period)")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty = none")
    api_keys: str = Field("", repr=False, description="comma-separated API keys; set = every /v1 request and "
                          "/metrics need `Authorization: Bearer KEY` (health, readiness, the page's files stay open)")
    api_keys_file: Path | None = Field(None, description="a file of API keys, one per line (# comments), "
                                       "read at start; added to LIFT_API_KEYS")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("bundle", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        # LIFT_BUNDLE= (empty, as compose files write unset variables) means no bundle, not the current directory.
        if isinstance(value, str) and not value.strip():
            return None
        # hf://ORG/NAME[@REVISION][/PATH]: the bundle's folder in the Hugging Face cache (fetched once).
        # A failure raises HubError, which is not a ValueError: it reaches the user as it is.
        from lift_serve.hub.refs import is_hub_ref, resolve_directory

        return resolve_directory(value) if is_hub_ref(value) else value

    @field_validator("demo_dir", "bundle", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value

    @property
    def provider_list(self) -> list[str]:
        return [p.strip() for p in self.providers.split(",") if p.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def uvicorn_options(self) -> dict:
        """The server limits as uvicorn's settings. h11 is used because it enforces the header size
        limit (httptools accepts a head of any size)."""
        return {"http": "h11", "h11_max_incomplete_event_size": self.max_header_bytes,
                "limit_concurrency": self.max_connections, "timeout_keep_alive": self.keep_alive_s,
                "timeout_graceful_shutdown": self.graceful_shutdown_s}

    def api_key_set(self) -> frozenset[str]:
        """Every accepted key (empty: authentication off). Raises ValueError for an unreadable file."""
        keys = {k.strip() for k in self.api_keys.split(",") if k.strip()}
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.expanduser().read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"LIFT_API_KEYS_FILE {self.api_keys_file} cannot be read ({exc.strerror}); "
                                 "point it at a file of keys, one per line") from None
            keys |= {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
        return frozenset(keys)

    @property
    def effective_batch_size(self) -> int:
        return self.max_batch_size if self.batching else 1


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once (a FastAPI dependency).

    ``create_app(settings)`` overrides this dependency with the settings it was given.
    """
    return Settings()
