"""What a run found, read from its directory: the findings (:mod:`polca.findings`), the run's
identity in one line, and ``report/summary.json``, the same as data.

The report's first screen, the command line's last lines and the documentation's measured
numbers all come from here, so they cannot disagree.

Example:
    >>> run = RunDir("runs/demo-addition")                            # doctest: +SKIP
    >>> print(identity_line(run_identity(run)))                       # doctest: +SKIP
    >>> print(to_text(read_findings(run), brief=True))                # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from polca.findings import Finding, find, overview, to_frame
from polca.report.reproduction import reproduction_tables
from polca.store import CORRECT, LOSS, RunDir

# the binary label of the paper's table metric (its evaluation table bears the label's name)
SKILL_LABEL = "carry"
SIGNAL_TABLE = "skill_signal"  # per clustering, label and group: a probe's balanced accuracy
MAX_GROUPS = 12  # a label with more values is not broken down (accuracy per group)


def read_findings(run: RunDir) -> list[Finding]:
    """:func:`polca.findings.find` on what the cluster, evaluate and decompose stages wrote
    (any part still missing is left out of the sentences)."""
    return find(run.clustering_infos(), scores=run.read_evaluation_table("scores"),
                clusters=run.read_evaluation_table("clusters"),
                skill=run.read_evaluation_table(SKILL_LABEL),
                hidden=run.read_evaluation_table("hidden"),
                diagnostics=run.read_diagnostics(),
                signal=run.read_evaluation_table(SIGNAL_TABLE), skill_label=SKILL_LABEL)


def run_identity(run: RunDir) -> dict:
    """What the run is, in numbers: name, task, model, the checkpoint steps, the probe tokens,
    the final accuracy (overall and per value of the first label with few values), bases, and
    the stages' recorded times. Keys without a value yet are None."""
    cfg = run.config_value((), {}) or {}
    source = cfg.get("source") or {}
    outside = source.get("kind", "train") != "train"
    tokens = run.read_tokens() if run.has_probe() else None
    steps = run.array_steps(LOSS)
    if steps is None and run.checkpoint_manifest():
        steps = [e["step"] for e in run.checkpoint_manifest()]
    identity = {
        "name": cfg.get("name", run.root.name), "outside": outside,
        "task": _task(cfg, outside), "model": _model(run, cfg, outside),
        "checkpoints": None if steps is None else len(steps),
        "first_step": None if not steps else int(steps[0]),
        "last_step": None if not steps else int(steps[-1]),
        "probe_tokens": None if tokens is None else len(tokens),
        "bases": run.basis_names(), "accuracy": None, "accuracy_by": None,
        "times": run.stage_times(),
    }
    arrays = run.arrays() if run.has_arrays() else None
    if tokens is not None and arrays is not None and CORRECT in arrays:
        final = np.asarray(arrays.read(CORRECT)[:, -1], dtype=bool)
        identity["accuracy"] = float(final.mean())
        labels = [c for c in run.label_columns(tokens) if 1 < tokens[c].nunique() <= MAX_GROUPS]
        if labels:
            column = labels[0]
            values = tokens[column].to_numpy()
            identity["accuracy_by"] = {"label": column, "values": {
                str(_plain(v)): float(final[values == v].mean())
                for v in sorted(pd.unique(values), key=str)}}
    return identity


def _task(cfg: dict, outside: bool) -> str:
    task = cfg.get("task") or {}
    kind = task.get("kind", "addition")
    if outside:
        probe = (task.get("options") or {}).get("probe")
        return f"probe file {probe}" if probe else "probe file"
    if kind == "addition":
        return f"{task.get('digits', 3)}-digit addition"
    if kind == "text":
        return f"text ({(task.get('options') or {}).get('corpus', 'wiki')} corpus)"
    return kind.replace("_", " ")


def _model(run: RunDir, cfg: dict, outside: bool) -> str:
    if outside:
        source = cfg.get("source") or {}
        kind = {"hf": "Hugging Face checkpoints", "state-dict": "state dicts"}.get(
            source.get("kind"), "checkpoints")
        path = source.get("path")
        where = path[0] if isinstance(path, list) and path else path
        text = f"{kind} {where}" if where else kind
    else:
        model = cfg.get("model") or {}
        text = (f"{model.get('n_layers', 2)}-layer decoder, d_model "
                f"{model.get('d_model', 128)}")
    dims = {doc.get("dim") for doc in run.basis_documents().values() if doc.get("dim")}
    return text + (f", {dims.pop():,} parameters" if len(dims) == 1 else "")


def _plain(value):
    """A label value as written (a float holding an integer loses its .0)."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def identity_line(identity: dict) -> str:
    """The run in one sentence.

    >>> print(identity_line({"name": "demo", "task": "3-digit addition", "model": "decoder",
    ...     "checkpoints": 41, "first_step": 0, "last_step": 2000, "probe_tokens": 1200,
    ...     "accuracy": 0.9825, "outside": False}))
    demo: 3-digit addition, decoder; 41 checkpoints (steps 0–2,000), 1,200 probe tokens; final accuracy 98.2%.
    """
    parts = [f"{identity['task']}, {identity['model']}"]
    counts = []
    if identity.get("checkpoints"):
        counts.append(f"{identity['checkpoints']} checkpoints (steps "
                      f"{identity['first_step']:,}–{identity['last_step']:,})")
    if identity.get("probe_tokens"):
        counts.append(f"{identity['probe_tokens']:,} probe tokens")
    if counts:
        parts.append(", ".join(counts))
    accuracy = identity.get("accuracy")
    if accuracy is not None and not math.isnan(accuracy):
        parts.append(f"final accuracy {100 * accuracy:.1f}%")
    return f"{identity['name']}: " + "; ".join(parts) + "."


def run_summary(run: RunDir, found: list[Finding] | None = None) -> dict:
    """``report/summary.json``: the run's identity, the overview paragraph, the numbers of
    every finding (:func:`polca.findings.to_frame`, one record per clustering, with its flag
    codes) and, for an addition run, the reproduction table as text cells. ``found``: the
    findings when already read."""
    found = read_findings(run) if found is None else found
    frame = to_frame(found)
    records = [] if not len(frame) else [
        {"name": name, **{k: _json(v) for k, v in row.items()}}
        for name, row in frame.to_dict(orient="index").items()]
    return {"run": run_identity(run), "overview": overview(found), "findings": records,
            "sentences": {f.name: f.sentence for f in found},
            "reproduction": reproduction_tables(run)}


def _json(value):
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
