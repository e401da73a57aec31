"""The run report: figures (:mod:`polca.report.figures`) and the HTML page
(:mod:`polca.report.html`)."""

from polca.report.html import write_report

__all__ = ["write_report"]
