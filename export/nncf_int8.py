"""int8-nncf: static int8 made by NNCF, OpenVINO's own post-training quantiser, as an ONNX Q/DQ graph.

Same file format as ``int8-qdq`` (QuantizeLinear/DequantizeLinear around the quantised ops, float32 at the
boundary), so ONNX Runtime, OpenVINO and TensorRT all read it; what differs is what is quantised and how:

- NNCF's transformer preset (``ModelType.TRANSFORMER``): SmoothQuant first (activation outliers moved into
  the weights, per input channel), then int8 weights per output channel and int8 activations per tensor,
  then fast bias correction; the patterns OpenVINO fuses (MatMul + bias, GELU, residual Add) are quantised
  the way its CPU plugin builds int8 kernels from them.
- Attention: ``q @ k^T`` in int8 and the softmax output quantised; NNCF (3.4, ONNX backend) leaves the ``v``
  input of ``softmax @ v`` float, so that MatMul is listed as float in mae.json (``float_matmuls``, read from
  the graph, not assumed). int8-qdq keeps both attention MatMuls float.
- The patch-embedding Conv is int8 too (a GEMM like the others), its pixels quantised over the range a
  normalised image can take (``pixel_range``, from the bundle's mean/std: every 0..1 pixel of every channel
  fits, nothing a calibration set missed is clipped; one step is about one 8-bit grey level). On ViT-B/16
  and real photos that cost no accuracy (pooled cosine within 3e-5 at 196, 49, 4 and 1 visible patches)
  and gained 1.6 % at AVX-512 VNNI (benchmarks/RESULTS.md). Without a pixel range the Conv stays float.
- What stays float: the rest of the embedding stage before the first LayerNormalization (position
  embeddings, the token gather), and everything after the final LayerNormalization (the latent output and
  the pooled outputs computed from it, the classifier head, decoder_pred), so the pooled outputs stay
  consistent with the latent and the output layer's rounding does not land on the result unaveraged.
- Calibrated on the encoder at several visible counts (export/calibration.py ``masked=True``).

``nncf`` is an export-side dependency (extra ``mae-deploy[nncf]``); importing it pulls in torch, which the
export has loaded anyway.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from export.precision import save_graph
from mae_deploy.errors import InputError, MissingDependency
from mae_deploy.names import ENCODER_INPUTS

PIXELS = ENCODER_INPUTS[0]  # the graph input the patch embedding reads (classifiers name it the same)

NNCF_INSTALL = "pip install 'mae-deploy[nncf]'"


@dataclass(frozen=True)
class NncfOptions:
    """What NNCF does (module docstring); the defaults are what ``export --precision int8-nncf`` writes."""

    smooth_quant: bool = True  # the transformer preset's SmoothQuant pass

    def describe(self) -> dict:
        """The ``quantization`` block of mae.json for this variant."""
        return {
            "method": "static",
            "format": "qdq",
            "quantizer": "nncf",
            "preset": "transformer",
            "smooth_quant": self.smooth_quant,
            "weights": "int8 symmetric per-channel",
            "activations": "int8 per-tensor, calibrated at several visible counts",
            "float": "before the first LayerNormalization but the patch-embedding Conv, and after the final one",
            "pixels": "int8 over the normalised image range (mean/std)",
        }


def import_nncf():
    """``import nncf`` with the one-line MissingDependency naming the extra."""
    try:
        import nncf
    except ImportError as e:
        raise MissingDependency("nncf", "--precision int8-nncf", NNCF_INSTALL) from e
    return nncf


def float_stages(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes before the first LayerNormalization and of those at or after the last one.

    ONNX node lists are topologically sorted, so "before" is a prefix of the list and "after" is whatever reads
    the last norm's output (``norm``, ``fc_norm``, ``decoder_norm``); a graph without a norm gives [].
    """
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    if not norms:
        return []
    names = []
    for node in model.graph.node:
        if node is norms[0]:
            break
        names.append(node.name)
    reached = set(norms[-1].output)
    names.append(norms[-1].name)
    for node in model.graph.node:
        if any(i in reached for i in node.input):
            reached.update(node.output)
            names.append(node.name)
    return names


# Ops that only move or relabel elements: an int8 tensor stays int8 through them (engines move the int8 data).
_LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def dequantized_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors that are a DequantizeLinear's output, directly or through layout-only ops (``_LAYOUT_OPS``)."""
    out: set[str] = set()
    for n in model.graph.node:  # topologically sorted: a producer comes before its readers
        if n.op_type == "DequantizeLinear" or (n.op_type in _LAYOUT_OPS and n.input and n.input[0] in out):
            out.update(n.output)
    return out


def float_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes of a Q/DQ graph with an input that is not dequantized int8 (they run in float).

    k of ``q @ k^T`` is quantised before its reshape and transposes: it still counts as int8.
    """
    dequantized = dequantized_tensors(model)
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and not all(i in dequantized for i in n.input[:2])
    ]


def unsigned_asymmetric_activations(model: onnx.ModelProto) -> int:
    """Rewrite asymmetric activation Q/DQ pairs from int8 to uint8 in place; returns how many zero points changed.

    NNCF's ONNX backend writes an activation quantiser as int8 whenever its range reaches below zero, so an
    asymmetric one (GELU's output, zero point -80) becomes int8 with a zero point that the int8 GEMM has to
    subtract. uint8 with the zero point + 128 is the same set of real values (q' = q + 128), and it is the
    form AVX-512 VNNI multiplies natively (u8 x s8): OpenVINO then runs those GEMMs as OpenVINO's own NNCF
    does, where they were 1.08x slower (ViT-B/16, VNNI). Symmetric quantisers (zero point 0) and weights stay
    int8.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    quantized_activations = {n.output[0] for n in quantize if n.input[0] not in inits}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            users.setdefault(n.input[2], []).append(n)
    retyped: set[str] = set()  # names whose declared type was int8 and is uint8 now
    for name, nodes in users.items():
        zp = inits.get(name)
        activation = all(
            (n.op_type == "QuantizeLinear" and n.input[0] not in inits) or n.input[0] in quantized_activations
            for n in nodes
        )
        if zp is None or zp.data_type != onnx.TensorProto.INT8 or not activation:
            continue
        value = numpy_helper.to_array(zp)
        if not value.any():
            continue  # symmetric: int8 is what the engines want
        zp.CopyFrom(numpy_helper.from_array((value.astype("int16") + 128).astype("uint8"), name))
        retyped |= {name, *(n.output[0] for n in nodes if n.op_type == "QuantizeLinear")}
    # Exporters declare the types of initializers and intermediate tensors too: drop the stale ones.
    keep = [v for v in graph.value_info if v.name not in retyped]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    changed = sum(1 for n in retyped if n in inits)
    return changed


def pixel_range(mean: list[float], std: list[float]) -> tuple[float, float]:
    """The lowest and highest value a normalised pixel can take: (0 - mean) / std and (1 - mean) / std."""
    pairs = list(zip(mean, std, strict=True))
    return min(-m / s for m, s in pairs), max((1 - m) / s for m, s in pairs)


def pixel_embedding_convs(model: onnx.ModelProto) -> list[str]:
    """The Conv nodes that read the graph's pixel input directly (the patch embedding)."""
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] == PIXELS]


def set_input_range(model: onnx.ModelProto, name: str, low: float, high: float) -> int:
    """Make every quantiser of the graph input ``name`` span [low, high] exactly; returns how many it changed.

    The QuantizeLinear and the DequantizeLinear nodes reading it get the same scale and zero point (NNCF
    shares the initializers; separate ones are set too). The zero point keeps its type (uint8 or int8).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] != name or len(node.input) < 3:
            continue
        zp_type = numpy_helper.to_array(inits[node.input[2]]).dtype
        info = np.iinfo(zp_type)
        scale = np.asarray((high - low) / (int(info.max) - int(info.min)), dtype=np.float32)
        zero_point = np.asarray(np.clip(np.round(int(info.min) - low / scale), info.min, info.max), dtype=zp_type)
        readers = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0]]
        pair = [node, *readers]
        for n in pair:
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(scale, n.input[1]))
            inits[n.input[2]].CopyFrom(numpy_helper.from_array(zero_point, n.input[2]))
        changed += 1
    return changed


def to_int8_nncf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    feeds: list[dict],
    external_data: bool = False,
    options: NncfOptions | None = None,
    pixels: tuple[float, float] | None = None,
) -> Path:
    """NNCF static int8 of the fp32 graph ``src``, calibrated on ``feeds`` (export/calibration.py's part feeds).

    ``pixels``: the range of a normalised pixel (``pixel_range``); given, the patch-embedding Conv is int8
    with its input quantised over exactly that range, else it stays float.
    """
    options = options or NncfOptions()
    if not feeds:
        raise InputError("--precision int8-nncf is calibrated on real images: pass --calibration DIR")
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))  # weights included: SmoothQuant rewrites them
    smooth = (
        AdvancedSmoothQuantParameters()
        if options.smooth_quant
        else AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
    )
    ignored = float_stages(model)
    if pixels is not None:
        embedding = set(pixel_embedding_convs(model))
        ignored = [n for n in ignored if n not in embedding]
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)  # one INFO line per ignored node, on every export
    try:
        quantized = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
            advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=smooth),
        )
    finally:
        nncf_log.setLevel(level)
    del model
    unsigned_asymmetric_activations(quantized)
    if pixels is not None:
        set_input_range(quantized, PIXELS, *pixels)
    save_graph(quantized, dst, external_data)
    return dst
