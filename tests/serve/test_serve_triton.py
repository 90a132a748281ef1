"""tritonclient.http, unchanged, against the server's KServe v2 endpoints (binary and JSON tensors)."""

from __future__ import annotations

import numpy as np
import pytest
from serve_support import LiveServer, metric_values

th = pytest.importorskip("tritonclient.http")

from mae_deploy.masking import all_visible, random_masking  # noqa: E402
from mae_deploy.runners import create_runner  # noqa: E402
from mae_deploy.serve.config import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with LiveServer(ServeConfig(bundle=str(tiny_bundle))) as s:
        yield s


@pytest.fixture
def client(server):
    c = th.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=30, network_timeout=30)
    yield c
    c.close()


def _input(name: str, arr: np.ndarray, binary: bool):
    t = th.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("encoder") and client.is_model_ready("decoder")
    meta = client.get_model_metadata("encoder")
    assert meta["name"] == "encoder" and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        {"name": "ids_keep", "datatype": "INT64", "shape": [-1, -1]},
    ]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoder_and_decoder_equal_the_runner(client, tiny_bundle, binary):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    ids_keep, ids_restore, _ = random_masking(3, 16, 0.75, rng=1)
    with create_runner(tiny_bundle) as runner:
        latent = runner.encode(x, ids_keep)
        pred = runner.decode(latent, ids_restore)
    res = client.infer(
        "encoder",
        [_input("pixel_values", x, binary), _input("ids_keep", ids_keep, binary)],
        outputs=[th.InferRequestedOutput("latent", binary_data=binary)],
        request_id="req-1",
    )
    np.testing.assert_allclose(res.as_numpy("latent"), latent, atol=1e-5, rtol=0)
    assert res.get_response()["id"] == "req-1"
    res = client.infer("decoder", [_input("latent", latent, binary), _input("ids_restore", ids_restore, binary)])
    np.testing.assert_allclose(res.as_numpy("pred"), pred, atol=1e-5, rtol=0)


def test_v2_shares_batches_with_v1_and_counts_images(client, server):
    x = np.zeros((2, 3, 32, 32), np.float32)
    ids, _, _ = all_visible(2, 16)
    client.infer("encoder", [_input("pixel_values", x, True), _input("ids_keep", ids, True)])
    import httpx

    text = httpx.get(f"{server.url}/metrics").text
    assert metric_values(text, "mae_serve_images_total")['{endpoint="/v2/models/encoder/infer"}'] >= 2


@pytest.mark.parametrize(
    ("model", "inputs", "match"),
    [
        (
            "encoder",
            {"pixel_values": np.zeros((1, 3, 16, 16), np.float32), "ids_keep": np.zeros((1, 4), np.int64)},
            "expects",
        ),
        (
            "encoder",
            {"pixel_values": np.zeros((1, 3, 32, 32), np.float32), "ids_keep": np.zeros((1, 2), np.int64)},
            "duplicate index",
        ),
        ("encoder", {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}, "takes inputs"),
        ("nothing", {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}, "no model"),
    ],
    ids=["wrong_shape", "duplicate_ids", "missing_input", "unknown_model"],
)
def test_bad_tensors_are_errors_tritonclient_reads(client, server, model, inputs, match):
    with pytest.raises(th.InferenceServerException, match=match):
        client.infer(model, [_input(k, v, True) for k, v in inputs.items()])
    assert client.is_server_ready()
