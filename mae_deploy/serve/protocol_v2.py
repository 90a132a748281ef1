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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

import numpy as np

from mae_deploy.serve.errors import ApiError
from mae_deploy.serve.json_body import parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"

# v2 datatype names <-> numpy dtypes (BYTES is not a tensor type these graphs take).
DATATYPES = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
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


def _object(value: object, where: str) -> dict:
    """A field that must be a JSON object when present (``parameters``); absent or null is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{where} must be a JSON object, got {type(value).__name__} {_short(value)}")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a dimension or a size


def _shape(spec: dict, name: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise _bad(f"input {name!r} needs a 'shape' of non-negative 64-bit integers, got {_short(shape)}")
    return tuple(shape)


def _dtype(spec: dict, name: str) -> np.dtype:
    dt = spec.get("datatype")
    if not isinstance(dt, str) or dt not in DATATYPES:
        raise _bad(f"input {name!r} has datatype {_short(dt)}; this server takes {sorted(DATATYPES)}")
    return DATATYPES[dt]


def _elements(shape: tuple[int, ...]) -> int:
    """The element count of ``shape``, as a Python int: np.prod wraps around in int64 ([2**32, 2**32] -> 0)."""
    return math.prod(shape)


def _check_finite(arr: np.ndarray, name: str) -> np.ndarray:
    """NaN and infinity are no pixel or token value, and a response holding them would not be JSON."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
        raise _bad(
            f"input {name!r} holds a non-finite value ({arr.ravel()[bad]}) at flat index {bad}; send finite numbers"
        )
    return arr


def _json_tensor(spec: dict, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    data = spec.get("data")
    if data is None:
        raise _bad(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    try:
        arr = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as e:
        raise _bad(f"input {name!r}: 'data' cannot be read as {dtype}: {e}") from e
    if arr.size != _elements(shape):
        raise _bad(f"input {name!r} has {arr.size} values in 'data' for shape {list(shape)}")
    return arr.reshape(shape)


def _binary_tensor(
    name: str, shape: tuple[int, ...], dtype: np.dtype, size: object, blob: memoryview, offset: int
) -> np.ndarray:
    if not _is_int(size) or size < 0:
        raise _bad(f"input {name!r}: parameters.binary_data_size must be a non-negative integer, got {_short(size)}")
    expected = _elements(shape) * dtype.itemsize
    if size != expected or offset + size > len(blob):
        raise _bad(
            f"input {name!r}: binary_data_size {size}, shape {list(shape)} x {dtype} needs {expected} "
            f"bytes, {len(blob) - offset} left in the body"
        )
    return np.frombuffer(blob[offset : offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Body (+ the Inference-Header-Content-Length header, if any) -> named numpy arrays.

    Whatever a client sends, the answer is an InferRequest or a 400 naming the field that is wrong.
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise _bad(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        head: bytes | memoryview = memoryview(body)[:n]
        blob = memoryview(body)[n:]
    else:
        head, blob = body, memoryview(b"")
    doc = parse_json(head, "bad_request", "the inference request header")
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise _bad("an inference request is a JSON object with a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("every entry of 'inputs' needs a 'name'")
        name = spec["name"]
        if name in inputs:
            raise _bad(f"input {name!r} is given twice; send each input once")
        shape, dtype = _shape(spec, name), _dtype(spec, name)
        size = _object(spec.get("parameters"), f"input {name!r}: 'parameters'").get("binary_data_size")
        if size is None:
            arr = _json_tensor(spec, name, shape, dtype)
        else:
            arr = _binary_tensor(name, shape, dtype, size, blob, offset)
            offset += size
        inputs[name] = _check_finite(arr, name)
    if offset != len(blob):
        raise _bad(f"the body has {len(blob) - offset} bytes after the binary inputs it declares")
    params = _object(doc.get("parameters"), "'parameters'")
    outputs, binary = _outputs(doc.get("outputs"))
    rid = doc.get("id")
    if rid is not None and not (isinstance(rid, str) or _is_int(rid)):
        raise _bad(f"'id' must be a string, got {type(rid).__name__} {_short(rid)}")
    return InferRequest(
        inputs=inputs,
        id=None if rid is None else str(rid),
        outputs=outputs,
        binary_outputs=binary,
        binary_default=bool(params.get("binary_data_output")),
    )


def _outputs(specs: object) -> tuple[list[str], set[str]]:
    """(names asked for in order, names asked for as binary) of a request's 'outputs'."""
    if specs is None:
        return [], set()
    if not isinstance(specs, list):
        raise _bad(f"'outputs' must be a list of {{\"name\": ...}} objects, got {type(specs).__name__}")
    outputs, binary = [], set()
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("every entry of 'outputs' needs a 'name'")
        name = spec["name"]
        if name in outputs:
            raise _bad(f"output {name!r} is asked for twice; name each output once")
        outputs.append(name)
        if _object(spec.get("parameters"), f"output {name!r}: 'parameters'").get("binary_data"):
            binary.add(name)
    return outputs, binary


def encode_infer_response(
    model: str, version: str, results: Mapping[str, np.ndarray], request: InferRequest
) -> tuple[bytes, dict[str, str]]:
    """Named output arrays -> (body, headers): JSON, or JSON + binary tensors with the length header."""
    names: Sequence[str] = request.outputs or list(results)
    outputs, blobs = [], []
    for name in names:
        arr = np.ascontiguousarray(results[name])
        entry: dict[str, object] = {"name": name, "datatype": v2_datatype(arr.dtype), "shape": list(arr.shape)}
        if name in request.binary_outputs or request.binary_default:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(name, arr)
        outputs.append(entry)
    doc = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(head))}


def _json_data(name: str, arr: np.ndarray) -> list:
    """An output's values as a JSON list; NaN or infinity has no JSON form, so it is an error, not bad JSON."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ApiError(
            500,
            "non_finite_output",
            f"the model's output {name!r} holds non-finite values (NaN or "
            "infinity), which JSON cannot carry; ask for it with parameters.binary_data to get the raw "
            "values, and report the input that caused it",
        )
    return arr.ravel().tolist()


def tensor_metadata(name: str, dtype: str, shape: Sequence[int | str]) -> dict:
    """A bundle TensorSpec -> v2 metadata (symbolic dims are -1)."""
    return {"name": name, "datatype": v2_datatype(dtype), "shape": [d if isinstance(d, int) else -1 for d in shape]}
