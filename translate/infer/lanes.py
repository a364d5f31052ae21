"""Lanes: images translated side by side, one per group of CPU cores.

A 256 px ResNet-9 image at batch 1 keeps two cores only ~80% busy: the norm kernels and the
Python between kernels do not split well across threads, and one image's decode and encode
would wait for the generator. Two lanes, each a thread with half of torch's threads that takes
a whole image through decode, generator and encode, keep both cores busy (2-core Xeon with
AMX, compiled bf16 ResNet-9, 256 px, the generator alone: 13.1 img/s one image at a time on 2
threads, 16.1 on batches of 4 split over two lanes of 1 thread; end to end through
translate_folder, with inductor's C++ wrapper: 12.7 -> 15.6 img/s).

torch's thread count is per thread (OpenMP's nthreads ICV), so each lane thread sets its own
once. `torch.set_num_threads` also changes the default that threads started later pick up;
that default is put back once the lanes are up.

An image run in tiles goes `alone` (no other lane runs meanwhile): the tiling patches the
generator's norm layers to whole-image statistics (translate/infer/tiling.py) and the other lane
shares those layers. Its whole-image passes run on all of the threads; its tiles, one per call
(`run` in the alone turn), are spread over the turn's thread and helper threads, a lane's share
of threads each: as with whole images, side by side beats all threads on one tile, and it lets
each tile run on NNPACK (translate/infer/nnpack.py). The ResNet-9 on a 512 px tile, fp32, the
2-core AVX2 EPYC: 3.4 s on 2 threads (4.2 per tile in batches of 4), 3.1 s per tile in two
one-thread lanes, 1.7 s with NNPACK.

The run's last image goes `alone` too when no other job is in flight (`last`): a run of one
image, or the tail of a folder, would otherwise leave the other lanes idle.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
LANES = 2  # lanes on a CPU with at least as many torch threads (measured on 2 cores)
_local = threading.local()


def cpu_lanes(device: torch.device) -> LanePool | None:
    """The lanes a generator on `device` runs images in: LANES on a CPU with that many torch
    threads or more; none on an accelerator."""
    if device.type != "cpu" or torch.get_num_threads() < LANES:
        return None
    return LanePool(LANES)


def in_lane() -> bool:
    """True in a lane's thread: work there runs inline, with the lane's threads."""
    return getattr(_local, "lane", False)


class LanePool:
    """`count` threads, each with `threads_each` torch threads (the caller's count split)."""

    def __init__(self, count: int) -> None:
        threads = torch.get_num_threads()
        self.count = count
        self.threads = threads
        self.threads_each = max(1, threads // count)
        self._turns = threading.Condition()
        self._running = 0  # lanes in a `beside` turn
        self._in_flight = 0  # submitted jobs not done (nor cancelled)
        self._alone_waiting = 0
        self._alone_thread: int | None = None  # the thread of the `alone` turn, if one runs
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="translate-lane")
        # threads that take tiles beside an `alone` turn's own thread
        self._helpers = ThreadPoolExecutor(max(1, count - 1), thread_name_prefix="translate-tiles")
        ready = threading.Barrier(2 * count)
        for pool in [self._pool] * count + [self._helpers] * (count - 1):
            pool.submit(self._start, ready)  # each submit starts a thread: all meet at ready
        ready.wait()
        self.restore()  # this thread's count, and the default for new threads

    def _start(self, ready: threading.Barrier) -> None:
        torch.set_num_threads(self.threads_each)
        # torch sets a thread's count up at its first parallel op, from the default: done
        # here, before the default is put back.
        torch.get_num_threads()
        _local.lane = True
        ready.wait()

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """A job for the next free lane (a whole image: translate_folder); `last` counts it."""
        with self._turns:
            self._in_flight += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._job_done)  # also when cancelled
        return future

    def _job_done(self, _: Future) -> None:
        with self._turns:
            self._in_flight -= 1

    def spreads(self) -> bool:
        """True in an `alone` turn's own thread, where `run` spreads its calls."""
        return self._alone_thread == threading.get_ident()

    def run(self, calls: list[Callable[[], T]]) -> list[T]:
        """The calls' results in order, run side by side: in the lanes; inline when already
        in a lane; spread over the helpers in an `alone` turn (even one call: it runs with a
        lane's share of threads, as a compiled graph made there expects)."""
        if self.spreads():
            return self._spread(calls)
        if in_lane():
            return [call() for call in calls]
        return [f.result() for f in [self._pool.submit(call) for call in calls]]

    def _spread(self, calls: list[Callable[[], T]]) -> list[T]:
        """The calls of an `alone` turn on its own thread and the helpers, a lane's share of
        threads each, each taking the next call when done with one."""
        todo = iter(enumerate(calls))
        taking, failed = threading.Lock(), threading.Event()
        results: list[T] = [None] * len(calls)  # type: ignore[list-item]

        def work() -> None:
            while not failed.is_set():  # after an error no thread takes another call
                with taking:
                    i, call = next(todo, (-1, None))
                if call is None:
                    return
                try:
                    results[i] = call()
                except BaseException:
                    failed.set()
                    raise

        helpers = [self._helpers.submit(work) for _ in range(self.count - 1)]
        torch.set_num_threads(self.threads_each)
        try:
            work()
        finally:
            torch.set_num_threads(self.threads)
            for helper in helpers:
                helper.exception()  # waits; an error of this thread's is the one raised
        for helper in helpers:
            helper.result()
        return results

    @contextlib.contextmanager
    def beside(self) -> Iterator[None]:
        """A turn beside the other lanes (waits while one runs alone, or waits to)."""
        with self._turns:
            self._turns.wait_for(lambda: self._alone_thread is None and not self._alone_waiting)
            self._running += 1
        try:
            yield
        finally:
            with self._turns:
                self._running -= 1
                self._turns.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """A turn with no other lane running, on all of the threads (from a lane)."""
        with self._turns:
            self._alone_waiting += 1
            self._turns.wait_for(lambda: self._alone_thread is None and not self._running)
            self._alone_waiting -= 1
            self._alone_thread = threading.get_ident()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            # This lane's count back; the default for new threads is put back by `restore`.
            torch.set_num_threads(self.threads_each)
            with self._turns:
                self._alone_thread = None
                self._turns.notify_all()

    def last(self) -> contextlib.AbstractContextManager[None]:
        """The turn of a run's last job: `alone`, on all of the threads, when no other job is
        in flight (their lanes would idle: a run of one image), else `beside`. The ResNet-9,
        fp32, one 1024x1024 px image, the 2-core AVX2 EPYC: on one thread 35.9 s, on two 20.3
        (on NNPACK 19.9 and 18.0 then; 12.6-13.7 s since its large convolutions run in a
        strip per thread: translate/infer/nnpack.py)."""
        with self._turns:
            idle = self._in_flight <= 1 and self._alone_thread is None and not self._running \
                and not self._alone_waiting
        return self.alone() if idle else self.beside()

    def restore(self) -> None:
        """Put back the default thread count for threads started later (an `alone` turn set
        it to a lane's); call from a thread outside the lanes."""
        torch.set_num_threads(self.threads)
