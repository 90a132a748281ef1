"""Triton model configurations (as dicts for :mod:`mae_deploy.triton.pbtxt`) for a bundle's models.

- ONNX models (``platform: "onnxruntime_onnx"``): inputs and outputs with the graph's names, dtypes and
  dims (the leading ``batch`` dim left to ``max_batch_size``; other symbolic dims such as ``visible`` -> -1),
  dynamic batching, an instance group of the asked kind, and optionally the onnxruntime backend's TensorRT
  accelerator.
- Python-backend models (``backend: "python"``) always run on CPU instances.
- Ensembles (``platform: "ensemble"``) wire steps by tensor names.

Schema: Triton's ``ModelConfig`` (model_config.proto). These dicts are checked against it in the tests
(tritonclient's ``model_config_pb2``); no live Triton has loaded them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from mae_deploy.bundle import GraphSpec, TensorSpec
from mae_deploy.errors import BundleError
from mae_deploy.triton.pbtxt import Enum

# Model names in the generated repository.
ENCODER_MODEL = "mae_encoder"
DECODER_MODEL = "mae_decoder"
CLASSIFIER_MODEL = "mae_classifier"
PREPROCESS_MODEL = "mae_preprocess"
POOL_MODEL = "mae_pool"
FEATURES_ENSEMBLE = "mae_features"
CLASSIFY_ENSEMBLE = "mae_classify"

# Tensor names the Python-backend models and ensembles add to the graphs' own.
IMAGE_TENSOR = "image"
FEATURES_TENSOR = "features"
LABELS_FILE = "labels.txt"

_TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class Scheduling:
    """What every ONNX model of the repository shares: batching, instances, device kind, accelerator."""

    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 500
    instances: int = 1
    kind: str = "cpu"  # "cpu" | "gpu"
    tensorrt: bool = False
    tensorrt_precision: str = "FP32"  # precision_mode of the TensorRT accelerator


def triton_dtype(dtype: str, where: str) -> Enum:
    try:
        return Enum(_TRITON_DTYPES[dtype])
    except KeyError:
        raise BundleError(f"{where} has dtype {dtype!r}, which has no Triton data type here") from None


def tensor_config(spec: TensorSpec, where: str) -> dict:
    """A graph tensor as a Triton input/output: the batch dim dropped, symbolic dims -> -1."""
    if not spec.shape or isinstance(spec.shape[0], int):
        raise BundleError(
            f"{where} tensor '{spec.name}' has shape {list(spec.shape)}, without a symbolic leading batch dim; "
            "Triton batching needs one: re-export the bundle"
        )
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in spec.shape[1:]]
    return {"name": spec.name, "data_type": triton_dtype(spec.dtype, f"{where} tensor '{spec.name}'"), "dims": dims}


def _dynamic_batching(s: Scheduling) -> dict:
    return {"preferred_batch_size": list(s.preferred_batch_sizes), "max_queue_delay_microseconds": s.max_queue_delay_us}


def _tensorrt_accelerator(s: Scheduling, profile: dict[str, tuple[tuple[int, ...], ...]] | None) -> dict:
    """The onnxruntime backend's TensorRT execution accelerator (values are strings in its schema)."""
    params = {
        "precision_mode": s.tensorrt_precision,
        "max_workspace_size_bytes": str(4 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": "/tmp/mae-deploy-trt-cache",
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": "/tmp/mae-deploy-trt-cache",
    }
    if profile:
        for i, corner in enumerate(("min", "opt", "max")):
            params[f"trt_profile_{corner}_shapes"] = ",".join(
                f"{name}:{'x'.join(str(d) for d in shapes[i])}" for name, shapes in profile.items()
            )
    entries = [{"key": k, "value": v} for k, v in params.items()]
    return {"execution_accelerators": {"gpu_execution_accelerator": [{"name": "tensorrt", "parameters": entries}]}}


def onnx_model_config(
    name: str,
    graph: GraphSpec,
    s: Scheduling,
    *,
    labels: bool = False,
    trt_profile: dict[str, tuple[tuple[int, ...], ...]] | None = None,
) -> dict:
    """config.pbtxt of an ONNX graph served by the onnxruntime backend."""
    where = f"{graph.file} ({graph.part})"
    outputs = [tensor_config(t, where) for t in graph.outputs]
    if labels:
        for out in outputs:
            out["label_filename"] = LABELS_FILE  # Triton's classification extension (class_count)
    cfg = {
        "name": name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": s.max_batch_size,
        "input": [tensor_config(t, where) for t in graph.inputs],
        "output": outputs,
        "instance_group": [{"count": s.instances, "kind": Enum("KIND_GPU" if s.kind == "gpu" else "KIND_CPU")}],
        "dynamic_batching": _dynamic_batching(s),
    }
    if s.tensorrt:
        cfg["optimization"] = _tensorrt_accelerator(s, trt_profile)
    return cfg


def python_model_config(
    name: str, inputs: list[dict], outputs: list[dict], s: Scheduling, parameters: Mapping[str, object]
) -> dict:
    """config.pbtxt of a Python-backend model (CPU instances; parameters as JSON-free strings)."""
    params = [
        {"key": k, "value": {"string_value": v if isinstance(v, str) else json.dumps(v)}} for k, v in parameters.items()
    ]
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": s.max_batch_size,
        "input": inputs,
        "output": outputs,
        "instance_group": [{"count": s.instances, "kind": Enum("KIND_CPU")}],
        "dynamic_batching": _dynamic_batching(s),
        "parameters": params,
    }


def ensemble_config(name: str, inputs: list[dict], outputs: list[dict], steps: list[dict], s: Scheduling) -> dict:
    """config.pbtxt of an ensemble; ``steps`` are {"model_name", "input_map", "output_map"} with plain dicts."""
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": s.max_batch_size,
        "input": inputs,
        "output": outputs,
        "ensemble_scheduling": {
            "step": [
                {
                    "model_name": st["model_name"],
                    "model_version": -1,
                    "input_map": [{"key": k, "value": v} for k, v in st["input_map"].items()],
                    "output_map": [{"key": k, "value": v} for k, v in st["output_map"].items()],
                }
                for st in steps
            ]
        },
    }
