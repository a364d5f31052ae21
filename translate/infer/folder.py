"""Translate a folder of images with a generator: batching, padding, tiling, progress, failures.

The engine behind `translate apply MODEL INPUT OUTPUT`. It takes any generator callable
`fn(x) -> y` on float32 NCHW tensors in [-1, 1] (CPU tensors in; the output may live on any
device) plus a `ModelInfo`, so safetensors, ONNX and in-memory nets share one code path.

Choices worth knowing (see `translate_folder`):
- Output size always equals input size: H and W are mirror-padded to `size_multiple` and
  cropped back. `resize=N` is the only resizing: the longer side becomes N (aspect kept).
- Memory is bounded: images above 1024x1024 pixels run in 512 px tiles unless told otherwise
  (`tile`), so a 4096x4096 image stays well under 4 GB; see translate/infer/tiling.py for how norm
  layers see whole-image statistics then.
- Gray input to an RGB model is replicated; RGB input to a 1-channel model becomes luma.
- Alpha is copied through unchanged (where the output format stores alpha).
- A 16-bit input gives a 16-bit output only when the model output is 1-channel (PIL cannot
  write 16-bit colour); otherwise the output is 8-bit.
- `side_by_side` writes OUTPUT/_pairs/<same relative path>: input | output, as well as the
  normal output, so OUTPUT still holds clean results.
- An output that exists is skipped (unless `overwrite`). The output is written last, after its
  pair, and atomically, so "output exists" means "this image is done" and reruns resume.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from translate.errors import ImageError, UserError
from translate.images import (
    DEFAULT_MAX_PIXELS,
    clear_stale_temps,
    load_image_rgba,
    match_channels,
    save_image,
    stores_alpha,
    to_uint8,
)
from translate.infer.lanes import LanePool
from translate.infer.plan import Job, check_format, plan
from translate.infer.progress import ApplyReport, Tally, progress_bar, summary

# The model run lives in translate/infer/tiling.py; re-exported here, where users look for it.
from translate.infer.tiling import (
    DEFAULT_OVERLAP,
    Generator,
    ModelInfo,
    Tile,
    _run_padded,
    tile_side,
    translate_tensor,
)

__all__ = ["ApplyReport", "ApplyWarning", "Generator", "ModelInfo", "translate_folder",
           "translate_tensor"]


class ApplyWarning(UserWarning):
    """Something the user may not expect, e.g. transparency the output format cannot store."""


# ---------------------------------------------------------------------------- the folder run


def translate_folder(
    fn: Generator,
    info: ModelInfo,
    input: str | Path,  # a file, a folder (searched recursively) or a glob pattern
    output: str | Path,  # a folder mirroring INPUT's relative paths (or a file, for one file)
    *,
    batch_size: int = 4,  # images (or tiles) per generator call; in lanes: tiles only
    tile: Tile = "auto",  # tile side for larger images; "auto": 512 above 1024x1024 px;
                          # None or 0: never tile (whole images, memory grows with size)
    overlap: int = DEFAULT_OVERLAP,  # pixels shared by neighbouring tiles (at most tile/2)
    resize: int | None = None,  # make the longer side this many pixels first; None: keep size
    format: str | None = None,  # output extension/format, e.g. "png"; None: same as input
    overwrite: bool = False,  # re-translate images whose output exists (else: skipped)
    side_by_side: bool = False,  # also write OUTPUT/_pairs/<path>: input | output
    workers: int = 2,  # threads decoding and encoding while the generator runs (unused when
                       # `fn` runs in lanes: each lane decodes and encodes its own images)
    max_pixels: int | None = DEFAULT_MAX_PIXELS,  # larger images fail (decompression bombs)
    progress: bool = True,  # progress bar, failure lines and a summary line on stderr
) -> ApplyReport:
    """Translate every image under `input` into `output`; unreadable files are reported in
    `ApplyReport.failed` and do not stop the run. Bad arguments raise UserError before any
    file is written."""
    start = time.perf_counter()
    _check_settings(batch_size, tile, overlap, resize, workers)
    jobs = plan(input, output, check_format(format), side_by_side)
    clear_stale_temps({p.parent for job in jobs for p in (job.dst, job.pair) if p is not None})
    todo = [job for job in jobs if overwrite or not _exists(job.dst)]
    settings = _Settings(fn, info, batch_size, tile, overlap, resize, max_pixels)
    console = Console(stderr=True)
    if progress and len(todo) < len(jobs):  # else the bar's "1/1" hides the finished ones
        console.print(f"{len(jobs)} images: {len(jobs) - len(todo)} skipped (their outputs "
                      f"exist; --overwrite redoes them), {len(todo)} to do", markup=False,
                      highlight=False, soft_wrap=True)
    with progress_bar(console, progress) as bar:
        tally = Tally(bar, bar.add_task("translating", total=len(todo)), quiet=not progress)
        lanes = getattr(getattr(fn, "forward", fn), "lanes", None)
        if isinstance(lanes, LanePool):
            _run_in_lanes(todo, settings, lanes, tally)
        else:
            pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="translate-io")
            try:
                _run_jobs(todo, settings, pool, tally, lookahead=batch_size + max(1, workers))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    if tally.alpha_dropped:
        first, n = tally.alpha_dropped[0], len(tally.alpha_dropped)
        what = "1 input image has" if n == 1 else f"{n} input images have"
        warnings.warn(f"{what} transparency (first: {first.src}) that {first.dst.suffix} files "
                      "cannot store: the outputs have none; use --format png (or webp, tif) to "
                      "keep it", ApplyWarning, stacklevel=2)
    report = ApplyReport(tally.translated, len(jobs) - len(todo),
                         [tally.failed[k] for k in sorted(tally.failed)],
                         time.perf_counter() - start)
    if progress:
        console.print(summary(report), markup=False, highlight=False, soft_wrap=True)
    return report


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long to look up: its write fails too, for that file only
        return False


def _check_settings(batch_size: int, tile: Tile, overlap: int, resize: int | None,
                    workers: int) -> None:
    if isinstance(tile, str) and tile != "auto":
        raise UserError(f"--tile {tile}: use a number of pixels, auto or 0 (never tile)")
    for flag, value, low in [("--batch-size", batch_size, 1),
                             ("--tile", None if isinstance(tile, str) else tile, 0),
                             ("--overlap", overlap, 0), ("--resize", resize, 1),
                             ("--workers", workers, 0)]:
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: must be at least {low} — pass a larger value")


@dataclass(frozen=True)
class _Settings:
    fn: Generator
    info: ModelInfo
    batch_size: int
    tile: Tile
    overlap: int
    resize: int | None
    max_pixels: int | None


@dataclass
class _Loaded:
    job: Job
    x: torch.Tensor  # 1xCxHxW uint8 with the model's input channels (floats are 4x larger)
    shown: np.ndarray | None  # the input pixels, kept only for side-by-side pairs
    alpha: np.ndarray | None  # HxW uint8, copied to the output untouched
    wide: bool  # write a 16-bit output


def _run_jobs(todo: list[Job], s: _Settings, pool: ThreadPoolExecutor, tally: Tally,
              lookahead: int) -> None:
    """Decode ahead and encode behind on the pool while the generator runs here."""
    saves: deque[tuple[Job, Future]] = deque()
    items = _loaded(todo, s, pool, tally, lookahead)
    try:
        for batch in _batches(items, s):
            try:
                with _warm_up_shown(s, batch, tally):
                    outputs = _translate_batch(s, batch)
            except (RuntimeError, MemoryError) as e:  # e.g. out of memory on one huge image
                for item in batch:
                    tally.fail(item.job, _generator_failed(item.job, e))
                continue
            for item, pixels in zip(batch, outputs):
                saves.append((item.job, pool.submit(_save, item, pixels)))
            _settle(saves, tally, keep=2 * s.batch_size)
    finally:
        items.close()  # cancels decodes not started yet
        _settle(saves, tally, keep=0)  # even when interrupted: finished work is kept


def _run_in_lanes(todo: list[Job], s: _Settings, lanes: LanePool, tally: Tally) -> None:
    """Each lane takes whole images through decode, generator and encode, one at a time
    (translate/infer/lanes.py); outcomes are recorded here, in input order."""
    running: deque[tuple[Job, Future[tuple[str | None, bool]]]] = deque()
    try:
        for i, job in enumerate(todo):
            last = i == len(todo) - 1
            running.append((job, lanes.submit(_whole_image, job, s, lanes, tally, last)))
            while len(running) > 2 * lanes.count or running and running[0][1].done():
                _record(*running.popleft(), tally)
        while running:
            _record(*running.popleft(), tally)
    finally:  # interrupted: images not started stay undone, started ones finish (whole)
        for job, future in running:
            if not future.cancel():
                with contextlib.suppress(Exception):  # the first error is the one raised
                    _record(job, future, tally)
        lanes.restore()


def _whole_image(job: Job, s: _Settings, lanes: LanePool, tally: Tally, last: bool
                 ) -> tuple[str | None, bool]:
    """(why it failed or None, whether transparency was dropped), in a lane; an image run in
    tiles runs alone, and so does the run's last image when the other lanes have nothing left
    to do (translate/infer/lanes.py)."""
    try:
        item = _load(job, s)
    except (ImageError, MemoryError) as e:
        return _load_failed(job, e), False
    dropped = _drops_alpha(item)
    tiled = tile_side(s.tile, s.info, *item.x.shape[2:]) is not None
    try:
        turn = lanes.alone() if tiled else lanes.last() if last else lanes.beside()
        with turn, _warm_up_shown(s, [item], tally):
            pixels = _translate_batch(s, [item])[0]
    except (RuntimeError, MemoryError) as e:
        return _generator_failed(job, e), False
    try:
        _save(item, pixels)
    except ImageError as e:
        return str(e), False
    return None, dropped


def _record(job: Job, future: Future[tuple[str | None, bool]], tally: Tally) -> None:
    reason, dropped = future.result()
    if reason is not None:
        tally.fail(job, reason)
        return
    if dropped:
        tally.alpha_dropped.append(job)
    tally.done()


def _load_failed(job: Job, e: Exception) -> str:
    if isinstance(e, MemoryError):
        return f"{job.src}: out of memory while decoding — lower --max-pixels"
    return str(e)


def _generator_failed(job: Job, e: Exception) -> str:
    reason = " ".join(str(e).split())[:300]
    return (f"{job.src}: the generator failed ({reason}) — if it ran out of memory, use "
            "--tile 512 or a smaller --batch-size")


def _drops_alpha(item: _Loaded) -> bool:
    """A transparent input whose output format stores no alpha."""
    return item.alpha is not None and item.alpha.min() < 255 and not stores_alpha(item.job.dst)


@contextlib.contextmanager
def _warm_up_shown(s: _Settings, batch: list[_Loaded], tally: Tally) -> Iterator[None]:
    """While a compiled generator compiles for a new input size (translate/infer/compiled.py: tens
    of seconds, once per size), the progress bar says so instead of looking stuck."""
    h, w = batch[0].x.shape[2:]
    compiles = getattr(getattr(s.fn, "forward", s.fn), "compiles", None)
    whole = len(batch) > 1 or tile_side(s.tile, s.info, h, w) is None
    if not (compiles and whole and compiles(s.info.padded(h), s.info.padded(w))):
        yield
        return
    tally.bar.update(tally.task, description=f"compiling for {h}x{w} px (one-time warm-up)")
    try:
        yield
    finally:
        tally.bar.update(tally.task, description="translating")


def _loaded(todo: list[Job], s: _Settings, pool: ThreadPoolExecutor, tally: Tally,
            lookahead: int) -> Iterator[_Loaded]:
    """Decoded images in input order, `lookahead` decodes in flight; failures go to tally."""
    jobs = iter(todo)
    loads: deque[tuple[Job, Future]] = deque()
    try:
        while True:
            while len(loads) < lookahead and (job := next(jobs, None)) is not None:
                loads.append((job, pool.submit(_load, job, s)))
            if not loads:
                return
            job, future = loads.popleft()
            try:
                item = future.result()
            except (ImageError, MemoryError) as e:
                tally.fail(job, _load_failed(job, e))
                continue
            if _drops_alpha(item):
                tally.alpha_dropped.append(job)
            yield item
    finally:
        for _, future in loads:  # interrupted: do not decode what will not be used
            future.cancel()


def _batches(items: Iterator[_Loaded], s: _Settings) -> Iterator[list[_Loaded]]:
    """Group images whose padded sizes match into batches; images needing tiles go alone.
    At most ~2 batches wait for company, so odd sizes do not pile up in memory."""
    waiting: dict[tuple[int, int], list[_Loaded]] = {}
    for item in items:
        h, w = item.x.shape[2:]
        if tile_side(s.tile, s.info, h, w) is not None:
            yield [item]
            continue
        key = (s.info.padded(h), s.info.padded(w))
        waiting.setdefault(key, []).append(item)
        if len(waiting[key]) == s.batch_size:
            yield waiting.pop(key)
        elif sum(map(len, waiting.values())) > 2 * s.batch_size:
            yield waiting.pop(next(iter(waiting)))  # the longest-waiting size
    yield from waiting.values()


def _translate_batch(s: _Settings, batch: list[_Loaded]) -> list[np.ndarray]:
    with torch.inference_mode():
        if len(batch) == 1:
            ys = [translate_tensor(s.fn, s.info, batch[0].x, tile=s.tile, overlap=s.overlap,
                                   batch_size=s.batch_size)]
        else:
            ys = _run_padded(s.fn, s.info, [item.x for item in batch])
        return [_to_pixels(y, item.wide) for y, item in zip(ys, batch)]


def _to_pixels(y: torch.Tensor, wide: bool) -> np.ndarray:
    if not wide:
        return to_uint8(y)[0]
    y16 = y[0].clamp(-1.0, 1.0).add(1.0).mul(65535 / 2).round().to(torch.int32)
    return y16.permute(1, 2, 0).numpy().astype(np.uint16)


def _load(job: Job, s: _Settings) -> _Loaded:
    colour, alpha, meta = load_image_rgba(job.src, s.max_pixels)
    if s.resize is not None:
        colour, alpha = _resize(colour, alpha, s.resize)
    x = torch.from_numpy(match_channels(colour, s.info.in_channels)).permute(2, 0, 1)[None]
    wide = meta.bit_depth == 16 and s.info.out_channels == 1
    return _Loaded(job, x, colour if job.pair else None, alpha, wide)


def _resize(colour: np.ndarray, alpha: np.ndarray | None, longer: int
            ) -> tuple[np.ndarray, np.ndarray | None]:
    h, w = colour.shape[:2]
    scale = longer / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))

    def one(a: np.ndarray) -> np.ndarray:
        return np.array(Image.fromarray(a).resize(size, Image.Resampling.LANCZOS))  # writable
    resized = one(colour[..., 0])[..., None] if colour.shape[2] == 1 else one(colour)
    return resized, None if alpha is None else one(alpha)


def _save(item: _Loaded, pixels: np.ndarray) -> None:
    # The pair first: the output's existence is what marks an image as done for reruns.
    if item.job.pair is not None and item.shown is not None:
        right = pixels if pixels.dtype == np.uint8 else np.rint(pixels / 257).astype(np.uint8)
        left = match_channels(item.shown, right.shape[2])
        save_image(item.job.pair, np.concatenate([left, right], axis=1))
    save_image(item.job.dst, pixels, item.alpha, bit_depth=16 if item.wide else 8)


def _settle(saves: deque[tuple[Job, Future]], tally: Tally, keep: int) -> None:
    """Record finished saves in order; block until at most `keep` are outstanding."""
    while saves and (len(saves) > keep or saves[0][1].done()):
        job, future = saves.popleft()
        try:
            future.result()
        except ImageError as e:
            tally.fail(job, str(e))
        else:
            tally.done()
