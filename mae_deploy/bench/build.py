"""Creating the runners a benchmark measures, and telling "not here" apart from "bad input".

A combination that cannot run on this machine (a missing package or device: MissingDependency,
DeviceUnavailable, ImportError) or that the backend or bundle does not offer (torch int8, an ORT
precision the bundle was not exported with, torch without weights) becomes skipped rows with the
reason. Anything else that goes wrong while building is the user's input and stops the run with exit 3
naming it: a graph ONNX Runtime cannot load, an unreadable or mismatching ``--checkpoint``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mae_deploy.errors import BundleError, CheckpointError, DeviceUnavailable, InputError, MissingDependency
from mae_deploy.names import TORCH_PRECISIONS

# What "unavailable here" means: the package or the device, never the user's files.
UNAVAILABLE = (MissingDependency, DeviceUnavailable, ImportError)


def torch_not_offered(bundle, precision: str, device: str, checkpoint: str | None) -> str | None:
    """Why the torch backend does not offer this combination (None: it does)."""
    if precision not in TORCH_PRECISIONS:
        return f"the torch backend runs {', '.join(TORCH_PRECISIONS)}, not {precision}"
    if precision == "fp16" and device == "cpu":
        return "torch fp16 autocast needs a CUDA device"
    if checkpoint is None:
        try:
            bundle.reference_checkpoint()
        except BundleError as e:
            return f"no weights for the torch backend (give --checkpoint): {e}"
    return None


def runner_options(
    backend: str, threads: int, checkpoint: str | None, max_batch: int, compile_model: bool = False
) -> dict:
    """Constructor options per backend: pinned threads, the torch weights, ``compile`` (torch.compile; OpenVINO's
    model per input shape), the TensorRT profile."""
    if backend == "ort":
        return {"intra_op_threads": threads, "inter_op_threads": 1}
    if backend == "torch":
        return {
            "threads": threads,
            **({"checkpoint": checkpoint} if checkpoint else {}),
            **({"compile": True} if compile_model else {}),
        }
    if backend == "trt":
        # The engine's profile must cover the largest batch, or the runner would split it into chunks.
        # Its optimum shape stays the runner's default (batch min(8, max), all tokens).
        return {"max_batch": max_batch}
    if backend == "openvino":
        return {"threads": threads, **({"compile": True} if compile_model else {})}
    return {"threads": threads}


def runner_threads(info, backend: str) -> dict:
    """The thread counts a runner reports, as {intra_op, inter_op} (None where it has no such knob)."""
    d = info.details or {}
    if backend == "ort":
        return {"intra_op": d.get("intra_op_threads"), "inter_op": d.get("inter_op_threads")}
    if backend in ("torch", "openvino"):
        return {"intra_op": d.get("threads"), "inter_op": None}
    return {"intra_op": None, "inter_op": None}


def build_runner(
    bundle,
    backend: str,
    precision: str,
    device: str,
    threads: int,
    checkpoint: str | None,
    parts_needed: Sequence[str],
    max_batch: int = 1,
    compile_model: bool = False,
):
    """Create a runner and its sessions/engines now: (runner, build seconds, None) or (None, None, reason).

    Raises InputError (exit 3) for bad input; returns a reason only for what is unavailable or not offered.
    """
    from mae_deploy.runners import create_runner

    if backend == "torch":
        reason = torch_not_offered(bundle, precision, device, checkpoint)
        if reason:
            return None, None, reason
    t0 = time.perf_counter()
    try:
        runner = create_runner(
            bundle,
            backend=backend,
            device=device,
            precision=precision,
            **runner_options(backend, threads, checkpoint, max_batch, compile_model),
        )
    except UNAVAILABLE as e:
        return None, None, f"{backend} {precision} on {device} unavailable: {e}"
    except InputError as e:
        if backend == "torch" and checkpoint is None:  # the bundle's own reference/ weights are unreadable
            raise InputError(
                f"{e} (the torch backend and the torch reference read the bundle's reference weights: "
                "give --checkpoint WEIGHTS, or --no-reference without torch in --backends)"
            ) from e
        if backend == "torch" or isinstance(e, CheckpointError):
            raise  # every combination torch does not offer was checked above: these are the weights
        return None, None, f"{backend} does not offer {precision} here: {e}"
    try:
        load = getattr(runner, "load", None)
        if callable(load):  # lazily-creating runners (ORT) build their sessions here, not in the first call
            # Every part encodes (decoder rows without a reference decode the runner's own latent).
            wants_decoder = runner.has_decoder and any(p in ("decoder", "reconstruct") for p in parts_needed)
            load(("encoder", "decoder") if wants_decoder else ("encoder",))
    except UNAVAILABLE as e:
        runner.close()
        return None, None, f"{backend} {precision} on {device} unavailable: {e}"
    except BaseException:
        runner.close()
        raise
    return runner, time.perf_counter() - t0, None
