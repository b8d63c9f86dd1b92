#!/usr/bin/env bash
# Throughput and MFU of model=base (bf16-mixed, context 512) on one CUDA GPU, without and with torch.compile,
# lingmao beside the plain-PyTorch GPT of scripts/bench_train.py. About 5 minutes on an H200.
#
#   bash scripts/gpu_check.sh            # on a machine with one CUDA GPU; output also in $OUT/gpu.txt when OUT is set
#   bash scripts/gpu_check.sh --dry      # the same steps on the CPU at a tiny size, in about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--dry" ]]; then
    shape=(--accelerator cpu --precision 32-true --model tiny --batch 4 --context 32 --threads 1
           --set model.d_model=32 model.num_layers=1 model.dim_feedforward=64)
    plain=(--steps 2 --warmup 1 --repeat 1)
    compiled=(--steps 2 --warmup 2 --repeat 1)
else
    shape=(--accelerator cuda --precision bf16-mixed --model base --batch 32 --context 512)
    plain=(--steps 30 --warmup 10 --repeat 2)
    compiled=(--steps 30 --warmup 15 --repeat 2)  # compiling happens inside the warm-up steps
fi

report=${OUT:+$OUT/gpu.txt}
report=${report:-/dev/null}
{
    echo "# bash scripts/gpu_check.sh $*  ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo n/a))"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
    python -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'lightning', lightning.__version__)"
    echo
    echo "## eager: python scripts/bench_train.py ${shape[*]} ${plain[*]}"
    timeout 180 python scripts/bench_train.py "${shape[@]}" "${plain[@]}" || echo "(exit status $?)"
    echo
    echo "## torch.compile: python scripts/bench_train.py ${shape[*]} ${compiled[*]} --compile"
    timeout 270 python scripts/bench_train.py "${shape[@]}" "${compiled[@]}" --compile || echo "(exit status $?)"
} 2>&1 | tee "$report"
