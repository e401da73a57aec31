#!/bin/bash
# The demo's decompose stage before and after a change, side by side on one machine:
#   benchmarks/demo_decompose_ab.sh RUN BEFORE_REF [AFTER_REF]
# RUN: a finished demo run (runs/demo-addition after `make demo`); BEFORE_REF / AFTER_REF: git
# refs (AFTER_REF defaults to the working tree). Each side recomputes the decompose stage on its
# own copy of RUN, one after the other, single-threaded; then the POLCA arrays are compared.
set -euo pipefail
RUN=$(realpath "$1"); BEFORE=$2; AFTER=${3:-}
ROOT=$(git rev-parse --show-toplevel); PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d); trap 'git -C "$ROOT" worktree remove --force "$WORK/src-before" >/dev/null 2>&1 || true; [ -n "$AFTER" ] && git -C "$ROOT" worktree remove --force "$WORK/src-after" >/dev/null 2>&1; rm -rf "$WORK"' EXIT
git -C "$ROOT" worktree add -q --detach "$WORK/src-before" "$BEFORE"
if [ -n "$AFTER" ]; then git -C "$ROOT" worktree add -q --detach "$WORK/src-after" "$AFTER"; AFTER_SRC=$WORK/src-after/src; else AFTER_SRC=$ROOT/src; fi
export OMP_NUM_THREADS=1
for side in before after; do
  cp -r "$RUN" "$WORK/run-$side"
  # forget the decompose stage's outputs and records: the stage recomputes them
  rm -rf "$WORK/run-$side"/arrays.zarr/{polca,lca} "$WORK/run-$side"/.progress/{polca,lca} \
         "$WORK/run-$side"/.progress/inputs/decompose "$WORK/run-$side"/.lock.pid
done
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
PYTHONPATH=$WORK/src-before/src /usr/bin/time -f "before ($BEFORE): %e s, peak RSS %M KB" \
  "$PY" -m polca.cli decompose "$WORK/run-before" -q
PYTHONPATH=$AFTER_SRC /usr/bin/time -f "after (${AFTER:-working tree}): %e s, peak RSS %M KB" \
  "$PY" -m polca.cli decompose "$WORK/run-after" -q
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$WORK/run-before/arrays.zarr" "$WORK/run-after/arrays.zarr" <<'PY'
import sys
import numpy as np
import zarr

before, after = (zarr.open(path, mode="r") for path in sys.argv[1:3])
worst = 0.0
def compare(a, b, path):
    global worst
    for key in a.array_keys():
        x, y = np.asarray(a[key][...], float), np.asarray(b[key][...], float)
        worst = max(worst, float(np.nanmax(np.abs(x - y)) / (np.nanmax(np.abs(x)) or 1.0)))
    for key in a.group_keys():
        compare(a[key], b[key], f"{path}/{key}")
for group in ("polca", "lca"):
    if group in before:
        compare(before[group], after[group], group)
print(f"largest difference, max |before - after| / max |before| per array: {worst:.1e}")
PY
