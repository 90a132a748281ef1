"""`mae-deploy triton`: every generated config parses with Triton's own schema (tritonclient's
model_config_pb2, strictly), matches the ONNX graph it serves, ensembles wire existing models and tensors,
and the Python-backend models compute what mae-deploy computes (driven through a stand-in of
triton_python_backend_utils). Triton itself does not run here."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import json_format, text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

from mae_deploy.bundle import MANIFEST_NAME, Bundle, write_manifest
from mae_deploy.classify import Classifier
from mae_deploy.cli import main
from mae_deploy.errors import BundleError, InputError
from mae_deploy.features import FeatureExtractor
from mae_deploy.preprocess import Preprocessor
from mae_deploy.triton import write_repository
from mae_deploy.triton.repository import MANIFEST

_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
}


# -- helpers ------------------------------------------------------------------------------------------


def load_config(model_dir: Path) -> mc.ModelConfig:
    """config.pbtxt parsed strictly: an unknown field or a bad value raises."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def repo_configs(repo: Path) -> dict[str, mc.ModelConfig]:
    return {d.name: load_config(d) for d in sorted(repo.iterdir()) if d.is_dir()}


def graph_io(path: Path) -> tuple[list, list]:
    """(inputs, outputs) of an ONNX file as (name, triton dtype, shape with symbolic dims as None)."""
    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}

    def spec(v):
        t = v.type.tensor_type
        return (
            v.name,
            _ONNX_TO_TRITON[t.elem_type],
            [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim],
        )

    return [spec(v) for v in proto.graph.input if v.name not in inits], [spec(v) for v in proto.graph.output]


def check_against_graph(cfg: mc.ModelConfig, model_file: Path) -> None:
    g_in, g_out = graph_io(model_file)
    for tensors, graph in ((cfg.input, g_in), (cfg.output, g_out)):
        assert sorted(t.name for t in tensors) == sorted(n for n, _, _ in graph)
        by_name = {n: (dt, shape) for n, dt, shape in graph}
        for t in tensors:
            dt, shape = by_name[t.name]
            assert t.data_type == dt, t.name
            assert shape[0] is None, f"{t.name}: the batch dim must be symbolic"  # max_batch_size > 0 batches it
            assert list(t.dims) == [-1 if d is None else d for d in shape[1:]], t.name


class _Tensor:
    def __init__(self, name: str, array) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Request:
    def __init__(self, *tensors: _Tensor) -> None:
        self.inputs = {t.name(): t for t in tensors}


class _Response:
    def __init__(self, output_tensors=None, error=None) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error


class _Error(Exception):
    def message(self) -> str:
        return str(self)


@pytest.fixture
def pb_utils(monkeypatch):
    """A minimal stand-in of triton_python_backend_utils: what the generated models use of it."""
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse, m.TritonError = _Tensor, _Response, _Error
    m.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", m)
    return m


def python_model(repo: Path, name: str):
    """Import REPO/name/1/model.py as Triton does and initialize its TritonPythonModel."""
    cfg = load_config(repo / name)
    spec = importlib.util.spec_from_file_location(f"triton_model_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
            "model_instance_kind": "CPU",
            "model_instance_name": f"{name}_0",
            "model_repository": str(repo / name),
            "model_version": "1",
            "model_name": name,
        }
    )
    return model


def run_ensemble(repo: Path, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ensemble's steps in order as Triton would route them: ONNX models with ONNX Runtime (the
    onnxruntime backend's engine), Python models through the stand-in. Needs the pb_utils fixture."""
    cfg = load_config(repo / name)
    tensors = dict(feeds)
    for step in cfg.ensemble_scheduling.step:
        step_cfg = load_config(repo / step.model_name)
        inputs = {model_in: tensors[ens] for model_in, ens in step.input_map.items()}
        if step_cfg.backend == "python":
            request = _Request(*(_Tensor(k, v) for k, v in inputs.items()))
            response = python_model(repo, step.model_name).execute([request])[0]
            assert response.error is None, response.error
            outputs = response.outputs
        else:
            onnx_file = repo / step.model_name / "1" / "model.onnx"
            sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            outputs = dict(zip(names, sess.run(names, inputs), strict=True))
        for model_out, ens in step.output_map.items():
            tensors[ens] = outputs[model_out]
    return {o.name: tensors[o.name] for o in cfg.output}


def sample_images(tmp: Path) -> list[Path]:
    """PNG/JPEG/greyscale/RGBA files of several sizes."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, mode, fmt) in enumerate(
        [((40, 30), "RGB", "PNG"), ((64, 64), "RGB", "JPEG"), ((33, 50), "L", "PNG"), ((48, 40), "RGBA", "PNG")]
    ):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        p = tmp / f"img{i}.{fmt.lower()}"
        Image.fromarray(a[..., 0] if channels == 1 else a, mode=mode).save(p, format=fmt)
        paths.append(p)
    return paths


def as_request_bytes(paths: list[Path]) -> np.ndarray:
    """What a client sends: a [batch, 1] BYTES tensor of the encoded files."""
    return np.array([[p.read_bytes()] for p in paths], dtype=object)


@pytest.fixture(scope="module")
def cls_repo(classifier_bundle, tmp_path_factory) -> Path:
    return write_repository(classifier_bundle, tmp_path_factory.mktemp("triton") / "repo", pool="mean").path


@pytest.fixture(scope="module")
def mae_repo(tiny_bundle, tmp_path_factory) -> Path:
    return write_repository(tiny_bundle, tmp_path_factory.mktemp("triton") / "repo").path


# -- schema and graph agreement ----------------------------------------------------------------------


def test_every_config_parses_strictly_and_matches_its_graph(cls_repo, mae_repo):
    # The exported bundle's encoder has pooled outputs: its ensemble needs no mae_pool. tiny_bundle's does not.
    for repo, expected in (
        (cls_repo, {"mae_encoder", "mae_classifier", "mae_preprocess", "mae_features", "mae_classify"}),
        (mae_repo, {"mae_encoder", "mae_decoder", "mae_preprocess", "mae_pool", "mae_features"}),
    ):
        configs = repo_configs(repo)
        assert set(configs) == expected
        for name, cfg in configs.items():
            assert cfg.name == name and cfg.max_batch_size == 64
            if cfg.platform == "onnxruntime_onnx":
                check_against_graph(cfg, repo / name / "1" / "model.onnx")
                assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
                assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
                assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
            elif cfg.backend == "python":
                assert (repo / name / "1" / "model.py").is_file()
            else:
                assert cfg.platform == "ensemble" and (repo / name / "1").is_dir()
    decoder = repo_configs(mae_repo)["mae_decoder"]
    assert [list(t.dims) for t in decoder.input] == [[-1, 32], [16]]  # latent [visible+1, D], ids_restore [L]


def test_ensembles_name_models_and_tensors_that_exist(cls_repo):
    configs = repo_configs(cls_repo)
    for name, cfg in configs.items():
        if cfg.platform != "ensemble":
            continue
        available = {t.name: (t.data_type, list(t.dims)) for t in cfg.input}
        for step in cfg.ensemble_scheduling.step:
            assert step.model_name in configs, f"{name}: step model {step.model_name} is not in the repository"
            model = configs[step.model_name]
            model_in = {t.name: (t.data_type, list(t.dims)) for t in model.input}
            model_out = {t.name: (t.data_type, list(t.dims)) for t in model.output}
            assert set(step.input_map) == set(model_in), f"{name}: every input of {step.model_name} is fed"
            for key, tensor in step.input_map.items():
                assert tensor in available, f"{name}: {tensor} is read before any step writes it"
                assert available[tensor][0] == model_in[key][0]
                assert available[tensor][1] == model_in[key][1] or -1 in model_in[key][1]
            for key, tensor in step.output_map.items():
                assert key in model_out, f"{name}: {step.model_name} has no output {key}"
                available[tensor] = model_out[key]
        for out in cfg.output:
            assert out.name in available and available[out.name] == (out.data_type, list(out.dims))
    logits = configs["mae_classify"].output[0]
    assert logits.name == "logits" and logits.label_filename == "labels.txt"
    assert configs["mae_classifier"].output[0].label_filename == "labels.txt"
    for d in ("mae_classifier", "mae_classify"):
        assert (cls_repo / d / "labels.txt").read_text().splitlines() == ["cat", "dog", "bird", "fish", "frog"]


def test_manifest_records_what_was_generated(cls_repo, classifier_bundle):
    m = json.loads((cls_repo / MANIFEST).read_text())
    assert m["bundle"] == str(Path(classifier_bundle).resolve())
    assert m["options"]["pool"] == "mean" and m["graphs"]["mae_classifier"] == "classifier.onnx"
    assert "unrun" in m["checked"]


# -- the Python-backend models and the ensembles, run through a stand-in --------------------------------


def test_preprocess_model_equals_preprocessor(cls_repo, classifier_bundle, pb_utils, tmp_path):
    paths = sample_images(tmp_path)
    model = python_model(cls_repo, "mae_preprocess")
    half = len(paths) // 2
    responses = model.execute(
        [
            _Request(_Tensor("image", as_request_bytes(paths[:half]))),
            _Request(_Tensor("image", as_request_bytes(paths[half:]))),
        ]
    )
    got = np.concatenate([r.outputs["pixel_values"] for r in responses])
    expected = Preprocessor.from_bundle(Bundle.load(classifier_bundle))(paths)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    ids = responses[0].outputs["ids_keep"]
    assert ids.dtype == np.int64 and np.array_equal(ids, np.tile(np.arange(16), (half, 1)))


def test_preprocess_model_fails_only_the_request_with_a_broken_image(cls_repo, pb_utils, tmp_path):
    good = sample_images(tmp_path)[:1]
    broken = np.array([[good[0].read_bytes()], [b"not an image at all"]], dtype=object)
    model = python_model(cls_repo, "mae_preprocess")
    ok, bad, empty = model.execute(
        [
            _Request(_Tensor("image", as_request_bytes(good))),
            _Request(_Tensor("image", broken)),
            _Request(_Tensor("image", np.array([[b""]], dtype=object))),
        ]
    )
    assert ok.error is None and ok.outputs["pixel_values"].shape == (1, 3, 32, 32)
    assert bad.outputs == {} and "image 1" in str(bad.error)  # the item is named (serve's decoding, its wording)
    assert "empty" in str(empty.error)


def test_features_ensemble_equals_feature_extractor(cls_repo, classifier_bundle, pb_utils, tmp_path):
    paths = sample_images(tmp_path)
    out = run_ensemble(cls_repo, "mae_features", {"image": as_request_bytes(paths)})
    with FeatureExtractor(classifier_bundle, pool="mean") as fx:
        np.testing.assert_allclose(out["features"], fx.extract(paths), rtol=0, atol=1e-6)


def test_features_ensemble_reads_the_pooled_output_or_pools_an_older_latent(
    cls_repo, mae_repo, tiny_bundle, pb_utils, tmp_path
):
    steps = load_config(cls_repo / "mae_features").ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["mae_preprocess", "mae_encoder"]
    assert dict(steps[1].output_map) == {"pooled_mean": "features"}
    steps = load_config(mae_repo / "mae_features").ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["mae_preprocess", "mae_encoder", "mae_pool"]
    paths = sample_images(tmp_path)
    out = run_ensemble(mae_repo, "mae_features", {"image": as_request_bytes(paths)})
    with FeatureExtractor(tiny_bundle, pool="cls") as fx:
        np.testing.assert_allclose(out["features"], fx.extract(paths), rtol=0, atol=1e-6)


def test_classify_ensemble_equals_classifier(cls_repo, classifier_bundle, pb_utils, tmp_path):
    paths = sample_images(tmp_path)
    out = run_ensemble(cls_repo, "mae_classify", {"image": as_request_bytes(paths)})
    with Classifier(classifier_bundle) as clf:
        np.testing.assert_allclose(out["logits"], clf.logits(paths), rtol=0, atol=1e-6)


# -- options --------------------------------------------------------------------------------------------


def test_gpu_tensorrt_options(classifier_bundle, tmp_path):
    repo = write_repository(
        classifier_bundle,
        tmp_path / "r",
        kind="gpu",
        tensorrt=True,
        precision="fp16",
        max_batch_size=16,
        instances=2,
        preferred_batch_sizes=[4, 16],
        max_queue_delay_us=100,
        models=["classify"],
    ).path
    configs = repo_configs(repo)
    assert set(configs) == {"mae_classifier", "mae_preprocess", "mae_classify"}
    cls = configs["mae_classifier"]
    assert [(g.kind, g.count) for g in cls.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]
    assert configs["mae_preprocess"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert list(cls.dynamic_batching.preferred_batch_size) == [4, 16]
    acc = cls.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in acc] == ["tensorrt"]
    params = dict(acc[0].parameters)
    assert params["precision_mode"] == "FP16"
    assert params["trt_profile_min_shapes"] == "pixel_values:1x3x32x32"
    assert params["trt_profile_max_shapes"] == "pixel_values:16x3x32x32"
    check_against_graph(cls, repo / "mae_classifier" / "1" / "model.onnx")  # the fp32 graph: FP16 is a build flag


def test_int8_precision_serves_the_int8_graphs(classifier_bundle, tmp_path):
    repo = write_repository(classifier_bundle, tmp_path / "r", precision="int8").path
    graphs = json.loads((repo / MANIFEST).read_text())["graphs"]
    assert graphs == {"mae_encoder": "encoder.int8.onnx", "mae_classifier": "classifier.int8.onnx"}
    b = Bundle.load(classifier_bundle)
    for name, part in (("mae_encoder", "encoder"), ("mae_classifier", "classifier")):
        assert (repo / name / "1" / "model.onnx").read_bytes() == (b.path / b.graph(part, "int8").file).read_bytes()


def test_tensorrt_int8_serves_the_qdq_graphs(classifier_bundle, tmp_path):
    """TensorRT builds int8 from Q/DQ graphs; here the fp32 files stand in for them (only selection is tested)."""
    src = tmp_path / "bundle"
    shutil.copytree(classifier_bundle, src)
    m = json.loads((src / MANIFEST_NAME).read_text())
    for part in ("encoder", "classifier"):
        shutil.copyfile(src / f"{part}.onnx", src / f"{part}.int8-qdq.onnx")
        entry = next(g for g in m["graphs"] if g["part"] == part and g["precision"] == "fp32")
        m["graphs"].append({**entry, "precision": "int8-qdq", "file": f"{part}.int8-qdq.onnx"})
    write_manifest(src, m)
    report = write_repository(src, tmp_path / "r", kind="gpu", tensorrt=True, precision="int8")
    assert report.graphs == {"mae_encoder": "encoder.int8-qdq.onnx", "mae_classifier": "classifier.int8-qdq.onnx"}
    for name in ("mae_encoder", "mae_classifier"):
        params = dict(
            load_config(report.path / name).optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
        )
        assert params["precision_mode"] == "INT8"


def test_labels_file_replaces_the_bundle_names(classifier_bundle, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\ne\n")
    repo = write_repository(classifier_bundle, tmp_path / "r", labels=labels, models=["classifier"]).path
    assert (repo / "mae_classifier" / "labels.txt").read_text() == "a\nb\nc\nd\ne\n"


# -- bad input: exit 3 with a message naming the problem -------------------------------------------------


def _cli(*args: str):
    return CliRunner().invoke(main, ["triton", *map(str, args)])


@pytest.fixture(scope="module")
def generated_names_bundle(classifier_bundle, tmp_path_factory) -> Path:
    """The classifier bundle as exported from a checkpoint without class names (class_0 ...)."""
    dst = tmp_path_factory.mktemp("gen") / "bundle"
    shutil.copytree(classifier_bundle, dst)
    m = json.loads((dst / MANIFEST_NAME).read_text())
    m["class_names"], m["class_names_source"] = [f"class_{i}" for i in range(5)], "generated"
    write_manifest(dst, m)
    return dst


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
        (["--instances", "0"], "--instances must be at least 1"),
        (["--preferred-batch-sizes", "8,128"], "must lie in 1..--max-batch-size"),
        (["--tensorrt"], "add --kind gpu"),
        (["--kind", "gpu", "--tensorrt", "--precision", "int8"], "--precision int8-qdq"),
        (["--models", "decoder"], "has no decoder graph"),
        (["--models", "nonsense"], "unknown model"),
    ],
)
def test_bad_options_exit_3(classifier_bundle, tmp_path, args, message):
    r = _cli(classifier_bundle, "--out", tmp_path / "r", *args)
    assert r.exit_code == 3, r.output
    assert message in r.output
    assert not (tmp_path / "r").exists()


def test_bundle_without_a_classifier_cannot_serve_one(tiny_bundle, tmp_path):
    r = _cli(tiny_bundle, "--out", tmp_path / "r", "--models", "classify")
    assert r.exit_code == 3 and "has no classifier graph" in r.output


def test_generated_class_names_need_labels(generated_names_bundle, tmp_path):
    r = _cli(generated_names_bundle, "--out", tmp_path / "r")
    assert r.exit_code == 3 and "--labels" in r.output and not (tmp_path / "r").exists()
    labels = tmp_path / "names.txt"
    labels.write_text("x\ny\n")
    r = _cli(generated_names_bundle, "--out", tmp_path / "r", "--labels", labels)
    assert r.exit_code == 3 and "2 class names" in r.output and "5 classes" in r.output
    labels.write_text("a\nb\nc\nd\ne\n")
    r = _cli(generated_names_bundle, "--out", tmp_path / "r", "--labels", labels)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "mae_classify" / "labels.txt").read_text() == "a\nb\nc\nd\ne\n"


def test_existing_repository_needs_overwrite(tiny_bundle, tmp_path):
    out = tmp_path / "repo"
    assert _cli(tiny_bundle, "--out", out).exit_code == 0
    r = _cli(tiny_bundle, "--out", out, "--pool", "mean")
    assert r.exit_code == 3 and "--overwrite" in r.output
    assert load_config(out / "mae_pool").parameters["pool"].string_value == "cls"
    r = _cli(tiny_bundle, "--out", out, "--pool", "mean", "--overwrite")
    assert r.exit_code == 0, r.output
    assert load_config(out / "mae_pool").parameters["pool"].string_value == "mean"
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temporary or swapped-out directories left


def test_overwrite_refuses_a_directory_it_did_not_write(tiny_bundle, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = _cli(tiny_bundle, "--out", out, "--overwrite")
    assert r.exit_code == 3 and "did not write" in r.output
    assert (out / "keep.txt").read_text() == "precious"


def test_a_failed_write_leaves_nothing(tiny_bundle, tmp_path, monkeypatch):
    import mae_deploy.triton.repository as repository

    def broken_copy(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(repository, "_copy_graph", broken_copy)
    with pytest.raises(OSError):
        write_repository(tiny_bundle, tmp_path / "repo")
    assert list(tmp_path.iterdir()) == []


def test_python_api_errors_are_input_errors(tiny_bundle, classifier_bundle, tmp_path):
    with pytest.raises(InputError):
        write_repository(tiny_bundle, tmp_path / "r", max_batch_size=0)
    with pytest.raises(BundleError):
        write_repository(tiny_bundle, tmp_path / "r", models=["classifier"])
    bad = tmp_path / "blank.txt"
    bad.write_text("a\n\nb\n")
    with pytest.raises(InputError, match="one non-empty class name per line"):
        write_repository(classifier_bundle, tmp_path / "r", labels=bad)


def test_string_parameters_survive_the_text_format(classifier_bundle, tmp_path):
    cfg = load_config(write_repository(classifier_bundle, tmp_path / "r").path / "mae_preprocess")
    pre = json.loads(cfg.parameters["preprocessing"].string_value)
    assert pre == Bundle.load(classifier_bundle).preprocessing


def test_a_duplicated_label_is_exit_3_naming_it(classifier_bundle, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\ndog\nfrog\n")
    r = _cli(classifier_bundle, "--out", tmp_path / "r", "--labels", labels)
    assert r.exit_code == 3, r.output
    assert "'dog' twice (lines 2 and 4)" in r.output and not (tmp_path / "r").exists()
