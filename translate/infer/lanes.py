"""Lanes: images translated side by side, one per group of CPU cores.

A 256 px ResNet-9 image at batch 1 keeps two cores only ~80% busy: the norm kernels and the
Python between kernels do not split well across threads, and one image's decode and encode
would wait for the generator. Two lanes, each a thread with half of torch's threads that takes
a whole image through decode, generator and encode, keep both cores busy (2-core Xeon with
AMX, compiled bf16 ResNet-9, 256 px: 11.6 -> 16.5 img/s for the generator on batches of 4).

torch's thread count is per thread (OpenMP's nthreads ICV), so each lane thread sets its own
once. `torch.set_num_threads` also changes the default that threads started later pick up;
that default is put back once the lanes are up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
_local = threading.local()


def in_lane() -> bool:
    """True in a lane's thread: work there runs inline, with the lane's threads."""
    return getattr(_local, "lane", False)


class LanePool:
    """`count` threads, each with `threads_each` torch threads (the caller's count split)."""

    def __init__(self, count: int) -> None:
        threads = torch.get_num_threads()
        self.count = count
        self.threads_each = max(1, threads // count)
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="translate-lane")
        ready = threading.Barrier(count + 1)
        for _ in range(count):  # each submit starts a thread: the others wait at the barrier
            self._pool.submit(self._start, ready)
        ready.wait()
        torch.set_num_threads(threads)  # this thread's count, and the default for new threads

    def _start(self, ready: threading.Barrier) -> None:
        torch.set_num_threads(self.threads_each)
        # torch sets a thread's count up at its first parallel op, from the default: done
        # here, before the default is put back.
        torch.get_num_threads()
        _local.lane = True
        ready.wait()

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        return self._pool.submit(fn, *args)

    def run(self, calls: list[Callable[[], T]]) -> list[T]:
        """The calls' results in order, run side by side (inline when already in a lane)."""
        if in_lane():
            return [call() for call in calls]
        return [f.result() for f in [self._pool.submit(call) for call in calls]]
