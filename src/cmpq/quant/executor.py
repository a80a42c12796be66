"""Where the per-linear work runs: the seam between the pipeline and its workers.

The pipeline hands an executor a function and the items (whole linears) to
apply it to; an executor returns the results in the items' order, equal to a
serial run's. :class:`ThreadExecutor` runs them on this machine's threads,
:class:`RayExecutor` as Ray tasks (on this machine or a cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from ..errors import CmpqError


class Executor(Protocol):
    same_machine: bool  # tasks run on this machine (and can read its files)

    def map(self, function: Callable, items: Sequence, cost: Callable | None = None) -> list:
        """``[function(item) for item in items]``; ``cost`` ranks the items, costliest
        first, where the executor schedules them."""
        ...


class ThreadExecutor:
    """Whole linears side by side on ``workers`` threads (default: torch's thread
    count), each running torch with one thread.

    The per-linear work (1-D k-means, column-by-column feedback) is many small
    tensor operations, which one thread per operation runs best; torch releases
    the GIL inside them, so whole linears run side by side instead. The results
    are those of a serial run with one torch thread, whatever the number of workers.
    """

    same_machine = True

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers

    def map(self, function: Callable, items: Sequence, cost: Callable | None = None) -> list:
        workers = torch.get_num_threads() if self.workers is None else self.workers
        order = (
            sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else range(len(items))
        )
        previous = torch.get_num_threads()

        def run(i: int):
            torch.set_num_threads(1)  # per thread under OpenMP: set where the work runs
            return function(items[i])

        try:
            if workers <= 1 or len(items) <= 1:
                results = dict(zip(order, map(run, order), strict=True))
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    results = dict(zip(order, pool.map(run, order), strict=True))
        finally:
            torch.set_num_threads(previous)
        return [results[i] for i in range(len(items))]


def _apply_one_thread(function: Callable, item):
    """One task of :class:`RayExecutor`: ``function(item)`` with one torch thread."""
    torch.set_num_threads(1)
    return function(item)


class RayExecutor:
    """Whole linears as Ray tasks, on a local Ray or a cluster (``address``, e.g.
    ``"auto"`` on a node of a running cluster, or ``ray://head:10001``).

    The function (with everything it captured: statistics, Gram matrices, the
    plan) goes into Ray's object store once per :meth:`map`; each task receives
    it by reference, plus its own item (a linear with its weight), runs it with
    one torch thread (one CPU per task), and returns its result. The results are
    a serial run's, byte for byte: every task computes what a thread would.
    """

    same_machine = False  # a cluster's nodes need not share this machine's disk

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise CmpqError(
                "`executor` ray needs Ray: pip install 'cmpq[ray]' (or ray itself)"
            ) from None
        self._ray = ray
        if not ray.is_initialized():
            options = {"address": address} if address else {"num_cpus": num_cpus}
            try:
                ray.init(**options, log_to_driver=False, configure_logging=False)
            except ConnectionError as exc:
                raise CmpqError(
                    f"`ray_address` {address}: no Ray cluster answers ({exc})"
                ) from None
        self._task = ray.remote(num_cpus=1)(_apply_one_thread)

    def map(self, function: Callable, items: Sequence, cost: Callable | None = None) -> list:
        if not items:
            return []
        order = (
            sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else range(len(items))
        )
        shared = self._ray.put(function)
        futures = {i: self._task.remote(shared, items[i]) for i in order}
        return self._ray.get([futures[i] for i in range(len(items))])


EXECUTORS = ("threads", "ray")


def make_executor(name: str = "threads", ray_address: str | None = None) -> Executor:
    """The executor ``name`` (``threads`` or ``ray``) asks for."""
    if name == "threads":
        if ray_address:
            raise CmpqError("`ray_address` applies to `executor` ray only")
        return ThreadExecutor()
    if name == "ray":
        return RayExecutor(ray_address)
    raise CmpqError(f"`executor` must be one of {', '.join(EXECUTORS)} (got {name!r})")
