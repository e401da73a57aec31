"""What a stage is doing, told to people: progress bars on a terminal, plain lines elsewhere.

Stages count their work in blocks (checkpoints, intervals, vectors, clusterings) and open one
:func:`bar` per loop with how many blocks there are and how many are already on disk. A bar
is drawn only on a terminal (or in a notebook), so a log file gets no carriage-return
updates; a loop that resumes says so in one line either way (``decompose hessian: resuming:
2/20 intervals on disk``). Every bar of a stage is recorded in the current :class:`Journal`,
from which the command line tells a stage that had nothing to do ("done (skipped)") from one
that worked, and how far an interrupted stage got.

Example:
    >>> with journal() as log:
    ...     with bar(True, total=4, done=4, desc="token losses", unit="checkpoint") as b:
    ...         pass
    >>> log.skipped, log.position()
    (True, '4/4 checkpoints')
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

from tqdm.auto import tqdm


def interactive() -> bool:
    """Whether bars are drawn: on a terminal, or in a notebook (``tqdm.auto`` draws them as
    widgets there), never into a file or a pipe."""
    if bool(getattr(sys.stderr, "isatty", lambda: False)()):
        return True
    return "ipykernel" in sys.modules


def say(line: str) -> None:
    """One line to standard error, without breaking a bar being drawn."""
    tqdm.write(line, file=sys.stderr)


@dataclass
class Bar:
    """One loop over blocks: ``total`` blocks, ``done`` of them on disk (those found at the
    start and those written since). Counts even when nothing is drawn."""

    desc: str
    unit: str
    total: int
    found: int
    done: int
    _tqdm: object = field(default=None, repr=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._tqdm is not None:
            self._tqdm.update(n)

    def set_postfix(self, **values) -> None:
        if self._tqdm is not None:
            self._tqdm.set_postfix(**values)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def position(self) -> str:
        """``"2/20 intervals"``."""
        return f"{self.done}/{self.total} {_plural(self.unit, self.total)}"


@dataclass
class Journal:
    """The bars one stage opened, in order."""

    bars: list[Bar] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        """Whether the stage found every block of every loop on disk (and opened one)."""
        return bool(self.bars) and all(b.found == b.total for b in self.bars)

    def position(self) -> str | None:
        """How far the last loop with work got, e.g. ``"2/20 intervals"`` (None: no loop)."""
        working = [b for b in self.bars if b.found < b.total] or self.bars
        return working[-1].position() if working else None


_JOURNALS: list[Journal] = []


@contextmanager
def journal():
    """Record every :func:`bar` opened inside the block in a new :class:`Journal`."""
    log = Journal()
    _JOURNALS.append(log)
    try:
        yield log
    finally:
        _JOURNALS.remove(log)


def bar(enabled: bool, total: int, done: int = 0, desc: str = "", unit: str = "block") -> Bar:
    """A progress bar over ``total`` blocks of which ``done`` are on disk.

    ``enabled`` (a stage's ``progress`` argument): tell the user at all. When enabled, a loop
    that resumes (0 < done < total) says so in one line, and a bar is drawn when standard
    error is a terminal; a bar with nothing left to do draws nothing.
    """
    found = min(int(done), int(total))
    drawn = enabled and interactive() and found < total
    if enabled and 0 < found < total:
        say(f"{desc}: resuming: {found}/{total} {_plural(unit, total)} on disk")
    handle = tqdm(total=total, initial=found, desc=desc, unit=unit) if drawn else None
    out = Bar(desc, unit, int(total), found, found, handle)
    for log in _JOURNALS:
        log.bars.append(out)
    return out


def _plural(unit: str, n: int) -> str:
    return unit if n == 1 or unit.endswith("s") else f"{unit}s"


def duration(seconds: float) -> str:
    """``"3 min 12 s"``, ``"4.1 s"``.

    >>> duration(4.12), duration(192.4), duration(3725)
    ('4.1 s', '3 min 12 s', '1 h 2 min')
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
