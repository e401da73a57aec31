#!/usr/bin/env bash
# polca on a GPU, in one prepared script (shared by the GPU-path and reproduction issues).
#
#   benchmarks/gpu_check.sh                      # (i) + (ii): about 5 minutes
#   benchmarks/gpu_check.sh --reproduce          # then (iii) for at most --budget-s seconds
#   benchmarks/gpu_check.sh --reproduce --budget-s 3000 --runs /scratch/runs   # resume (iii)
#
# (i)   CUDA against float64 on the CPU on a tiny decoder: token losses, first and second
#       directional derivatives, one interval's POLCA terms, for float64, float32, tf32 and
#       bfloat16; tolerance 100 x the unit roundoff of each arithmetic (benchmarks/gpu_check.py).
#       Time limit 150 s.
# (ii)  the paper-shape decomposition (9.5M parameters, 5000 tokens, m = 50): seconds per
#       interval, LCA per interval, losses per checkpoint, one Hessian-vector product; for
#       float64, tf32 and bfloat16, at most 50 s each (a stage over its limit is recorded as
#       such and the script goes on).
# (iii) optional: `polca reproduce configs/paper-addition.toml` (the config unchanged) writing
#       docs/reproduction-paper.md, killed after --budget-s seconds (default 540). Every stage
#       resumes where it stopped: run the same command again with the same --runs folder to go
#       on. The whole paper run takes far more than one 15-minute loan (10,000 training steps,
#       four bases, 500 intervals each): keep --runs on storage that outlives the machine.
#
# Needs a Python with a CUDA build of torch and polca installed (pip install -e '.[hf]');
# PYTHON picks it (default: python). Results go to $OUT (default benchmarks/results/gpu):
# gpu_check.json, gpu_time_<dtype>.json, reproduce.log. Without a CUDA device the script says
# so and exits 0 without doing anything.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/gpu}
REPRODUCE=0
BUDGET=540
RUNS=runs
while [ $# -gt 0 ]; do
    case "$1" in
        --reproduce) REPRODUCE=1 ;;
        --budget-s) BUDGET=$2; shift ;;
        --runs) RUNS=$2; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to torch ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda)' 2>/dev/null || echo "torch not importable")); nothing to check here. Run it on a machine with a GPU."
    exit 0
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
start=$(date +%s)

echo "== (i) CUDA against float64 CPU"
timeout 150 "$PY" benchmarks/gpu_check.py check --device cuda --out "$OUT/gpu_check.json"
code=$?
[ $code -eq 124 ] && echo "(i) timed out after 150 s"
[ $code -ne 0 ] && status=1

echo "== (ii) paper-shape decomposition, seconds per interval"
for dtype in float64 tf32 bfloat16; do
    timeout 50 "$PY" benchmarks/gpu_check.py time --device cuda --dtype "$dtype" \
        --out "$OUT/gpu_time_$dtype.json"
    code=$?
    if [ $code -eq 124 ]; then
        echo "{\"arithmetic\": \"$dtype\", \"timed_out_after_s\": 50}" > "$OUT/gpu_time_$dtype.json"
        echo "(ii) $dtype: over 50 s"
    fi
done
echo "(i)+(ii): $(( $(date +%s) - start )) s"

if [ $REPRODUCE -eq 1 ]; then
    echo "== (iii) polca reproduce configs/paper-addition.toml (at most $BUDGET s)"
    timeout "$BUDGET" "$PY" -m polca.cli reproduce configs/paper-addition.toml \
        --out docs/reproduction-paper.md --runs "$RUNS" --quiet 2>&1 | tee "$OUT/reproduce.log"
    code=${PIPESTATUS[0]}
    if [ $code -eq 124 ]; then
        echo "(iii) stopped after $BUDGET s; run the same command again (same --runs $RUNS) to resume"
    elif [ $code -ne 0 ]; then
        status=1
    else
        echo "(iii) done: docs/reproduction-paper.md"
    fi
fi
exit $status
