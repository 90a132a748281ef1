"""TensorRT backend logic that needs no GPU (mae_deploy/runners/trt/): generations, profiles, cache keys and
paths, dtypes, ONNX Runtime's TensorRT-provider options, and the builder configuration against a recording
fake ``tensorrt`` (tests/runners/trt_fakes.py). The runner's execute path is tested in test_trt_runner.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from trt_fakes import (
    ENGINE_MAGIC,
    DataType,
    FakeTrt,
    LayerType,
)

from mae_deploy.errors import BundleError, InputError, MissingDependency
from mae_deploy.runners import create_runner
from mae_deploy.runners import trt as T

# --------------------------------------------------------------------------------------------------
# API generations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version,gen", [("10.3.0", 10), ("10.13.1", 10), ("11.0.0", 11), ("11.4.0.106", 11), ("12.1.0", 11)]
)
def test_api_generation(version, gen):
    assert T.trt_api_generation(version) == gen


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0.post12.dev1", "7", "garbage", ""])
def test_tensorrt_older_than_10_is_refused(version):
    with pytest.raises(T.UnsupportedTensorRT, match="needs TensorRT 10 or newer") as e:
        T.trt_api_generation(version)
    assert isinstance(e.value, MissingDependency) and e.value.exit_code == 6
    if version[:1].isdigit():
        assert f"TensorRT {version} is installed" in str(e.value)


def test_capability_table():
    ten, eleven = T.CAPABILITIES[10], T.CAPABILITIES[11]
    assert ten.precision_builder_flags and not eleven.precision_builder_flags
    assert eleven.always_strongly_typed and not ten.always_strongly_typed
    assert ten.strongly_typed_flag and not eleven.strongly_typed_flag
    assert not ten.explicit_batch_flag and not eleven.explicit_batch_flag
    assert (ten.fp16_source, eleven.fp16_source) == ("builder-flag", "onnx-variant")


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------


def test_profile_vit_base_reconstruction_opt():
    p = T.derive_profile(196, 224, 3, 32, 8, "L/4", embed_dim=768)
    assert (p.opt_visible, p.min_visible, p.max_visible) == (49, 1, 196)
    assert p.shapes("encoder") == {
        "pixel_values": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)),
        "ids_keep": ((1, 1), (8, 49), (32, 196)),
    }
    assert p.shapes("decoder") == {
        "latent": ((1, 2, 768), (8, 50, 768), (32, 197, 768)),  # visible + cls
        "ids_restore": ((1, 196), (8, 196), (32, 196)),
    }
    assert "batch 1..32 (opt 8), visible tokens 1..196 (opt 49) of L=196" == p.describe()


def test_profile_defaults_and_narrowed_visible_range():
    p = T.derive_profile(196, 224, 3, embed_dim=768)
    assert (p.max_batch, p.opt_batch, p.opt_visible, p.max_visible) == (32, 8, 196, 196)
    small = T.derive_profile(196, 224, 3, max_batch=4, embed_dim=768)
    assert small.opt_batch == 4  # default opt batch never exceeds max
    recon = T.derive_profile(196, 224, 3, 64, 16, min_visible="L/4", max_visible="L/4", embed_dim=768)
    assert recon.shapes("encoder")["ids_keep"] == ((1, 49), (16, 49), (64, 49))
    assert recon.shapes("decoder")["latent"][2] == (64, 50, 768)


def test_profile_edge_case_single_patch_single_image():
    p = T.derive_profile(1, 8, 1, 1, embed_dim=4)
    assert p.shapes("encoder") == {"pixel_values": ((1, 1, 8, 8),) * 3, "ids_keep": ((1, 1),) * 3}
    assert p.shapes("decoder") == {"latent": ((1, 2, 4),) * 3, "ids_restore": ((1, 1),) * 3}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_batch=0), "max_batch must be at least 1, got 0"),
        (dict(max_batch=8, opt_batch=9), r"opt_batch 9 must be in 1..max_batch \(8\)"),
        (dict(opt_batch=0), r"opt_batch 0 must be in 1..max_batch \(32\)"),
        (dict(opt_visible=197), r"visible-token count 197 must be in 1..196"),
        (dict(opt_visible=0), r"visible-token count 0 must be in 1..196"),
        (dict(min_visible=50, opt_visible=49), r"opt_visible 49 must be in min_visible..max_visible \(50..196\)"),
        (dict(min_visible=100, max_visible=99), "min_visible 100 is above max_visible 99"),
        (dict(opt_visible="L/0"), "divides by zero"),
        (dict(opt_visible="half"), r"'half' is not a number, 'L' or 'L/N' \(L = 196 patches\)"),
    ],
)
def test_bad_profiles_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        T.derive_profile(196, 224, 3, **kwargs, embed_dim=768)


def test_profile_rejects_nonsense_model_sizes():
    with pytest.raises(InputError, match="embed_dim must be positive, got 0"):
        T.derive_profile(196, 224, 3, embed_dim=0)
    with pytest.raises(InputError, match="unknown part 'head'"):
        T.derive_profile(196, 224, 3, embed_dim=768).shapes("head")


@pytest.mark.parametrize("spec,value", [("L", 196), ("L/4", 49), ("L / 2", 98), (7, 7), ("7", 7), ("L/1000", 1)])
def test_parse_visible(spec, value):
    assert T.parse_visible(spec, 196) == value


def test_profile_check_call_names_the_range():
    p = T.derive_profile(196, 224, 3, max_visible="L/4", embed_dim=768)
    p.check_call("encoder", 100, 49)  # batch above max is chunked by the runner, not refused
    with pytest.raises(InputError, match=r"built for 1..49 visible tokens, but this call has 196; rebuild"):
        p.check_call("encoder", 1, 196)


# --------------------------------------------------------------------------------------------------
# Cache keys and paths
# --------------------------------------------------------------------------------------------------


def test_engine_cache_key_is_stable_and_order_independent():
    p = T.derive_profile(196, 224, 3, embed_dim=768)
    base = ("ab" * 32, "10.13.1", "NVIDIA H100 (sm_90)", p, "fp16", {"tf32": False, "workspace_gb": 4.0})
    key = T.engine_cache_key(*base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert T.engine_cache_key(*base) == key
    shuffled_profile = dict(reversed(list(p.as_dict().items())))
    assert (
        T.engine_cache_key(base[0], base[1], base[2], shuffled_profile, "fp16", {"workspace_gb": 4.0, "tf32": False})
        == key
    )
    variants = [
        ("cd" * 32, *base[1:]),
        (base[0], "11.4.0.106", *base[2:]),
        (*base[:2], "NVIDIA A100 (sm_80)", *base[3:]),
        (*base[:3], T.derive_profile(196, 224, 3, 64, embed_dim=768), *base[4:]),
        (*base[:3], T.derive_profile(196, 224, 3, opt_visible="L/4", embed_dim=768), *base[4:]),
        (*base[:4], "fp32", base[5]),
        (*base[:5], {"tf32": True, "workspace_gb": 4.0}),
    ]
    keys = {T.engine_cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys


def test_cache_layout(tmp_path, monkeypatch):
    paths = T.engine_paths(tmp_path, "encoder", "fp16", "0123456789abcdef" * 4)
    assert paths.engine == tmp_path / "encoder-fp16-0123456789abcdef01234567.engine"
    assert paths.sidecar == tmp_path / "encoder-fp16-0123456789abcdef01234567.json"
    assert T.timing_cache_path(tmp_path, "10.13.1", "NVIDIA H100 80GB HBM3 (sm_90)") == (
        tmp_path / "timing-trt10.13.1-nvidia-h100-80gb-hbm3-sm-90.cache"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert T.default_cache_dir() == tmp_path / "xdg" / "mae-deploy" / "trt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert T.default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "mae-deploy" / "trt"


def test_graph_sha256_covers_external_data(trt_bundle):
    spec = trt_bundle.graph("encoder")
    assert T.graph_sha256(trt_bundle, spec) == trt_bundle.manifest["files"]["encoder.onnx"]
    with_data = type(spec)(part="encoder", precision="fp32", file="encoder.onnx", external_data=("encoder.onnx",))
    combined = T.graph_sha256(trt_bundle, with_data)
    assert combined != trt_bundle.manifest["files"]["encoder.onnx"] and len(combined) == 64


# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,np_dtype,size",
    [
        ("FLOAT", np.float32, 4),
        ("HALF", np.float16, 2),
        ("INT32", np.int32, 4),
        ("INT64", np.int64, 8),
        ("INT8", np.int8, 1),
        ("BOOL", np.bool_, 1),
        ("UINT8", np.uint8, 1),
    ],
)
def test_dtype_mapping_both_ways(name, np_dtype, size):
    for form in (name, f"DataType.{name}", DataType[name]):  # a name, str(trt.DataType.X), an enum member
        assert T.numpy_dtype(form) == np.dtype(np_dtype)
        assert T.dtype_itemsize(form) == size
    assert T.trt_dtype_for_numpy(np_dtype) == name


def test_dtype_mapping_special_types():
    import ml_dtypes

    assert T.numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16) and T.dtype_itemsize(DataType.BF16) == 2
    assert T.trt_dtype_for_numpy(ml_dtypes.bfloat16) == "BF16"
    with pytest.raises(InputError, match="FP8 has no numpy equivalent"):
        T.numpy_dtype(DataType.FP8)
    with pytest.raises(InputError, match="unknown TensorRT data type 'COMPLEX'"):
        T.numpy_dtype("COMPLEX")
    with pytest.raises(InputError, match="complex64 has no TensorRT equivalent"):
        T.trt_dtype_for_numpy(np.complex64)
    assert T.buffer_nbytes((32, 197, 768), DataType.FLOAT) == 32 * 197 * 768 * 4
    assert T.buffer_nbytes((3, 3), "INT4") == 5  # 4.5 bytes rounded up


# --------------------------------------------------------------------------------------------------
# ONNX Runtime TensorRT execution provider options
# --------------------------------------------------------------------------------------------------


def test_ort_trt_provider_options(tmp_path):
    p = T.derive_profile(196, 224, 3, 32, 8, "L/4", embed_dim=768)
    enc = T.ort_trt_provider_options(p, tmp_path / "ep", fp16=True)
    assert enc == {
        "device_id": 0,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp_path / "ep"),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(tmp_path / "ep"),
        "trt_profile_min_shapes": "pixel_values:1x3x224x224,ids_keep:1x1",
        "trt_profile_opt_shapes": "pixel_values:8x3x224x224,ids_keep:8x49",
        "trt_profile_max_shapes": "pixel_values:32x3x224x224,ids_keep:32x196",
    }
    dec = T.ort_trt_provider_options(p, tmp_path, fp16=False, part="decoder", device_id=1)
    assert dec["trt_profile_min_shapes"] == "latent:1x2x768,ids_restore:1x196"
    assert dec["trt_profile_opt_shapes"] == "latent:8x50x768,ids_restore:8x196"
    assert dec["trt_profile_max_shapes"] == "latent:32x197x768,ids_restore:32x196"
    assert dec["trt_fp16_enable"] is False and dec["device_id"] == 1


def test_trt_module_imports_no_engine_library():
    code = (
        "import sys, mae_deploy.runners.trt as t\n"
        "p = t.derive_profile(16, 32, 3, embed_dim=32)\n"
        "t.ort_trt_provider_options(p, '/tmp/x', True)\n"
        "print(sorted(m for m in ('torch', 'tensorrt', 'onnxruntime', 'cuda') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# Missing packages and devices
# --------------------------------------------------------------------------------------------------


def test_missing_tensorrt_names_the_extra(trt_bundle):
    assert importlib.util.find_spec("tensorrt") is None, "this test documents the machine without TensorRT"
    with pytest.raises(MissingDependency) as e:
        T.import_tensorrt()
    assert str(e.value) == (
        "the trt backend needs the package 'tensorrt', which is not installed: "
        "pip install 'mae-deploy[trt]' (CUDA 12 driver; 'mae-deploy[trt-cu13]' for CUDA 13)"
    )
    assert e.value.exit_code == 6
    with pytest.raises(MissingDependency, match=r"pip install 'mae-deploy\[trt\]'"):
        create_runner(trt_bundle, "trt", device="cuda")


# --------------------------------------------------------------------------------------------------
# Choosing graphs and configuring the builder (fake tensorrt)
# --------------------------------------------------------------------------------------------------


def test_select_graph_per_generation(trt_bundle, trt_fp32_only_bundle):
    assert T.select_graph(trt_bundle, "encoder", "fp16", 10).file == "encoder.onnx"  # FP16 builder flag on 10
    assert T.select_graph(trt_bundle, "encoder", "fp16", 11).file == "encoder.fp16.onnx"  # strongly typed on 11
    assert T.select_graph(trt_bundle, "decoder", "fp32", 11).file == "decoder.onnx"
    with pytest.raises(
        BundleError,
        match=r"TensorRT 11 builds strongly typed networks, so fp16 needs the "
        r"bundle's fp16 ONNX.*--precision fp16",
    ):
        T.select_graph(trt_fp32_only_bundle, "encoder", "fp16", 11)
    assert T.select_graph(trt_fp32_only_bundle, "encoder", "fp16", 10).file == "encoder.onnx"


def _count_ops(path: Path, ops: tuple[str, ...]) -> int:
    import onnx

    return sum(n.op_type in ops for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_build_engine_fp32_on_10(trt_bundle):
    trt = FakeTrt("10.13.1")
    p = T.profile_for_bundle(trt_bundle, max_batch=16, opt_visible="L/4")
    res = T.build_engine(trt_bundle.graph_path("encoder"), p.shapes("encoder"), "fp32", b"seed", 2 << 30, trt=trt)
    assert ("create_network", 0) in trt.log  # no EXPLICIT_BATCH (ignored in 10, gone in 11), weakly typed
    sets = [e for e in trt.log if e[0] == "set_shape"]
    assert sets == [
        ("set_shape", "pixel_values", (1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32)),
        ("set_shape", "ids_keep", (1, 1), (8, 4), (16, 16)),
    ]
    assert ("create_timing_cache", b"seed") in trt.log
    assert res.timing_cache == b"seed+timings"  # the updated cache comes back to be saved
    meta = json.loads(res.engine[len(ENGINE_MAGIC) :])
    assert meta["flags"] == []  # TF32 cleared: fp32 means fp32; no FP16
    assert res.builder_flags == [] and res.fp32_layers == [] and res.generation == 10
    assert res.inputs == ["pixel_values", "ids_keep"]


def test_build_engine_config_details(trt_bundle, monkeypatch):
    trt = FakeTrt("10.13.1")
    configs = []
    orig = trt.Builder.create_builder_config
    monkeypatch.setattr(trt.Builder, "create_builder_config", lambda self: configs.append(orig(self)) or configs[-1])
    p = T.profile_for_bundle(trt_bundle)
    T.build_engine(trt_bundle.graph_path("decoder"), p.shapes("decoder"), "fp32", None, 3 << 30, tf32=True, trt=trt)
    cfg = configs[0]
    assert cfg.pools == {trt.MemoryPoolType.WORKSPACE: 3 << 30}
    assert trt.BuilderFlag.TF32 in cfg.flags  # tf32=True leaves TensorRT's default on
    assert ("create_timing_cache", b"") in trt.log  # no seed: an empty cache
    assert [e[1:] for e in trt.log if e[0] == "set_shape"] == [
        ("latent", (1, 2, 32), (8, 17, 32), (32, 17, 32)),
        ("ids_restore", (1, 16), (8, 16), (32, 16)),
    ]


def test_build_engine_fp16_on_10_uses_the_flag_and_pins_norms(trt_bundle, monkeypatch):
    trt = FakeTrt("10.3.0")
    networks = []
    orig = trt.Builder.create_network
    monkeypatch.setattr(trt.Builder, "create_network", lambda self, f=0: networks.append(orig(self, f)) or networks[-1])
    path = trt_bundle.graph_path("encoder")
    res = T.build_engine(path, T.profile_for_bundle(trt_bundle).shapes("encoder"), "fp16", trt=trt)
    assert json.loads(res.engine[len(ENGINE_MAGIC) :])["flags"] == ["FP16", "PREFER_PRECISION_CONSTRAINTS"]
    n_norm = _count_ops(path, ("LayerNormalization", "Softmax"))
    assert n_norm >= 5 and len(res.fp32_layers) == n_norm  # 2 blocks x (2 LN + softmax) + final norm
    for layer in networks[0].layers:
        pinned = layer.type in (LayerType.NORMALIZATION, LayerType.SOFTMAX)
        assert (layer.precision == DataType.FLOAT) == pinned
        assert (layer.output_types == {0: DataType.FLOAT}) == pinned


def test_build_engine_fp16_on_11_takes_precision_from_the_onnx(trt_bundle):
    trt = FakeTrt("11.4.0.106")
    assert not hasattr(trt.BuilderFlag, "FP16")  # the fake mirrors 11: touching the flag would fail
    spec = T.select_graph(trt_bundle, "encoder", "fp16", 11)
    res = T.build_engine(
        trt_bundle.path / spec.file, T.profile_for_bundle(trt_bundle).shapes("encoder"), "fp16", trt=trt
    )
    assert ("create_network", 0) in trt.log
    assert res.builder_flags == [] and res.fp32_layers == [] and res.generation == 11
    assert json.loads(res.engine[len(ENGINE_MAGIC) :])["onnx"].endswith("encoder.fp16.onnx")


def test_build_engine_errors(trt_bundle, tmp_path):
    p = T.profile_for_bundle(trt_bundle)
    with pytest.raises(BundleError, match=r"the profile gives no shapes for \['ids_keep'\]"):
        T.build_engine(
            trt_bundle.graph_path("encoder"), {"pixel_values": p.shapes("encoder")["pixel_values"]}, trt=FakeTrt()
        )
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(T.EngineBuildError, match="TensorRT's ONNX parser rejected .*junk.onnx: cannot parse"):
        T.build_engine(junk, p.shapes("encoder"), trt=FakeTrt())
    with pytest.raises(T.EngineBuildError, match="could not build an engine .* larger --workspace-gb"):
        T.build_engine(trt_bundle.graph_path("encoder"), p.shapes("encoder"), trt=FakeTrt(build_fails=True))
    with pytest.raises(BundleError, match="does not exist"):
        T.build_engine(tmp_path / "missing.onnx", p.shapes("encoder"), trt=FakeTrt())
    with pytest.raises(InputError, match="builds fp32 or fp16 engines, not 'int8'"):
        T.build_engine(trt_bundle.graph_path("encoder"), p.shapes("encoder"), "int8", trt=FakeTrt())


@pytest.mark.parametrize("seed", [b"incompatible", b"corrupt"])
def test_refused_timing_cache_is_dropped(trt_bundle, seed):
    trt = FakeTrt()
    res = T.build_engine(
        trt_bundle.graph_path("encoder"), T.profile_for_bundle(trt_bundle).shapes("encoder"), "fp32", seed, trt=trt
    )
    assert [e for e in trt.log if e[0] == "create_timing_cache"] == [
        ("create_timing_cache", seed),
        ("create_timing_cache", b""),
    ]
    assert res.timing_cache == b"+timings"  # built with a fresh cache


def test_build_progress_monitor_follows_the_outer_phase(trt_bundle, capsys):
    trt = FakeTrt()
    T.build_engine(
        trt_bundle.graph_path("encoder"), T.profile_for_bundle(trt_bundle).shapes("encoder"), trt=trt, progress=True
    )
    assert ("IProgressMonitor.__init__",) in trt.log
    mon = T._progress_monitor(trt, "x")
    mon.phase_start("Build", None, 4)
    assert mon.bar.total == 4
    mon.phase_start("Inner", "Build", 10)
    assert mon.step_complete("Inner", 0) is True and mon.bar.n == 0  # inner steps do not move the bar
    mon.step_complete("Build", 0)
    assert mon.bar.n == 1
    mon.phase_finish("Build")
    assert mon.bar is None
    assert T._progress_monitor(types.SimpleNamespace(), "x") is None  # TensorRT without IProgressMonitor


# --------------------------------------------------------------------------------------------------
# Engine cache (fake tensorrt)
# --------------------------------------------------------------------------------------------------


def test_engine_cache_builds_once_and_reuses_the_timing_cache(trt_bundle, tmp_path):
    trt = FakeTrt("10.13.1")
    gpu = "Fake GPU (sm_90)"
    p = T.profile_for_bundle(trt_bundle, max_batch=4)
    first = T.get_or_build_engine(
        trt_bundle, "encoder", "fp16", p, gpu_name=gpu, cache_dir=tmp_path, trt=trt, progress=False
    )
    assert first.built and first.paths.engine.is_file() and first.paths.engine.parent == tmp_path
    side = first.sidecar()
    assert side["tensorrt"] == "10.13.1" and side["gpu"] == gpu and side["precision"] == "fp16"
    assert side["graph"]["file"] == "encoder.onnx"
    assert side["graph"]["sha256"] == trt_bundle.manifest["files"]["encoder.onnx"]
    assert side["profile"] == p.as_dict() and side["builder_flags"] == ["FP16", "PREFER_PRECISION_CONSTRAINTS"]
    assert side["input_shapes"]["ids_keep"] == [[1, 1], [4, 16], [4, 16]]
    assert side["timing_cache"]["seeded"] is False
    tcache = T.timing_cache_path(tmp_path, "10.13.1", gpu)
    assert tcache.read_bytes() == b"+timings"
    builds = sum(e[0] == "build_serialized_network" for e in trt.log)

    again = T.get_or_build_engine(trt_bundle, "encoder", "fp16", p, gpu_name=gpu, cache_dir=tmp_path, trt=trt)
    assert not again.built and again.paths == first.paths
    assert sum(e[0] == "build_serialized_network" for e in trt.log) == builds  # no new build

    other = T.get_or_build_engine(
        trt_bundle, "decoder", "fp16", p, gpu_name=gpu, cache_dir=tmp_path, trt=trt, progress=False
    )
    assert other.built and other.paths.engine != first.paths.engine
    assert ("create_timing_cache", b"+timings") in trt.log  # the second build started from the saved cache
    assert other.sidecar()["timing_cache"]["seeded"] is True
    assert tcache.read_bytes() == b"+timings+timings"

    forced = T.get_or_build_engine(
        trt_bundle, "encoder", "fp16", p, gpu_name=gpu, cache_dir=tmp_path, trt=trt, rebuild=True, progress=False
    )
    assert forced.built and forced.paths == first.paths
    other_gpu = T.get_or_build_engine(
        trt_bundle, "encoder", "fp16", p, gpu_name="Other GPU (sm_80)", cache_dir=tmp_path, trt=trt, progress=False
    )
    assert other_gpu.built and other_gpu.paths.engine != first.paths.engine
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files behind


# --------------------------------------------------------------------------------------------------
# GPU-path rules that need no GPU: TensorRT generation for ORT's provider, its graphs and cache folders,
# a progress display that never raises
# --------------------------------------------------------------------------------------------------


def test_installed_trt_generation_without_importing_tensorrt():
    from importlib import metadata

    def versions(**have):
        def version(dist):
            if dist not in have:
                raise metadata.PackageNotFoundError(dist)
            return have[dist]

        return version

    none = lambda name: None  # noqa: E731
    assert T.installed_trt_generation(none, versions(**{"tensorrt-cu12": "10.13.3.9"})) == 10
    assert T.installed_trt_generation(none, versions(**{"tensorrt-cu13": "11.4.0.106"})) == 11
    assert T.installed_trt_generation(none, versions(tensorrt="8.6.1", **{"tensorrt-cu12-libs": "10.3.0"})) == 10
    assert T.installed_trt_generation(lambda name: "libnvinfer.so.11", versions()) == 11
    assert T.installed_trt_generation(lambda name: "libnvinfer.so.8", versions()) is None
    assert T.installed_trt_generation(none, versions()) is None


def test_ort_tensorrt_provider_gets_the_fp16_graph_on_tensorrt_11(trt_bundle, trt_fp32_only_bundle, tmp_path):
    """trt_fp16_enable has no effect on TensorRT 11: the provider must get the fp16 ONNX, as select_graph does."""
    on11 = T.OrtTrtSetup.for_bundle(trt_bundle, "fp16", cache_root=tmp_path, generation=11)
    assert {p: s.file for p, s in on11.specs.items()} == {
        "encoder": "encoder.fp16.onnx",
        "decoder": "decoder.fp16.onnx",
    }
    assert on11.provider_options("encoder", 0)["trt_fp16_enable"] is False  # the graph carries the precision
    on10 = T.OrtTrtSetup.for_bundle(trt_bundle, "fp16", cache_root=tmp_path, generation=10)
    assert on10.specs["encoder"].file == "encoder.onnx" and on10.provider_options("decoder", 1)["trt_fp16_enable"]
    unknown = T.OrtTrtSetup.for_bundle(trt_bundle, "fp16", cache_root=tmp_path, detect=lambda: None)
    assert unknown.specs["encoder"].file == "encoder.fp16.onnx"  # right on either generation
    old = T.OrtTrtSetup.for_bundle(trt_fp32_only_bundle, "fp16", cache_root=tmp_path, detect=lambda: None)
    assert old.specs["encoder"].file == "encoder.onnx" and old.fp16_flag("encoder")
    with pytest.raises(BundleError, match="TensorRT 11 builds strongly typed networks.*--precision fp16"):
        T.OrtTrtSetup.for_bundle(trt_fp32_only_bundle, "fp16", cache_root=tmp_path, generation=11)
    fp32 = T.OrtTrtSetup.for_bundle(trt_bundle, "fp32", cache_root=tmp_path, generation=11)
    assert fp32.specs["encoder"].file == "encoder.onnx" and not fp32.fp16_flag("encoder")
    with pytest.raises(InputError, match="trt_generation must be 10 or 11"):
        T.OrtTrtSetup.for_bundle(trt_bundle, "fp32", generation=9)
    with pytest.raises(InputError, match="--device tensorrt runs fp32, fp16 or int8, not 'bf16'"):
        T.OrtTrtSetup.for_bundle(trt_bundle, "bf16")


def test_ort_tensorrt_provider_has_one_engine_cache_folder_per_profile(trt_bundle, tmp_path):
    a = T.OrtTrtSetup.for_bundle(trt_bundle, "fp32", max_batch=8, cache_root=tmp_path, generation=10)
    same = T.OrtTrtSetup.for_bundle(trt_bundle, "fp32", max_batch=8, cache_root=tmp_path, generation=10)
    other = T.OrtTrtSetup.for_bundle(trt_bundle, "fp32", max_batch=64, cache_root=tmp_path, generation=10)
    half = T.OrtTrtSetup.for_bundle(trt_bundle, "fp16", max_batch=8, cache_root=tmp_path, generation=10)
    assert a.cache_dir == same.cache_dir and a.cache_dir.parent == tmp_path
    assert len({a.cache_dir, other.cache_dir, half.cache_dir}) == 3
    assert a.cache_dir.name.startswith("fp32-b8-v1-16-")
    opts = a.provider_options("encoder", 0)
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(a.cache_dir)
    assert a.cache_dir.is_dir() and a.describe()["profile"]["max_batch"] == 8
    blocked = tmp_path / "file"
    blocked.write_text("x")
    bad = T.OrtTrtSetup.for_bundle(trt_bundle, "fp32", cache_root=blocked, generation=10)
    with pytest.raises(InputError, match="cannot create the TensorRT engine cache"):
        bad.provider_options("encoder", 0)


def test_build_progress_callbacks_never_raise(monkeypatch):
    """A raise inside a TensorRT callback cancels the build (and the message then blames the workspace)."""
    import tqdm

    def broken(*a, **k):
        raise OSError("stderr is closed")

    monkeypatch.setattr(tqdm, "tqdm", broken)
    p = T.BuildProgress("x")
    p.phase_start("Build", None, 4)  # creating the bar fails: swallowed, remembered
    assert p.step_complete("Build", 0) is True
    p.phase_finish("Build")
    assert p.error == "OSError: stderr is closed"
    monkeypatch.undo()

    q = T.BuildProgress("y")
    q.phase_start("Build", None, "not a number")  # TensorRT handing something odd is no reason to cancel
    assert q.step_complete("Build", 0) is True and q.error.startswith("ValueError")
    r = T.BuildProgress("z")
    r.phase_start("Build", None, 2)
    r.bar.update = broken
    assert r.step_complete("Build", 0) is True and r.error == "OSError: stderr is closed"
    r.phase_finish("Build")


def test_progress_monitor_is_tensorrts_type_and_a_build_progress():
    trt = FakeTrt()
    mon = T._progress_monitor(trt, "desc")
    assert isinstance(mon, trt.IProgressMonitor) and isinstance(mon, T.BuildProgress)
    assert ("IProgressMonitor.__init__",) in trt.log and mon.desc == "desc"


def test_trt_package_keeps_one_job_per_module():
    import mae_deploy.runners.trt as pkg

    root = Path(pkg.__file__).parent
    sizes = {p.name: len(p.read_text().splitlines()) for p in root.glob("*.py")}
    assert {"api.py", "profile.py", "cache.py", "build.py", "session.py", "runner.py"} <= set(sizes)
    assert max(sizes.values()) < 600, sizes
    assert not any("_atomic_write" in p.read_text() for p in root.glob("*.py"))  # mae_deploy.fileio writes


def test_trt_extras_are_pinned_per_cuda_major():
    """Unpinned, tensorrt and cuda-python resolve to TensorRT 11 + cuda-python 13, which need a CUDA 13 driver."""
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["trt-cu12"] == ["tensorrt-cu12>=10.3,<11", "cuda-python>=12.9,<13"]
    assert extras["trt-cu13"] == ["tensorrt-cu13>=11,<12", "cuda-python>=13,<14"]
    assert extras["trt"] == ["mae-deploy[trt-cu12]"]  # the documented default: CUDA 12 drivers
    assert "trt-cu13" in T.INSTALL_HINT and "mae-deploy[trt]" in T.INSTALL_HINT
