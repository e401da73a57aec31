"""Stages: the I/O edge between the run directory and polca's tensor functions.

Each stage reads what earlier stages wrote, writes its own part of the run directory in blocks
marked done only once on disk, and skips what is already done.

:data:`STAGES` is their order; :data:`READS` which stages' products each one reads, and
:func:`invalidated` what a changed config value can make recompute.
"""

from __future__ import annotations

STAGES = ("train", "trajectories", "basis", "decompose", "cluster", "evaluate", "measures",
          "report")
READS = {"trajectories": ("train",), "basis": ("train",), "decompose": ("basis",),
         "cluster": ("trajectories", "decompose"), "evaluate": ("cluster",),
         "measures": ("train",), "report": ("evaluate", "measures")}
# The first stage that reads each config section (or key); sections that define the training
# run are read by `train`, an unknown section by every analysis stage.
READER = {"seed": "train", "source": "train", "task": "train", "model": "train",
          "train": "train", "checkpoints": "train", "trajectories": "trajectories",
          "basis": "basis", "decompose": "decompose", "cluster": "cluster",
          "cluster.top_clusters": "evaluate", "evaluate": "evaluate",
          "report.examples_per_cluster": "evaluate", "report": "report"}


def downstream(stage: str) -> tuple[str, ...]:
    """``stage`` and every stage that reads its products, directly or not, in order.

    >>> downstream("cluster")
    ('cluster', 'evaluate', 'report')
    >>> downstream("basis")
    ('basis', 'decompose', 'cluster', 'evaluate', 'report')
    """
    found = {stage}
    for name in STAGES:  # in order, so a reader comes after what it reads
        if any(r in found for r in READS.get(name, ())):
            found.add(name)
    return tuple(s for s in STAGES if s in found)


def invalidated(key: str) -> tuple[str, ...]:
    """The stages a change of config value ``key`` (``"cluster.min_cluster_size"``) can make
    recompute: the first stage that reads it, and every stage downstream. Each of them then
    recomputes only where its recorded inputs really changed.

    >>> invalidated("cluster.min_cluster_size")
    ('cluster', 'evaluate', 'report')
    """
    reader = READER.get(key) or READER.get(key.split(".")[0])
    if reader is None:
        return STAGES[1:]
    return downstream(reader)
