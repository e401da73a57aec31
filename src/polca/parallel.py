"""Executors: map a pure kernel over independent blocks (checkpoints, intervals), and hold
stateful workers over the shards of a sample (Hessian-vector products).

A stage lists the blocks it still needs (those without a done marker in the run directory),
hands them with a pure function to an executor, and writes each result through the contract
as it arrives. The contract between stage and executor:

* ``fn(block) -> result`` is a pure function of its block: no I/O but reading its inputs (a
  block task loads its own checkpoints), no shared state, the same result for the same block
  wherever and whenever it runs. ``fn`` and every block are picklable (a top-level function,
  or :func:`functools.partial` of one with picklable arguments), so an executor may run them
  in other processes or on other machines.
* Blocks are independent: results may arrive in any order, and a stage killed mid-way
  resumes with the blocks it has no marker for. Results are therefore bit-identical however
  the blocks were spread out, and a resumed run equals an uninterrupted one.
* :meth:`Executor.map` yields ``(block, result)`` pairs lazily, as results become available;
  the stage writes each before asking for the next, so memory holds a bounded number of
  results. The driver alone writes the run directory (it holds the run's lock).
* :meth:`Executor.hold` builds one long-lived worker per shard (``factory(shard)``) and
  returns a :class:`WorkerGroup` whose :meth:`~WorkerGroup.call` runs a method on every worker
  and returns the results in shard order: :class:`ShardedHessian` keeps one
  :class:`~polca.curvature.HessianOperator` per sample shard (with its kept gradient graphs)
  for all the products of one basis checkpoint, and sums their products in shard order.

:class:`InProcess` (the default) runs everything one after the other in this process;
:class:`polca.ray_executor.RayExecutor` (``[ray]`` extra) fans blocks out over a Ray cluster
and holds the shard workers as Ray actors. Executors register under a name in
:data:`EXECUTORS`.

Example:
    >>> executor = make_executor("in-process")
    >>> [(block, result) for block, result in executor.map(abs, [-2, 3])]
    [(-2, 2), (3, 3)]
    >>> executor.hold(list, ["ab", "c"]).call("__len__")
    [2, 1]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from polca.curvature import HessianOperator
from polca.functional import ProbeBatch, TokenLoss
from polca.precision import arithmetic, model_dtype

Block = TypeVar("Block")
Result = TypeVar("Result")


@runtime_checkable
class WorkerGroup(Protocol):
    """Long-lived workers, one per shard, made by :meth:`Executor.hold`."""

    def call(self, method: str, *args) -> list:
        """``[getattr(worker, method)(*args) for worker]`` in shard order."""
        ...

    def close(self) -> None:
        """Release the workers (and what they hold: CPUs, GPUs, memory)."""
        ...


@runtime_checkable
class Executor(Protocol):
    """Runs a pure function over independent blocks; see the module docstring."""

    def map(self, fn: Callable[[Block], Result], blocks: Iterable[Block]
            ) -> Iterator[tuple[Block, Result]]:
        """``(block, fn(block))`` for every block, in any order, as results are ready."""
        ...

    def hold(self, factory: Callable[[Any], Any], shards: Sequence) -> WorkerGroup:
        """One worker ``factory(shard)`` per shard, kept until the group is dropped."""
        ...


class _LocalGroup:
    def __init__(self, workers: list):
        self.workers = workers

    def call(self, method: str, *args) -> list:
        return [getattr(worker, method)(*args) for worker in self.workers]

    def close(self) -> None:
        self.workers = []


class InProcess:
    """The blocks one after the other, in this process, in the order given."""

    def map(self, fn: Callable[[Block], Result], blocks: Iterable[Block]
            ) -> Iterator[tuple[Block, Result]]:
        for block in blocks:
            yield block, fn(block)

    def hold(self, factory: Callable[[Any], Any], shards: Sequence) -> WorkerGroup:
        return _LocalGroup([factory(shard) for shard in shards])


def _ray(**options) -> Executor:
    return importlib.import_module("polca.ray_executor").RayExecutor(**options)


# name -> (**options) -> Executor
EXECUTORS: dict[str, Callable[..., Executor]] = {"in-process": lambda **_: InProcess(),
                                                 "ray": _ray}


def make_executor(kind: str = "in-process", **options) -> Executor:
    """The executor registered as ``kind``; ``options`` go to its constructor (Ray:
    ``address``, ``gpus_per_task``; the in-process executor takes none)."""
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}; known: {sorted(EXECUTORS)}")
    return EXECUTORS[kind](**options)


# -- Hessian-vector products summed over sample shards --------------------------------------------

def shard_sample(sample: ProbeBatch, n: int) -> list[ProbeBatch]:
    """``sample`` cut into ``n`` contiguous shards of sequences (sizes differ by at most one;
    never an empty shard).

    >>> ids = torch.zeros(5, 2, dtype=torch.long)
    >>> [len(s) for s in shard_sample(ProbeBatch(ids, ids, torch.ones(5, 2, dtype=bool)), 2)]
    [3, 2]
    """
    rows = [r for r in np.array_split(np.arange(len(sample)), min(n, len(sample))) if len(r)]
    return [sample[torch.as_tensor(r)] for r in rows]


class _ShardHessian:
    """A :class:`HessianOperator` of one shard, its products in the given arithmetic."""

    def __init__(self, loss: TokenLoss, theta: torch.Tensor, batch_size: int, arithmetic: str,
                 shard: ProbeBatch):
        self.arithmetic = arithmetic
        self.operator = HessianOperator(loss, theta, shard, batch_size=batch_size,
                                        dtype=model_dtype(arithmetic))

    def __matmul__(self, vectors: torch.Tensor) -> torch.Tensor:
        with arithmetic(self.arithmetic):
            return self.operator @ vectors


class ShardedHessian:
    """``H = Σ_s (n_s / N) H_s``: the Hessian of the mean token loss over ``sample``, as the
    token-weighted sum of the Hessians of its ``shards`` (each a
    :class:`~polca.curvature.HessianOperator` held by ``executor``, e.g. one Ray actor per
    shard). The shard products are added in shard order, so the result is the same whichever
    executor holds them; with one shard it is that shard's :class:`HessianOperator` exactly.

    ``H @ V`` takes ``V [d]`` or ``[d, k]`` and returns the same shape on V's device;
    ``n_products`` counts products like :class:`HessianOperator`.

    Example:
        >>> from polca.functional import ParameterSpace
        >>> class Quadratic:   # ℓ = ½ Σ aᵢθᵢ² for every token: H = diag(a)
        ...     space = ParameterSpace({"w": (2,)})
        ...     def __call__(self, theta, batch):
        ...         a = torch.tensor([3.0, 1.0], dtype=theta.dtype)
        ...         return (0.5 * a * theta**2).sum().expand(batch.n_tokens)
        >>> ids = torch.zeros(3, 1, dtype=torch.long)
        >>> sample = ProbeBatch(ids, ids, torch.ones(3, 1, dtype=torch.bool))
        >>> H = ShardedHessian(InProcess(), Quadratic(), torch.ones(2, dtype=torch.float64),
        ...                    sample, shards=2)
        >>> (H @ torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist()
        [3.0, 1.0]
    """

    def __init__(self, executor: Executor, loss: TokenLoss, theta: torch.Tensor,
                 sample: ProbeBatch, shards: int = 1, batch_size: int = 256,
                 arithmetic: str = "float64"):
        parts = shard_sample(sample, shards)
        self.weights = [part.n_tokens / sample.n_tokens for part in parts]
        self.group = executor.hold(partial(_ShardHessian, loss, theta.detach(), batch_size,
                                           arithmetic), parts)
        self.dtype = model_dtype(arithmetic)
        self.shape = (theta.numel(), theta.numel())
        self.n_products = 0

    def __matmul__(self, vectors):
        if isinstance(vectors, np.ndarray):
            return (self @ torch.as_tensor(vectors)).numpy()
        products = self.group.call("__matmul__", vectors)
        self.n_products += 1 if vectors.ndim == 1 else vectors.shape[1]
        if len(products) == 1:
            return products[0].to(vectors.device)
        total = products[0].to(vectors.device) * self.weights[0]
        for product, weight in zip(products[1:], self.weights[1:]):
            total += product.to(vectors.device) * weight
        return total

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self @ vector

    def close(self) -> None:
        """Release the shard workers (a Ray actor holds a CPU until then)."""
        self.group.close()


__all__ = ["EXECUTORS", "Executor", "InProcess", "ShardedHessian", "WorkerGroup",
           "make_executor", "shard_sample"]
