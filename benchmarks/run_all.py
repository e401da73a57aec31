"""Run every benchmark in this folder (``make bench``); each prints its own table and says
which section of docs/benchmarks.md it belongs to."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).parent
    chosen = sys.argv[1:] or sorted(p.stem for p in here.glob("bench_*.py"))
    for name in chosen:
        print(f"\n=== {name}", flush=True)
        runpy.run_path(str(here / f"{name}.py"), run_name="__main__")
