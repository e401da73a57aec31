"""Executors: map a pure kernel over independent blocks (checkpoints, intervals).

A stage lists the blocks it still needs (those without a done marker in the run directory),
hands them with a pure function to an executor, and writes each result through the contract
as it arrives. The contract between stage and executor:

* ``fn(block) -> result`` is a pure function of its block: no I/O, no shared state, the same
  result for the same block wherever and whenever it runs. ``fn`` and every block are
  picklable (a top-level function, or :func:`functools.partial` of one with picklable
  arguments), so an executor may run them in other processes or on other machines.
* Blocks are independent: results may arrive in any order, and a stage killed mid-way
  resumes with the blocks it has no marker for. Results are therefore bit-identical however
  the blocks were spread out, and a resumed run equals an uninterrupted one.
* :meth:`Executor.map` yields ``(block, result)`` pairs lazily, as results become available;
  the stage writes each before asking for the next, so memory holds a bounded number of
  results.

:class:`InProcess` (the default) runs the blocks one after the other in this process. An
executor that fans blocks out (e.g. over a Ray cluster) implements the same
:class:`Executor` protocol and registers under a name in :data:`EXECUTORS`.

Example:
    >>> executor = make_executor("in-process")
    >>> [(block, result) for block, result in executor.map(abs, [-2, 3])]
    [(-2, 2), (3, 3)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar, runtime_checkable

Block = TypeVar("Block")
Result = TypeVar("Result")


@runtime_checkable
class Executor(Protocol):
    """Runs a pure function over independent blocks; see the module docstring."""

    def map(self, fn: Callable[[Block], Result], blocks: Iterable[Block]
            ) -> Iterator[tuple[Block, Result]]:
        """``(block, fn(block))`` for every block, in any order, as results are ready."""
        ...


class InProcess:
    """The blocks one after the other, in this process, in the order given."""

    def map(self, fn: Callable[[Block], Result], blocks: Iterable[Block]
            ) -> Iterator[tuple[Block, Result]]:
        for block in blocks:
            yield block, fn(block)


# name -> () -> Executor; other executors (Ray) add themselves here
EXECUTORS: dict[str, Callable[[], Executor]] = {"in-process": InProcess}


def make_executor(kind: str = "in-process") -> Executor:
    """The executor registered as ``kind``."""
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; known: {sorted(EXECUTORS)}")
    return EXECUTORS[kind]()


__all__ = ["EXECUTORS", "Executor", "InProcess", "make_executor"]
