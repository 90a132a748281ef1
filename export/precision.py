"""Precision variants of an exported fp32 graph: int8 for CPU serving, fp16 for GPU runtimes.

Both take and return float32 at the graph boundary, so a runner feeds every variant the same arrays.

int8 — ONNX Runtime dynamic quantisation (``onnxruntime.quantization.quantize_dynamic``) of the MatMuls
whose second input is a weight (the Linear layers: q, k, v, proj, fc1, fc2, decoder_embed/pred): int8 weights,
uint8 activations quantised per call (no calibration data needed, which suits an export step). The two
attention MatMuls (q@k^T, attn@v) multiply two activations; they stay fp32 (ONNX Runtime 1.32 leaves them
alone anyway; excluding them by name keeps it so across versions: softmax outputs span orders of magnitude
and quantise badly). Weights are quantised per tensor: on the demo's trained digits classifier, 7-bit
per-channel weights lost 0.3-0.8 top-1 points depending on the batch (activation scales are computed per
call, over the whole batch), per-tensor 7-bit stayed within 0.3 of fp32 at batch 1, 8, 32 and 64; on ViT-B
features the two are alike (cosine 0.99996). Weights use 7 bits (``reduce_range``):
on x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 kernel sums pairs of products in saturating int16
(vpmaddubsw), which with full-range weights overflows — measured on an AVX2 CPU without VNNI (AMD EPYC, ORT
1.32, the test model): mean-pooled feature cosine 0.943 with 8-bit weights, 0.99989 with 7-bit. A bundle
may be exported on one CPU and served on another, so the variant is made safe for both. Measured on
ViT-B/16 (random init, 8 skimage photos, 2 threads): mean-pooled feature cosine 0.99996 per-channel and
per-tensor alike, ~3x faster than PyTorch eager fp32 (benchmarks/RESULTS.md has the real run). The
patch-embedding Conv stays fp32 (one layer, ~0.5 % of the FLOPs), and so does the layer that writes the
graph's output (the classifier head, decoder_pred): its rounding lands on the result unaveraged.

int8-qdq — static quantisation in the explicit Q/DQ format
(``onnxruntime.quantization.quantize_static``, ``QuantFormat.QDQ``): QuantizeLinear/DequantizeLinear pairs
around the weight MatMuls/Gemms, the form TensorRT (which has no implicit int8 since 10.x's strongly typed
networks, and none at all in 11) and OpenVINO build int8 kernels from. Activation ranges come from
calibration images (min/max over export/calibration.py's feeds); activations are int8 symmetric per
tensor and weights int8 symmetric per output channel (zero points 0: what TensorRT requires), in the 7-bit
range for the same reason as the dynamic variant: ONNX Runtime's CPU provider runs Q/DQ MatMuls through
the same u8 x s8 kernels, and the export verifies the graph there (test model on smooth images: pooled
cosine 0.973 with 8-bit weights, 0.99945 with 7-bit; TensorRT and OpenVINO just see smaller int8 values). Only MatMul
and Gemm with a weight input are quantised: LayerNormalization, Softmax, GELU, the residual Adds and the
two attention MatMuls (activation x activation) stay float, as does the patch-embedding Conv.

fp16 — ``onnxruntime.transformers.float16.convert_float_to_float16`` (ships with onnxruntime, so no extra
dependency) with ``keep_io_types`` (float32 inputs/outputs, casts inside) and LayerNormalization and
Softmax kept in float32: their reductions (variance, exp-sum) are where fp16 loses accuracy and overflows,
while they are a negligible share of the time. Converting the ONNX graph rather than exporting a
``model.half()`` keeps one export path and needs no autocast exclusions inside the model code. The fp16
graph is checked here on ONNX Runtime's CPU provider (which upcasts kernels it lacks); it is meant for GPU
runtimes (CUDA / TensorRT, strongly typed networks take the precision from the ONNX; what has run where:
docs/verification.md). Two things the converter gets wrong on the dynamo exporter's graphs are set right around
it (issue #21): the exporter merges equal small initializers (a fresh model's LayerNorm weights are all
ones, its LayerNorm and Linear biases all zeros: one initializer then feeds every LayerNorm), and it
annotates initializers in ``value_info``. The converter takes every float annotation for an fp16 value, so
it put a Cast in front of each LayerNorm reading a weight it keeps in float32; ONNX Runtime 1.25-1.31 (the
CUDA 13 onnxruntime-gpu) names that Cast after the value it reads, once per reader, so 25 LayerNorms
sharing one weight gave 25 nodes declaring one output, an invalid graph. Here the initializers' annotations
are dropped before converting (a float32-kept weight then needs no Cast at all) and repeated identical
nodes are dropped after (a value read by two float32 nodes, e.g. the zero bias shared with fp16 Adds, keeps
one Cast, as ONNX Runtime 1.32 does itself).
"""

from __future__ import annotations

import heapq
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

from mae_deploy.errors import InputError, VerificationError
from mae_deploy.names import INT8_NNCF, INT8_QDQ

VARIANT_PRECISIONS = ("fp16", "int8", INT8_QDQ, INT8_NNCF)
FP16_KEEP_FP32_OPS = ("LayerNormalization", "Softmax")


def variant_filename(part: str, precision: str) -> str:
    """encoder.onnx, encoder.int8.onnx, decoder.fp16.onnx ..."""
    return f"{part}.onnx" if precision == "fp32" else f"{part}.{precision}.onnx"


def _weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(MatMul/Gemm nodes whose B input is an initializer, the other MatMul nodes)."""
    inits = {t.name for t in model.graph.initializer}
    # Constant nodes hold weights too in some exports.
    inits |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    weight, activation = [], []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            (weight if len(node.input) > 1 and node.input[1] in inits else activation).append(node.name)
    return weight, activation


def _output_layers(model: onnx.ModelProto, weight: list[str]) -> list[str]:
    """Weight MatMul/Gemm nodes that write a graph output, directly or through one Add (their bias).

    These stay float: the classification head's (or decoder_pred's) rounding lands on the result itself,
    not averaged over later layers, and they are a small share of the FLOPs. On the demo's digits the
    quantised head alone cost 0.56 top-1 points; the issue's bar is 0.5.
    """
    outputs = {o.name for o in model.graph.output}
    adds_to_output = {i for n in model.graph.node if n.op_type == "Add" and n.output[0] in outputs for i in n.input}
    wanted = set(weight)
    return [
        n.name
        for n in model.graph.node
        if n.name in wanted and (n.output[0] in outputs or n.output[0] in adds_to_output)
    ]


def _float_nodes(src: Path, graph: onnx.ModelProto | None = None) -> list[str]:
    """Names of the MatMul/Gemm nodes of ``src`` that stay float; InputError when nothing would be quantised."""
    graph = graph if graph is not None else onnx.load(str(src), load_external_data=False)
    weight, activation = _weight_matmuls(graph)
    if not weight:
        raise InputError(f"{src.name} has no MatMul with a weight input: nothing to quantise")
    return activation + _output_layers(graph, weight)


@contextmanager
def _one_copy_of_the_weights(graph: onnx.ModelProto) -> Iterator[None]:
    """Keep ``quantize_dynamic`` to one in-memory copy of a graph without Gemm nodes.

    ONNX Runtime's dynamic quantiser (1.32) rewrites Gemm nodes as MatMul and then, unconditionally, deep-copies
    the model, saves it and reloads it with shape inference to refresh its type annotations, while the caller's
    copy stays alive: three copies of the weights at once (ViT-H/14 encoder: 2.5 GB of weights, 7.3 GB peak;
    the export's peak, issue #10). With no Gemm node the rewrite changes nothing and the model was already
    shape-inferred when the quantiser loaded it, so the refresh would return an equal model: here it returns
    the same one (2.5 GB peak). Graphs with Gemm (classifier heads, small) keep the library's path, and so
    does a version of ONNX Runtime that lacks the function (tests/export/test_export.py checks the result is equal).
    """
    import importlib

    module = importlib.import_module("onnxruntime.quantization.onnx_quantizer")
    original = getattr(module, "save_and_reload_model_with_shape_infer", None)
    if original is None or any(n.op_type == "Gemm" for n in graph.graph.node):
        yield
        return
    module.save_and_reload_model_with_shape_infer = lambda model: model
    try:
        yield
    finally:
        module.save_and_reload_model_with_shape_infer = original


def _without_initializer_annotations(model: onnx.ModelProto) -> None:
    """Drop the ``value_info`` entries of initializers (they carry their own type) in place.

    The fp16 converter turns every float annotation into float16, also that of a weight it keeps in float32
    (one only LayerNorms read), and then casts that "fp16" weight back before each LayerNorm (module
    docstring).
    """
    initializers = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in initializers]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _one_node_per_output(model: onnx.ModelProto) -> None:
    """Drop nodes that repeat an earlier node exactly (same op, inputs, outputs, name) in place.

    ONNX Runtime 1.25-1.31's fp16 converter emits one Cast per float32 reader of an fp16 value, each named
    after the value, so a value two LayerNorms read is declared twice (module docstring). The copies
    compute the same thing: one stays. Two different nodes writing one value are a converter bug that no
    reordering fixes, so that is an error.
    """
    producers: dict[str, onnx.NodeProto] = {}
    kept: list[onnx.NodeProto] = []
    for node in model.graph.node:
        earlier = next((producers[o] for o in node.output if o in producers), None)
        if earlier is None:
            kept.append(node)
            producers.update((o, node) for o in node.output)
        elif earlier != node:
            raise VerificationError(
                f"the fp16 converter made two different nodes ({earlier.name!r}, {node.name!r}) that write one "
                f"value ({', '.join(o for o in node.output if o in producers)}): upgrade onnxruntime "
                "(1.32 or newer) or export without fp16"
            )
    if len(kept) < len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def _topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 converter appends its boundary Casts at the end of the node list; ONNX requires
    topological order (onnx.checker rejects the file otherwise). Sorted in place, keeping the given order
    where it is already valid: only the node list is rebuilt, never the initializers (a copy of the model
    through onnx_ir held the ViT-H encoder's fp16 weights twice, +1.2 GB at the export's peak)."""
    graph = model.graph
    nodes = list(graph.node)
    produced = {name for node in nodes for name in node.output}
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    waiting = {i: {n for n in node.input if n in produced and n not in ready} for i, node in enumerate(nodes)}
    readers: dict[str, list[int]] = {}
    for i, missing in waiting.items():
        for name in missing:
            readers.setdefault(name, []).append(i)
    order, queue = [], [i for i in range(len(nodes)) if not waiting[i]]
    heapq.heapify(queue)  # the lowest original index first: a valid order stays as it was
    while queue:
        i = heapq.heappop(queue)
        order.append(i)
        for name in nodes[i].output:
            for j in readers.pop(name, ()):
                waiting[j].discard(name)
                if not waiting[j]:
                    heapq.heappush(queue, j)
    if len(order) != len(nodes):
        raise VerificationError(
            "the fp16 graph has a cycle or a value no node produces; this is a bug in the "
            "conversion: export without fp16 and report it"
        )
    sorted_nodes = [nodes[i] for i in order]
    del graph.node[:]
    graph.node.extend(sorted_nodes)
    # The converter leaves stale value_info types behind (float where it now produces float16); drop the
    # intermediate annotations so shape inference (and onnx.checker) re-derive them from the ops.
    del graph.value_info[:]
    return model


def save_graph(model: onnx.ModelProto, dst: Path, external_data: bool) -> None:
    """Write a variant graph, its weights in ``<file>.data`` beside it when ``external_data``."""
    if external_data:
        onnx.save_model(
            model,
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dst.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(dst))


def to_int8(src: str | os.PathLike, dst: str | os.PathLike, external_data: bool = False) -> Path:
    """Dynamic int8 quantisation of the weight MatMuls of ``src`` (see the module docstring)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    graph = onnx.load(str(src), load_external_data=False)
    keep_float = _float_nodes(src, graph)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" hint on every call
    try:
        with _one_copy_of_the_weights(graph):
            quantize_dynamic(
                src,
                dst,
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_exclude=keep_float,
                per_channel=False,  # module docstring: per-tensor kept top-1 within 0.3 points, per-channel not
                reduce_range=True,  # see the module docstring: int16 saturation on CPUs without VNNI
                weight_type=QuantType.QInt8,
                use_external_data_format=external_data,
            )
    finally:
        root.setLevel(level)
    return dst


class _FeedReader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of input dicts."""

    def __init__(self, feeds: list[dict]) -> None:
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def to_int8_qdq(src: str | os.PathLike, dst: str | os.PathLike, feeds: list[dict], external_data: bool = False) -> Path:
    """Static Q/DQ int8 of the weight MatMuls of ``src``, calibrated on ``feeds`` (see the module docstring)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dst = Path(src), Path(dst)
    keep_float = _float_nodes(src)
    if not feeds:
        raise InputError("static int8 needs calibration images: pass --calibration DIR")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs a "consider pre-processing" hint on every call
    try:
        quantize_static(
            src,
            dst,
            _FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=keep_float,
            per_channel=True,
            reduce_range=True,  # 7-bit weights: ORT's CPU kernels saturate otherwise (module docstring)
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=external_data,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    finally:
        root.setLevel(level)
    return dst


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike, external_data: bool = False) -> Path:
    """float16 weights and compute, float32 boundary, LayerNorm/Softmax in float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    # The converter needs value types; its own shape inference works on an in-memory proto, which fails
    # above 2 GB (ViT-H). Inferring through files works at any size; the temporary graph sits next to
    # src so its relative external-data reference still resolves.
    fd, inferred = tempfile.mkstemp(prefix=f".{src.stem}.", suffix=".inferred.onnx", dir=src.parent)
    os.close(fd)
    try:
        onnx.shape_inference.infer_shapes_path(str(src), inferred)
        model = onnx.load(inferred)  # weights included: the converter rewrites them
    finally:
        Path(inferred).unlink(missing_ok=True)
    _without_initializer_annotations(model)
    half = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32_OPS), disable_shape_infer=True
    )
    _one_node_per_output(half)
    save_graph(_topologically_sorted(half), dst, external_data)
    return dst


def make_variant(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    precision: str,
    external_data: bool = False,
    feeds: list[dict] | None = None,
    pixels: tuple[float, float] | None = None,
) -> Path:
    """``dst``: the ``precision`` variant of the fp32 graph ``src``; ``feeds`` calibrate int8-qdq and int8-nncf;
    ``pixels`` (the normalised pixel range) lets int8-nncf quantise the patch embedding."""
    if precision == INT8_NNCF:  # NNCF's transformer preset: export/nncf_int8.py
        from export.nncf_int8 import to_int8_nncf

        return to_int8_nncf(src, dst, feeds or [], external_data, pixels=pixels)
    if precision == INT8_QDQ:
        return to_int8_qdq(src, dst, feeds or [], external_data)
    if precision == "int8":
        return to_int8(src, dst, external_data)
    if precision == "fp16":
        return to_fp16(src, dst, external_data)
    raise InputError(f"unknown precision {precision!r}; use one of fp32, {', '.join(VARIANT_PRECISIONS)}")
