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


def _umask() -> int:
    """The process's file-creation mask: from /proc on Linux, else read by setting it and
    putting it back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary(path: Path) -> tuple[int, str]:
    """A new file beside ``path`` with the mode a plain ``open`` would give it: mkstemp
    creates it 0600 whatever the umask, so results would be private to their writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers never see a torn
    file; the file gets the mode of a plain ``open`` (0666 less the umask)."""
    path = Path(path)
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path = Path(path)
    fd, tmp = _temporary(path)
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
