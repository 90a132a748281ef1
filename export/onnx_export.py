"""One graph (encoder, decoder or classifier) from PyTorch to an ONNX file with symbolic ``batch`` and
``visible`` dims (the classifier sees every patch: ``batch`` only).

Uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) with ``torch.export.Dim`` objects, so
the dims are real symbols: one encoder file serves visible = 1 ... L. The decoder's latent input is
declared as the derived dim ``visible + 1`` so both graphs agree on what ``visible`` means.

After export the graph is checked for ops that would make it random or unusable by TensorRT (random
generators, TopK, Scatter*), and dims are renamed to the bundle's names if the exporter picked others
(older exporters call them ``s0``, ``s1``).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from export.wrappers import graph_module
from mae_deploy.errors import InputError, VerificationError
from mae_deploy.names import (
    CLASSIFIER,
    CLASSIFIER_INPUTS,
    CLASSIFIER_OUTPUTS,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    POOLED_OUTPUTS,
)
from training.model import MaskedAutoencoderViT, VisionTransformer

DEFAULT_OPSET = 20
MIN_OPSET = 17  # LayerNormalization appears in opset 17
# Weights above this go to a side file: a protobuf cannot exceed 2 GiB, and this leaves room for the graph.
EXTERNAL_DATA_THRESHOLD_BYTES = 1536 * 2**20
# Random generators make outputs irreproducible; TopK and Scatter* are what a mask-in-graph export would
# use and what TensorRT handles badly. The host passes ids instead.
FORBIDDEN_OPS = frozenset(
    {
        "RandomUniform",
        "RandomUniformLike",
        "RandomNormal",
        "RandomNormalLike",
        "Multinomial",
        "Bernoulli",
        "TopK",
        "ScatterND",
        "ScatterElements",
        "Scatter",
    }
)
BATCH, VISIBLE, VISIBLE_PLUS_ONE = "batch", "visible", "visible+1"


@dataclass
class GraphFile:
    """What :func:`export_graph` wrote."""

    part: str
    path: Path
    external_data: list[str] = field(default_factory=list)  # relative to path's directory
    op_types: list[str] = field(default_factory=list)


def _example_inputs(model: MaskedAutoencoderViT | VisionTransformer, part: str) -> tuple[torch.Tensor, ...]:
    """Trace-time inputs: sizes chosen distinct from each other, from 1 and from L, so that the exporter
    cannot mistake a symbolic size for a constant (it specialises sizes 0/1 and may merge equal ones)."""
    cfg = model.config
    L = cfg.num_patches
    n = 2
    k = max(3, L // 2) if L > 3 else L
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(L, generator=gen) for _ in range(n)])
    if part == CLASSIFIER:
        return (torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen),)
    if part == "encoder":
        x = torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
        return x, ids[:, :k].contiguous()
    latent = torch.randn(n, k + 1, cfg.embed_dim, generator=gen)
    return latent, torch.argsort(ids, dim=1)


def _dynamic_shapes(model: MaskedAutoencoderViT | VisionTransformer, part: str) -> dict:
    L = model.config.num_patches
    batch = Dim(BATCH, min=1)
    visible = Dim(VISIBLE, min=1, max=L)
    if part == CLASSIFIER:
        return {"pixel_values": {0: batch}}
    if part == "encoder":
        return {"pixel_values": {0: batch}, "ids_keep": {0: batch, 1: visible}}
    return {"latent": {0: batch, 1: visible + 1}, "ids_restore": {0: batch}}


def _io_names(part: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if part == CLASSIFIER:
        return CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS
    if part == "encoder":
        return ENCODER_INPUTS, (*ENCODER_OUTPUTS, *POOLED_OUTPUTS.values())
    return DECODER_INPUTS, DECODER_OUTPUTS


def _normalise_dim(name: str, mapping: dict[str, str]) -> str:
    """Rename symbols in a dim expression (``s1 + 1`` -> ``visible+1``) and drop spaces."""
    renamed = re.sub(r"[A-Za-z_][A-Za-z0-9_]*", lambda m: mapping.get(m.group(0), m.group(0)), name)
    return renamed.replace(" ", "")


def rename_symbolic_dims(model, part: str) -> dict[str, str]:
    """Give the graph's symbolic dims the bundle's names, in place on an ``onnx_ir`` model.

    The exporter normally uses the ``Dim`` names already; this makes it certain and also normalises
    expressions (``visible + 1`` -> ``visible+1``, as docs/bundle-format.md spells it). Returns the
    mapping applied to bare symbols.
    """
    import onnx_ir as ir

    def dims(value) -> list:
        return list(value.shape.dims) if value.shape is not None else []

    inputs = {v.name: v for v in model.graph.inputs}
    # Which exporter symbol stands for batch and visible, read off the inputs' positions.
    first = _io_names(part)[0][0]
    mapping: dict[str, str] = {}
    batch_dim = dims(inputs[first])[0]
    if isinstance(batch_dim, ir.SymbolicDim) and batch_dim.value:
        mapping[batch_dim.value] = BATCH
    if part == "encoder":
        vis = dims(inputs[_io_names(part)[0][1]])[1]
        if isinstance(vis, ir.SymbolicDim) and vis.value:
            mapping[vis.value] = VISIBLE
    elif part != CLASSIFIER:
        expr = dims(inputs[first])[1]
        if isinstance(expr, ir.SymbolicDim) and expr.value:
            symbols = [s for s in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr.value) if s not in mapping]
            if len(symbols) == 1:
                mapping[symbols[0]] = VISIBLE

    values = [*model.graph.inputs, *model.graph.outputs]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        values.extend(node.outputs)
    for v in values:
        if v.shape is None:
            continue
        new = [
            ir.SymbolicDim(_normalise_dim(d.value, mapping)) if isinstance(d, ir.SymbolicDim) and d.value else d
            for d in v.shape.dims
        ]
        v.shape = ir.Shape(new)
    return mapping


def forbidden_ops(model: onnx.ModelProto) -> list[str]:
    """Names of forbidden op types present in ``model`` (subgraphs and functions included)."""
    found: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in FORBIDDEN_OPS:
                found.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(model.graph)
    for fn in model.functions:
        found.update(n.op_type for n in fn.node if n.op_type in FORBIDDEN_OPS)
    return sorted(found)


def op_types(model: onnx.ModelProto) -> list[str]:
    return sorted({n.op_type for n in model.graph.node})


def external_data_files(path: str | os.PathLike) -> list[str]:
    """Side files that ``path`` references, as stored (relative locations); raises if any is absolute."""
    proto = onnx.load(str(path), load_external_data=False)
    locations: set[str] = set()
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts:
                raise VerificationError(f"{path} references external data at {loc!r}, which is not relative")
            locations.add(loc)
    return sorted(locations)


def check_graph_file(path: str | os.PathLike) -> onnx.ModelProto:
    """onnx.checker with full checks (shape inference included), and no forbidden ops.

    Returns the proto without external weights loaded (cheap for any model size).
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx raises several exception types; any of them is a broken export
        raise VerificationError(f"{Path(path).name} fails onnx.checker: {e}") from e
    proto = onnx.load(str(path), load_external_data=False)
    bad = forbidden_ops(proto)
    if bad:
        raise VerificationError(
            f"{Path(path).name} contains {', '.join(bad)}: graphs must take the mask as ids from the host "
            "(no random, TopK or Scatter ops); this is a bug in the export"
        )
    return proto


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.state_dict().values())


def export_graph(
    model: MaskedAutoencoderViT | VisionTransformer,
    part: str,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> GraphFile:
    """Export ``part`` of ``model`` to ``path``; ``external_data`` None = only when the weights are large.

    External weights go to ``<file>.data`` next to the graph, referenced by a relative location.
    """
    if opset < MIN_OPSET:
        raise InputError(f"--opset {opset} is too old: LayerNormalization needs opset {MIN_OPSET} or newer")
    path = Path(path)
    module = graph_module(model, part)
    if external_data is None:
        external_data = parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES
    input_names, output_names = _io_names(part)
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns that the second use of "batch" is merged with the first: that is the intent.
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        program = torch.onnx.export(
            module,
            _example_inputs(model, part),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=_dynamic_shapes(model, part),
            opset_version=opset,
            dynamo=True,
            external_data=external_data,
            verbose=False,
        )
    rename_symbolic_dims(program.model, part)
    program.model.producer_name = "mae-deploy"
    program.model.metadata_props["mae_deploy.part"] = part
    program.model.metadata_props["mae_deploy.architecture"] = model.config.name
    program.save(path, external_data=external_data)
    proto = check_graph_file(path)
    return GraphFile(part, path, external_data_files(path), op_types(proto))
