"""The run directory: the contract between stages, and its chunked array store.

Layout (see ARCHITECTURE.md)::

    runs/NAME/
      config.toml  checkpoints/  probe/{sequences,tokens}.parquet  arrays.zarr/
      basis/  clusters/  report/  .progress/

Arrays are zarr arrays with named dimensions. A stage writes one block (e.g. one checkpoint
interval) at a time and only then drops an empty marker file in ``.progress/<array>/<key>``;
a killed stage therefore resumes at the first block without a marker and never counts a
half-written block as done.

Example:
    >>> run = RunDir("/tmp/polca-doc-run")
    >>> arrays = run.arrays()
    >>> loss = arrays.require("loss", shape=(5, 3), chunks=(5, 1), dims=("token", "checkpoint"))
    >>> arrays.write_block("loss", (slice(None), 0), np.zeros(5), key=0)
    >>> sorted(arrays.done("loss"))
    [0]
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from polca.functional import ProbeBatch

SEQUENCE_COLUMNS = ("sequence", "input_ids")
TOKEN_COLUMNS = ("token", "sequence", "position", "target")


class StoreError(RuntimeError):
    """A run directory file is missing, malformed or inconsistent; the message names the fix."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ArrayStore:
    """Chunked float arrays in ``arrays.zarr`` with per-block completion markers."""

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
        array = self.group.create_array(
            name, shape=shape, chunks=tuple(int(c) for c in chunks), dtype=dtype,
            fill_value=np.nan if np.dtype(dtype).kind == "f" else 0, dimension_names=tuple(dims),
        )
        if attrs:
            array.attrs.update(attrs)
        return array

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

    def read(self, name: str) -> np.ndarray:
        if name not in self:
            raise StoreError(f"array {name!r} is not in {self.root}: run the stage that writes it")
        return self.group[name][...]

    def attrs(self, name: str) -> dict:
        return dict(self.group[name].attrs)

    def dims(self, name: str) -> tuple[str, ...]:
        return tuple(self.group[name].metadata.dimension_names or ())


class RunDir:
    """Paths of one run and readers/writers for the files the stages share."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

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
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def progress(self) -> Path:
        return self.root / ".progress"

    def arrays(self) -> ArrayStore:
        return ArrayStore(self.root / "arrays.zarr", self.progress)

    # probe set -------------------------------------------------------------------------------
    def write_probe(self, sequences: pd.DataFrame, tokens: pd.DataFrame) -> None:
        """Store the probe set: ``sequences`` (sequence, input_ids) and ``tokens`` (one row per
        scored token: token, sequence, position, target, then text and labels)."""
        validate_probe(sequences, tokens, where=str(self.probe))
        atomic_write_parquet(self.probe / "sequences.parquet", sequences)
        atomic_write_parquet(self.probe / "tokens.parquet", tokens)

    def has_probe(self) -> bool:
        return (self.probe / "tokens.parquet").is_file() and (
            self.probe / "sequences.parquet"
        ).is_file()

    def read_tokens(self) -> pd.DataFrame:
        path = self.probe / "tokens.parquet"
        if not path.is_file():
            raise StoreError(f"no probe set at {path}: run `polca train` (it writes the probe set)")
        return pd.read_parquet(path)

    def read_probe(self) -> tuple[ProbeBatch, pd.DataFrame]:
        """The probe set as a :class:`ProbeBatch` and its token table (rows in token order)."""
        tokens = self.read_tokens()
        sequences = pd.read_parquet(self.probe / "sequences.parquet")
        validate_probe(sequences, tokens, where=str(self.probe))
        return probe_batch(sequences, tokens), tokens


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


def probe_batch(sequences: pd.DataFrame, tokens: pd.DataFrame) -> ProbeBatch:
    """Rebuild the padded ``[batch, seq]`` tensors; token order must be row-major (seq, pos)."""
    rows = {s: i for i, s in enumerate(sequences["sequence"].tolist())}
    lengths = [len(ids) for ids in sequences["input_ids"]]
    input_ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, ids in enumerate(sequences["input_ids"]):
        input_ids[i, : len(ids)] = torch.from_numpy(np.array(ids, dtype=np.int64))
    targets = torch.zeros_like(input_ids)
    scored = torch.zeros_like(input_ids, dtype=torch.bool)
    r = torch.tensor(tokens["sequence"].map(rows).to_numpy(np.int64))
    p = torch.tensor(tokens["position"].to_numpy(np.int64))
    order = r * input_ids.shape[1] + p
    if bool((order[1:] <= order[:-1]).any()):
        raise StoreError("tokens.parquet rows must be ordered by sequence, then position")
    targets[r, p] = torch.tensor(tokens["target"].to_numpy(np.int64))
    scored[r, p] = True
    return ProbeBatch(input_ids, targets, scored)
