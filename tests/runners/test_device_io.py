"""What leaves a runner is what the caller asked for: pooled outputs, tensors in and out (DLPack), compile.

On the CPU the same code paths run as on a GPU: ONNX Runtime binds a torch CPU tensor by address and writes
into a torch tensor; the torch runner keeps tensors where they are.
"""

from __future__ import annotations

import numpy as np
import pytest
from runtime_fixtures import export_tiny_bundle

from mae_deploy import Bundle, FeatureExtractor, create_runner, random_masking
from mae_deploy.errors import InputError
from mae_deploy.masking import all_visible
from mae_deploy.names import POOLED_OUTPUTS
from mae_deploy.pooling import pool_latent

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def pooled_bundle(tmp_path_factory):
    """An export_bundle bundle: encoder graphs (fp32, fp16, int8) with pooled outputs, reference weights."""
    from export.bundle_writer import export_bundle
    from training.model import create_model

    torch.manual_seed(0)
    model = create_model("mae_vit_test").eval()
    with torch.no_grad():  # LayerNorms off their identity init, so the pooled outputs are not trivial
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path_factory.mktemp("pooled") / "bundle"
    export_bundle(
        model, out, parts=["encoder"], precisions=("fp32", "fp16", "int8"), reference_weights=True, progress=None
    )
    return out


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory):
    """A bundle whose encoder has only the latent output (as exported before pooled outputs existed)."""
    return export_tiny_bundle(tmp_path_factory.mktemp("old") / "bundle")


def _inputs(bundle_dir, n: int = 3, mask_ratio: float = 0.0):
    b = Bundle.load(bundle_dir)
    x = np.random.default_rng(0).standard_normal((n, b.in_chans, b.image_size, b.image_size)).astype(np.float32)
    ids = (
        all_visible(n, b.num_patches)[0] if mask_ratio == 0 else random_masking(n, b.num_patches, mask_ratio, rng=1)[0]
    )
    return x, ids


def test_the_encoder_graph_lists_its_pooled_outputs(pooled_bundle, old_bundle):
    for g in Bundle.load(pooled_bundle).graphs:
        assert g.output_names == ("latent", *POOLED_OUTPUTS.values())
        assert [tuple(t.shape) for t in g.outputs[1:]] == [("batch", 32), ("batch", 32)]
    assert Bundle.load(old_bundle).graph("encoder", "fp32").output_names == ("latent",)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_ort_pooled_outputs_equal_pooling_the_latent(pooled_bundle, precision, mask_ratio):
    x, ids = _inputs(pooled_bundle, mask_ratio=mask_ratio)
    with create_runner(pooled_bundle, "ort", precision=precision) as r:
        latent = r.encode(x, ids)
        for pool in ("cls", "mean"):
            got = r.encode_pooled(x, ids, pool)
            assert got.shape == (3, 32) and got.dtype == np.float32
            np.testing.assert_allclose(got, pool_latent(latent, pool), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(r.encode_pooled(x, ids, "tokens"), latent)


@pytest.mark.parametrize("io_binding", [False, True])
def test_ort_fetches_only_the_pooled_output(pooled_bundle, io_binding):
    x, ids = _inputs(pooled_bundle)
    r = create_runner(pooled_bundle, "ort", io_binding=io_binding)
    fetched = []
    original = r._run_once
    r._run_once = lambda part, feeds, out=None: fetched.append(out) or original(part, feeds, out)
    r.encode_pooled(x, ids, "mean")
    r.encode_pooled(x, ids, "cls")
    r.encode(x, ids)
    assert fetched == ["pooled_mean", "pooled_cls", None]


def test_an_older_bundle_is_pooled_on_the_host(old_bundle):
    x, ids = _inputs(old_bundle)
    for backend in ("ort", "torch"):
        with create_runner(old_bundle, backend) as r:
            latent = r.encode(x, ids)
            for pool in ("cls", "mean"):
                np.testing.assert_allclose(r.encode_pooled(x, ids, pool), pool_latent(latent, pool), atol=1e-6)


def test_a_bad_pool_is_refused(pooled_bundle):
    x, ids = _inputs(pooled_bundle)
    with create_runner(pooled_bundle, "ort") as r, pytest.raises(InputError, match="pool must be one of"):
        r.encode_pooled(x, ids, "max")


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("pool", [None, "cls", "mean"])
def test_a_tensor_in_gives_a_tensor_out_equal_to_numpy(pooled_bundle, backend, pool):
    x, ids = _inputs(pooled_bundle, mask_ratio=0.5)
    with create_runner(pooled_bundle, backend) as r:
        want = r.encode(x, ids) if pool is None else r.encode_pooled(x, ids, pool)
        t = torch.from_numpy(x.copy())
        got = r.encode(t, torch.from_numpy(ids)) if pool is None else r.encode_pooled(t, ids, pool)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device == t.device
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


def test_ort_binds_a_cpu_tensor_by_address(pooled_bundle):
    """The IO-binding path (caller's memory in, a tensor of the caller's library out) runs, not the host copy."""
    x, ids = _inputs(pooled_bundle)
    r = create_runner(pooled_bundle, "ort")
    r._run_once = None  # the host path would call it: fail loudly if the tensor went through the host
    out = r.encode_pooled(torch.from_numpy(x), ids, "cls")
    with create_runner(pooled_bundle, "ort") as ref:
        np.testing.assert_allclose(out.numpy(), ref.encode_pooled(x, ids, "cls"), atol=1e-6)


def test_device_tensors_are_checked_like_arrays(pooled_bundle):
    x, ids = _inputs(pooled_bundle)
    with create_runner(pooled_bundle, "ort") as r:
        with pytest.raises(InputError, match="must be float32"):
            r.encode(torch.from_numpy(x).double(), ids)
        with pytest.raises(InputError, match="expects"):
            r.encode(torch.from_numpy(x[:, :, :16]).contiguous(), ids)
        with pytest.raises(InputError, match="contiguous"):
            r.encode(torch.from_numpy(x).transpose(2, 3), ids)
        with pytest.raises(InputError, match="batch mismatch"):
            r.encode(torch.from_numpy(x[:2]), ids)
        bad = ids.copy()
        bad[0, 1] = bad[0, 0]
        with pytest.raises(InputError, match="duplicate"):
            r.encode(torch.from_numpy(x), torch.from_numpy(bad))


def test_feature_extractor_takes_a_tensor(pooled_bundle):
    x, _ = _inputs(pooled_bundle)
    with FeatureExtractor(pooled_bundle, pool="mean") as fx:
        got = fx.extract_pixels(torch.from_numpy(x))
        assert isinstance(got, torch.Tensor)
        np.testing.assert_allclose(got.numpy(), fx.extract_pixels(x), atol=1e-6)


def test_torch_runner_pools_on_its_device_at_bf16(pooled_bundle):
    x, ids = _inputs(pooled_bundle)
    with create_runner(pooled_bundle, "torch") as fp32, create_runner(pooled_bundle, "torch", precision="bf16") as bf:
        ref = fp32.encode_pooled(x, ids, "mean")
        got = bf.encode_pooled(x, ids, "mean")
        assert got.dtype == np.float32 and got.shape == ref.shape
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.99 and np.abs(got - ref).max() > 0  # bf16 really ran


def test_compiled_torch_runner_equals_eager(pooled_bundle):
    """torch.compile (inductor on the CPU here) gives the eager model's features and latent."""
    x, ids = _inputs(pooled_bundle, mask_ratio=0.75)
    with create_runner(pooled_bundle, "torch") as eager, create_runner(pooled_bundle, "torch", compile=True) as comp:
        assert comp.info.details["compiled"] is True and eager.info.details["compiled"] is False
        np.testing.assert_allclose(comp.encode(x, ids), eager.encode(x, ids), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            comp.encode_pooled(x, ids, "cls"), eager.encode_pooled(x, ids, "cls"), rtol=1e-4, atol=1e-4
        )
