"""A Triton Inference Server model repository made from a bundle (``lift export --format triton``).

Torch-free: it reads the bundle contract (``lift_serve.bundle``) and the graphs' signatures (ONNX
Runtime), so an existing bundle converts on the service's own installation. The service side is
``lift_serve.service.triton_runtime``; the names both use are in :mod:`lift_serve.triton_repo.layout`.
See :mod:`lift_serve.triton_repo.repository` for the layout and the configuration written.
"""

from lift_serve.triton_repo.layout import (
    DEFAULT_PREFIX,
    REPOSITORY_INFO,
    ensemble_name,
    model_name,
)
from lift_serve.triton_repo.repository import (
    RepositoryError,
    TritonOptions,
    parse_config,
    write_repository,
)

__all__ = ["DEFAULT_PREFIX", "REPOSITORY_INFO", "RepositoryError", "TritonOptions", "ensemble_name", "model_name",
           "parse_config", "write_repository"]
