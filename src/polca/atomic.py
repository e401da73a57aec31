"""Files replaced atomically (written beside, then renamed), so a reader or a killed writer
never sees a torn file; the contract's modules write through these.

Example:
    >>> atomic_write_json(Path("/tmp/polca-doc-atomic/x.json"), {"a": 1})
    >>> read_json(Path("/tmp/polca-doc-atomic/x.json"))
    {'a': 1}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd


class StoreError(RuntimeError):
    """A run directory file is missing, malformed or inconsistent; the message names the fix."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers never see a torn file."""
    path = Path(path)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{path} is not valid JSON ({err}); delete it and re-run the stage "
                         "that writes it") from None
