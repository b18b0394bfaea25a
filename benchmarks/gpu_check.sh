#!/usr/bin/env bash
# The first thing to run on a CUDA machine: every GPU-facing path of nnunet-ape once, timed, in about 10 minutes
# (pretrain ape with AMP, the APE trainers with torch.compile off and on, the pretraining trainer on 1 and 2 GPUs,
# nnunet-ape predict against nnUNetv2_predict on a 512x512x300 CT). Prints seconds and peak GPU memory per step and
# a table; stops at the first failing step with a non-zero exit code naming it. Details: benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [WORK=/tmp/nnunet_ape_gpu_check] [--steps N ...]
#   benchmarks/gpu_check.sh [WORK] --dry-run              # print the commands, run nothing (no GPU needed)
#   benchmarks/gpu_check.sh [WORK] --device cpu --tiny    # the same steps at toy size on the CPU
#
# PYTHON selects the interpreter (default: python3 on PATH, with nnunet_ape and nnunetv2 installed).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
needs_gpu=1
for arg in "$@"; do
    case "$arg" in
        --dry-run|cpu|--device=cpu) needs_gpu=0 ;;
    esac
done
if [[ $needs_gpu == 1 ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 \
        || ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        echo "gpu_check: no CUDA GPU here (nvidia-smi or torch.cuda missing); run it on a CUDA machine, or use --dry-run / --device cpu --tiny" >&2
        exit 2
    fi
fi
exec "$python" "$here/gpu_check.py" "$@"
