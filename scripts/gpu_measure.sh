#!/usr/bin/env bash
# The GPU figures of the README and docs/benchmarks.md, from one invocation on a machine with one CUDA GPU:
#   1. the tuning sweeps of the default recipe (Hydra multiruns, several at once) and
#      scripts/bench_quality.py (two seeds), in fp32 (TF32) like the CPU default: the same recipes, faster;
#   2. model=base, bf16, context 512: tokens/s and MFU, eager and torch.compile (the GPU to itself).
# Figures and CSVs land in ${OUT:-outputs/gpu}; the runs themselves in a scratch folder.
#   bash scripts/gpu_measure.sh            # STEPS=800 by default; DRY=1 runs tiny settings on the CPU
set -uo pipefail
OUT=${OUT:-outputs/gpu}
WORK=${WORK:-$(mktemp -d)}
STEPS=${STEPS:-800}
mkdir -p "$OUT"
if [ "${DRY:-0}" = 1 ]; then
  MFU=(model=tiny data.context_length=32 data.batch_size=4 hardware=cpu trainer.max_steps=6 trainer.log_every_n_steps=2)
  SMALL=(model.d_model=32 model.nhead=2 model.num_layers=1 model.dim_feedforward=64 data.batch_size=4
         data.context_length=32 trainer.limit_val_batches=2 trainer.limit_test_batches=2 hardware=cpu)
  COMPILE=false
else
  MFU=(model=base data.context_length=512 data.batch_size=64 hardware.precision=bf16-mixed trainer.max_steps=120
       trainer.log_every_n_steps=10)
  SMALL=(hardware.precision=32-true data.num_workers=1)
  COMPILE=true
fi
COMMON=(night=off export=false show_samples=false logger.plots=false auto_resume=false)
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/versions.txt"

mfu() {  # label, extra overrides...
  local label=$1; shift
  timeout 150 python -m lingmao.train "${MFU[@]}" "${COMMON[@]}" run_test=false trainer.limit_val_batches=0 \
    trainer.val_check_interval=100000 paths.output_dir="$WORK/mfu" run_name="$label" "$@" > "$OUT/mfu-$label.log" 2>&1
  python - "$WORK/mfu" "$label" <<'PY' | tee -a "$OUT/mfu.txt"
import csv, statistics, sys
from pathlib import Path
rows = [r for f in Path(sys.argv[1]).glob(f"runs/{sys.argv[2]}*/**/metrics.csv") for r in csv.DictReader(open(f))]
rows = [r for r in rows if r.get("tokens_per_sec")]
late = rows[len(rows) // 2:] or rows
def med(key):
    values = [float(r[key]) for r in late if r.get(key)]
    return statistics.median(values) if values else float("nan")
print(f"{sys.argv[2]}: tokens/s {med('tokens_per_sec'):,.0f}  MFU {med('mfu'):.1%}  TFLOP/s {med('tflops'):.1f}  "
      f"peak memory {med('gpu_mem_peak_gb'):.1f} GiB  (median of the last {len(late)} logged windows)")
PY
}
# Tuning sweeps and the quality benchmark, side by side on the one GPU.
sweep() {  # name, overrides...
  local name=$1; shift
  timeout 300 python -m lingmao.train -m "${SMALL[@]}" "${COMMON[@]}" trainer.max_steps="$STEPS" \
    trainer.val_check_interval=100 paths.output_dir="$WORK/sweep-$name" "$@" > "$OUT/sweep-$name.log" 2>&1
}
pids=()
for mlr in 0.01 0.02 0.04 0.08; do
  sweep "muon-$mlr" optim=muon optim.muon.lr=$mlr optim.lr=1e-3,3e-3 optim.warmup_steps=50,100 & pids+=($!)
done
sweep adamw optim=adamw optim.lr=1e-3,2e-3,4e-3,8e-3 & pids+=($!)
for seed in 0 1; do
  timeout 300 python scripts/bench_quality.py --steps "$STEPS" --seed $seed --set "${SMALL[@]}" \
    > "$OUT/quality-seed$seed.txt" 2>&1 & pids+=($!)
done
wait "${pids[@]}"
(cd "$WORK" && find . -name summary.csv -o -name metrics.csv | while read -r f; do
  mkdir -p "$OUT/csv/$(dirname "$f")" && cp "$f" "$OUT/csv/$f"; done)
grep -h "^|\|^STEPS" "$OUT"/quality-seed*.txt
for f in "$OUT"/csv/sweep-*/multirun/*/*/summary.csv; do echo "== $f"; cut -d, -f1-5 "$f"; done

# Then the GPU to itself for the throughput figures.
mfu base-adamw-eager optim=adamw
mfu base-adamw-compile optim=adamw model.compile=$COMPILE
mfu base-muon-compile optim=muon model.compile=$COMPILE
