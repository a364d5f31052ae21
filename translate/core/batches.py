"""The batch stream over any map-style dataset indexed by a global sample number.

Batch n on rank r holds the samples k = (n * world_size + r) * batch_size + j, so resuming is
"start at batch n", and 2 ranks with batch b together see exactly what 1 rank with batch 2b
sees. Which data it is (images, toy points) is the dataset's business (translate/data/).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from translate.errors import DataError, UserError


def steps_per_epoch(dataset: Dataset, batch_size: int, world_size: int = 1) -> int:
    return math.ceil(len(dataset) / (batch_size * world_size))


def batch_samples(n: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """The global sample numbers in batch `n` of process `rank`."""
    first = (n * world_size + rank) * batch_size
    return list(range(first, first + batch_size))


@dataclass(frozen=True)
class _BatchPlan:
    """An endless sampler of batches for the DataLoader: each index it yields is a whole batch."""

    batch_size: int
    start_batch: int
    rank: int
    world_size: int

    def __iter__(self) -> Iterator[list[int]]:
        n = self.start_batch
        while True:
            yield batch_samples(n, self.batch_size, self.rank, self.world_size)
            n += 1


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = {}
    for key in items[0]:
        tensors = [item[key] for item in items]
        shapes = sorted({tuple(t.shape) for t in tensors})
        if len(shapes) > 1:
            raise DataError(
                f"one batch mixes image sizes {shapes[0]} and {shapes[1]}: data.preprocess "
                "'none' keeps each image's size — use train.batch_size=1 or a cropping mode")
        batch[key] = torch.stack(tensors)
    return batch


def fetch(dataset: Dataset, samples: list[int]) -> dict[str, torch.Tensor]:
    """The collated batch of `samples`. A dataset with a `batch(samples)` method makes the
    whole batch at once (the toy data: per-item calls would cost more than its tiny nets)."""
    whole = getattr(dataset, "batch", None)
    return whole(samples) if whole else collate([dataset[k] for k in samples])


@dataclass(frozen=True)
class _Failure:
    """A user-facing error raised in a worker, carried back as a value: re-raised by the
    DataLoader it would arrive wrapped in a multi-line worker traceback."""

    kind: type
    message: str


class _BatchFetcher(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, samples: list[int]) -> dict[str, torch.Tensor] | _Failure:
        try:
            return fetch(self.dataset, samples)
        except UserError as e:
            return _Failure(type(e), str(e))


def _keep(batch: object) -> object:
    return batch


def _init_worker(worker_id: int) -> None:
    import signal

    import cv2

    # A terminal's Ctrl-C reaches the workers too; the main process decides when to stop
    # (at a step boundary, after saving), so the workers must not die under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # Workers each get a core's worth of work already; nested thread pools only oversubscribe.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def batches(dataset: Dataset, batch_size: int, start_batch: int = 0, rank: int = 0,
            world_size: int = 1, num_workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless collated batches n = start_batch, start_batch + 1, ... of process `rank`.

    num_workers > 0 loads in DataLoader worker processes; the batches are identical.
    """
    if batch_size < 1 or start_batch < 0 or num_workers < 0:
        raise ValueError("batch_size must be >= 1, start_batch and num_workers >= 0")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    plan = _BatchPlan(batch_size, start_batch, rank, world_size)
    if num_workers == 0:
        return (fetch(dataset, samples) for samples in plan)
    loader = DataLoader(
        _BatchFetcher(dataset), batch_size=None, sampler=plan, collate_fn=_keep,
        num_workers=num_workers, persistent_workers=True, prefetch_factor=2,
        worker_init_fn=_init_worker, pin_memory=torch.cuda.is_available())
    return _raise_failures(loader)


def _raise_failures(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    for batch in loader:
        if isinstance(batch, _Failure):
            raise batch.kind(batch.message)
        yield batch
