"""The run directory: the one contract between stages, and the only module that touches its paths.

A run directory holds everything one analysis produced. Every stage reads it and writes its
own part through :class:`RunDir`; the report, the command line and the Python API read it
through the same class. No other module builds a path inside a run.

Layout::

    runs/NAME/
      config.toml                        the resolved config that produced the run
      checkpoints/                       built-in training only (:mod:`polca.checkpoints`)
      source.json                        an outside series as its source describes it (steps,
                                         paths, weight fingerprints, tokens seen)
      probe/sequences.parquet            one row per probe sequence: sequence, input_ids, ...
      probe/tokens.parquet               one row per scored token: token, sequence, position,
                                         target, then text, context and the labels
      probe/probe.json                   the label columns and the probe's content hash
      arrays.zarr/                       chunked arrays with named dimensions (ARRAYS below)
      basis/NAME.safetensors, NAME.json  basis vectors [m, d] and their provenance
      basis/.partial/                    Algorithm 1 so far, while the basis stage runs
      diagnostics/BASIS.json             decomposition diagnostics per basis
      clusters/NAME.parquet              per clustering: [vector,] token, label, break_step
      clusters/NAME.breaks.parquet       per cluster: [vector,] cluster, size, break_step, hidden
      clusters/NAME.json                 the clustering's parameters and per-vector counts
      evaluation/TABLE.csv, summary.json scores, clusters, carry, hidden (and any other table)
      evaluation/pos_clusters.parquet    POS labels of every cluster (text runs)
      report/index.html, *.png           the self-contained page and its figures
      report/summary.json                what the run found (the page's first screen) as data
      tokenizer.json                     the text task's tokenizer (text runs)
      .progress/ARRAY/BLOCK              one empty marker per array block written completely
      .progress/inputs/PRODUCT.json      the inputs each product was computed from
      .progress/file-hashes.json         content hashes of outside checkpoint files
      .progress/times.json               how long each stage last worked, on what machine
      .lock                              held by the one process working on the run

Resumption. A stage writes one block (a checkpoint or an interval) at a time and only then
drops its marker; a killed stage resumes at the first block without one and never counts a
half-written block as done. Files are replaced atomically (written beside, then renamed).

Input fingerprints. Every product (an array group, a basis, a clustering, the evaluation)
records the inputs it was computed from: content hashes of the checkpoints, the probe set,
the basis sample and the basis vectors, the versions of the products it reads, and the config
values it depends on (settings that change only speed or memory, such as batch sizes, are not
inputs). A stage compares them before it starts: when they differ it discards the product,
says so in one line, and computes it again, so a result is never reused for inputs that
changed. A second process on the same run is refused while the first holds the lock.

Example:
    >>> run = RunDir("/tmp/polca-doc-run")
    >>> arrays = run.arrays()
    >>> loss = arrays.require("loss", shape=(5, 3), chunks=(5, 1), dims=("token", "checkpoint"))
    >>> arrays.write_block("loss", (slice(None), 0), np.zeros(5), key=0)
    >>> sorted(arrays.done("loss"))
    ['0']
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from polca.atomic import (
    StoreError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    read_json,
)
from polca.checkpoints import CheckpointStore
from polca.cluster import DROPPED, FILTERED, NOISE
from polca.functional import ProbeBatch
from polca.tasks.base import label_columns

SEQUENCE_COLUMNS = ("sequence", "input_ids")
TOKEN_COLUMNS = ("token", "sequence", "position", "target")
LABEL_VALUES = {NOISE: "noise", FILTERED: "filtered", DROPPED: "vector dropped"}

# Arrays of arrays.zarr ------------------------------------------------------------------------
LOSS, CORRECT, MEASURES = "loss", "correct", "measures"
LCA_TOP, LCA_TENSORS = "lca/top/first", "lca/tensors"
# Per-basis arrays polca/<basis>/<term>; dims of each.
TERM_DIMS = {
    "delta": ("vector", "interval"),
    "grad": ("vector", "checkpoint", "token"),
    "first": ("vector", "interval", "token"),
    "second_exact": ("vector", "interval", "token"),
    "second_paper": ("vector", "interval", "token"),
    "paper_small": ("vector", "interval"),
    "integrated": ("vector", "interval", "token"),
    "fisher": ("vector", "interval", "token"),
}
ARRAYS = {
    LOSS: "[token, checkpoint] float64: exact token losses ℓ_x(θ_t) (stage trajectories)",
    CORRECT: "[token, checkpoint] bool: the argmax prediction is the target",
    "polca/BASIS/delta": "[vector, interval]: δ_{t,b} = ⟨b, θ_{t+1} − θ_t⟩ (stage decompose)",
    "polca/BASIS/grad": "[vector, checkpoint, token]: g_x(t) = ⟨b, ∇ℓ_x(θ_t)⟩",
    "polca/BASIS/first": "[vector, interval, token]: first-order POLCA g·δ",
    "polca/BASIS/second_exact": "[vector, interval, token]: ½ κ δ², κ exact",
    "polca/BASIS/second_paper": "[vector, interval, token]: ½ κ̃ δ², the paper's κ̃",
    "polca/BASIS/paper_small": "[vector, interval] bool: κ̃ zeroed (tiny denominator)",
    "polca/BASIS/integrated": "[vector, interval, token]: Simpson's path integral · δ",
    "polca/BASIS/fisher": "[vector, interval, token]: projected empirical Fisher g²",
    LCA_TOP: "[parameter, interval, token]: token-level LCA along the top-|θ| parameters",
    LCA_TENSORS: "[tensor, interval]: aggregate LCA per parameter tensor (Lan et al.)",
    MEASURES: "[checkpoint, measure]: progress measures (stage measures)",
}


def term_array(basis: str, term: str) -> str:
    """The array of one decomposition term of one basis.

    >>> term_array("hessian", "first")
    'polca/hessian/first'
    """
    if term not in TERM_DIMS:
        raise ValueError(f"unknown decomposition term {term!r}; known: {list(TERM_DIMS)}")
    return f"polca/{basis}/{term}"


# Trajectory kinds -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrajectoryKind:
    """What one kind of trajectory is made of, so that every reader builds it the same way.

    ``source``: ``"loss"`` (the exact losses, kinds of :func:`polca.cluster.exact_trajectories`),
    ``"terms"`` (arrays ``polca/<basis>/<term>`` summed), ``"lca"`` (``lca/top/first``).
    ``cumulative``: interval terms ``[vector, interval, token]`` are summed over time into
    ``[vector, checkpoint, token]`` with zero at the first checkpoint; otherwise the arrays
    already hold values per checkpoint. ``allocation``: the values are allocated loss changes,
    so the POLCA sign filters apply.
    """

    name: str
    source: str
    terms: tuple[str, ...] = ()
    cumulative: bool = True
    allocation: bool = False
    doc: str = ""


TRAJECTORY_KINDS = {kind.name: kind for kind in (
    TrajectoryKind("loss", "loss", doc="L[x, t], the exact token loss"),
    TrajectoryKind("delta_loss", "loss", doc="ΔL[x, t] = L[x, t+1] − L[x, t]"),
    TrajectoryKind("abs_delta_loss", "loss", doc="|ΔL[x, t]|"),
    TrajectoryKind("first_order", "terms", ("first",), allocation=True,
                   doc="cumulated first-order POLCA"),
    TrajectoryKind("polca", "terms", ("first", "second_exact"), allocation=True,
                   doc="PL with exact curvature"),
    TrajectoryKind("polca_paper", "terms", ("first", "second_paper"), allocation=True,
                   doc="PL with the paper's curvature"),
    TrajectoryKind("integrated", "terms", ("integrated",), allocation=True,
                   doc="cumulated integrated POLCA"),
    TrajectoryKind("fisher", "terms", ("fisher",), doc="cumulated projected Fisher"),
    TrajectoryKind("lca", "lca", (LCA_TOP,), allocation=True,
                   doc="cumulated token-level LCA, top-|θ| parameters"),
    # the first-order engine's g_x(t), stored per checkpoint: not an allocation, not cumulated
    TrajectoryKind("gradient", "terms", ("grad",), cumulative=False,
                   doc="⟨b, ∇ℓ_x(θ_t)⟩ per checkpoint"),
)}


def clustering_name(kind: str, basis: str | None = None) -> str:
    """``kind`` for kinds without a basis, else ``kind-basis``.

    >>> clustering_name("polca", "hessian"), clustering_name("loss")
    ('polca-hessian', 'loss')
    """
    return kind if basis is None else f"{kind}-{basis}"


def kind_arrays(kind: str, basis: str | None = None) -> tuple[str, ...]:
    """The arrays a trajectory kind is built from (for ``basis`` when it has one)."""
    spec = TRAJECTORY_KINDS[kind]
    if spec.source == "loss":
        return (LOSS,)
    if spec.source == "lca":
        return spec.terms
    if basis is None:
        raise ValueError(f"trajectory kind {kind!r} needs a basis")
    return tuple(term_array(basis, term) for term in spec.terms)


# Small file helpers ---------------------------------------------------------------------------
class RunLocked(StoreError):
    """Another process holds the run directory."""


def sha256_json(obj) -> str:
    """Hash of a JSON-able object, independent of key order.

    >>> sha256_json({"a": 1, "b": 2}) == sha256_json({"b": 2, "a": 1})
    True
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def frame_sha256(frame: pd.DataFrame) -> str:
    """Content hash of a table: its column names, dtypes and values in order (lists and arrays
    in cells included), independent of how it is stored."""
    digest = hashlib.sha256()
    for column in frame.columns:
        values = frame[column]
        digest.update(f"{column}:{values.dtype}\n".encode())
        if values.dtype != object and not pd.api.types.is_string_dtype(values):
            digest.update(np.ascontiguousarray(values.to_numpy()).tobytes())
        else:
            cells = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
            digest.update(json.dumps(cells, default=str).encode())
    return digest.hexdigest()


def batch_sha256(batch: ProbeBatch) -> str:
    """Content hash of a :class:`ProbeBatch` (ids, targets, scored)."""
    digest = hashlib.sha256()
    for tensor in (batch.input_ids, batch.targets, batch.scored):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# Token tables -----------------------------------------------------------------------------------
def validate_probe(sequences: pd.DataFrame, tokens: pd.DataFrame, where: str) -> None:
    for frame, columns, name in (
        (sequences, SEQUENCE_COLUMNS, "sequences.parquet"),
        (tokens, TOKEN_COLUMNS, "tokens.parquet"),
    ):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise StoreError(
                f"{where}/{name} lacks columns {missing}; it needs {list(columns)} "
                f"(has {list(frame.columns)}). Regenerate the probe set with `polca train`."
            )
    if not np.array_equal(tokens["token"].to_numpy(), np.arange(len(tokens))):
        raise StoreError(f"{where}/tokens.parquet: column 'token' must be 0..{len(tokens) - 1}")
    known = set(sequences["sequence"].tolist())
    unknown = set(tokens["sequence"].tolist()) - known
    if unknown:
        raise StoreError(f"{where}/tokens.parquet names sequences not in sequences.parquet: "
                         f"{sorted(unknown)[:5]}")


def probe_sha256(sequences: pd.DataFrame, tokens: pd.DataFrame) -> str:
    """Content hash of a probe set (its two tables)."""
    return sha256_json([frame_sha256(sequences), frame_sha256(tokens)])


def probe_batch(sequences: pd.DataFrame, tokens: pd.DataFrame) -> ProbeBatch:
    """The ``[batch, seq]`` tensors of probe tables (:meth:`ProbeBatch.from_tables`)."""
    try:
        return ProbeBatch.from_tables(sequences, tokens)
    except ValueError as err:
        raise StoreError(f"tokens.parquet: {err}") from None


# Arrays ------------------------------------------------------------------------------------------
class ArrayStore:
    """Chunked arrays in ``arrays.zarr`` with per-block completion markers."""

    def __init__(self, root: Path, progress: Path):
        self.root = Path(root)
        self.progress = Path(progress)
        self.group = zarr.open_group(str(self.root), mode="a")

    def require(
        self,
        name: str,
        shape: Sequence[int],
        chunks: Sequence[int],
        dims: Sequence[str],
        dtype: str = "float64",
        attrs: dict | None = None,
    ) -> zarr.Array:
        """Open array ``name``, creating it if absent; an existing array must have ``shape``."""
        shape = tuple(int(s) for s in shape)
        if name in self:
            array = self.group[name]
            if tuple(array.shape) != shape:
                raise StoreError(
                    f"array {name!r} in {self.root} has shape {tuple(array.shape)} but this stage "
                    f"needs {shape} (the config or probe set changed). Delete {self.root / name} "
                    f"and {self.progress / name} to recompute it, or use a new run name."
                )
            return array
        # the attributes go in with the array's metadata: one atomic write, never one without
        return self.group.create_array(
            name, shape=shape, chunks=tuple(int(c) for c in chunks), dtype=dtype,
            fill_value=np.nan if np.dtype(dtype).kind == "f" else 0, dimension_names=tuple(dims),
            attributes=dict(attrs or {}),
        )

    def __contains__(self, name: str) -> bool:
        try:
            node = self.group[name]
        except KeyError:
            return False
        return isinstance(node, zarr.Array)

    def write_block(self, name: str, index, data, key) -> None:
        """Write ``data`` at ``index`` of array ``name``, then mark block ``key`` done."""
        self.group[name][index] = np.asarray(data)
        marker = self.progress / name / str(key)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def done(self, name: str) -> set[str]:
        """Keys of the blocks of ``name`` that were completely written."""
        folder = self.progress / name
        if not folder.is_dir():
            return set()
        return {p.name for p in folder.iterdir() if p.is_file()}

    def is_done(self, name: str, key) -> bool:
        return (self.progress / name / str(key)).is_file()

    def complete(self, name: str, keys) -> bool:
        """Whether every block in ``keys`` of ``name`` is done."""
        return name in self and all(self.is_done(name, k) for k in keys)

    def read(self, name: str) -> np.ndarray:
        if name not in self:
            raise StoreError(f"array {name!r} is not in {self.root}: run the stage that writes it")
        return self.group[name][...]

    def block(self, name: str, index) -> np.ndarray:
        """``array[index]`` of array ``name``, read without loading the rest."""
        return np.asarray(self.group[name][index])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.group[name].shape)

    def chunks(self, name: str) -> tuple[int, ...]:
        return tuple(self.group[name].chunks)

    def attrs(self, name: str) -> dict:
        return dict(self.group[name].attrs)

    def dims(self, name: str) -> tuple[str, ...]:
        return tuple(self.group[name].metadata.dimension_names or ())

    def members(self, prefix: str) -> list[str]:
        """Names of the arrays directly under group ``prefix`` (e.g. ``polca`` → its bases)."""
        try:
            node = self.group[prefix]
        except KeyError:
            return []
        return sorted(node.group_keys() if isinstance(node, zarr.Group) else [])

    def discard(self, name: str) -> None:
        """Remove array (or group) ``name`` and its markers: markers first, so a kill in
        between leaves blocks that are recomputed, never ones counted done."""
        shutil.rmtree(self.progress / name, ignore_errors=True)
        if name in self or name in self.group:
            del self.group[name]


# The run directory ------------------------------------------------------------------------------
PARTIAL = ".partial"
EVALUATION_ORDER = ("carry", "hidden", "scores", "clusters")
POS_CLUSTERS = "pos_clusters.parquet"
TOKENIZER_FILE = "tokenizer.json"
# Checkpoint-folder files that are not the model (a Trainer's optimiser state, logs).
NOT_WEIGHTS = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state")

_LOCKS: dict[Path, object] = {}
_LOCKS_GUARD = threading.Lock()


@dataclass
class Clustering:
    """One clustering as the cluster stage wrote it: ``frame`` ([vector,] token, label,
    break_step), ``breaks`` (per cluster: [vector,] cluster, size, break_step, hidden) and
    ``info`` (``params`` that reproduce it, counts)."""

    name: str
    frame: pd.DataFrame
    info: dict
    breaks: pd.DataFrame | None = None

    @property
    def params(self) -> dict:
        return self.info.get("params") or {}

    @property
    def kind(self) -> str:
        return str(self.params.get("kind") or self.name)

    @property
    def basis(self) -> str | None:
        return self.params.get("basis")

    def vectors(self) -> list:
        """The basis vectors clustered (``[None]`` for kinds without one)."""
        return [int(v) for v in sorted(self.frame["vector"].unique())] \
            if "vector" in self.frame else [None]

    def labels(self, vector, n_tokens: int) -> np.ndarray:
        """``[tokens]`` cluster id per probe token (tokens absent from the file: FILTERED)."""
        rows = self.frame if vector is None else self.frame[self.frame["vector"] == vector]
        out = np.full(n_tokens, FILTERED, dtype=np.int64)
        out[rows["token"].to_numpy()] = rows["label"].to_numpy()
        return out

    def labels_by_vector(self, n_tokens: int) -> dict:
        """``{vector or None: labels [tokens]}``; every vector must cover every token."""
        out = {}
        for vector in self.vectors():
            rows = self.frame if vector is None else self.frame[self.frame["vector"] == vector]
            if not np.array_equal(np.sort(rows["token"].to_numpy()), np.arange(n_tokens)):
                raise StoreError(f"clusters/{self.name}.parquet does not cover the {n_tokens} "
                                 "probe tokens (probe set changed?); run `polca cluster`")
            out[vector] = self.labels(vector, n_tokens)
        return out

    def breaks_of(self, vector) -> pd.DataFrame | None:
        """Per cluster (index) size, break_step and hidden, or None if not recorded."""
        frame = self.breaks
        if frame is None or "cluster" not in frame:
            return None
        if vector is not None and "vector" in frame:
            frame = frame[frame["vector"] == vector]
        return frame.set_index("cluster")


@dataclass
class RunDir:
    """One run directory: its paths, and a reader and a writer for every file in it."""

    root: Path
    say: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr),
                                       repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # -- paths (documented in the module docstring) -------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def probe(self) -> Path:
        return self.root / "probe"

    @property
    def basis(self) -> Path:
        return self.root / "basis"

    @property
    def diagnostics(self) -> Path:
        return self.root / "diagnostics"

    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def progress(self) -> Path:
        return self.root / ".progress"

    @property
    def tokenizer_path(self) -> Path:
        """Where the text task keeps the tokenizer it trained, to reuse it on reopening."""
        return self.root / TOKENIZER_FILE

    def write_task_files(self, files: Mapping[str, bytes]) -> None:
        """Keep a task's files (``task.run_files()``: the text task's ``tokenizer.json``) in
        the run directory, once."""
        for name, data in files.items():
            if name != TOKENIZER_FILE:
                raise StoreError(f"a task may keep only {TOKENIZER_FILE} in a run, not {name!r}")
            if not (self.root / name).is_file():
                atomic_write_bytes(self.root / name, data)

    def exists(self) -> bool:
        """Whether the run was created (its config is written last when a run is made)."""
        return self.config_path.is_file()

    # -- the lock ------------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for this process; another process gets :class:`RunLocked` at once.

        The lock is an OS file lock, released when the process ends however it ends, and
        re-entrant within one process."""
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        path = (self.root / ".lock").resolve()
        with _LOCKS_GUARD:
            lock = _LOCKS.setdefault(path, FileLock(str(path), thread_local=False))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            owner = (self.root / ".lock.pid").read_text().strip() \
                if (self.root / ".lock.pid").is_file() else "?"
            raise RunLocked(f"another polca process (pid {owner}) is working on {self.root}; "
                            "wait for it to finish, or stop it") from None
        try:
            if lock.lock_counter == 1:
                (self.root / ".lock.pid").write_text(f"{os.getpid()}\n")
            yield
        finally:
            lock.release()

    # -- config --------------------------------------------------------------------------------
    def write_config(self, text: str) -> None:
        """Write ``config.toml`` (the resolved config as TOML)."""
        atomic_write_bytes(self.config_path, text.encode())

    def config_text(self) -> str | None:
        """``config.toml`` as text, or None before the run is created."""
        return self.config_path.read_text() if self.config_path.is_file() else None

    def config_value(self, keys: Sequence[str], default):
        """One value of the stored config (``("report", "examples_per_cluster")``), or
        ``default`` when the run has no config or the key is absent."""
        import tomllib

        text = self.config_text()
        if text is None:
            return default
        value = tomllib.loads(text)
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return default
            value = value[key]
        return value

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint_store(self) -> CheckpointStore:
        """The built-in training's :class:`~polca.checkpoints.CheckpointStore`."""
        return CheckpointStore(self.checkpoints)

    def checkpoint_manifest(self) -> list[dict] | None:
        """The manifest entries (step, file, sha256, train_loss) or None without training."""
        path = self.checkpoints / "manifest.json"
        if not path.is_file():
            return None
        return read_json(path).get("checkpoints")

    def write_source(self, metadata: dict) -> None:
        """``source.json``: what the run source records about an outside checkpoint series."""
        atomic_write_json(self.root / "source.json", metadata)

    def read_source(self) -> dict | None:
        """``source.json``, or None (runs polca trained, or sources that record nothing)."""
        path = self.root / "source.json"
        return read_json(path) if path.is_file() else None

    def files_sha256(self, paths: Sequence[Path]) -> str:
        """One content hash of files outside the run (a checkpoint folder counts its weight
        files), each file hashed once and remembered by its size and modification time."""
        cache_path = self.progress / "file-hashes.json"
        cache = read_json(cache_path) if cache_path.is_file() else {}
        hashes, changed = [], False
        for path in paths:
            files = [Path(path)] if Path(path).is_file() else sorted(
                p for p in Path(path).rglob("*") if p.is_file()
                and not p.name.startswith(NOT_WEIGHTS) and not p.name.startswith("."))
            for file in files:
                stat = file.stat()
                key = str(file.resolve())
                stamp = [stat.st_size, stat.st_mtime_ns]
                entry = cache.get(key)
                if entry is None or entry["stamp"] != stamp:
                    digest = hashlib.sha256()
                    with open(file, "rb") as handle:
                        for chunk in iter(lambda: handle.read(1 << 24), b""):
                            digest.update(chunk)
                    entry = cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
                    changed = True
                hashes.append([Path(file).name, entry["sha256"]])
        if changed:
            atomic_write_json(cache_path, cache)
        return sha256_json(hashes)

    # -- probe set -----------------------------------------------------------------------------
    def write_probe(self, sequences: pd.DataFrame, tokens: pd.DataFrame,
                    labels: Sequence[str] | None = None) -> str:
        """Store the probe set: ``sequences`` (sequence, input_ids) and ``tokens`` (one row per
        scored token: token, sequence, position, target, then text and labels), with the
        task's ``labels`` (the columns that are labels). Returns its content hash."""
        validate_probe(sequences, tokens, where=str(self.probe))
        digest = probe_sha256(sequences, tokens)
        atomic_write_json(self.probe / "probe.json", {
            "sha256": None, "labels": None if labels is None else list(labels)})
        atomic_write_parquet(self.probe / "sequences.parquet", sequences)
        atomic_write_parquet(self.probe / "tokens.parquet", tokens)
        # written last: a probe.json with a hash names complete tables
        atomic_write_json(self.probe / "probe.json", {
            "sha256": digest, "labels": None if labels is None else list(labels)})
        return digest

    def has_probe(self) -> bool:
        """Whether the probe set is stored."""
        return (self.probe / "tokens.parquet").is_file() and (
            self.probe / "sequences.parquet").is_file()

    def read_tokens(self) -> pd.DataFrame:
        """The token table: one row per scored probe token."""
        path = self.probe / "tokens.parquet"
        if not path.is_file():
            raise StoreError(f"no probe set at {path}: run `polca train` (it writes the probe set)")
        return pd.read_parquet(path)

    def read_sequences(self) -> pd.DataFrame:
        """The sequence table: one row per probe sequence."""
        path = self.probe / "sequences.parquet"
        if not path.is_file():
            raise StoreError(f"no probe set at {path}: run `polca train` (it writes the probe set)")
        return pd.read_parquet(path)

    def read_probe(self) -> tuple[ProbeBatch, pd.DataFrame]:
        """The probe set as a :class:`ProbeBatch` and its token table (rows in token order)."""
        tokens, sequences = self.read_tokens(), self.read_sequences()
        validate_probe(sequences, tokens, where=str(self.probe))
        return probe_batch(sequences, tokens), tokens

    def probe_sha256(self) -> str:
        """Content hash of the stored probe set (recorded when written, else computed)."""
        info = self.probe / "probe.json"
        if info.is_file():
            digest = read_json(info).get("sha256")
            if digest:
                return digest
        return probe_sha256(self.read_sequences(), self.read_tokens())

    def label_columns(self, tokens: pd.DataFrame | None = None) -> list[str]:
        """The label columns of the probe tokens (:func:`label_columns`, with the task's
        list when it was recorded)."""
        tokens = self.read_tokens() if tokens is None else tokens
        info = self.probe / "probe.json"
        declared = read_json(info).get("labels") if info.is_file() else None
        return label_columns(tokens, declared)

    # -- arrays --------------------------------------------------------------------------------
    def arrays(self) -> ArrayStore:
        """The chunked arrays (``arrays.zarr``) and their block markers."""
        return ArrayStore(self.root / "arrays.zarr", self.progress)

    def has_arrays(self) -> bool:
        """Whether any array was written."""
        return (self.root / "arrays.zarr").is_dir()

    def array_steps(self, name: str = LOSS) -> list[int] | None:
        """The training step of every checkpoint of array ``name`` (recorded with it)."""
        if not self.has_arrays():
            return None
        arrays = self.arrays()
        if name not in arrays:
            return None
        steps = arrays.attrs(name).get("steps")
        return None if steps is None else [int(s) for s in steps]

    def decomposed_bases(self) -> list[str]:
        """Bases with arrays under ``polca/``."""
        return self.arrays().members("polca") if self.has_arrays() else []

    def _kind_arrays(self, kind: str, basis: str | None) -> tuple[ArrayStore, tuple[str, ...]]:
        names = kind_arrays(kind, basis)
        arrays = self.arrays() if self.has_arrays() else None
        missing = [n for n in names if arrays is None or n not in arrays]
        if missing:
            raise StoreError(f"arrays {missing} are not in {self.root / 'arrays.zarr'}: run "
                             "`polca decompose`")
        return arrays, names

    def trajectory_terms(self, kind: str, basis: str | None, index=slice(None)) -> np.ndarray:
        """``[vector, time, token][index]`` float64 values of a projected kind's arrays, summed
        (the interval terms before cumulation, or per-checkpoint values for non-cumulative
        kinds); ``index`` reads a part only (``slice(v, v + 1)``: one vector, ``(slice(None),
        t)``: one interval)."""
        arrays, names = self._kind_arrays(kind, basis)
        return sum(np.asarray(arrays.block(n, index), dtype=np.float64) for n in names)

    def projected(self, kind: str, basis: str | None, vectors=slice(None)) -> np.ndarray:
        """``[vector, checkpoint, token]`` trajectories of a projected kind as they are
        clustered: the summed terms cumulated over intervals (``PL[:, 0] = 0``)."""
        from polca.cluster import cumulate

        terms = self.trajectory_terms(kind, basis, vectors)
        return cumulate(terms) if TRAJECTORY_KINDS[kind].cumulative else terms

    def dataset(self, group: str):
        """The arrays of ``group`` (``polca/<basis>``, ``lca``) as a lazily read
        :class:`xarray.Dataset` with coordinates ``step`` (per checkpoint) and ``step_start``,
        ``step_end`` (per interval), and ``tokens_seen`` (``tokens_seen_start``,
        ``tokens_seen_end``) where the source knows them (:meth:`tokens_seen`)."""
        import xarray as xr

        ds = xr.open_zarr(self.root / "arrays.zarr", group=group, consolidated=False,
                          chunks=None)
        steps = next((v.attrs["steps"] for v in ds.data_vars.values() if "steps" in v.attrs),
                     self.array_steps())
        coords = {}
        if steps is not None:
            if "checkpoint" in ds.dims:
                coords["step"] = ("checkpoint", list(steps))
            if "interval" in ds.dims:
                coords["step_start"] = ("interval", list(steps[:-1]))
                coords["step_end"] = ("interval", list(steps[1:]))
            tokens = self.tokens_seen(steps)
            if tokens is not None and "checkpoint" in ds.dims:
                coords["tokens_seen"] = ("checkpoint", tokens)
            if tokens is not None and "interval" in ds.dims:
                coords["tokens_seen_start"] = ("interval", tokens[:-1])
                coords["tokens_seen_end"] = ("interval", tokens[1:])
        return ds.assign_coords(coords)

    def tokens_seen(self, steps: Sequence[int]) -> list[int] | None:
        """Training tokens seen at each of ``steps``, as ``source.json`` records them (an
        outside series whose tokens per step are known), else None: an x axis in tokens."""
        source = self.read_source() or {}
        seen = {c["step"]: c.get("tokens_seen") for c in source.get("checkpoints", [])}
        values = [seen.get(int(step)) for step in steps]
        return None if any(v is None for v in values) else values

    # -- basis ---------------------------------------------------------------------------------
    def basis_names(self) -> list[str]:
        """The finished bases."""
        return sorted(p.stem for p in self.basis.glob("*.json")) if self.basis.is_dir() else []

    def has_basis(self, name: str, partial: bool = False) -> bool:
        """Whether basis ``name`` (or its partial, Algorithm 1 so far) is stored."""
        folder = self.basis / PARTIAL if partial else self.basis
        return (folder / f"{name}.json").is_file()

    def save_basis(self, basis, partial: bool = False) -> None:
        """Write ``basis/<name>.safetensors`` (tensor ``vectors``) then ``<name>.json``; the
        json is written last, so a reader that finds it also finds vectors at least as recent.
        ``partial``: the Algorithm 1 progress of a running basis stage."""
        from safetensors.torch import save as save_safetensors

        folder = self.basis / PARTIAL if partial else self.basis
        atomic_write_bytes(folder / f"{basis.name}.safetensors",
                           save_safetensors({"vectors": basis.vectors.contiguous()}))
        atomic_write_json(folder / f"{basis.name}.json", basis.metadata())

    def load_basis(self, name: str, dim: int | None = None, partial: bool = False):
        """The :class:`~polca.bases.Basis` ``name``; ``dim`` is the model's parameter count.
        A partial basis keeps the rows its json describes (a save interrupted between the two
        files leaves the vectors ahead)."""
        from polca.bases import Basis, BasisError

        folder = self.basis / PARTIAL if partial else self.basis
        meta_path, vectors_path = folder / f"{name}.json", folder / f"{name}.safetensors"
        for path in (meta_path, vectors_path):
            if not path.is_file():
                raise StoreError(f"basis file {path} does not exist: run `polca basis` first")
        meta = read_json(meta_path)
        vectors = read_vectors(vectors_path)
        entries = meta["vectors"]
        if partial and len(vectors) > len(entries):
            vectors = vectors[: len(entries)]
        if dim is not None and vectors.shape[1] != dim:
            raise BasisError(
                f"{vectors_path} has vectors of dimension {vectors.shape[1]} but the model has "
                f"{dim} parameters in θ: the basis was made for another model or parameter "
                f"selection. Rebuild it (delete {vectors_path} and {meta_path}, run `polca basis`)."
            )
        if len(vectors) != len(entries):
            raise BasisError(f"{vectors_path} holds {len(vectors)} vectors but {meta_path} "
                             f"describes {len(entries)}; delete both and rebuild the basis")
        return Basis(meta["name"], meta["kind"], vectors, entries, meta.get("params", {}))

    def discard_basis(self, name: str, partial: bool = False) -> None:
        """Remove basis ``name`` (or its partial)."""
        folder = self.basis / PARTIAL if partial else self.basis
        for suffix in (".json", ".safetensors"):  # json first: a basis is judged by its json
            (folder / f"{name}{suffix}").unlink(missing_ok=True)
        if partial and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def basis_documents(self) -> dict[str, dict]:
        """``{name: basis/<name>.json}`` (provenance and parameters) for every basis."""
        return {name: read_json(self.basis / f"{name}.json") for name in self.basis_names()}

    def basis_sha256(self, name: str) -> str:
        """Content hash of a finished basis: its vectors and eigenvalues (all the decompose
        stage reads of it)."""
        basis = self.load_basis(name)
        digest = hashlib.sha256(basis.vectors.numpy().tobytes())
        digest.update(json.dumps([e.get("eigenvalue") for e in basis.provenance]).encode())
        return digest.hexdigest()

    # -- diagnostics ---------------------------------------------------------------------------
    def write_diagnostics(self, name: str, summary: dict) -> None:
        """``diagnostics/<basis>.json``: the decompose stage's summary of one basis (left
        untouched when it already holds the same summary)."""
        path = self.diagnostics / f"{name}.json"
        if path.is_file() and read_json(path) == json.loads(json.dumps(summary)):
            return
        atomic_write_json(path, summary)

    def read_diagnostics(self) -> dict[str, dict]:
        """``{basis: summary}`` of :class:`~polca.decompose.DecompositionDiagnostics`."""
        if not self.diagnostics.is_dir():
            return {}
        return {p.stem: read_json(p) for p in sorted(self.diagnostics.glob("*.json"))}

    # -- clusterings ---------------------------------------------------------------------------
    def write_clustering(self, name: str, tokens: pd.DataFrame, breaks: pd.DataFrame,
                         info: dict) -> None:
        """Write the three files of a clustering; the json last (it marks it complete)."""
        atomic_write_parquet(self.clusters / f"{name}.parquet", tokens)
        atomic_write_parquet(self.clusters / f"{name}.breaks.parquet", breaks)
        atomic_write_json(self.clusters / f"{name}.json", info)

    def clustering_names(self) -> list[str]:
        """Names of the complete clusterings (those with their json and labels)."""
        if not self.clusters.is_dir():
            return []
        return sorted(p.stem for p in self.clusters.glob("*.json")
                      if (self.clusters / f"{p.stem}.parquet").is_file())

    def clustering_infos(self) -> dict[str, dict]:
        """``{name: clusters/NAME.json}`` (parameters and counts) of every complete
        clustering, read without its labels."""
        return {name: read_json(self.clusters / f"{name}.json")
                for name in self.clustering_names()}

    def has_clustering(self, name: str) -> bool:
        """Whether clustering ``name`` is complete."""
        return name in self.clustering_names()

    def read_clustering(self, name: str) -> Clustering:
        """One clustering (:class:`Clustering`: labels, per-cluster breaks, parameters)."""
        frame = pd.read_parquet(self.clusters / f"{name}.parquet")
        info_path = self.clusters / f"{name}.json"
        breaks_path = self.clusters / f"{name}.breaks.parquet"
        return Clustering(name, frame, read_json(info_path) if info_path.is_file() else {},
                          pd.read_parquet(breaks_path) if breaks_path.is_file() else None)

    def read_clusterings(self) -> tuple[list[Clustering], list[str]]:
        """Every clustering in ``clusters/`` and notes on the files that could not be used."""
        out, problems = [], []
        paths = sorted(self.clusters.glob("*.parquet")) if self.clusters.is_dir() else []
        for path in paths:
            if path.name.endswith(".breaks.parquet"):
                continue
            clustering = self.read_clustering(path.stem)
            if not {"token", "label"} <= set(clustering.frame.columns):
                problems.append(f"{path.name} lacks the columns token and label (has "
                                f"{list(clustering.frame.columns)}); re-run `polca cluster`")
                continue
            out.append(clustering)
        return out, problems

    def read_breaks(self) -> dict[str, pd.DataFrame]:
        """``{clustering: its per-cluster break table}`` for every clustering that has one."""
        if not self.clusters.is_dir():
            return {}
        return {p.name.removesuffix(".breaks.parquet"): pd.read_parquet(p)
                for p in sorted(self.clusters.glob("*.breaks.parquet"))}

    def discard_clustering(self, name: str) -> None:
        """Remove clustering ``name``."""
        for suffix in (".json", ".parquet", ".breaks.parquet"):  # json first
            (self.clusters / f"{name}{suffix}").unlink(missing_ok=True)

    # -- evaluation ----------------------------------------------------------------------------
    def write_evaluation(self, tables: Mapping[str, pd.DataFrame],
                         pos_clusters: pd.DataFrame | None = None) -> None:
        """``evaluation/<table>.csv`` for each table, ``summary.json`` (all tables as records,
        written last) and the POS cluster table of a text run."""
        for key, frame in tables.items():
            atomic_write_bytes(self.evaluation / f"{key}.csv", frame.to_csv(index=False).encode())
        if pos_clusters is not None:
            atomic_write_parquet(self.evaluation / POS_CLUSTERS, pos_clusters)
        atomic_write_json(self.evaluation / "summary.json", {
            key: json.loads(frame.to_json(orient="records")) for key, frame in tables.items()})

    def has_evaluation(self) -> bool:
        """Whether a complete evaluation is stored (``summary.json`` is written last)."""
        return (self.evaluation / "summary.json").is_file()

    def discard_evaluation(self) -> None:
        """Remove the evaluation."""
        (self.evaluation / "summary.json").unlink(missing_ok=True)  # first: marks it complete
        if self.evaluation.is_dir():
            for path in self.evaluation.iterdir():
                path.unlink()

    def evaluation_names(self) -> list[str]:
        """The evaluation tables, the reproduction tables first."""
        first = {name: i for i, name in enumerate(EVALUATION_ORDER)}
        paths = self.evaluation.glob("*.csv") if self.evaluation.is_dir() else []
        return sorted((p.stem for p in paths), key=lambda n: (first.get(n, len(first)), n))

    def read_evaluation_table(self, name: str) -> pd.DataFrame | None:
        """One evaluation table; None when absent or empty (a table without rows)."""
        path = self.evaluation / f"{name}.csv"
        if not path.is_file() or path.stat().st_size <= 1:
            return None
        return pd.read_csv(path)

    def read_evaluation(self) -> dict[str, pd.DataFrame]:
        """Every evaluation table by name (empty tables as empty frames)."""
        return {name: self.read_evaluation_table(name) if (self.evaluation / f"{name}.csv")
                .stat().st_size > 1 else pd.DataFrame() for name in self.evaluation_names()}

    def read_pos_clusters(self) -> pd.DataFrame | None:
        """The POS label table of every cluster (text runs), or None."""
        path = self.evaluation / POS_CLUSTERS
        return pd.read_parquet(path) if path.is_file() else None

    # -- measures ------------------------------------------------------------------------------
    def require_measures(self, n_checkpoints: int, names: list[str], steps: list[int],
                         reference: dict) -> None:
        """Create the ``measures`` array ``[checkpoint, measure]`` (or check its columns)."""
        arrays = self.arrays()
        if MEASURES in arrays and arrays.attrs(MEASURES).get("measures") != names:
            raise StoreError(
                f"array {MEASURES!r} holds measures {arrays.attrs(MEASURES).get('measures')} but "
                f"this run computes {names}; delete {arrays.root / MEASURES} and "
                f"{arrays.progress / MEASURES} to recompute")
        arrays.require(MEASURES, (n_checkpoints, len(names)), (1, len(names)),
                       ("checkpoint", "measure"),
                       attrs={"steps": steps, "measures": names, "reference": reference})

    def has_measures(self) -> bool:
        """Whether progress measures are stored."""
        return self.has_arrays() and MEASURES in self.arrays()

    def read_measures(self) -> pd.DataFrame:
        """``[checkpoint × measure]`` table indexed by ``step``; ``.attrs["reference"]`` holds
        the true outputs' repetition and entropy. Rows not yet computed are NaN."""
        arrays = self.arrays()
        values = arrays.read(MEASURES)
        attrs = arrays.attrs(MEASURES)
        table = pd.DataFrame(values, columns=attrs["measures"],
                             index=pd.Index(attrs["steps"], name="step"))
        table.attrs["reference"] = attrs.get("reference", {})
        return table

    # -- report --------------------------------------------------------------------------------
    def write_report(self, page: str, figures: Mapping[str, bytes]) -> Path:
        """``report/index.html`` and its figures beside it (PNG bytes by file name); figures
        of an earlier report that this one does not have are removed."""
        if self.report.is_dir():
            for old in self.report.glob("*.png"):
                if old.name not in figures:
                    old.unlink()
        for name, png in figures.items():
            atomic_write_bytes(self.report / name, png)
        path = self.report_path()
        atomic_write_bytes(path, page.encode("utf-8"))
        return path

    def report_path(self) -> Path:
        """Where the report page is (or will be)."""
        return self.report / "index.html"

    def write_summary(self, summary: dict) -> None:
        """``report/summary.json``: the run's identity and findings as data (written with the
        page; the documentation's measured numbers are rendered from it)."""
        atomic_write_json(self.report / "summary.json", summary)

    def read_summary(self) -> dict | None:
        """``report/summary.json``, or None before the report stage ran."""
        path = self.report / "summary.json"
        return read_json(path) if path.is_file() else None

    # -- stage times ---------------------------------------------------------------------------
    def record_time(self, stage: str, seconds: float) -> None:
        """Record that ``stage`` just worked ``seconds`` (wall clock), with the machine's CPU
        count, torch's thread count and the 1-minute load average, in
        ``.progress/times.json``."""
        path = self.progress / "times.json"
        times = read_json(path) if path.is_file() else {}
        times[stage] = {"seconds": round(float(seconds), 1), "cpus": os.cpu_count(),
                        "threads": torch.get_num_threads(),
                        "load": round(os.getloadavg()[0], 2)}
        atomic_write_json(path, times)

    def stage_times(self) -> dict[str, dict]:
        """``{stage: {seconds, cpus, load}}`` of the stages that recorded a time."""
        path = self.progress / "times.json"
        return read_json(path) if path.is_file() else {}

    # -- input fingerprints --------------------------------------------------------------------
    def _inputs_path(self, product: str) -> Path:
        return self.progress / "inputs" / f"{product}.json"

    def recorded_inputs(self, product: str) -> dict | None:
        """The inputs ``product`` was computed from, as recorded (None: no record)."""
        path = self._inputs_path(product)
        return read_json(path) if path.is_file() else None

    def record_inputs(self, product: str, inputs: dict) -> None:
        """Record the inputs ``product`` is computed from."""
        atomic_write_json(self._inputs_path(product), json.loads(json.dumps(inputs)))

    def is_current(self, product: str, inputs: dict) -> bool:
        """Whether ``product`` was computed from exactly ``inputs``."""
        return self.recorded_inputs(product) == json.loads(json.dumps(inputs))

    def version(self, product: str) -> str | None:
        """The identity of a product: the hash of the inputs it was computed from (None when
        it records none, e.g. written by hand)."""
        inputs = self.recorded_inputs(product)
        return None if inputs is None else sha256_json(inputs)

    def refresh(self, product: str, inputs: dict, discard: Callable[[], None],
                exists: bool = True) -> bool:
        """Make ``product`` current for ``inputs``: when it was computed from other inputs,
        ``discard()`` it and say so in one line. Records ``inputs`` (before any block of the
        new product is written). ``exists``: whether anything of the product is on disk (a
        product without recorded inputs is then treated as stale). Returns whether it was
        discarded."""
        if self.is_current(product, inputs):
            return False
        inputs = json.loads(json.dumps(inputs))
        recorded = self.recorded_inputs(product)
        stale = recorded is not None or exists
        if stale:
            changed = sorted(k for k in set(inputs) | set(recorded or {})
                             if (recorded or {}).get(k) != inputs.get(k))
            what = ", ".join(changed) if recorded is not None else "no record of its inputs"
            self.say(f"{product}: inputs changed ({what}); recomputing it")
            discard()
        self.record_inputs(product, inputs)
        return stale


def read_vectors(path: Path) -> torch.Tensor:
    """``vectors [m, d]`` (float64) of a safetensors file holding a tensor ``vectors``."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from polca.bases import BasisError

    if not Path(path).is_file():
        raise BasisError(f"basis file {path} does not exist; give a safetensors file holding "
                         "'vectors' [m, d]")
    try:
        tensors = load_safetensors(Path(path).read_bytes())
    except (SafetensorError, OSError) as err:
        raise BasisError(f"{path} is not a readable safetensors file ({err}); write the basis "
                         "with safetensors.torch.save_file({'vectors': V}, path)") from None
    if "vectors" not in tensors:
        raise BasisError(f"{path} has no tensor named 'vectors' (it has {sorted(tensors)}); "
                         "save the [m, d] basis matrix under the name 'vectors'")
    vectors = tensors["vectors"]
    if vectors.ndim != 2 or not vectors.is_floating_point():
        raise BasisError(f"{path}: 'vectors' must be a float matrix [m, d]; got "
                         f"{vectors.dtype} of shape {tuple(vectors.shape)}")
    return vectors.to(torch.float64)


def describe() -> str:
    """The run directory as markdown (docs/run-directory.md), from this module's docstrings."""
    doc = __doc__.split("Example:")[0].rstrip()
    title, _, body = doc.partition("\n\n")
    lines = [
        "# The run directory",
        "",
        "<!-- generated by `python -m polca.store > docs/run-directory.md`; do not edit -->",
        "",
        title, "", body.strip(), "",
        "## Arrays (`arrays.zarr`)", "",
        "| array | contents |", "|---|---|",
        *(f"| `{name}` | {_cell(text)} |" for name, text in ARRAYS.items()), "",
        "## Trajectory kinds", "",
        " ".join((TrajectoryKind.__doc__ or "").split()), "",
        "| kind | built from | cumulated | sign filters | meaning |", "|---|---|---|---|---|",
        *(f"| `{k.name}` | {', '.join(kind_arrays(k.name, 'BASIS'))} | "
          f"{'yes' if k.cumulative and k.source != 'loss' else 'no'} | "
          f"{'yes' if k.allocation else 'no'} | {_cell(k.doc)} |"
          for k in TRAJECTORY_KINDS.values()),
        "",
        "## Cluster labels", "",
        "`clusters/NAME.parquet` holds one label per token (per vector and token for kinds with "
        "a basis): `>= 0` a cluster, largest first; "
        + "; ".join(f"`{v}` {name}" for v, name in LABEL_VALUES.items()) + ".", "",
        "## Label columns", "",
        " ".join((label_columns.__doc__ or "").split("\n\n")[0].split()), "",
        "## Readers and writers (`polca.store.RunDir`)", "",
        " ".join((RunDir.__doc__ or "").split()), "",
    ]
    for name in sorted(vars(RunDir)):
        member = vars(RunDir)[name]
        if name.startswith("_") or not callable(member) or not member.__doc__:
            continue
        first = " ".join(member.__doc__.split("\n\n")[0].split())
        lines.append(f"- `{name}`: {first}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    print(describe(), end="")
