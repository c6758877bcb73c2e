#!/usr/bin/env bash
# The GPU check of issue 16: one script for the first machine with a CUDA GPU, under 8 minutes on one GPU.
#
# It prints, each stage with a parity check against the CPU result on the same input (a "# parity ... -> ok" line):
#   1. training: images/s of an SVI step at the paper's configuration (48x48 patches, K=4, encoder 2x256, decoder
#      3x256) on CUDA (plain autograd likelihood, models.likelihood_path) against the CPU (the fused kernel)
#      -- benchmarks/train_speed.py; parity: the decoder's log-likelihood and its gradients;
#   2. encoder: patches/s at batch 1, 64 and 4096 of the eager model, TorchScript, ONNX Runtime (CUDA provider with
#      IOBinding) and ONNX Runtime's TensorRT provider when it is installed, on the GPU beside the CPU
#      -- benchmarks/encode_speed.py; parity: every backend's outputs against the eager model on the CPU;
#   3. stream: end-to-end patches/s through a real Service on loopback sockets at 1024x1024 and 4096x4096 frames on
#      the GPU (tiling, normalisation and encoding on the device) -- benchmarks/stream_throughput.py; parity: the maps
#      of one frame against the CPU pipeline's.
# A CUDA piece that finds no GPU prints a line saying it was skipped: no figure is ever printed for a GPU that did not
# run. Each stage has a time limit (120 + 150 + 180 s), so the whole check ends within 8 minutes.
#
#   bash benchmarks/gpu_check.sh             # the check (on a CPU-only machine: the CPU rows, the GPU ones skipped)
#   bash benchmarks/gpu_check.sh --dry-run   # every stage and entry point at tiny sizes, in well under a minute
#
# Exit status: 0 when every stage ran and every parity check passed; 1 otherwise, naming the stages that did not.
set -uo pipefail

usage="usage: bash benchmarks/gpu_check.sh [--dry-run]"
dry_run=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h | --help) echo "$usage"; exit 0 ;;
        *) echo "$usage (unknown argument: $arg)" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python}"

if ((dry_run)); then
    train=(--size 8 --batch 2 --steps 1 --warmup 0)
    encode=(--patch 8 --batches 1,4 --repeats 1)
    stream=(--sizes 64 --frames 2 --rounds 1 --repeats 1 --batch 32 --device cpu,cuda --backend torchscript)
    limits=(120 120 120)
else
    train=(--size 48 --batch 32 --steps 5 --warmup 2)
    encode=(--patch 48 --batches 1,64,4096 --repeats 20)
    stream=(--sizes 1024,4096 --frames 8 --rounds 1 --repeats 5 --batch 4096 --device cuda)
    limits=(120 150 180)
    # the service's GPU backend: ONNX Runtime's CUDA provider where onnxruntime-gpu is installed, else TorchScript
    # (`--backend torchscript`, the service's other GPU backend); the encoder stage times both either way
    if "$python" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
        stream+=(--backend onnx)
    else
        stream+=(--backend torchscript)
        stream_note="# stream: this onnxruntime has no CUDA provider (onnxruntime-gpu is not installed): TorchScript on the GPU"
    fi
fi

failed=()
stage() {  # stage NAME LIMIT_S COMMAND...: run it under a time limit, note a failure or a timeout
    local name="$1" limit="$2" start status
    shift 2
    echo
    echo "## $name"
    start=$SECONDS
    timeout "$limit" "$@"
    status=$?
    if ((status == 124)); then
        echo "# $name: stopped after its limit of $limit s"
        failed+=("$name (timed out)")
    elif ((status != 0)); then
        failed+=("$name (exit $status)")
    fi
    echo "# $name: $((SECONDS - start)) s"
}

echo "# atomstream GPU check$( ((dry_run)) && echo ' -- DRY RUN: tiny sizes, no figure here means anything')"
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/# gpu: /'
else
    echo "# gpu: nvidia-smi not found"
fi
"$python" - <<'EOF' || failed+=("environment")
import os

import onnxruntime as ort
import torch

cuda = torch.cuda.is_available()
print(f"# torch {torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'}; "
      f"onnxruntime {ort.__version__} providers {', '.join(ort.get_available_providers())}; {os.cpu_count()} CPUs")
if not cuda:
    print("# no CUDA device: every GPU row below is skipped, and says so")
EOF

stage training "${limits[0]}" "$python" benchmarks/train_speed.py "${train[@]}" --devices cpu,cuda --skip-pyroved --parity
stage encoder "${limits[1]}" "$python" benchmarks/encode_speed.py "${encode[@]}" --devices cpu,cuda --parity
[[ -n "${stream_note:-}" ]] && echo && echo "$stream_note"
stage stream "${limits[2]}" "$python" benchmarks/stream_throughput.py "${stream[@]}" --parity

echo
if ((${#failed[@]})); then
    echo "# gpu check: FAILED -- ${failed[*]}"
    exit 1
fi
echo "# gpu check: every stage ran and every parity check passed (${SECONDS} s)"
