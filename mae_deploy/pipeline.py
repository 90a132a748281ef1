"""What every pipeline over a runner shares: the bundle, a batch size, the preprocessing, a runner it may
own, and a ``close()`` after which it refuses work (a closed runner would silently open new sessions)."""

from __future__ import annotations

import os

from mae_deploy.bundle import Bundle
from mae_deploy.errors import InputError
from mae_deploy.preprocess import Preprocessor
from mae_deploy.runners import Runner, create_runner


class Pipeline:
    """Base of FeatureExtractor, Classifier and Reconstructor; subclasses check the bundle in ``_check_bundle``."""

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        backend: str,
        device: str,
        precision: str,
        batch_size: int,
        runner: Runner | None,
        preprocessor: Preprocessor | None,
        runner_opts: dict,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        self._check_bundle()
        self.batch_size = batch_size
        self.preprocessor = preprocessor or Preprocessor.from_bundle(self.bundle)
        self._own_runner = runner is None
        self._closed = False
        self.runner = runner or create_runner(self.bundle, backend, device=device, precision=precision, **runner_opts)

    def _check_bundle(self) -> None:
        """Raise when the bundle lacks what this pipeline needs (before any runner is created)."""

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed; create a new one to run more images")

    def close(self) -> None:
        self._closed = True
        if self._own_runner:
            self.runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
