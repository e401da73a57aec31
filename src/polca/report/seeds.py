"""The reproduction table over seeds: every row as mean ± sd, the paper's value beside it.

``polca reproduce CONFIG --seeds 0,1,2`` runs one run per seed; this module reads each run's
numbers (:func:`seed_numbers`, through the run directory), aggregates them
(:func:`aggregate`, pure) and renders the page block (:func:`seeds_markdown`).

Example:
    >>> one = pd.DataFrame({"homogeneity": [0.4, 0.6]}, index=["exact loss L", "ΔL"])
    >>> two = pd.DataFrame({"homogeneity": [0.6, None]}, index=["exact loss L", "ΔL"])
    >>> table = aggregate([one, two])
    >>> table.loc["exact loss L", ("homogeneity", "mean")].round(3)
    np.float64(0.5)
    >>> int(table.loc["ΔL", ("homogeneity", "n")])
    1
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from polca.evaluate import paper_row
from polca.findings import coverage
from polca.report.reproduction import ROWS, _table
from polca.store import RunDir

SEEDS_BEGIN, SEEDS_END = "<!-- seeds table: begin -->", "<!-- seeds table: end -->"
SIGNAL_LABEL = "carry"  # the skill-signal columns: carry within each place
SIGNAL_GROUPS = (10, 100)
MEASURES = ("coverage", "homogeneity", "recall", "f1", "place_v_measure", "hidden_fraction",
            "explained", *(f"signal_{g}" for g in SIGNAL_GROUPS))
# the estimator of the decompose stage's diagnostics that each projected kind is scored by
EXPLAINED = {"first_order": "first_order", "polca": "polca", "polca_paper": "polca_paper",
             "integrated": "integrated"}


def seed_numbers(run: RunDir) -> pd.DataFrame:
    """One evaluated run's numbers, one row per clustering of :data:`ROWS` it has (index: the
    row's label), columns :data:`MEASURES` (NaN where the run has none): the share of tokens
    clustered, the best carry cluster's homogeneity, recall and F1 (rank 1 of the carry
    table), the mean place V-measure, the hidden-breakthrough fraction, the fraction of
    Σ|ΔL| explained by the kind's estimator over its basis, and the skill-signal probe's
    balanced accuracy for carry within the tens and the hundreds (the row with the highest
    interval low end, as the report reads it)."""
    carry = _table_or_empty(run, "carry")
    hidden = _table_or_empty(run, "hidden")
    scores = _table_or_empty(run, "scores")
    signal = _table_or_empty(run, "skill_signal")
    infos = run.clustering_infos()
    diagnostics = run.read_diagnostics()
    rows = {}
    for name, label in ROWS:
        if name not in infos:
            continue
        params = infos[name].get("params") or {}
        kind, basis = params.get("kind"), params.get("basis")
        row = dict.fromkeys(MEASURES, math.nan)
        row["coverage"] = coverage(infos[name]).fraction
        best = carry[carry["name"] == name].sort_values("rank").head(1) if len(carry) else carry
        if len(best):
            row.update({k: float(best[k].iloc[0]) for k in ("homogeneity", "recall", "f1")})
        place = scores[(scores["name"] == name) & (scores["label"] == "place")] if len(
            scores) else scores
        if len(place):
            row["place_v_measure"] = float(place["v_measure"].mean())
        hid = hidden[hidden["name"] == name] if len(hidden) else hidden
        if len(hid) and pd.notna(hid["hidden_fraction"].iloc[0]):
            row["hidden_fraction"] = float(hid["hidden_fraction"].iloc[0])
        estimator = EXPLAINED.get(kind)
        if estimator and basis in diagnostics:
            value = diagnostics[basis].get("estimators", {}).get(estimator, {}).get(
                "explained_fraction")
            row["explained"] = math.nan if value is None else float(value)
        for group in SIGNAL_GROUPS:
            row[f"signal_{group}"] = _best_signal(signal, name, group)
        rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(MEASURES))


def _table_or_empty(run: RunDir, name: str) -> pd.DataFrame:
    frame = run.read_evaluation_table(name)
    return pd.DataFrame() if frame is None else frame


def _best_signal(signal: pd.DataFrame, name: str, group) -> float:
    if not len(signal):
        return math.nan
    rows = signal[(signal["name"] == name) & (signal["label"] == SIGNAL_LABEL)
                  & (signal["status"] == "ok")]
    rows = rows[pd.to_numeric(rows["group"], errors="coerce") == group]
    if not len(rows):
        return math.nan
    return float(rows.sort_values("ci_low", ascending=False, kind="stable")
                 ["balanced_accuracy"].iloc[0])


def aggregate(per_seed: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean, sample standard deviation (ddof 1; NaN from one value) and count of each cell over
    the seeds' tables (rows in first-seen order, NaN cells left out of all three).

    Returns columns ``(measure, "mean" | "sd" | "n")``."""
    stacked = pd.concat(per_seed, keys=range(len(per_seed)), names=["seed", "row"])
    order = list(dict.fromkeys(label for frame in per_seed for label in frame.index))
    grouped = stacked.groupby(level="row", sort=False)
    parts = {"mean": grouped.mean(), "sd": grouped.std(ddof=1), "n": grouped.count()}
    table = pd.concat(parts, axis=1).swaplevel(axis=1)
    columns = [(m, s) for m in per_seed[0].columns for s in ("mean", "sd", "n")]
    return table.reindex(index=order, columns=pd.MultiIndex.from_tuples(columns))


def _cell(table: pd.DataFrame, row: str, measure: str, seeds: int, percent: bool = False) -> str:
    mean, sd, n = (table.loc[row, (measure, s)] for s in ("mean", "sd", "n"))
    if not n:
        return "–"
    scale, digits = (100, 0) if percent else (1, 3)
    text = f"{scale * mean:.{digits}f}"
    if n > 1:
        text += f" ± {scale * sd:.{digits}f}"
    text += "%" * percent
    return text + (f" ({int(n)} of {seeds})" if n < seeds else "")


def _paper(label: str, field: str) -> str:
    name = {lab: n for n, lab in ROWS}[label]
    kind, _, basis = name.partition("-")
    row = paper_row(kind, basis or None)
    if row is None or row.get(field) is None:
        return "–"
    value = row[field]
    return f"{(value[0] if isinstance(value, tuple) else value):.3f}"


HEADER = ["trajectories", "tokens clustered", "carry homogeneity", "paper", "recall", "paper",
          "F1", "paper", "place V-measure", "hidden fraction", "paper",
          "fraction of Σ|ΔL| explained",
          *(f"probe: carry in {g}s" for g in SIGNAL_GROUPS)]


def seeds_markdown(table: pd.DataFrame, seeds: Sequence[int], command: str,
                   note: str = "") -> str:
    """The page block: the command, then the table of :func:`aggregate` (mean ± sd over the
    seeds; "(k of n)" where only k seeds have a value, "–" where none has), each carry number
    beside the paper's (its best vector for POLCA kinds), then ``note``."""
    rows = []
    n = len(seeds)
    for label in table.index:
        rows.append([label, _cell(table, label, "coverage", n, percent=True),
                     _cell(table, label, "homogeneity", n), _paper(label, "homogeneity"),
                     _cell(table, label, "recall", n), _paper(label, "recall"),
                     _cell(table, label, "f1", n), _paper(label, "f1"),
                     _cell(table, label, "place_v_measure", n),
                     _cell(table, label, "hidden_fraction", n),
                     _paper(label, "hidden_fraction"), _cell(table, label, "explained", n),
                     *(_cell(table, label, f"signal_{g}", n) for g in SIGNAL_GROUPS)])
    seeds_text = ", ".join(map(str, seeds))
    return (f"Regenerate with:\n\n```\n{command}\n```\n\nMean ± sd over seeds {seeds_text} "
            "(sample sd). Carry homogeneity, recall and F1: the best carry cluster (the "
            "paper's Appendix G metric; for POLCA kinds the best vector's); “paper”: the "
            "paper's value (its best vector). Probe: the skill-signal diagnostic's balanced "
            "accuracy for carry within the place (10-NN, 5 folds; chance 0.5; over vectors "
            "the best one, its interval widened for their number).\n\n"
            + _table(HEADER, rows) + "\n" + (f"\n{note}\n" if note else ""))


def seed_table(roots: Sequence, seeds: Sequence[int], command: str, note: str = "") -> str:
    """:func:`seeds_markdown` of the evaluated runs ``roots`` (one per seed)."""
    frames = [seed_numbers(RunDir(root)) for root in roots]
    if not any(len(f) for f in frames):
        raise FileNotFoundError("no run has a clustering of the reproduction table: run "
                                "`polca evaluate` first")
    return seeds_markdown(aggregate(frames), seeds, command, note)


def wall_seconds(roots: Sequence) -> tuple[float, list[float]]:
    """Recorded stage seconds of all runs together and the runs' 1-minute load averages."""
    total, loads = 0.0, []
    for root in roots:
        for entry in (RunDir(root).stage_times() or {}).values():
            total += float(entry.get("seconds") or 0.0)
            if entry.get("load") is not None:
                loads.append(float(entry["load"]))
    return total, loads
