"""Stage `report`: the self-contained HTML page of a run, ``report/index.html``."""

from __future__ import annotations

from pathlib import Path

from polca.report import write_report


def run_report(ctx, progress: bool = True) -> Path:
    """Write the report of ``ctx.run`` from whatever the earlier stages wrote; returns its path.

    ``progress`` is accepted for the stage interface; the report is one quick pass.
    """
    return write_report(ctx.run, examples=ctx.cfg.report.examples_per_cluster)
