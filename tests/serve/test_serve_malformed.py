"""Malformed requests are 400s with the JSON error body, never 500s (issue #24, item 2).

Each case here was a 500 (or a 200 with a response that is not JSON) before: element counts that overflow
int64, a float binary_data_size, 'parameters' that is not an object, JSON nested 100k deep (on /v2 and on
/v1/features), an input given twice, NaN / Infinity pixels. Over real HTTP against a live server.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from serve_support import LiveServer

httpx = pytest.importorskip("httpx")

from mae_deploy.serve.config import ServeConfig  # noqa: E402
from mae_deploy.serve.errors import ApiError  # noqa: E402
from mae_deploy.serve.protocol_v2 import InferRequest, encode_infer_response  # noqa: E402

S, C, L = 32, 3, 16  # the tiny bundle: 32x32 RGB, 16 patches
HEADER = "Inference-Header-Content-Length"


def strict_json(text: str | bytes):
    """json.loads that refuses NaN / Infinity, which Python's parser accepts and JSON does not have."""

    def refuse(name):
        raise AssertionError(f"{name} in a response body: not JSON")

    return json.loads(text, parse_constant=refuse)


def pixels(**over) -> dict:
    return {"name": "pixel_values", "shape": [1, C, S, S], "datatype": "FP32", "data": [0.0] * (C * S * S), **over}


def ids(**over) -> dict:
    return {"name": "ids_keep", "shape": [1, L], "datatype": "INT64", "data": list(range(L)), **over}


def binary(shape, size, nbytes: int, datatype: str = "FP32") -> tuple[dict, bytes]:
    return {
        "inputs": [
            {"name": "pixel_values", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}
        ]
    }, b"\0" * nbytes


DEEP = "[" * 100_000 + "]" * 100_000
JSON_CASES = {
    "element count overflows int64": {"inputs": [pixels(shape=[4294967296, 4294967296], data=[0.0])]},
    "dimension above int64": {"inputs": [pixels(shape=[2**63, 1], data=[0.0])]},
    "boolean dimension": {"inputs": [pixels(shape=[True, C, S, S])]},
    "input parameters a list": {"inputs": [pixels(parameters=[1]), ids()]},
    "input parameters a string": {"inputs": [pixels(parameters="binary"), ids()]},
    "request parameters a list": {"inputs": [pixels(), ids()], "parameters": [1]},
    "output parameters a number": {"inputs": [pixels(), ids()], "outputs": [{"name": "latent", "parameters": 5}]},
    "outputs a number": {"inputs": [pixels(), ids()], "outputs": 5},
    "datatype a list": {"inputs": [pixels(datatype=[]), ids()]},
    "the same input twice": {"inputs": [pixels(), ids(), pixels()]},
    "the same output twice": {"inputs": [pixels(), ids()], "outputs": [{"name": "latent"}, {"name": "latent"}]},
    "null pixel": {"inputs": [pixels(data=[None] * (C * S * S)), ids()]},
    "id an object": {"inputs": [pixels(), ids()], "id": {"a": 1}},
}


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with LiveServer(ServeConfig(bundle=str(tiny_bundle))) as s:
        yield s


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60) as c:
        yield c


def assert_400(r, v2: bool = True) -> str:
    assert r.status_code == 400, (r.status_code, r.text[:300])
    body = strict_json(r.text)
    message = body["error"] if v2 else body["error"]["message"]
    assert isinstance(message, str) and message
    return message


def infer(client, server, body: bytes, headers: dict | None = None):
    return client.post(f"{server.url}/v2/models/encoder/infer", content=body, headers=headers or {})


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_malformed_json_requests_are_400(server, client, case):
    assert_400(infer(client, server, json.dumps(JSON_CASES[case]).encode()))


@pytest.mark.parametrize(
    ("doc", "blob", "match"),
    [
        (*binary([1024], 4096.0, 4096), "binary_data_size must be a non-negative integer"),
        (*binary([1024], True, 4096), "binary_data_size must be a non-negative integer"),
        (*binary([4294967296, 4294967296], 0, 0), "needs 73786976294838206464 bytes"),
        (*binary([2**62, 4], 0, 0), "bytes"),
    ],
)
def test_malformed_binary_requests_are_400(server, client, doc, blob, match):
    head = json.dumps(doc).encode()
    assert match in assert_400(infer(client, server, head + blob, {HEADER: str(len(head))}))


def test_json_nested_100k_deep_is_400_on_v2_and_v1(server, client):
    assert "too deeply" in assert_400(infer(client, server, ('{"inputs": ' + DEEP + "}").encode()))
    r = client.post(
        f"{server.url}/v1/features", content='{"images": ' + DEEP + "}", headers={"Content-Type": "application/json"}
    )
    assert "too deeply" in assert_400(r, v2=False)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_json_pixels_are_refused(server, client, literal):
    body = json.dumps({"inputs": [pixels(), ids()]}).replace("[0.0, 0.0", f"[0.0, {literal}", 1)
    message = assert_400(infer(client, server, body.encode()))
    assert "JSON number" in message or "non-finite" in message


def test_non_finite_binary_pixels_are_refused(server, client):
    x = np.zeros((1, C, S, S), np.float32)
    x[0, 1, 2, 3] = np.nan
    doc = {
        "inputs": [
            {
                "name": "pixel_values",
                "shape": [1, C, S, S],
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes},
            },
            ids(),
        ]
    }
    head = json.dumps(doc).encode()
    message = assert_400(infer(client, server, head + x.tobytes(), {HEADER: str(len(head))}))
    assert "non-finite" in message and f"flat index {1 * S * S + 2 * S + 3}" in message


def test_a_valid_request_still_answers_strict_json(server, client):
    r = infer(client, server, json.dumps({"inputs": [pixels(), ids()]}).encode())
    assert r.status_code == 200
    assert strict_json(r.text)["outputs"][0]["shape"] == [1, L + 1, 32]


def test_non_finite_outputs_are_never_written_as_json():
    """A model output holding NaN is an error in JSON form (a 500 of ours, said so), and raw bytes when binary."""
    out = {"latent": np.array([[1.0, np.nan]], np.float32)}
    with pytest.raises(ApiError) as e:
        encode_infer_response("encoder", "1", out, InferRequest(inputs={}))
    assert e.value.status == 500 and e.value.code == "non_finite_output"
    body, headers = encode_infer_response("encoder", "1", out, InferRequest(inputs={}, binary_default=True))
    head = strict_json(body[: int(headers[HEADER])])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert np.isnan(np.frombuffer(body[int(headers[HEADER]) :], np.float32)[1])
