"""Settings of one `mae-deploy serve` process (limits, batching, auth), checked once.

Torch-free and FastAPI-free: the CLI, the uvicorn server and the Ray Serve deployment all build the same
:class:`ServeConfig`, so a replica on a cluster runs with exactly the limits of a local server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mae_deploy.errors import InputError
from mae_deploy.names import BACKENDS, DECODERS, RUNTIME_PRECISIONS

LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `mae-deploy serve` takes besides the network address (see ``mae-deploy serve --help``)."""

    bundle: str
    backend: str = "ort"
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    max_batch_size: int = 32
    max_delay_ms: float = 0.0
    max_queue: int = 256  # images waiting for the runner; more is refused with 503
    max_body_mb: float = 20.0
    max_images_per_request: int = 64
    timeout_s: float = 30.0
    api_key_env: str | None = None
    log_format: str = "text"
    max_pixels: int | None = None  # decompression-bomb limit (None: Pillow's default)
    max_decode_mb: float = 1024.0  # memory of images being decoded at once; beyond it 503 (413 for one request)
    decoder: str | None = None  # names.DECODERS; None: torch on cuda/tensorrt devices, pil on the CPU
    decode_workers: int = 8  # threads that decode and preprocess images off the event loop
    verify_bundle: bool = True
    runner_opts: dict = field(default_factory=dict)  # extra keywords for create_runner

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"--backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.precision not in RUNTIME_PRECISIONS:
            raise InputError(f"--precision must be one of {list(RUNTIME_PRECISIONS)}, got {self.precision!r}")
        positive = {
            "--max-batch-size": self.max_batch_size,
            "--max-queue": self.max_queue,
            "--max-body-mb": self.max_body_mb,
            "--max-decode-mb": self.max_decode_mb,
            "--max-images-per-request": self.max_images_per_request,
            "--timeout-s": self.timeout_s,
            "decode_workers": self.decode_workers,
        }
        for name, value in positive.items():
            if value <= 0:
                raise InputError(f"{name} must be positive, got {value}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"--threads must be at least 1, got {self.threads}")
        if self.max_delay_ms < 0:
            raise InputError(f"--max-delay-ms must be >= 0, got {self.max_delay_ms}")
        if self.decoder is not None and self.decoder not in DECODERS:
            raise InputError(f"--decoder must be one of {list(DECODERS)}, got {self.decoder!r}")
        if self.log_format not in LOG_FORMATS:
            raise InputError(f"--log-format must be one of {list(LOG_FORMATS)}, got {self.log_format!r}")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise InputError(
                f"--api-key-env {self.api_key_env}: that environment variable is not set or empty; export the key "
                "in it (e.g. export MAE_API_KEY=$(openssl rand -hex 16)) or drop the option"
            )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def image_decoder(self) -> str:
        """The decoder in use: --decoder, or the device's default."""
        from mae_deploy.decode_torch import default_decoder

        return self.decoder or default_decoder(self.device)

    @property
    def max_decode_bytes(self) -> int:
        return int(self.max_decode_mb * 2**20)

    @property
    def api_key(self) -> str | None:
        """The key clients must send, read from the environment (never stored in the config itself)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None
