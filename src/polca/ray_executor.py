"""The Ray executor (``[ray]`` extra): blocks as Ray tasks, shard workers as Ray actors.

``RayExecutor(address)`` connects to a Ray cluster — ``"auto"`` (the cluster started on this
machine by ``ray start --head``), ``"HOST:PORT"`` (a head node's GCS address), or None (a
local cluster started for this process, or the one this process already started with
``ray.init``) — and implements :class:`polca.parallel.Executor`:

* :meth:`map` submits one task per block (``fn`` is put in the object store once), keeps at
  most ``2 × cluster CPUs`` tasks in flight and yields results as they finish. A task whose
  worker dies (killed, out of memory, its node lost) is run again by Ray (``max_retries``);
  since ``fn`` is pure, the retried block gives the same result.
* :meth:`hold` starts one actor per shard, spread over the nodes; an actor that dies is
  restarted from its construction arguments and its pending call retried (``max_restarts``,
  ``max_task_retries``).

Every task asks for one CPU (Ray then sets ``OMP_NUM_THREADS=1`` in it: one torch thread per
worker) and, with ``gpus_per_task``, that many GPUs. An actor reserves no CPU (it runs one
torch thread): a group of more shards than the cluster has CPUs would otherwise wait forever
for the CPUs its own members hold; with GPUs the shards of a group share one GPU's worth. The driver writes every
result through the run-directory contract, so workers need read access to the checkpoints
(the same paths on every node, e.g. a shared file system) but never write the run directory.

Example:
    >>> executor = RayExecutor()                        # doctest: +SKIP
    >>> dict(executor.map(abs, [-2, 3]))                # doctest: +SKIP
    {-2: 2, 3: 3}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from polca.config import ConfigError

try:
    import ray
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ConfigError(f"--executor ray needs ray: pip install 'polca[ray]' ({err})") from None

RETRIES = 3


def _apply(fn: Callable, block):
    return fn(block)


class _Holder:
    """An actor holding one worker ``factory(shard)`` (one torch thread)."""

    def __init__(self, factory: Callable, shard):
        import torch

        torch.set_num_threads(1)
        self.worker = factory(shard)

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)


class _ActorGroup:
    def __init__(self, actors: list, factory_ref):
        # the factory stays referenced while the actors live, so a restarted actor finds it
        self.actors, self.factory_ref = actors, factory_ref

    def call(self, method: str, *args) -> list:
        shared = [ray.put(a) for a in args]  # one copy in the object store for all actors
        return ray.get([actor.call.remote(method, *shared) for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class RayExecutor:
    """Blocks as Ray tasks and shard workers as Ray actors (see the module docstring).

    Args:
        address: ``"auto"``, ``"HOST:PORT"`` or None (a local cluster).
        gpus_per_task: GPUs each task and actor asks for (0 on CPUs; 1 to give each its own).
        in_flight: tasks submitted ahead of the results read (default 2 × cluster CPUs).
    """

    def __init__(self, address: str | None = None, gpus_per_task: float = 0.0,
                 in_flight: int | None = None):
        if not ray.is_initialized():
            # workers import polca and torch as this process does
            env = {k: os.environ[k] for k in ("PYTHONPATH", "HF_DEACTIVATE_ASYNC_LOAD")
                   if k in os.environ}
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": env} if env else None)
            except ConnectionError as err:
                raise ConfigError(
                    f"cannot reach a Ray cluster at {address!r} ({err}); start one with "
                    "`ray start --head` (then --address auto), or leave --address out for a "
                    "local cluster") from None
        self.gpus_per_task = gpus_per_task
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.in_flight = in_flight or 2 * max(cpus, 1)
        self._task = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=RETRIES)(_apply)
        self._actor = ray.remote(num_cpus=0, max_restarts=RETRIES,
                                 max_task_retries=RETRIES)(_Holder)

    def map(self, fn: Callable, blocks: Iterable) -> Iterator[tuple[Any, Any]]:
        shared = ray.put(fn)
        pending: dict = {}
        blocks = iter(blocks)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < self.in_flight:
                block = next(blocks, _END)
                if block is _END:
                    exhausted = True
                else:
                    pending[self._task.remote(shared, block)] = block
            if pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(done), ray.get(done)

    def hold(self, factory: Callable, shards: Sequence) -> _ActorGroup:
        shared = ray.put(factory)
        gpus = min(self.gpus_per_task, 1 / max(len(shards), 1))
        actor = self._actor.options(num_gpus=gpus, scheduling_strategy="SPREAD")
        return _ActorGroup([actor.remote(shared, shard) for shard in shards], shared)


_END = object()

__all__ = ["RayExecutor"]
