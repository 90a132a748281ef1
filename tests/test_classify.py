"""Classifier (Python API), `mae-deploy classify` and `mae-deploy eval` on real classifier bundles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_fixtures import export_classifier_bundle, tiny_classifier

from mae_deploy.bundle import Bundle
from mae_deploy.classify import Classifier, softmax
from mae_deploy.cli import main
from mae_deploy.errors import BundleError, InputError
from mae_deploy.evaluate import evaluate
from mae_deploy.preprocess import Preprocessor

LABELS = ["cat", "dog", "bird", "fish", "frog"]


def write_images(d: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = d / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def write_broken(d: Path) -> list[Path]:
    """An empty file, a truncated PNG and a text file named .jpg."""
    good = write_images(d / "src", 1, seed=7)[0].read_bytes()
    empty, truncated, text = d / "empty.png", d / "truncated.png", d / "text.jpg"
    empty.write_bytes(b"")
    truncated.write_bytes(good[: len(good) // 2])
    text.write_text("hello, not an image")
    return [empty, truncated, text]


# -- the Python API --------------------------------------------------------------------------------------


def test_classifier_equals_onnx_runtime_and_the_pytorch_model(classifier_bundle, tmp_path):
    paths = write_images(tmp_path, 5)
    b = Bundle.load(classifier_bundle)
    pixels = Preprocessor.from_bundle(b)(paths)
    sess = ort.InferenceSession(str(b.path / "classifier.onnx"), providers=["CPUExecutionProvider"])
    direct = sess.run(["logits"], {"pixel_values": pixels})[0]
    with Classifier(b, batch_size=2) as clf:  # batches of 2: chunking must not change the result
        logits = clf.logits(paths)
        np.testing.assert_allclose(logits, direct, rtol=0, atol=1e-6)
    with Classifier(b, backend="torch") as ref:
        np.testing.assert_allclose(ref.logits(paths), logits, rtol=0, atol=1e-4)
    import torch

    from training.checkpoints import load_model

    model, _ = load_model(b.path / "reference")
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(pixels)).numpy(), logits, rtol=0, atol=1e-4)


def test_classify_returns_sorted_top_k_with_the_bundle_names(classifier_bundle, tmp_path):
    paths = write_images(tmp_path, 3)
    with Classifier(classifier_bundle) as clf:
        assert clf.class_names == LABELS
        preds = clf.classify(paths, top_k=3)
        logits = clf.logits(paths)
        probs = softmax(logits)
        for pred, p in zip(preds, probs, strict=True):
            assert len(pred) == 3
            assert [x[1] for x in pred] == sorted((x[1] for x in pred), reverse=True)
            assert pred[0] == (LABELS[int(p.argmax())], pytest.approx(float(p.max())))
        full = clf.classify(paths[0], top_k=50)[0]  # one path is one image; k is capped at the class count
        assert sorted(lab for lab, _ in full) == sorted(LABELS) and sum(p for _, p in full) == pytest.approx(1.0)
        assert clf.classify(np.zeros((2, 40, 40, 3), np.uint8), top_k=1)[0][0][0] in LABELS
        with pytest.raises(InputError, match="top_k"):
            clf.classify(paths, top_k=0)


def test_int8_runs_the_int8_graph(classifier_bundle, tmp_path):
    paths = write_images(tmp_path, 4)
    b = Bundle.load(classifier_bundle)
    sess = ort.InferenceSession(str(b.path / b.graph("classifier", "int8").file), providers=["CPUExecutionProvider"])
    with Classifier(b, precision="int8") as int8:
        assert int8.runner.info.precision == "int8"
        direct = sess.run(["logits"], {"pixel_values": int8.preprocessor(paths)})[0]
        np.testing.assert_allclose(int8.logits(paths), direct, rtol=0, atol=1e-6)


def test_bundle_without_a_classifier_says_how_to_get_one(tiny_bundle):
    with pytest.raises(BundleError, match="fine-tuned or linear-probe"):
        Classifier(tiny_bundle)


def test_class_names_override_is_checked(classifier_bundle):
    with pytest.raises(InputError, match="2 class names"):
        Classifier(classifier_bundle, class_names=["a", "b"])
    with Classifier(classifier_bundle, class_names=list("vwxyz")) as clf:
        assert clf.classify(np.zeros((32, 32, 3), np.uint8), top_k=1)[0][0][0] in "vwxyz"


# -- mae-deploy classify ---------------------------------------------------------------------------------


def test_classify_cli_lists_broken_images_and_exits_4(classifier_bundle, tmp_path):
    images = tmp_path / "images"
    good = write_images(images, 3)
    broken = write_broken(images)
    out = tmp_path / "preds.jsonl"
    r = CliRunner().invoke(
        main, ["classify", str(images), "--bundle", str(classifier_bundle), "--top-k", "2", "--out", str(out)]
    )
    assert r.exit_code == 4, r.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_path = {Path(rec["path"]).name: rec for rec in records}
    assert set(by_path) == {p.name for p in good + broken}
    for p in good:
        preds = by_path[p.name]["predictions"]
        assert len(preds) == 2 and preds[0]["label"] in LABELS and preds[0]["probability"] >= preds[1]["probability"]
    for p in broken:
        assert "error" in by_path[p.name] and "predictions" not in by_path[p.name]
        assert p.name in r.output  # listed on stderr too
    with Classifier(classifier_bundle) as clf:
        expected = clf.classify(good, top_k=2)
    assert [by_path[p.name]["predictions"][0]["label"] for p in good] == [e[0][0] for e in expected]


def test_classify_cli_csv_and_several_sources(classifier_bundle, tmp_path):
    a = write_images(tmp_path / "a", 2)
    b = write_images(tmp_path / "b", 2, seed=1)
    out = tmp_path / "preds.csv"
    r = CliRunner().invoke(
        main,
        [
            "classify",
            str(a[0]),
            str(tmp_path / "b" / "*.png"),
            "--bundle",
            str(classifier_bundle),
            "--out",
            str(out),
            "--top-k",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 9 and {Path(row["path"]).name for row in rows} == {a[0].name, b[0].name, b[1].name}
    assert [row["rank"] for row in rows[:3]] == ["1", "2", "3"] and all(row["error"] == "" for row in rows)
    r = CliRunner().invoke(main, ["classify", str(a[1]), "--bundle", str(classifier_bundle), "--top-k", "1"])
    assert r.exit_code == 0 and a[1].name in r.output


def test_classify_cli_bad_input_exits_3(classifier_bundle, tiny_bundle, tmp_path):
    img = write_images(tmp_path, 1)[0]
    r = CliRunner().invoke(main, ["classify", str(img), "--bundle", str(tiny_bundle)])
    assert r.exit_code == 3 and "no classifier graph" in r.output
    r = CliRunner().invoke(
        main, ["classify", str(img), "--bundle", str(classifier_bundle), "--out", str(tmp_path / "p.txt")]
    )
    assert r.exit_code == 3 and ".jsonl or .csv" in r.output
    r = CliRunner().invoke(main, ["classify", str(tmp_path / "missing"), "--bundle", str(classifier_bundle)])
    assert r.exit_code == 3


# -- mae-deploy eval on real labelled images (scikit-learn's digits) ----------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from training.data import write_digits_imagefolder

    root = tmp_path_factory.mktemp("digits") / "digits"
    write_digits_imagefolder(root, size=32, per_class=30, seed=0)
    return root


@pytest.fixture(scope="module")
def digits_bundle(digits, tmp_path_factory) -> Path:
    """A 1-channel mae_vit_test classifier whose head is a least-squares fit on the train split's features,
    so that its accuracy means something (well above the 10 % of chance)."""
    import torch

    from export.bundle_writer import default_preprocessing

    model = tiny_classifier(num_classes=10, in_chans=1)
    pre = Preprocessor.from_config(default_preprocessing(32, 1), in_chans=1)
    paths = sorted((digits / "train").glob("*/*.png"))
    y = np.array([int(p.parent.name) for p in paths])
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(pre(paths))).numpy().astype(np.float64)
    x = np.hstack([feats, np.ones((len(feats), 1))])
    w = np.linalg.solve(x.T @ x + 1e-3 * np.eye(x.shape[1]), x.T @ np.eye(10)[y])
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(w[:-1].T).float())
        model.head.bias.copy_(torch.from_numpy(w[-1]).float())
    dst = tmp_path_factory.mktemp("digits_bundle") / "bundle"
    return export_classifier_bundle(dst, model=model, labels=[str(d) for d in range(10)])


def test_eval_scores_every_precision_and_the_reference(digits, digits_bundle):
    report = evaluate(digits_bundle, digits / "val")
    assert [s.name for s in report.scores] == ["ort fp32", "ort int8", "torch fp32"]
    paths = sorted((digits / "val").glob("*/*.png"))
    assert report.images == len(paths) == 60 and report.failed == []
    targets = np.array([int(p.parent.name) for p in paths])
    with Classifier(digits_bundle) as clf:
        pred = clf.logits(paths).argmax(1)
    fp32 = report.score("ort fp32")
    assert fp32.top1 == pytest.approx((pred == targets).mean() * 100)
    assert fp32.top1 > 30.0  # a fitted head, not chance (10 %)
    assert np.asarray(fp32.confusion).sum() == 60 and np.trace(np.asarray(fp32.confusion)) == (pred == targets).sum()
    assert fp32.top5 >= fp32.top1
    assert report.score("torch fp32").agreement >= 95.0
    assert "| ort int8 |" in report.table()


def test_eval_cli_writes_json_and_plot_and_guards_top1(digits, digits_bundle, tmp_path):
    out, plot = tmp_path / "eval.json", tmp_path / "cm.png"
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(digits_bundle),
            str(digits / "val"),
            "--precisions",
            "fp32,int8",
            "--no-reference",
            "--out",
            str(out),
            "--plot",
            str(plot),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert [x["name"] for x in doc["results"]] == ["ort fp32", "ort int8"] and doc["images"] == 60
    assert Image.open(plot).size[0] > 100
    r = CliRunner().invoke(
        main,
        [
            "eval",
            str(digits_bundle),
            str(digits / "val"),
            "--precisions",
            "fp32,int8",
            "--no-reference",
            "--max-top1-drop",
            "-1",
            "--no-progress",
        ],
    )
    assert r.exit_code == 5 and "ort int8" in r.output


def test_eval_lists_unreadable_images_and_goes_on(digits, digits_bundle, tmp_path):
    import shutil

    val = tmp_path / "val"
    shutil.copytree(digits / "val", val)
    (val / "3" / "broken.png").write_bytes(b"\x89PNG not really")
    report = evaluate(digits_bundle, val, ["fp32"], reference=False)
    assert report.images == 60 and len(report.failed) == 1 and report.failed[0]["path"].endswith("broken.png")


def test_eval_bad_input_exits_3(digits, digits_bundle, tiny_bundle, tmp_path):
    r = CliRunner().invoke(main, ["eval", str(digits_bundle), str(digits), "--no-progress"])
    assert r.exit_code == 3 and "val/" in r.output  # the dataset root, not a class folder
    r = CliRunner().invoke(main, ["eval", str(tiny_bundle), str(digits / "val"), "--no-progress"])
    assert r.exit_code == 3 and "classifier" in r.output
    r = CliRunner().invoke(
        main, ["eval", str(digits_bundle), str(digits / "val"), "--precisions", "fp16", "--no-progress"]
    )
    assert r.exit_code == 3 and "fp16" in r.output


# -- sources and decoders (issues #21 and #23): classify reads every SOURCE extract reads ----------------


def _top1(records: list[dict]) -> list[str]:
    return [r["predictions"][0]["label"] for r in records]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_classify_reads_shards_parquet_and_urls_as_the_folder(digits, digits_bundle, tmp_path):
    import functools
    import http.server
    import threading

    from mae_deploy.sources.pack import write_parquet, write_shards

    val = digits / "val"
    write_shards(val, tmp_path / "shards", per_shard=25)
    write_parquet(val, tmp_path / "pq", per_file=40)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(val))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/3/"
    try:
        got = {}
        for name, spec in [
            ("folder", val),
            ("shards", tmp_path / "shards"),
            ("parquet", tmp_path / "pq"),
            ("url", url + sorted(p.name for p in (val / "3").iterdir())[0]),
        ]:
            out = tmp_path / f"{name}.jsonl"
            r = CliRunner().invoke(
                main,
                [
                    "classify",
                    str(spec),
                    "--bundle",
                    str(digits_bundle),
                    "--out",
                    str(out),
                    "--top-k",
                    "1",
                    "--decoder",
                    "pil",
                ],
            )
            assert r.exit_code == 0, (name, r.output)
            got[name] = _jsonl(out)
    finally:
        server.shutdown()
    assert len(got["folder"]) == len(got["shards"]) == len(got["parquet"]) == 60
    assert _top1(got["shards"]) == _top1(got["parquet"]) == _top1(got["folder"])  # the same images, in order
    assert got["shards"][0]["path"].endswith(".tar#0/" + Path(got["folder"][0]["path"]).stem + ".png")
    assert _top1(got["url"]) == [_top1(got["folder"])[[Path(r["path"]).parent.name for r in got["folder"]].index("3")]]
    assert got["url"][0]["path"].startswith("http://")


def test_classify_lists_a_broken_shard_member_and_exits_4(digits_bundle, tmp_path):
    import io
    import tarfile

    good = io.BytesIO()
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(good, format="PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in [("a.png", good.getvalue()), ("b.png", b"\x89PNG not really"), ("c.txt", b"no image")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    out = tmp_path / "p.jsonl"
    r = CliRunner().invoke(
        main, ["classify", str(tmp_path / "s.tar"), "--bundle", str(digits_bundle), "--out", str(out)]
    )
    assert r.exit_code == 4, r.output
    records = _jsonl(out)
    assert [Path(x["path"]).name for x in records] == ["s.tar#a.png", "s.tar#b.png", "s.tar#c"]
    assert "predictions" in records[0]
    assert [x.get("reason") for x in records[1:]] == ["not_an_image", "missing_image"]
    assert "2 of 3 images" in r.output


@pytest.fixture(scope="module")
def digits_jpeg(digits, tmp_path_factory) -> Path:
    """The digits' val/ as JPEGs (what --decoder torch decodes on the device), plus one PNG and one broken JPEG."""
    root = tmp_path_factory.mktemp("digits_jpeg") / "val"
    for p in sorted((digits / "val").glob("*/*.png")):
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(p).save(root / p.parent.name / f"{p.stem}.jpg", quality=95)
    (root / "0" / "as_png.png").write_bytes(next((digits / "val" / "0").glob("*.png")).read_bytes())
    (root / "1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken \xff\xd9")
    return root


def test_torch_decoder_gives_the_pil_top1_on_jpegs(digits_jpeg, digits_bundle, monkeypatch):
    from mae_deploy.classify import classify_files
    from mae_deploy.decode_torch import TorchJpegDecoder
    from mae_deploy.sources import list_source

    decoded = []
    real = TorchJpegDecoder.decode
    monkeypatch.setattr(TorchJpegDecoder, "decode", lambda self, blobs: decoded.append(len(blobs)) or real(self, blobs))
    src = list_source(digits_jpeg)
    with Classifier(digits_bundle, batch_size=16) as clf:
        pil = classify_files(clf, src, top_k=10, decoder="pil")
        assert decoded == []
        torch_ = classify_files(clf, src, top_k=10, decoder="torch")
    assert sum(decoded) == 60  # every JPEG went to the device decoder; the PNG and the broken file did not
    assert [r["path"] for r in torch_] == [r["path"] for r in pil] == list(src.paths)
    assert [r.get("reason") for r in torch_] == [r.get("reason") for r in pil]
    assert sum("error" in r for r in pil) == 1
    ok = [i for i, r in enumerate(pil) if "predictions" in r]
    assert _top1([torch_[i] for i in ok]) == _top1([pil[i] for i in ok])
    probs = [{p["label"]: p["probability"] for p in records[i]["predictions"]} for records in (pil, torch_) for i in ok]
    a = np.array([[d[str(c)] for c in range(10)] for d in probs[: len(ok)]])
    b = np.array([[d[str(c)] for c in range(10)] for d in probs[len(ok) :]])
    np.testing.assert_allclose(b, a, atol=0.02)  # rounding of the resize, not another image


def test_classify_and_eval_cli_take_decoder_torch(digits_jpeg, digits_bundle, tmp_path):
    outs = {}
    for dec in ("pil", "torch"):
        outs[dec] = tmp_path / f"{dec}.jsonl"
        r = CliRunner().invoke(
            main,
            [
                "classify",
                str(digits_jpeg),
                "--bundle",
                str(digits_bundle),
                "--out",
                str(outs[dec]),
                "--decoder",
                dec,
                "--top-k",
                "1",
            ],
        )
        assert r.exit_code == 4 and "broken.jpg" in r.output, r.output
    assert _top1([r for r in _jsonl(outs["torch"]) if "error" not in r]) == _top1(
        [r for r in _jsonl(outs["pil"]) if "error" not in r]
    )
    scores = {}
    for dec in ("pil", "torch"):
        out = tmp_path / f"eval-{dec}.json"
        r = CliRunner().invoke(
            main,
            [
                "eval",
                str(digits_bundle),
                str(digits_jpeg),
                "--precisions",
                "fp32",
                "--no-reference",
                "--decoder",
                dec,
                "--out",
                str(out),
                "--no-progress",
            ],
        )
        assert r.exit_code == 4 and "1 of 62 images could not be read" in r.output, r.output
        doc = json.loads(out.read_text())
        assert doc["images"] == 61 and doc["decoder"] == dec
        scores[dec] = doc["results"][0]
    assert scores["torch"]["top1"] == pytest.approx(scores["pil"]["top1"], abs=100 / 61 + 1e-9)


def test_eval_scores_shards_and_parquet_as_the_image_folder(digits, digits_bundle, tmp_path):
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from mae_deploy.sources.pack import write_parquet, write_shards

    val = digits / "val"
    write_shards(val, tmp_path / "shards", per_shard=25)  # samples KEY.png + KEY.cls (the class index)
    write_parquet(val, tmp_path / "pq", per_file=40)  # columns image {bytes, path}, label, class_name
    with tarfile.open(tmp_path / "s.tar", "w") as tf:  # the first shard without its .cls members
        with tarfile.open(sorted((tmp_path / "shards").glob("*.tar"))[0]) as src:
            for ti in src:
                if not ti.name.endswith(".cls"):
                    tf.addfile(ti, src.extractfile(ti))
    folder = evaluate(digits_bundle, val, ["fp32"], reference=False)
    shards = evaluate(digits_bundle, tmp_path / "shards", ["fp32"], reference=False)
    parquet = evaluate(digits_bundle, tmp_path / "pq", ["fp32"], reference=False)
    by_name = evaluate(digits_bundle, tmp_path / "pq", ["fp32"], reference=False, label_column="class_name")
    for r in (shards, parquet, by_name):
        assert r.images == folder.images == 60 and r.failed == []
        assert r.scores[0].top1 == folder.scores[0].top1 and r.scores[0].confusion == folder.scores[0].confusion
    # A label that names no class of the classifier is exit 3 naming the row; unlabelled images too.
    table = pq.read_table(sorted((tmp_path / "pq").glob("*.parquet"))[0])
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        table.set_column(table.schema.get_field_index("label"), "label", pa.array([12] * table.num_rows, pa.int64())),
        bad,
    )
    r = CliRunner().invoke(main, ["eval", str(digits_bundle), str(bad), "--no-progress", "--no-reference"])
    assert r.exit_code == 3 and "label 12" in r.output and "bad.parquet#0" in r.output, r.output
    r = CliRunner().invoke(main, ["eval", str(digits_bundle), str(bad), "--label-column", "nope", "--no-progress"])
    assert r.exit_code == 3 and "'nope' is not a column" in r.output, r.output
    r = CliRunner().invoke(main, ["eval", str(digits_bundle), str(val / "3"), "--no-progress"])
    assert r.exit_code == 3 and "without labels" in r.output and ".cls" in r.output, r.output
    r = CliRunner().invoke(main, ["eval", str(digits_bundle), str(tmp_path / "s.tar"), "--no-progress"])
    assert r.exit_code == 3 and "no .cls member" in r.output and "s.tar#0/" in r.output, r.output
