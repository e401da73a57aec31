"""The documentation's measured numbers, rendered from a run's ``report/summary.json``.

``make demo`` runs ``polca demo addition`` and then this module on its run, which rewrites

* the measured block of ``README.md`` (between :data:`README_BEGIN` and :data:`README_END`):
  the demo's time, accuracy and what it found;
* the demo table of ``docs/reproduction.md`` (between the reproduction-table markers);
* ``docs/demo-addition.summary.json``, the summary those were rendered from, kept so that a
  test checks the two pages against it (and against a fresh run's summary when one exists).

So no number on those pages is typed by hand, and a changed result shows up in ``git diff``.

    python -m polca.report.docs runs/demo-addition

Example:
    >>> print(replace_between("a\\n<!-- b -->\\nold\\n<!-- e -->\\nz", "<!-- b -->",
    ...                       "<!-- e -->", "new\\n"))
    a
    <!-- b -->
    new
    <!-- e -->
    z
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polca.evaluate import paper_row
from polca.findings import FLAG_NAMES, percent
from polca.progress import duration
from polca.report.reproduction import reproduction_markdown
from polca.store import RunDir

README_BEGIN = ("<!-- measured demo: begin (generated from the demo's report/summary.json by "
                "`make demo`; do not edit) -->")
README_END = "<!-- measured demo: end -->"
TABLE_BEGIN, TABLE_END = ("<!-- reproduction table: begin -->",
                          "<!-- reproduction table: end -->")
SUMMARY_COPY = Path("docs/demo-addition.summary.json")
COMMAND = "make demo   # polca demo addition, then python -m polca.report.docs runs/demo-addition"
# stage times left out of the measured time: the report is drawn after the summary is written
TIMED_STAGES = ("train", "trajectories", "basis", "decompose", "cluster", "evaluate",
                "measures")


def readme_block(summary: dict) -> str:
    """The README's measured paragraph: the stages' time on the machine that ran them, the
    model's accuracy (per value of its first label), and the run's overview of what it found.

    >>> print(readme_block({"run": {"accuracy": 0.5, "times": {}}, "overview": "Nothing."}))
    The model reaches **50.0 %** accuracy on the probe tokens. What the run found (the report's first screen):
    <BLANKLINE>
    > Nothing.
    <BLANKLINE>
    The run has no POLCA clustering on a Hessian basis.
    <BLANKLINE>
    """
    run = summary["run"]
    parts = []
    times = {k: v for k, v in (run.get("times") or {}).items() if k in TIMED_STAGES}
    if times:
        seconds = sum(t["seconds"] for t in times.values())
        loads = [t["load"] for t in times.values() if t.get("load") is not None]
        machine = {(t.get("cpus"), t.get("threads")) for t in times.values()}
        cpus, threads = machine.pop() if len(machine) == 1 else (None, None)
        where = (f" on {cpus} CPU cores, no GPU, torch using {threads} "
                 f"thread{'s' * (threads != 1)}" if cpus else "")
        load = (f"; 1-minute load average {min(loads):.1f}–{max(loads):.1f} as the stages "
                "ended" if loads else "")
        parts.append(f"Measured with `polca demo addition` (what `make demo` runs){where}: "
                     f"the stages from training to the progress measures took "
                     f"**{duration(seconds)}**{load}; the report takes seconds more.")
    accuracy = run.get("accuracy")
    if accuracy is not None:
        line = f"The model reaches **{100 * accuracy:.1f} %** accuracy on the probe tokens"
        by = run.get("accuracy_by")
        if by:
            line += " (" + ", ".join(f"{by['label']} {value}: {100 * share:.1f} %"
                                     for value, share in by["values"].items()) + ")"
        parts.append(line + ".")
    parts.append("What the run found (the report's first screen):")
    text = " ".join(parts)
    return f"{text}\n\n> {summary['overview']}\n\n{headline_method(summary)}\n"


def headline_method(summary: dict) -> str:
    """One sentence on the paper's headline result, POLCA along the Hessian basis: its best
    carry cluster beside the paper's, or that it has none.

    >>> print(headline_method({"findings": [{"name": "polca-hessian", "n_clusters": 0}]}))
    The paper's headline result (POLCA along a Hessian basis recovers carrying, best carry homogeneity 0.973): here POLCA (exact curvature) on the Hessian basis found no cluster. See [docs/reproduction.md](docs/reproduction.md): it holds a premise sweep and a planted carry regime analysed over 3 seeds (`polca reproduce configs/repro-addition.toml --seeds 0,1,2`).
    """
    paper = paper_row("polca", "hessian")["homogeneity"][0]
    found = {f["name"]: f for f in summary.get("findings", [])}
    clauses = []
    for name, title in (("polca-hessian", "POLCA (exact curvature)"),
                        ("polca_paper-hessian", "POLCA (paper's curvature)")):
        finding = found.get(name)
        if finding is None:
            continue
        homogeneity = finding.get("skill_homogeneity")
        if not finding.get("n_clusters"):
            clauses.append(f"{title} on the Hessian basis found no cluster")
        elif homogeneity is None:
            clauses.append(f"{title} on the Hessian basis found {finding['n_clusters']} "
                           "clusters, none an eligible carry cluster")
        else:
            clauses.append(f"{title} on the Hessian basis: best carry homogeneity "
                           f"{homogeneity:.3f} over {percent(finding.get('coverage'))} of the "
                           "tokens" + (f" ({finding['flags'].replace('_', ' ')})"
                                       if finding.get("flags") else ""))
    if not clauses:
        return "The run has no POLCA clustering on a Hessian basis."
    return (f"The paper's headline result (POLCA along a Hessian basis recovers carrying, best "
            f"carry homogeneity {paper:.3f}): here " + "; ".join(clauses)
            + ". See [docs/reproduction.md](docs/reproduction.md): it holds a premise sweep "
            "and a planted carry regime analysed over 3 seeds (`polca reproduce "
            "configs/repro-addition.toml --seeds 0,1,2`).")


def table_block(summary: dict, command: str = COMMAND) -> str:
    """The demo table of docs/reproduction.md (:func:`reproduction_markdown` of the
    summary's tables, regenerated by ``command``), then what the run found in the report's
    words: the overview and one sentence per clustering with its red flags."""
    lines = ["", "What the run found, in the report's words:", "", f"> {summary['overview']}",
             ""]
    for finding in summary.get("findings", []):
        flags = [FLAG_NAMES.get(code, code) for code in (finding.get("flags") or "").split(", ")
                 if code]
        sentence = summary["sentences"][finding["name"]]
        lines.append(f"- {sentence}" + (f" **Flags: {'; '.join(flags)}.**" if flags else ""))
    return reproduction_markdown(summary["reproduction"], command=command) + "\n".join(
        lines) + "\n"


def replace_between(text: str, begin: str, end: str, block: str) -> str:
    """``text`` with what lies between the lines ``begin`` and ``end`` replaced by ``block``."""
    if begin not in text or end not in text:
        raise ValueError(f"the markers {begin!r} and {end!r} are not in the text")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}{end}{tail}"


def write_between(path: Path, begin: str, end: str, block: str) -> None:
    """Put ``block`` between the lines ``begin`` and ``end`` of the file ``path``, keeping
    everything around them; a file without the markers (or no file) gets them, with the
    block, at its end."""
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        text = replace_between(text, begin, end, block)
    else:
        text += ("\n" if text and not text.endswith("\n") else "") + f"{begin}\n{block}{end}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def between(text: str, begin: str, end: str) -> str:
    """What lies between the lines ``begin`` and ``end`` (the generated block)."""
    return text.split(begin, 1)[1].split(end, 1)[0].removeprefix("\n")


def update(summary: dict, readme: Path, reproduction: Path, copy: Path | None) -> list[Path]:
    """Write the measured block into ``readme``, the demo table into ``reproduction`` and the
    summary to ``copy``; returns the files whose content changed."""
    changed = []
    outputs = [(readme, lambda t: replace_between(t, README_BEGIN, README_END,
                                                  readme_block(summary)))]
    if summary.get("reproduction") is not None:
        outputs.append((reproduction, lambda t: replace_between(t, TABLE_BEGIN, TABLE_END,
                                                                table_block(summary))))
    for path, render in outputs:
        before = path.read_text()
        after = render(before)
        if after != before:
            path.write_text(after)
            changed.append(path)
    if copy is not None:
        text = json.dumps(summary, indent=1, ensure_ascii=False) + "\n"
        if not copy.is_file() or copy.read_text() != text:
            copy.write_text(text)
            changed.append(copy)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polca.report.docs",
        description="Render a run's report/summary.json into the README's measured block and "
                    "the demo table of docs/reproduction.md.")
    parser.add_argument("run", type=Path, help="the run directory (runs/demo-addition)")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--reproduction", type=Path, default=Path("docs/reproduction.md"))
    parser.add_argument("--copy", type=Path, default=SUMMARY_COPY,
                        help="where the summary is kept beside the docs")
    parser.add_argument("--verbose", "-v", action="store_true", help="name the files changed")
    args = parser.parse_args(argv)
    summary = RunDir(args.run).read_summary()
    if summary is None:
        print(f"error: {args.run}/report/summary.json does not exist: run `polca report "
              f"{args.run}` first", file=sys.stderr)
        return 2
    try:
        changed = update(summary, args.readme, args.reproduction, args.copy)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.verbose:
        for path in changed:
            print(f"{path}: rewritten from {args.run}/report/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
