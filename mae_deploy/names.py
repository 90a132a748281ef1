"""The one definition of the names that commands, pipelines, runners and the bundle share.

A choice list in a click option, a check in a pipeline and a graph's input name in the exporter all read
from here, so ``reconstruct dir/`` and ``extract dir/`` see the same files and ``--backend`` offers what
``create_runner`` accepts.
"""

from __future__ import annotations

# Inference backends, in the order `--help` lists them.
BACKENDS = ("ort", "trt", "torch", "openvino")

# Diagnostic runners that create_runner also accepts: never offered by --backend or `mae-deploy bench`
# ("null" returns zeros at once, for measuring the extraction pipeline without a model).
DIAGNOSTIC_BACKENDS = ("null",)
# Backends with a ``compile`` option (--compile): torch.compile; OpenVINO's model per input shape.
COMPILING_BACKENDS = ("torch", "openvino")

# Image decoders of extraction, classification and serving: Pillow on the host (the exact reference), or
# torch on the runner's device (nvJPEG on CUDA).
DECODERS = ("pil", "torch")

# Feature pooling: cls token, mean of the patch tokens, or every token.
POOLS = ("cls", "mean", "tokens")

# Precisions a bundle's graphs can come in.
PRECISIONS = ("fp32", "fp16", "int8")

# Graph parts of a bundle and their tensor names (see docs/bundle-format.md).
ENCODER, DECODER = "encoder", "decoder"
ENCODER_INPUTS = ("pixel_values", "ids_keep")
ENCODER_OUTPUTS = ("latent",)
# The encoder's pooled outputs, (batch, D) each, beside the latent in bundles exported since they exist: a GPU
# runner fetches only the one the caller pooled, so (N, D) crosses the bus instead of (N, 1+K, D). Older
# bundles lack them; runners then pool the latent themselves.
POOLED_OUTPUTS = {"cls": "pooled_cls", "mean": "pooled_mean"}
DECODER_INPUTS = ("latent", "ids_restore")
DECODER_OUTPUTS = ("pred",)
# The classifier graph (fine-tuned / linear-probe checkpoints): every patch visible, logits out.
CLASSIFIER = "classifier"
CLASSIFIER_INPUTS = ("pixel_values",)
CLASSIFIER_OUTPUTS = ("logits",)
# The statically calibrated Q/DQ int8 variant (explicit quantisation: what TensorRT and OpenVINO build int8
# from). A graph precision, not a runtime --precision: runners asked for int8 pick it where it runs best.
INT8_QDQ = "int8-qdq"
# The same format made by NNCF, OpenVINO's quantiser (transformer preset: SmoothQuant, per-channel weights,
# the attention MatMuls in int8 too): what the openvino backend runs for int8 when the bundle has it.
INT8_NNCF = "int8-nncf"
# Graph precisions calibrated on real images (export needs --calibration for them).
CALIBRATED_PRECISIONS = (INT8_QDQ, INT8_NNCF)
GRAPH_PRECISIONS = (*PRECISIONS, *CALIBRATED_PRECISIONS)
# What the torch backend runs the reference weights at (autocast; fp16 on CUDA only): no graph needed.
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")
# What each other backend runs: OpenVINO (int8 from a Q/DQ graph: int8-nncf, else int8-qdq; bf16 where the
# CPU has it) and TensorRT (fp16 from the fp32 graph's flag or the fp16 graph); ORT runs the bundle's graphs.
OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
TRT_PRECISIONS = ("fp32", "fp16")
# What --precision of the runtime commands (extract, classify, eval, serve, reconstruct) accepts; the backend
# then refuses what it does not run, saying what it does.
RUNTIME_PRECISIONS = (*GRAPH_PRECISIONS, "bf16")
# The training scripts' --precision ("auto": bf16 where the GPU has it, else fp16 with a scaler; fp32 on CPU).
TRAINING_PRECISIONS = ("auto", *TORCH_PRECISIONS)

# Every graph part: (input names, output names). The encoder's pooled outputs are extra (POOLED_OUTPUTS).
GRAPH_IO = {
    ENCODER: (ENCODER_INPUTS, ENCODER_OUTPUTS),
    DECODER: (DECODER_INPUTS, DECODER_OUTPUTS),
    CLASSIFIER: (CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS),
}

# Files a directory walk treats as images (a glob or a list file may name anything).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
