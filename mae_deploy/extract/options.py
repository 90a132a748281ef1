"""What an extraction job is asked to do: one options object that ``mae-deploy extract`` builds and
:func:`~mae_deploy.extract.extract_features` takes (keywords override its fields)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from mae_deploy.errors import InputError


@dataclass(frozen=True)
class ExtractOptions:
    """Every setting of an extraction job, with its default. See :func:`~mae_deploy.extract.extract_features`."""

    # the model
    backend: str = "ort"
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 32
    threads: int | None = None  # inference threads, mapped by each backend
    runner_opts: dict = field(default_factory=dict)  # passed to the runner as they are (e.g. compile=True)
    # what is stored
    pool: str = "cls"
    dtype: str = "float32"
    shard_size: int | None = None  # None: 10,000 inputs (fewer for tokens), or the existing job's when resuming
    num_parts: int = 1  # parts of the source (one per launcher task) ...
    part_index: int = 0  # ... and the part this job runs
    # inputs
    strict: bool = False  # stop at the first input that fails
    min_side: int = 16
    max_pixels: int | None = None  # None: Pillow's limit; 0: none
    exact_resize: bool = False
    decoder: str | None = None  # "pil" | "torch"; None: torch on CUDA, pil on the CPU
    # the local engine
    workers: int | None = None  # decode processes; None: default_workers(); 0: a thread
    transfer: str = "float32"  # how decoded images come back from the workers
    start_method: str = "spawn"
    # the Ray engine
    engine: str = "local"
    ray_address: str | None = None
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    # reporting
    progress: bool = True

    def updated(self, **changes) -> ExtractOptions:
        """A copy with ``changes``; an unknown name is an InputError listing the options."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InputError(
                f"extract_features has no option {', '.join(unknown)}; it takes: {', '.join(sorted(names))}"
            )
        if "runner_opts" in changes and changes["runner_opts"] is None:
            changes["runner_opts"] = {}
        return replace(self, **changes)
