"""The KServe v2 / Open Inference Protocol codec: JSON tensors and Triton's binary-tensor extension.

Requests: a JSON header ``{"id", "inputs": [{"name", "shape", "datatype", "data" | "parameters":
{"binary_data_size": n}}], "outputs": [{"name", "parameters": {"binary_data": bool}}], "parameters"}``,
followed, when the ``Inference-Header-Content-Length`` header gives the JSON's length, by the binary
tensors in input order (row-major, little-endian). Responses use the same layout: outputs asked for with
``binary_data`` (or all, with ``parameters.binary_data_output``) travel as bytes after the JSON.

This module only turns bytes into numpy arrays and back; it knows nothing of HTTP frameworks or models.
Spec: https://github.com/kserve/open-inference-protocol (REST) and Triton's binary_data extension.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mae_deploy.serve.errors import ApiError

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"

# v2 datatype names <-> numpy dtypes (BYTES is not a tensor type these graphs take).
DATATYPES = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_NAMES = {v: k for k, v in DATATYPES.items()}


def v2_datatype(dtype: str | np.dtype) -> str:
    """numpy dtype (or its name, e.g. 'float32') -> v2 name ('FP32')."""
    return _NAMES[np.dtype(dtype)]


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[str] = field(default_factory=list)  # names asked for, in order; empty: all
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False  # parameters.binary_data_output


def _shape(spec: dict, name: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(f"input {name!r} needs a 'shape' of non-negative integers, got {shape!r}")
    return tuple(shape)


def _dtype(spec: dict, name: str) -> np.dtype:
    dt = spec.get("datatype")
    if dt not in DATATYPES:
        raise _bad(f"input {name!r} has datatype {dt!r}; this server takes {sorted(DATATYPES)}")
    return DATATYPES[dt]


def _json_tensor(spec: dict, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    data = spec.get("data")
    if data is None:
        raise _bad(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    try:
        arr = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise _bad(f"input {name!r}: 'data' cannot be read as {dtype}: {e}") from e
    if arr.size != int(np.prod(shape)):
        raise _bad(f"input {name!r} has {arr.size} values in 'data' for shape {list(shape)}")
    return arr.reshape(shape)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Body (+ the Inference-Header-Content-Length header, if any) -> named numpy arrays."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise _bad(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        head, blob = body[:n], memoryview(body)[n:]
    else:
        head, blob = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"the inference request header is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("an inference request is a JSON object with a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("every entry of 'inputs' needs a 'name'")
        name = spec["name"]
        shape, dtype = _shape(spec, name), _dtype(spec, name)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is None:
            inputs[name] = _json_tensor(spec, name, shape, dtype)
            continue
        expected = int(np.prod(shape)) * dtype.itemsize
        if size != expected or offset + size > len(blob):
            raise _bad(f"input {name!r}: binary_data_size {size}, shape {list(shape)} x {dtype} needs {expected} "
                       f"bytes, {len(blob) - offset} left in the body")
        inputs[name] = np.frombuffer(blob[offset : offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)
        offset += size
    if offset != len(blob):
        raise _bad(f"the body has {len(blob) - offset} bytes after the binary inputs it declares")
    params = doc.get("parameters") or {}
    outputs, binary = [], set()
    for spec in doc.get("outputs") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("every entry of 'outputs' needs a 'name'")
        outputs.append(spec["name"])
        if (spec.get("parameters") or {}).get("binary_data"):
            binary.add(spec["name"])
    rid = doc.get("id")
    return InferRequest(inputs=inputs, id=None if rid is None else str(rid), outputs=outputs,
                        binary_outputs=binary, binary_default=bool(params.get("binary_data_output")))


def encode_infer_response(
    model: str, version: str, results: Mapping[str, np.ndarray], request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """Named output arrays -> (body, headers): JSON, or JSON + binary tensors with the length header."""
    names: Sequence[str] = request.outputs or list(results)
    outputs, blobs = [], []
    for name in names:
        arr = np.ascontiguousarray(results[name])
        entry = {"name": name, "datatype": v2_datatype(arr.dtype), "shape": list(arr.shape)}
        if name in request.binary_outputs or request.binary_default:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    doc = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}


def tensor_metadata(name: str, dtype: str, shape: Sequence[int | str]) -> dict:
    """A bundle TensorSpec -> v2 metadata (symbolic dims are -1)."""
    return {"name": name, "datatype": v2_datatype(dtype), "shape": [d if isinstance(d, int) else -1 for d in shape]}
