"""The Python client of the lift-serve HTTP API: httpx + NumPy, no torch (Pillow only to send
arrays or PIL images). ``pip install lift-serve`` without extras installs exactly this."""

from lift_serve.client.lift_client import (
    AsyncLiftClient,
    Features,
    ImageInput,
    LiftAPIError,
    LiftClient,
    Match,
    image_bytes,
)

__all__ = ["AsyncLiftClient", "Features", "ImageInput", "LiftAPIError", "LiftClient", "Match", "image_bytes"]
