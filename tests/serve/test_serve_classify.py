"""A classifier bundle served: POST /v1/classify and the classifier graph under /v2 (tritonclient)."""

from __future__ import annotations

import numpy as np
import pytest
from serve_support import LiveServer, jpeg_bytes
from test_serve import post_image

httpx = pytest.importorskip("httpx")
th = pytest.importorskip("tritonclient.http")

from mae_deploy.classify import Classifier  # noqa: E402
from mae_deploy.serve.config import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def server(classifier_bundle):
    with LiveServer(ServeConfig(bundle=str(classifier_bundle))) as s:
        yield s


def test_classify_equals_the_offline_classifier(server, classifier_bundle, tmp_path):
    blobs = [jpeg_bytes(400 + i) for i in range(3)]
    paths = []
    for i, b in enumerate(blobs):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(b)
    with Classifier(classifier_bundle) as clf:
        expected = clf.classify(paths, top_k=3)
        logits = clf.logits(paths)
    with httpx.Client(timeout=60) as c:
        files = [("file", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
        r = c.post(f"{server.url}/v1/classify?top_k=3", files=files)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["top_k"] == 3 and [d["index"] for d in doc["data"]] == [0, 1, 2]
        for got, want in zip(doc["data"], expected, strict=True):
            assert [p["label"] for p in got["predictions"]] == [label for label, _ in want]
            np.testing.assert_allclose([p["probability"] for p in got["predictions"]], [p for _, p in want], atol=1e-5)
        card = c.get(f"{server.url}/v1/models").json()["data"][0]
        assert card["class_names"] == ["cat", "dog", "bird", "fish", "frog"]
        assert (
            c.post(
                f"{server.url}/v1/classify?top_k=0", content=blobs[0], headers={"Content-Type": "image/jpeg"}
            ).status_code
            == 400
        )

    client = th.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=30, network_timeout=30)
    try:
        from mae_deploy.bundle import Bundle
        from mae_deploy.preprocess import Preprocessor

        x = Preprocessor.from_bundle(Bundle.load(classifier_bundle))(paths)
        inp = th.InferInput("pixel_values", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        res = client.infer("classifier", [inp], outputs=[th.InferRequestedOutput("logits", binary_data=True)])
        np.testing.assert_allclose(res.as_numpy("logits"), logits, atol=1e-5, rtol=0)
        assert client.get_model_metadata("classifier")["outputs"][0]["name"] == "logits"
    finally:
        client.close()


def test_classify_without_a_classifier_is_a_400(tiny_bundle):
    with LiveServer(ServeConfig(bundle=str(tiny_bundle))) as s, httpx.Client(timeout=30) as c:
        r = post_image(c, f"{s.url}/v1/classify", jpeg_bytes(0))
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_classifier"
