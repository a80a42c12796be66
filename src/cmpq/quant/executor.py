"""Where the per-linear work runs: the seam between the pipeline and its workers.

The pipeline hands an executor a function and the items (whole linears) to
apply it to; an executor returns the results in the items' order, equal to a
serial run's. :class:`ThreadExecutor` runs them on this machine's threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch


class Executor(Protocol):
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
