#!/usr/bin/env bash
# The GPU checks of one CUDA GPU, in one invocation of under 10 minutes (docs/hardware.md, "On a GPU"):
#   1. the full corpus (scripts/prepare_corpus.py --full), model=base, bf16, model.compile=true (the whole training
#      step compiled), one GPU, at most 8 minutes: tokens/s, MFU against the card's dense bf16 peak, and test
#      bits/char on the corpus's test split at the end;
#   2. night mode's GPU memory cap (hardware=cuda night.now=23:30): peak allocated memory against the cap;
#   3. the periodic allocator-cache clearing (hardware.empty_cache_every_n_steps=1 beside 0): its cost per call.
#
#   SOURCE=chinese-poetry-2.0.1.tgz bash scripts/gpu_check.sh   # prepares data/poetry_full from the package first
#   bash scripts/gpu_check.sh            # uses data/poetry_full as it is (or JSONL=dir with train.jsonl/test.jsonl)
#   bash scripts/gpu_check.sh --dry      # the same steps on the CPU at a tiny size (the script's own test)
# Figures go to $OUT/gpu.txt (default outputs/gpu-check); the runs to a scratch folder ($WORK). STEPS sets the
# length of the main run (default 1200 optimizer steps of 64 x 512 tokens).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-outputs/gpu-check}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
report=$OUT/gpu.txt
: > "$report"
say() { echo "$*" | tee -a "$report"; }

COMMON=(export=false show_samples=false logger.plots=false logger.print_config=false auto_resume=false
        trainer.enable_progress_bar=false checkpoint_every_n_steps=0 checkpoint_every=0)
if [[ "${1:-}" == "--dry" ]]; then
    DRY=1
    HW=(hardware=cpu hardware.cpu_threads=1 hardware.precision=32-true)
    MODEL=(model=tiny model.d_model=32 model.dim_feedforward=64 data.context_length=32 data.batch_size=4)
    DATA=(data=poetry_sample)
    DATA_NOTE="the bundled sample (dry run)"
    STEPS=${STEPS:-6}
    SHORT=6; LOG_SHORT=2
    LIMITS=(trainer.limit_val_batches=2 trainer.limit_test_batches=2 trainer.log_every_n_steps=2)
    TIME_MAIN=480; TIME_SHORT=240
else
    DRY=0
    HW=(hardware=cuda hardware.precision=bf16-mixed)
    MODEL=(model=base data.context_length=512 data.batch_size=64)
    STEPS=${STEPS:-1200}
    SHORT=30; LOG_SHORT=5
    LIMITS=(trainer.limit_val_batches=20 trainer.log_every_n_steps=20)
    TIME_MAIN=400; TIME_SHORT=60  # all of it within 10 minutes
    if [[ -n "${SOURCE:-}" ]]; then
        python scripts/prepare_corpus.py --source "$SOURCE" --full --out data/poetry_full 2>&1 | tail -3
    fi
    if [[ -d data/poetry_full/train ]]; then
        DATA=(data=poetry_full); DATA_NOTE="data/poetry_full (scripts/prepare_corpus.py --full)"
    elif [[ -n "${JSONL:-}" ]]; then
        DATA=(data=poetry "data.train_file=$JSONL/train.jsonl" "data.test_file=$JSONL/test.jsonl")
        DATA_NOTE="$JSONL (NOT the full corpus: SOURCE=chinese-poetry-2.0.1.tgz prepares it)"
    else
        echo "error: no corpus: give SOURCE=chinese-poetry-2.0.1.tgz, prepare data/poetry_full, or JSONL=dir" >&2
        exit 2
    fi
fi

say "# bash scripts/gpu_check.sh $*  ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo n/a))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null | tee -a "$report"
# The card's dense bf16 peak (TFLOP/s) from lingmao's table, which the logged MFU uses too.
PEAK=$(python -c "import torch; from lingmao.peak_flops import peak_tflops; \
print(peak_tflops(torch.cuda.get_device_name(), 'bf16-mixed') if torch.cuda.is_available() else None)")
say "$(python -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', \
lightning.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")"
say "corpus: $DATA_NOTE; dense bf16 peak used for MFU: $PEAK TFLOP/s"

# Median of a metric over the second half of the logged training rows of a run's metrics.csv.
median() {  # run_dir key
    python - "$1" "$2" <<'PY'
import csv, statistics, sys
from pathlib import Path
rows = [r for f in Path(sys.argv[1]).glob("**/metrics.csv") for r in csv.DictReader(open(f)) if r.get(sys.argv[2])]
late = rows[len(rows) // 2:]
print(f"{statistics.median(float(r[sys.argv[2]]) for r in late):.6g}" if late else "nan")
PY
}

# 1. The main run: the whole step compiled, bf16, test bits/char at the end.
say ""
say "## 1. ${MODEL[*]} ${HW[*]} model.compile=true, $STEPS steps, then the test split"
main=(python -m lingmao.train "${MODEL[@]}" "${DATA[@]}" "${HW[@]}" "${COMMON[@]}" "${LIMITS[@]}" night=off
      model.compile=true "trainer.max_steps=$STEPS" trainer.val_check_interval=500
      paths.output_dir="$WORK/main" run_name=main)
say "command: ${main[*]}"
started=$(date +%s)
timeout "$TIME_MAIN" "${main[@]}" > "$OUT/main.log" 2>&1
status=$?
say "exit status $status after $(( $(date +%s) - started )) s (limit $TIME_MAIN s)"
say "tokens/s $(median "$WORK/main/runs/main" tokens_per_sec)  MFU $(median "$WORK/main/runs/main" mfu)" \
    " peak memory $(median "$WORK/main/runs/main" gpu_mem_peak_gb) GiB  (medians of the second half of the logged windows)"
say "test: $(grep -o 'test  *loss .* bits/char' "$OUT/main.log" | tail -1)"

# 2. Night mode's memory cap: the run at 23:30 takes night.gpu_memory_fraction of the GPU's memory.
say ""
say "## 2. night mode (night.now=23:30): peak allocated memory against the cap"
night=(python -m lingmao.train "${MODEL[@]}" "${DATA[@]}" "${HW[@]}" "${COMMON[@]}" "${LIMITS[@]}" night.now=23:30
       "trainer.max_steps=$SHORT" trainer.val_check_interval=1000 run_test=false "trainer.log_every_n_steps=$LOG_SHORT"
       paths.output_dir="$WORK/night" run_name=night)
say "command: ${night[*]}"
timeout "$TIME_SHORT" "${night[@]}" > "$OUT/night.log" 2>&1
say "exit status $?; $(grep -m1 'night mode on' "$OUT/night.log" | sed 's/.*\] - //')"
python - "$WORK/night/runs/night" "$DRY" <<'PY' | tee -a "$report"
import csv, sys
from pathlib import Path
import torch
rows = [r for f in Path(sys.argv[1]).glob("**/metrics.csv") for r in csv.DictReader(open(f)) if r.get("gpu_mem_peak_gb")]
if not torch.cuda.is_available():
    print("no CUDA here: the cap does not apply (the run logs that it is ignored on cpu)")
else:
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    from lingmao.callbacks.night import NightConfig
    cap = total * NightConfig().gpu_memory_fraction
    peak = max((float(r["gpu_mem_peak_gb"]) for r in rows), default=float("nan"))
    print(f"peak allocated {peak:.2f} GiB, cap {cap:.2f} GiB ({NightConfig().gpu_memory_fraction:.0%} of {total:.1f} GiB): "
          f"{'under the cap' if peak <= cap else 'OVER THE CAP'}")
PY

# 3. Allocator-cache clearing every step beside never: the cost of one call (and of re-allocating after it).
say ""
say "## 3. hardware.empty_cache_every_n_steps=1 beside 0, $SHORT steps each (eager)"
for every in 0 1; do
    timeout "$TIME_SHORT" python -m lingmao.train "${MODEL[@]}" "${DATA[@]}" "${HW[@]}" "${COMMON[@]}" "${LIMITS[@]}" \
        night=off "trainer.max_steps=$SHORT" trainer.val_check_interval=1000 run_test=false \
        "trainer.log_every_n_steps=$LOG_SHORT" "hardware.empty_cache_every_n_steps=$every" \
        paths.output_dir="$WORK/cache$every" run_name=cache > "$OUT/cache$every.log" 2>&1
    say "every $every: exit status $?, tokens/s $(median "$WORK/cache$every/runs/cache" tokens_per_sec)"
done
python - "$WORK" "${MODEL[*]}" <<'PY' | tee -a "$report"
import csv, re, statistics, sys
from pathlib import Path
shape = dict(re.findall(r"data\.(batch_size|context_length)=(\d+)", sys.argv[2]))
tokens = int(shape["batch_size"]) * int(shape["context_length"])  # per optimizer step (one GPU)
def seconds_per_step(every):
    rows = [r for f in Path(sys.argv[1], f"cache{every}").glob("**/metrics.csv") for r in csv.DictReader(open(f))
            if r.get("tokens_per_sec")]
    late = rows[len(rows) // 2:]
    return statistics.median(tokens / float(r["tokens_per_sec"]) for r in late) if late else None
never, always = seconds_per_step(0), seconds_per_step(1)
import torch
if never is None or always is None:
    print("cache clearing: no figures (a run failed)")
else:
    what = "one empty_cache call, with the re-allocation after it" if torch.cuda.is_available() else (
        "no CUDA here: nothing is cleared, so this is the noise between two runs")
    print(f"{what}: {(always - never) * 1000:+.2f} ms "
          f"(a step: {never * 1000:.1f} ms without, {always * 1000:.1f} ms with a call every step)")
PY
say ""
say "logs: $OUT/*.log; runs: $WORK"
