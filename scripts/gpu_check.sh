#!/usr/bin/env bash
# The GPU check anyone can run on a machine with CUDA torch (and, where installed, onnxruntime-gpu /
# TensorRT); no network. About 6 minutes on an H200 for the inference part, 4 more for pretraining.
#
#   scripts/gpu_check.sh                  # everything; appends one table to benchmarks/RESULTS.md
#   scripts/gpu_check.sh --no-pretrain    # tests/gpu + inference + extraction only
#   scripts/gpu_check.sh --no-append      # measure and print, leave RESULTS.md alone
#
# Steps: 1. pytest tests/gpu (parity of every GPU backend against PyTorch fp32 on the CPU; skips say what
# is missing); 2. benchmarks/bench_gpu.py: ViT-B/16, the model alone on device tensors vs a runner call,
# torch eager/compiled and ORT CUDA fp32/fp16, timm beside; 3. benchmarks/bench_extract.py: extraction end
# to end (GPU JPEG decoding) vs the encoder alone, on JPEGs it generates; 4. benchmarks/bench_pretrain_gpu.py:
# MAE vs encoder-w/[M] steps; 5. one table with the GPU name and versions -> benchmarks/RESULTS.md.
# Every step's raw output is kept in $OUT (default gpu-check/<UTC time>/).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PRETRAIN=1
APPEND=--append
for arg in "$@"; do
  case "$arg" in
    --no-pretrain) PRETRAIN=0 ;;
    --no-append) APPEND= ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "unknown option $arg (see --help)" >&2; exit 3 ;;
  esac
done
OUT=${OUT:-gpu-check/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: PyTorch sees no CUDA device here (torch.cuda.is_available() is False); nothing to check" >&2
  exit 7
fi
$PY - <<'PY' | tee "$OUT/machine.txt"
import platform, torch
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"Python {platform.python_version()}, {torch.get_num_threads()} CPU threads")
for name in ("onnxruntime", "tensorrt", "timm", "torchvision"):
    try:
        m = __import__(name)
        extra = f" providers {m.get_available_providers()}" if name == "onnxruntime" else ""
        print(f"{name} {m.__version__}{extra}")
    except ImportError:
        print(f"{name}: not installed")
PY

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, keep its log, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}

WORKERS=$(( $(nproc) - 1 ))
step tests-gpu 240 env -u PYTHONDONTWRITEBYTECODE $PY -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider
step inference 150 $PY benchmarks/bench_gpu.py --json "$OUT/inference.json"
step extract 150 $PY benchmarks/bench_extract.py --runner torch --device cuda --precision fp16 --decoder torch \
  --images 4096 --batch-size 128 --workers "$WORKERS" --model-seconds 10 --no-append --json "$OUT/extract.json"
PRETRAIN_MD=()
if [ "$PRETRAIN" = 1 ]; then
  step pretrain 260 $PY benchmarks/bench_pretrain_gpu.py --budget-s 170 --loader-images 4096 \
    --profile "$OUT/pretrain_profile" --json "$OUT/pretrain.json" --markdown "$OUT/pretrain.md"
  [ -f "$OUT/pretrain.md" ] && PRETRAIN_MD=(--pretrain-md "$OUT/pretrain.md")
fi
EXTRACT_JSON=()
[ -f "$OUT/extract.json" ] && EXTRACT_JSON=(--extract-json "$OUT/extract.json")
if [ -f "$OUT/inference.json" ]; then
  $PY benchmarks/bench_gpu.py --from-json "$OUT/inference.json" "${EXTRACT_JSON[@]}" "${PRETRAIN_MD[@]}" \
    $APPEND | tee "$OUT/table.md"
fi
echo "gpu_check: logs and JSON in $OUT$([ -n "$APPEND" ] && echo '; table appended to benchmarks/RESULTS.md')"
exit $status
