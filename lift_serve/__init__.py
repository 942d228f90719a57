"""lift-serve: dense ViT features with LiFT, trained, exported to ONNX and served over HTTP.

One import namespace for the whole distribution, whose folders stay at the repository's top level
(mapped in pyproject.toml with setuptools ``package-dir``):

* ``lift_serve.model``    pure PyTorch: backbones, LiFT, checkpoints, ONNX export (``model/``)
* ``lift_serve.training`` self-supervised training and reconstruction evaluation (``training/``)
* ``lift_serve.service``  the HTTP service on ONNX Runtime; never imports torch (``service/``)
* ``lift_serve.bench``    benchmarks and evaluations (``bench/``)
* ``lift_serve.client``   the HTTP client (``client/``)
* ``lift_serve.cli``      the ``lift`` command

A bare ``pip install lift-serve`` is the HTTP client (``lift_serve.client``, httpx + numpy);
the server and the torch side come with the ``serve``/``gpu`` and ``train`` extras.
"""

__version__ = "0.1.0"
