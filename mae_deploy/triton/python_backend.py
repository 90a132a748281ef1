"""The Python-backend models of a generated Triton repository; their ``model.py`` files import these.

A generated ``mae_preprocess/1/model.py`` is one import line (``PreprocessModel as TritonPythonModel``), so
Triton and ``mae-deploy`` run the very same preprocessing code: Triton's Python environment needs
``pip install 'mae-deploy[cpu]'`` (numpy + Pillow are what these models use; no torch).

- :class:`PreprocessModel`: ``image`` (TYPE_STRING, encoded JPEG/PNG/... bytes) -> ``pixel_values``
  (float32 [C, H, W]) exactly as :class:`~mae_deploy.preprocess.Preprocessor` makes it, and ``ids_keep``
  (int64 [L], every patch visible) for the encoder.
- :class:`PoolModel`: ``latent`` [L+1, D] -> ``features`` [D] with :func:`~mae_deploy.pooling.pool_latent`.

Settings come from the model's ``parameters`` in config.pbtxt (written by :mod:`mae_deploy.triton.repository`).
``triton_python_backend_utils`` exists only inside Triton, so it is imported in ``initialize``. Unrun against a
live Triton: the tests drive these classes through a stand-in of that module.
"""

from __future__ import annotations

import json

import numpy as np

from mae_deploy.errors import InputError
from mae_deploy.preprocess import Preprocessor

PIXEL_VALUES, IDS_KEEP, LATENT = "pixel_values", "ids_keep", "latent"
IMAGE, FEATURES = "image", "features"


def _pb_utils():
    import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

    return pb_utils


def model_parameters(args: dict) -> dict[str, str]:
    """The string parameters of the model's config (Triton passes the config as JSON in ``args``)."""
    cfg = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}


def decode_batch(preprocessor: Preprocessor, blobs: np.ndarray) -> np.ndarray:
    """Encoded images (an object array of bytes, any shape) -> float32 (N, C, H, W).

    The server's decoding (:func:`mae_deploy.serve.images.preprocess`): the Preprocessor on the request's
    bytes, so Triton, ``mae-deploy serve`` and the offline pipelines agree. Raises its ApiError naming the item.
    """
    from mae_deploy.serve.images import preprocess

    items = [b.encode() if isinstance(b, str) else bytes(b) for b in blobs.reshape(-1)]
    if not items:
        raise InputError("the request holds no images")
    return preprocess(items, preprocessor)


class PreprocessModel:
    """Triton Python model: encoded image bytes -> pixel_values and all-visible ids_keep."""

    def initialize(self, args: dict) -> None:
        self.pb = _pb_utils()
        params = model_parameters(args)
        config = json.loads(params["preprocessing"])
        self.preprocessor = Preprocessor.from_config(config, in_chans=int(params["in_chans"]))
        self.num_patches = int(params["num_patches"])

    def _respond(self, request):
        pb = self.pb
        from mae_deploy.serve.errors import ApiError

        blobs = pb.get_input_tensor_by_name(request, IMAGE).as_numpy()
        try:
            pixels = decode_batch(self.preprocessor, blobs)
        except (ApiError, InputError) as e:  # this request fails; the others in the batch still get answers
            return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e)))
        ids_keep = np.tile(np.arange(self.num_patches, dtype=np.int64), (pixels.shape[0], 1))
        return pb.InferenceResponse(output_tensors=[pb.Tensor(PIXEL_VALUES, pixels), pb.Tensor(IDS_KEEP, ids_keep)])

    def execute(self, requests: list) -> list:
        return [self._respond(r) for r in requests]

    def finalize(self) -> None:
        self.preprocessor = None  # type: ignore[assignment]  # dropped: Triton calls nothing after finalize


class PoolModel:
    """Triton Python model: encoder latent -> pooled features (cls token or mean of the patch tokens)."""

    def initialize(self, args: dict) -> None:
        from mae_deploy.pooling import pool_latent

        self.pb = _pb_utils()
        self.pool = model_parameters(args)["pool"]
        self._pool_latent = pool_latent
        if self.pool not in ("cls", "mean"):
            raise InputError(f"mae_pool: parameter pool is {self.pool!r}; expected cls or mean")

    def execute(self, requests: list) -> list:
        pb = self.pb
        out = []
        for request in requests:
            latent = pb.get_input_tensor_by_name(request, LATENT).as_numpy()
            feats = np.ascontiguousarray(self._pool_latent(latent, self.pool), dtype=np.float32)
            out.append(pb.InferenceResponse(output_tensors=[pb.Tensor(FEATURES, feats)]))
        return out

    def finalize(self) -> None:
        pass
