"""Run every benchmark in this folder (``make bench``) with the arguments of its section in
docs/benchmarks.md, one after the other, single-threaded; each prints its own tables.

``python benchmarks/run_all.py [bench_name ...]`` runs only the named ones.
"""

import os
import subprocess
import sys
from pathlib import Path

# the runs docs/benchmarks.md reports (a benchmark not listed runs once with no arguments)
RUNS = {
    "bench_curvature": [[], ["--hvp"]],
    "bench_decompose": [["--sweep", "--hf", "--configs"]],
}

if __name__ == "__main__":
    here = Path(__file__).parent
    chosen = sys.argv[1:] or sorted(p.stem for p in here.glob("bench_*.py"))
    for name in chosen:
        for arguments in RUNS.get(name, [[]]):
            print(f"\n=== {name} {' '.join(arguments)}", flush=True)
            subprocess.run([sys.executable, str(here / f"{name}.py"), *arguments], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
