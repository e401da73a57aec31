"""What a run found, one plain sentence per trajectory kind, and the red flags that make a
result meaningless.

Pure: tables and dicts in, :class:`Finding` objects and text out; nothing here reads a file.
The inputs are what the stages write (the caller reads them through the run directory):

* ``clusterings``: name → the cluster stage's ``clusters/NAME.json`` (``params`` with
  ``n_tokens``, ``kind``, ``basis``, ``tau``, ``delta``; ``n_clusters``, ``n_hidden``,
  ``hidden_fraction``; per-vector ``vectors`` [{vector, kept, n_filtered, n_noise,
  n_clusters}] for projected kinds, ``n_noise`` for exact ones);
* the evaluate stage's tables: ``scores`` (per name, vector, label: n_clustered,
  weighted_purity, chance), ``clusters`` (per cluster: name, vector, cluster, size, break_step,
  hidden, majority_<label>, purity_<label>), ``skill`` (the paper's table for a binary label,
  e.g. ``carry.csv``: name, rank, vector, cluster, size, homogeneity, recall, paper_*),
  ``hidden`` (per name: the paper's hidden fraction in ``paper``);
* ``diagnostics``: basis → the decompose stage's ``diagnostics/<basis>.json``;
* ``signal`` (optional): the skill-signal table (per name, label, group: balanced_accuracy,
  chance, ci_low, ci_high).

Every table is optional: a missing one removes its part of the sentence, never a flag that
the others can still show.

Example:
    >>> meta = {"params": {"kind": "loss", "basis": None, "n_tokens": 400, "tau": 700,
    ...                    "delta": 100}, "n_clusters": 0, "n_hidden": 0, "n_noise": 400}
    >>> [finding] = find({"loss": meta})
    >>> print(finding.sentence)
    exact loss: no clusters: HDBSCAN marked every one of the 400 tokens it saw as noise.
    >>> [flag.code for flag in finding.flags]
    ['all_noise']
"""

from __future__ import annotations

import html
import math
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pandas as pd

# -- thresholds (decided before looking at any run; each with its reason) -------------------------
# A quarter is half of what the paper's POLCA filters alone kept (about 2639 of 5000 addition
# tokens per vector): a purity over fewer tokens describes a self-selected minority.
MIN_COVERAGE = 0.25
# With fewer clustered tokens the 95 % binomial interval of a purity near 0.5 is wider than
# ±0.1 (1.96·√(0.25/100) = 0.098): no homogeneity from such a clustering can be told apart.
MIN_CLUSTERED_TOKENS = 100
# The paper's curvature is set to zero where its denominator is below tolerance; past one
# vector-interval in ten the "paper" trajectories are no longer the paper's estimator.
MAX_SMALL_DENOMINATOR_SHARE = 0.1
# An error per (vector, interval, token) above the mean |ΔL| of a token over an interval is
# larger than the whole loss change it is meant to allocate.
MAX_PAPER_RMSE_PER_MEAN_ABS_DELTA_LOSS = 1.0

# projected kinds whose terms the decompose stage scores by the fraction of |ΔL| they explain
# (its estimators bear the kinds' names)
EXPLAINED_KINDS = ("first_order", "polca", "polca_paper", "integrated")
KIND_NAMES = {"loss": "exact loss", "delta_loss": "ΔL", "abs_delta_loss": "|ΔL|",
              "lca": "LCA (top-50 parameters)", "fisher": "Fisher", "first_order":
              "first-order POLCA", "polca": "POLCA (exact curvature)",
              "polca_paper": "POLCA (paper's curvature)", "integrated": "integrated POLCA",
              "gradient": "gradient projection ⟨b, ∇ℓ_x⟩"}
KIND_ORDER = ("loss", "delta_loss", "abs_delta_loss", "lca", "fisher", "first_order", "polca",
              "polca_paper", "integrated", "gradient")
BASIS_ORDER = ("hessian", "random", "shuffled-hessian", "trajectory-pca")


@dataclass(frozen=True)
class Flag:
    """A condition under which a finding means nothing: ``code`` (stable, for tests and
    filters; :data:`FLAG_NAMES` gives each a few words) and a plain-language ``message`` that
    says what happened and what it implies."""

    code: str
    message: str


FLAG_NAMES = {"all_dropped": "all vectors dropped", "all_noise": "every token noise",
              "negative_explained": "explains less than nothing",
              "low_coverage": f"under {100 * MIN_COVERAGE:.0f}% of tokens clustered",
              "few_tokens": f"under {MIN_CLUSTERED_TOKENS} tokens clustered",
              "paper_curvature_unstable": "paper's curvature unstable"}


@dataclass(frozen=True)
class Finding:
    """What one clustering found: ``name`` (``polca_paper-hessian``), ``kind`` and ``basis``,
    a human ``title``, one ``sentence``, its ``flags``, the ``numbers`` behind the sentence
    (coverage, clusters, homogeneity with the paper's value, hidden fraction, ...) and a
    one-line ``headline`` of the same numbers for a terminal."""

    name: str
    kind: str
    basis: str | None
    title: str
    sentence: str
    flags: tuple[Flag, ...] = ()
    numbers: dict = field(default_factory=dict)
    headline: str = ""


@dataclass(frozen=True)
class Coverage:
    """Where the tokens of one clustering went, counted over (vector, token) pairs.

    ``total`` = tokens × vectors; ``clustered`` got a cluster; ``noise`` were HDBSCAN
    outliers; ``filtered`` removed by the token filter; ``dropped`` belong to vectors the mean
    filter removed. ``fraction`` = clustered / total (NaN without tokens).

    >>> coverage({"params": {"n_tokens": 10}, "vectors": [
    ...     {"kept": True, "n_filtered": 4, "n_noise": 1}, {"kept": False}]})
    Coverage(total=20, clustered=5, noise=1, filtered=4, dropped=10, vectors=2, kept_vectors=1)
    """

    total: int
    clustered: int
    noise: int
    filtered: int
    dropped: int
    vectors: int
    kept_vectors: int

    @property
    def fraction(self) -> float:
        return self.clustered / self.total if self.total else math.nan

    @property
    def seen(self) -> int:
        """Pairs HDBSCAN saw (after both filters)."""
        return self.clustered + self.noise


def coverage(meta: Mapping) -> Coverage:
    """The :class:`Coverage` of a clustering from its ``clusters/NAME.json``."""
    n = int((meta.get("params") or {}).get("n_tokens") or 0)
    vectors = meta.get("vectors")
    if not isinstance(vectors, list):  # an exact kind: one clustering of every token
        noise = int(meta.get("n_noise") or 0)
        return Coverage(n, n - noise, noise, 0, 0, 1, 1)
    kept = [v for v in vectors if v.get("kept")]
    filtered = sum(int(v.get("n_filtered") or 0) for v in kept)
    noise = sum(int(v.get("n_noise") or 0) for v in kept)
    return Coverage(n * len(vectors), n * len(kept) - filtered - noise, noise, filtered,
                    n * (len(vectors) - len(kept)), len(vectors), len(kept))


def find(clusterings: Mapping[str, Mapping], scores: pd.DataFrame | None = None,
         clusters: pd.DataFrame | None = None, skill: pd.DataFrame | None = None,
         hidden: pd.DataFrame | None = None, diagnostics: Mapping[str, Mapping] | None = None,
         signal: pd.DataFrame | None = None, skill_label: str = "carry") -> list[Finding]:
    """One :class:`Finding` per clustering, in the order exact kinds, LCA, Fisher, POLCA
    estimators (Hessian basis first). ``skill_label`` names the binary label of ``skill``
    (the paper's table metric), e.g. ``carry``. See the module docstring for the inputs."""
    out = []
    for name in sorted(clusterings, key=lambda n: display_order(clusterings[n], n)):
        meta = clusterings[name]
        params = meta.get("params") or {}
        kind, basis = str(params.get("kind") or name), params.get("basis")
        out.append(_finding(
            name, kind, basis, meta, _rows(scores, name), _rows(clusters, name),
            _rows(skill, name), _rows(hidden, name), (diagnostics or {}).get(basis),
            _rows(signal, name), skill_label))
    return out


def _finding(name, kind, basis, meta, scores, clusters, skill, hidden, diagnostic, signal,
             skill_label) -> Finding:
    params = meta.get("params") or {}
    cov = coverage(meta)
    title = KIND_NAMES.get(kind, kind) + (f", {basis} basis" if basis else "")
    n_clusters = int(meta.get("n_clusters") or 0)
    numbers = {"n_clusters": n_clusters, "coverage": cov.fraction, "clustered": cov.clustered,
               "total": cov.total, "vectors": cov.vectors, "kept_vectors": cov.kept_vectors,
               "tau": params.get("tau"), "delta": params.get("delta")}
    flags = [*_empty_flags(cov, n_clusters, params)]
    if diagnostic and kind in EXPLAINED_KINDS:
        explained = ((diagnostic.get("estimators") or {}).get(kind) or {}).get(
            "explained_fraction")
        numbers["explained"] = explained
        if explained is not None and explained < 0:
            flags.append(Flag("negative_explained", (
                f"the {KIND_NAMES.get(kind, kind)} terms explain {_fraction(explained)} of |ΔL| on "
                f"the {basis} basis: below zero they are further from the exact loss change "
                "than allocating nothing, so these trajectories are not the loss change")))
    if diagnostic and kind == "polca_paper":
        flags += _paper_curvature_flags(diagnostic, int(params.get("n_tokens") or 0), numbers)
    parts = []
    if n_clusters:
        flags += _coverage_flags(cov, meta)
        parts.append(_clusters_part(cov, n_clusters, kind))
        parts += _label_part(scores, clusters, numbers)
        parts += _skill_part(skill, clusters, skill_label, numbers)
        parts += _hidden_part(meta, params, hidden, numbers)
    else:
        parts.append(_nothing_part(cov))
    parts += _signal_part(signal, numbers)
    if numbers.get("explained") is not None:
        parts.append(f"the terms explain {_fraction(numbers['explained'])} of |ΔL|")
    sentence = f"{title}: " + "; ".join(parts) + "."
    return Finding(name, kind, basis, title, sentence, tuple(flags), numbers,
                   _headline(title, numbers, flags))


# -- the parts of a sentence ----------------------------------------------------------------------
def _clusters_part(cov: Coverage, n_clusters: int, kind: str) -> str:
    vectors = "parameters" if kind == "lca" else "vectors"
    where = (f" on {cov.kept_vectors} of {cov.vectors} {vectors}" if cov.vectors > 1 else "")
    unit = f"token-{vectors[:-1]} pairs" if cov.vectors > 1 else "tokens"
    return (f"{n_clusters} cluster{'s' * (n_clusters != 1)}{where} covering {cov.clustered:,} "
            f"of {cov.total:,} {unit} ({percent(cov.fraction)})")


def _nothing_part(cov: Coverage) -> str:
    if cov.kept_vectors == 0:
        return f"no clusters: the mean filter dropped all {cov.vectors} vectors"
    if cov.seen == 0:
        return (f"no clusters: the token filter removed every token of the {cov.kept_vectors} "
                f"vectors the mean filter kept")
    return f"no clusters: HDBSCAN marked every one of the {cov.seen:,} tokens it saw as noise"


def _label_part(scores: pd.DataFrame | None, clusters: pd.DataFrame | None,
                numbers: dict) -> list[str]:
    """The label the clusters follow best (largest lift of size-weighted purity over chance,
    pooled over vectors), and the largest cluster's majority value of it."""
    if scores is None or not len(scores) or "label" not in scores:
        return []
    rows = scores[scores["n_clustered"] > 0]
    if not len(rows):
        return []
    pooled = {}
    for label, group in rows.groupby("label", sort=False):
        weights = group["n_clustered"].astype(float)
        purity = float((group["weighted_purity"] * weights).sum() / weights.sum())
        chance = float((group["chance"] * weights).sum() / weights.sum())
        lift = (purity - chance) / (1 - chance) if chance < 1 else 0.0
        pooled[label] = (lift, purity, chance)
    label = max(pooled, key=lambda k: pooled[k][0])
    _, purity, chance = pooled[label]
    numbers.update(label=label, purity=purity, chance=chance)
    text = (f"they follow {label} best (size-weighted purity {purity:.3f} against "
            f"{chance:.3f} by chance)")
    column = f"majority_{label}"
    if clusters is not None and column in clusters and len(clusters):
        largest = clusters.sort_values("size", ascending=False, kind="stable").iloc[0]
        value = _value(largest[column])
        numbers.update(largest_size=int(largest["size"]), largest_value=value,
                       largest_purity=float(largest[f"purity_{label}"]))
        text += (f", the largest cluster ({int(largest['size']):,} tokens) being "
                 f"{label} = {value} at {float(largest[f'purity_{label}']):.3f}")
    return [text]


def _skill_part(skill: pd.DataFrame | None, clusters: pd.DataFrame | None, label: str,
                numbers: dict) -> list[str]:
    """The paper's metric: the most homogeneous eligible cluster of the binary label."""
    if skill is None:
        return []
    if not len(skill):
        return [f"no cluster qualifies as a {label} cluster by the paper's metric"]
    best = skill.sort_values("rank").iloc[0]
    homogeneity, recall = float(best["homogeneity"]), float(best["recall"])
    paper = _number(best.get("paper_homogeneity"))
    paper_recall = _number(best.get("paper_recall"))
    numbers.update(skill_label=label, skill_homogeneity=homogeneity, skill_recall=recall,
                   skill_size=int(best["size"]), paper_homogeneity=paper,
                   paper_recall=paper_recall)
    where = "" if pd.isna(best.get("vector")) else f" (vector {int(best['vector'])})"
    text = (f"best {label} cluster by the paper's metric{where}: {int(best['size']):,} tokens, "
            f"homogeneity "
            f"{homogeneity:.3f}{_paper(paper)}, recall {recall:.3f}{_paper(paper_recall)}")
    row = _cluster_row(clusters, best)
    if row is not None and pd.notna(row.get("break_step")):
        numbers["skill_break_step"] = float(row["break_step"])
        text += f", breaking at step {float(row['break_step']):.0f}"
    return [text]


def _hidden_part(meta: Mapping, params: Mapping, hidden: pd.DataFrame | None,
                 numbers: dict) -> list[str]:
    n_hidden, n_clusters = int(meta.get("n_hidden") or 0), int(meta.get("n_clusters") or 0)
    tau = params.get("tau")
    paper = (_number(hidden["paper"].iloc[0]) if hidden is not None and len(hidden)
             and "paper" in hidden else None)
    numbers.update(n_hidden=n_hidden, hidden_fraction=n_hidden / n_clusters,
                   paper_hidden_fraction=paper)
    tau = "τ" if tau is None else f"τ={tau}"
    return [(f"hidden breakthroughs (mean break step later than {tau}, where the loss is "
             f"flat): {'none' if n_hidden == 0 else n_hidden} of {n_clusters} clusters, "
             f"fraction {n_hidden / n_clusters:.3f}{_paper(paper)}")]


def _signal_part(signal: pd.DataFrame | None, numbers: dict) -> list[str]:
    """Per label and group, the best probe row (highest interval low end): visible or not.
    The intervals are taken as the table gives them; over many vectors its maker widens them
    for the number of vectors (a best-of-m row is otherwise biased upwards)."""
    if signal is None or not len(signal):
        return []
    rows = signal
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    rows = rows.dropna(subset=["balanced_accuracy", "ci_low"])
    if not len(rows):
        return []
    keys = [c for c in ("label", "group") if c in rows]
    best = (rows.sort_values("ci_low", ascending=False, kind="stable")
            .groupby(keys, sort=True, dropna=False).head(1) if keys else rows.head(1))
    parts, visible, cells = [], {}, []
    for _, row in best.sort_values(keys).iterrows() if keys else best.iterrows():
        label = row.get("label", "the label")
        value = row.get("group", math.nan)
        value = None if pd.isna(value) else _value(value)
        group = "" if value is None else f" within group {value}"
        seen = bool(row["ci_low"] > row["chance"])
        visible[(label, value)] = seen
        cells.append(f"{label}{'' if value is None else f' in {value}'} "
                     f"{row['balanced_accuracy']:.2f}{'' if seen else ' (chance)'}")
        parts.append(f"{label}{group} is {'' if seen else 'not '}visible to a probe "
                     f"(balanced accuracy {row['balanced_accuracy']:.2f}, interval "
                     f"{row['ci_low']:.2f}–{row['ci_high']:.2f}, chance {row['chance']:.2f})")
    numbers["signal_visible"] = visible
    numbers["signal_cell"] = ", ".join(cells)
    return parts


# -- flags ------------------------------------------------------------------------------------------
def _empty_flags(cov: Coverage, n_clusters: int, params: Mapping) -> list[Flag]:
    if n_clusters:
        return []
    if cov.seen == 0:
        by_mean, by_token = cov.vectors - cov.kept_vectors, cov.kept_vectors
        reason = (f"the mean filter dropped {by_mean}"
                  + (f" and the token filter emptied {by_token}" if by_token else ""))
        return [Flag("all_dropped", f"all {cov.vectors} vectors were dropped by the POLCA "
                                    f"filters ({reason}): nothing was clustered")]
    return [Flag("all_noise", f"HDBSCAN marked all {cov.seen:,} tokens it saw as noise "
                              f"(min_cluster_size {params.get('min_cluster_size')}): no "
                              "cluster exists to describe")]


def _coverage_flags(cov: Coverage, meta: Mapping) -> list[Flag]:
    flags = []
    if cov.fraction < MIN_COVERAGE:
        flags.append(Flag("low_coverage", (
            f"only {percent(cov.fraction)} of the tokens were clustered ({cov.clustered:,} of "
            f"{cov.total:,}; noise {cov.noise:,}, filtered {cov.filtered:,}, on dropped "
            f"vectors {cov.dropped:,}), under {percent(MIN_COVERAGE)}: its purities describe "
            "a minority of the probe set")))
    n = int((meta.get("params") or {}).get("n_tokens") or 0)
    vectors = meta.get("vectors")
    per_vector = ({int(v.get("vector", i)): n - int(v.get("n_filtered") or 0)
                   - int(v.get("n_noise") or 0) for i, v in enumerate(vectors)
                   if v.get("kept") and v.get("n_clusters")}
                  if isinstance(vectors, list) else {None: cov.clustered})
    small = {v: c for v, c in per_vector.items() if c < MIN_CLUSTERED_TOKENS}
    if small:
        which = ("the clustering" if None in small else
                 f"vector{'s' * (len(small) > 1)} {', '.join(map(str, small))}")
        flags.append(Flag("few_tokens", (
            f"{which} clustered fewer than {MIN_CLUSTERED_TOKENS} tokens "
            f"({', '.join(map(str, small.values()))}): a purity from so few tokens has a 95 % "
            "interval wider than ±0.1")))
    return flags


def _paper_curvature_flags(diagnostic: Mapping, n_tokens: int, numbers: dict) -> list[Flag]:
    flags = []
    small = int(diagnostic.get("paper_small_denominators") or 0)
    checks = int(diagnostic.get("paper_denominator_checks") or 0)
    if checks:
        numbers["small_denominator_share"] = small / checks
        if small / checks > MAX_SMALL_DENOMINATOR_SHARE:
            flags.append(Flag("paper_curvature_unstable", (
                f"the paper's curvature had a near-zero denominator in {small} of {checks} "
                f"vector-intervals (over {percent(MAX_SMALL_DENOMINATOR_SHARE)}), where its "
                "second-order term was set to zero")))
    rmse = diagnostic.get("rmse_paper_vs_exact_second_order")
    intervals = int(diagnostic.get("n_intervals") or 0)
    if rmse is not None and intervals and n_tokens:
        mean_abs = float(diagnostic.get("sum_abs_delta_loss") or 0.0) / (intervals * n_tokens)
        numbers.update(paper_rmse=float(rmse), mean_abs_delta_loss=mean_abs)
        if mean_abs > 0 and rmse / mean_abs > MAX_PAPER_RMSE_PER_MEAN_ABS_DELTA_LOSS:
            flags.append(Flag("paper_curvature_unstable", (
                f"the paper's second-order term is off the exact one by RMSE {rmse:.3g}, "
                f"{rmse / mean_abs:.3g} times the mean |ΔL| of a token over an interval "
                f"({mean_abs:.3g} nats): its error is larger than the change it allocates")))
    return flags


# -- renderers -------------------------------------------------------------------------------------
def overview(findings: Iterable[Finding]) -> str:
    """One paragraph for the whole run: which clusterings found clusters with no red flag,
    what POLCA on the Hessian basis (the paper's method) found, and how many are flagged for
    what.

    >>> ok = Finding("loss", "loss", None, "exact loss", "…", (), {"n_clusters": 3})
    >>> bad = Finding("polca-hessian", "polca", "hessian", "POLCA", "…",
    ...               (Flag("all_dropped", "…"),), {"n_clusters": 0})
    >>> print(overview([ok, bad]))
    1 of 2 clusterings found clusters with no red flag: exact loss. POLCA on the Hessian basis (the paper's method) found no cluster: POLCA (all vectors dropped). 1 is flagged: all vectors dropped 1.
    """
    findings = list(findings)
    if not findings:
        return "No clustering yet: nothing to report."
    sound = [f.title for f in findings if f.numbers.get("n_clusters") and not f.flags]
    text = (f"{len(sound)} of {len(findings)} clusterings found clusters with no red flag"
            + (f": {', '.join(sound)}." if sound else "."))
    paper = [f for f in findings if f.basis == "hessian" and f.kind in ("polca", "polca_paper")]
    if paper:
        states = [f"{f.title} ({_flag_names(f.flags) or 'no red flag'})" for f in paper]
        found = [f for f in paper if f.numbers.get("n_clusters")]
        verdict = ("no cluster" if not found else "only flagged clusters"
                   if all(f.flags for f in found) else "clusters")
        text += (f" POLCA on the Hessian basis (the paper's method) found {verdict}: "
                 + "; ".join(states) + ".")
    counts: dict[str, int] = {}
    for finding in findings:
        for name in dict.fromkeys(FLAG_NAMES.get(f.code, f.code) for f in finding.flags):
            counts[name] = counts.get(name, 0) + 1
    flagged = sum(1 for f in findings if f.flags)
    if flagged:
        text += (f" {flagged} {'is' if flagged == 1 else 'are'} flagged: "
                 + ", ".join(f"{name} {n}" for name, n in counts.items()) + ".")
    return text


def to_text(findings: Iterable[Finding], width: int = 100, brief: bool = False) -> str:
    """Plain text for a terminal: the :func:`overview`, then one wrapped paragraph per
    finding, its flags indented under it with ``!``; with ``brief`` each finding's one-line
    headline instead. No markup.

    >>> print(to_text([Finding("x", "loss", None, "exact loss", "exact loss: 2 clusters.",
    ...                        (Flag("low_coverage", "only 10 % clustered"),))], width=70), end="")
    0 of 1 clusterings found clusters with no red flag. 1 is flagged:
    under 25% of tokens clustered 1.
    <BLANKLINE>
    exact loss: 2 clusters.
      ! only 10 % clustered
    """
    findings = list(findings)
    if not findings:
        return "No clustering yet: nothing to report.\n"
    lines = [*textwrap.wrap(overview(findings), width), ""]
    for finding in findings:
        if brief:
            lines += textwrap.wrap(finding.headline, width, subsequent_indent="    ")
            continue
        lines += textwrap.wrap(finding.sentence, width, subsequent_indent="    ")
        for flag in finding.flags:
            lines += textwrap.wrap(flag.message, width, initial_indent="  ! ",
                                   subsequent_indent="    ")
    return "\n".join(lines) + "\n"


FINDINGS_CSS = """
.polca-findings { border: 1px solid #bbb; border-radius: 6px; padding: 0.6em 1.2em;
  margin: 1em 0; background: #fcfcfc; }
.polca-findings h2 { margin-top: 0.2em; }
.polca-findings table { border-collapse: collapse; font-size: 0.82em; margin: 0.5em 0; }
.polca-findings th, .polca-findings td { border: 1px solid #ccc; padding: 0.15em 0.5em;
  text-align: left; vertical-align: top; }
.polca-findings th { background: #f0f0f0; }
.polca-findings td { white-space: nowrap; }
.polca-findings td.problem { color: #a00; white-space: normal; min-width: 12em; }
.polca-findings td.wrap { white-space: normal; min-width: 10em; }
.polca-findings tr.meaningless td:not(.problem) { color: #777; }
.polca-findings li { margin: 0.4em 0; }
.polca-findings .meaningless { color: #555; }
.polca-findings ul.flags { margin: 0.2em 0 0.4em; padding-left: 1.2em; list-style: none; }
.polca-findings ul.flags li { color: #a00; margin: 0.1em 0; }
.polca-findings ul.flags li::before { content: "⚠ "; }
"""


def to_html(findings: Iterable[Finding], skill_label: str = "carry") -> str:
    """A self-contained HTML fragment (its own ``<style>``, no script, no external resource):
    a table of the headline numbers, one row per finding, its problems in red (a flagged row
    is greyed so the eye goes to the findings that stand); then the sentences, each with its
    flags in full.

    >>> "⚠" in to_html([Finding("x", "loss", None, "t", "s.", (Flag("c", "m"),))])
    True
    """
    findings = list(findings)
    if not findings:
        body = "<p>No clustering yet: nothing to report.</p>"
    else:
        head = ["trajectories", "clusters", "tokens clustered", "clusters follow",
                f"best {skill_label} cluster", "hidden", "probe sees (balanced accuracy)",
                "problems"]
        grid = [[f.title, *_cells(f.numbers).values(), _flag_names(f.flags)] for f in findings]
        # a column no finding fills (no skill label in a text run) is left out
        shown = [j for j in range(len(head)) if j in (0, 1, len(head) - 1)
                 or any(row[j] for row in grid)]
        # names, the problems and the probe's list wrap; the numbers stay on one line
        css_of = {0: ' class="wrap"', len(head) - 1: ' class="problem"',
                  len(head) - 2: ' class="wrap"'}
        rows = []
        for finding, cells in zip(findings, grid):
            tds = "".join(f"<td{css_of.get(j, '')}>{html.escape(cells[j])}</td>" for j in shown)
            css = ' class="meaningless"' if finding.flags else ""
            rows.append(f"<tr{css}>{tds}</tr>")
        table = ("<table><thead><tr>" + "".join(f"<th>{html.escape(head[j])}</th>" for j in shown)
                 + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
        items = []
        for finding in findings:
            flags = "".join(f"<li>{html.escape(f.message)}</li>" for f in finding.flags)
            title, _, rest = finding.sentence.partition(": ")
            css = ' class="meaningless"' if finding.flags else ""
            items.append(f"<li{css}><strong>{html.escape(title)}</strong>: {html.escape(rest)}"
                         + (f'<ul class="flags">{flags}</ul>' if flags else "") + "</li>")
        body = (f"<p>{html.escape(overview(findings))}</p>" + table + "<ul>" + "".join(items)
                + "</ul>")
    return (f"<style>{FINDINGS_CSS}</style><section id=\"found\" class=\"polca-findings\">"
            f"<h2>What was found</h2>{body}</section>")


def to_frame(findings: Iterable[Finding]) -> pd.DataFrame:
    """The numbers behind the sentences, one row per finding (index: the clustering name),
    with the flag codes joined in a ``flags`` column."""
    rows = {f.name: {"title": f.title, **{k: v for k, v in f.numbers.items()
                                           if not isinstance(v, dict)},
                     "flags": ", ".join(flag.code for flag in f.flags)} for f in findings}
    return pd.DataFrame.from_dict(rows, orient="index")


# -- small helpers ---------------------------------------------------------------------------------
def _rows(frame: pd.DataFrame | None, name: str) -> pd.DataFrame | None:
    """The rows of clustering ``name``; None when there is no table (a table without columns,
    as an empty CSV reads back, is none: the run has no such label)."""
    if frame is None or not len(frame.columns):
        return None
    if "name" in frame:
        return frame[frame["name"] == name]
    return frame[frame["kind"] == name] if "kind" in frame else frame.iloc[:0]


def _cluster_row(clusters: pd.DataFrame | None, best: pd.Series) -> pd.Series | None:
    if clusters is None or not len(clusters) or "cluster" not in clusters:
        return None
    match = clusters["cluster"] == best["cluster"]
    if "vector" in clusters and pd.notna(best.get("vector")):
        match &= clusters["vector"] == best["vector"]
    rows = clusters[match]
    return rows.iloc[0] if len(rows) else None


def display_order(meta: Mapping, name: str) -> tuple:
    """Sort key of a clustering (its ``clusters/NAME.json`` and name): exact kinds, LCA,
    Fisher, the POLCA estimators; within a kind the Hessian basis first."""
    params = meta.get("params") or {}
    kind, basis = params.get("kind") or name, params.get("basis")
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER),
            -1 if basis is None else BASIS_ORDER.index(basis) if basis in BASIS_ORDER
            else len(BASIS_ORDER), str(basis), name)


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _paper(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f" (paper {value:.{digits}f})"


def percent(fraction: float | None) -> str:
    """A fraction as a percentage: whole percent rounded down (so a share just under a
    threshold never reads as the threshold), one significant digit under 1 %.

    >>> percent(0.8), percent(0.2496), percent(0.0093), percent(None)
    ('80%', '24%', '0.9%', '–')
    """
    if fraction is None or math.isnan(fraction):
        return "–"
    return f"{math.floor(100 * fraction + 1e-9):.0f}%" if fraction >= 0.01 or fraction == 0 \
        else f"{100 * fraction:.1g}%"


def _fraction(value: float) -> str:
    """Three decimals, or two significant digits for a value that would print as 0.000."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.001 else f"{value:.2g}"


def _value(value):
    """A label value as written: integers read back as floats (CSV with gaps) lose the .0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value.item() if hasattr(value, "item") else value


def _cells(numbers: dict) -> dict[str, str]:
    """The headline numbers as short strings (empty where the finding has none): clusters,
    coverage, the label the clusters follow, the best skill cluster, the hidden fraction, what
    the skill-signal probe sees."""
    n = numbers.get("n_clusters", 0)
    cells = {"clusters": str(n), "coverage": "", "follows": "", "skill": "", "hidden": "",
             "signal": numbers.get("signal_cell", "")}  # with or without clusters
    if not n:
        return cells
    cells["coverage"] = percent(numbers["coverage"])
    if "label" in numbers:
        cells["follows"] = (f"{numbers['label']} {numbers['purity']:.2f} "
                            f"(chance {numbers['chance']:.2f})")
    if "skill_homogeneity" in numbers:
        cells["skill"] = (f"{numbers['skill_homogeneity']:.2f}"
                          f"{_paper(numbers['paper_homogeneity'], 2)}"
                          + (f", breaks at {numbers['skill_break_step']:.0f}"
                             if numbers.get("skill_break_step") is not None else ""))
    if "n_hidden" in numbers:
        cells["hidden"] = f"{numbers['n_hidden']}/{n}{_paper(numbers['paper_hidden_fraction'], 2)}"
    return cells


def _headline(title: str, numbers: dict, flags: list[Flag]) -> str:
    """The numbers of a finding on one line: clusters, coverage, the label they follow, the
    skill cluster and the hidden fraction, each beside the paper's value where there is one."""
    cells = _cells(numbers)
    parts = [f"{cells['clusters']} clusters"
             + (f", {cells['coverage']} of tokens" if cells["coverage"] else ""), cells["follows"],
             cells["skill"] and f"best {numbers['skill_label']} cluster {cells['skill']}",
             cells["hidden"] and f"hidden {cells['hidden']}",
             cells["signal"] and f"probe: {cells['signal']}"]
    line = f"{title}: " + "; ".join(p for p in parts if p)
    if flags:
        line += "  !! " + _flag_names(flags)
    return line


def _flag_names(flags: Iterable[Flag]) -> str:
    return "; ".join(dict.fromkeys(FLAG_NAMES.get(f.code, f.code) for f in flags))
