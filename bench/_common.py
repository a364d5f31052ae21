"""Helpers shared by the benchmarks: synthetic image folders, an exported generator and one
apply pass, timing, the GEMM ceiling, peak RSS, the machine's description, waiting for a quiet
machine and running jobs in processes. Measuring cases in live subprocesses side by side is in
_paired.py."""

from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def write_pngs(folder: Path, size: int, count: int, seed: int) -> None:
    """`count` RGB PNGs of size x size: smooth colour fields plus noise, so PNG decode and
    encode cost about what photos cost (flat images would compress to nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        f = rng.uniform(2, 8, 3)
        img = np.stack([np.sin(f[0] * xx + i), np.cos(f[1] * yy - i), np.sin(f[2] * xx * yy)], -1)
        img = (img + 1) * 110 + rng.normal(0, 12, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def export_resnet9(path: Path, ngf: int = 64, n_blocks: int = 9):
    """(net, metadata): the paper's ResNet generator (untrained, seed 0) written to `path` as
    `translate export` writes one, for the apply benchmarks."""
    from safetensors.torch import save_file

    from translate import recipe
    from translate.export import metadata
    from translate.nets import build_net, init_weights

    torch.manual_seed(0)
    G = build_net("resnet", ngf=ngf, n_blocks=n_blocks)
    init_weights(G, 0.02)
    G.eval()
    cfg = recipe.load(Path(__file__).resolve().parent.parent / "recipes" /
                      "cyclegan_horse2zebra.toml",
                      [f"model.ngf={ngf}", f"model.n_blocks={n_blocks}"])
    meta = metadata(G, cfg, "G_ab", {"from": "A", "to": "B"}, 0, False)
    save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(path), meta)
    return G, meta


def apply_folder(gen, folder: str, out: str) -> int:
    """One `translate apply` pass of a loaded generator over `folder` into `out` (overwritten):
    the number translated; RuntimeError on the first failed image."""
    from translate.infer import translate_folder

    report = translate_folder(gen.forward, gen.info, folder, out, overwrite=True,
                              progress=False)
    if report.failed:
        raise RuntimeError(f"apply failed: {report.failed[0][1]}")
    return report.translated


def write_unpaired(root: Path, size: int, count: int = 8) -> Path:
    """ROOT/trainA + ROOT/trainB of synthetic images, the layout data.kind = "unpaired" reads."""
    write_pngs(root / "trainA", size, count, seed=1)
    write_pngs(root / "trainB", size, count, seed=2)
    return root


def train_steps(recipe: str, overrides: list[str]):
    """(session, batches, step) of RECIPE (a file, or a name in recipes/) with `overrides`,
    set up in-process the way `translate train` sets it up (translate.runner.setup); step() is
    one real train_step."""
    from translate import recipe as config
    from translate import runner
    from translate.core import checkpoint, loop

    # A name in recipes/ or a path (as `translate train` takes it: recipes/NAME.toml works too).
    path = Path(recipe) if Path(recipe).is_file() else Path(__file__).resolve().parent.parent \
        / "recipes" / recipe
    cfg = config.load(path, overrides)
    s = runner.setup(cfg)
    state = checkpoint.TrainState(fingerprint="bench")
    batches = loop.Batches(cfg, s.dataset, s.accelerator, 0)
    return s, batches, lambda: loop.train_step(s, state, batches)


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, budget_s: float
               ) -> list[float]:
    """Seconds per call of `fn` after `warmup` calls: `repeats` timed calls, fewer (but at
    least one) when they would overrun `budget_s`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start + times[-1] > budget_s:
            break
    return times


def gemm_gflops(dtype: torch.dtype, n_max: int = 4096, budget_s: float = 40.0
                ) -> tuple[float, int]:
    """(GFLOP/s of an n x n x n matmul, n). n doubles up to n_max while the next size fits the
    budget: without native support a bf16 GEMM runs ~100x slower and 4096^3 would take ten
    minutes, so its rate comes from a smaller n."""
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = min(time_calls(lambda a=a, b=b: a @ b, warmup=1, repeats=3, budget_s=budget_s))
        if n >= n_max or 4 * 8 * best > budget_s:  # the next n costs 8x, 1 warm-up + 3 repeats
            return 2 * n**3 / best / 1e9, n
        n *= 2


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB. VmHWM where Linux has it:
    ru_maxrss of a process started by subprocess also counts its parent's peak (vfork + exec
    carry the parent's high-water mark over), which made every child look as big as us."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX): the same test that makes
    precision "auto" pick bf16, so the bench measures what a user's default would run."""
    from translate.precision import cpu_has_bf16

    return cpu_has_bf16()


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_for_idle(max_wait_s: float, busy_below: float = 0.15, window_s: float = 2.0) -> float:
    """Block until the whole machine was less than `busy_below` busy over `window_s` (other
    jobs on a shared machine; our own children sleep between steps), or `max_wait_s` passed.
    Returns the busy fraction last seen (1.0 where /proc/stat is missing)."""
    start, busy = time.monotonic(), 1.0
    while True:
        try:
            b0, t0 = _cpu_times()
            time.sleep(window_s)
            b1, t1 = _cpu_times()
        except OSError:
            return 1.0
        busy = (b1 - b0) / max(t1 - t0, 1)
        if busy < busy_below or time.monotonic() - start >= max_wait_s:
            return busy


def map_jobs(fn: Callable[..., Any], jobs: list[tuple], workers: int) -> Iterator[Any]:
    """fn(*job) for every job, in order; in `workers` fresh processes when > 1 (spawned, so
    each starts clean and inherits OMP_NUM_THREADS from the environment)."""
    if workers == 1:
        yield from (fn(*job) for job in jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(fn, *zip(*jobs))


# The CPU flags that decide which kernels run: AVX2 / AVX-512 fp32, and bf16 done natively
# (AVX-512 BF16, AMX) or emulated.
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def machine(threads: int) -> dict[str, object]:
    """What the numbers were measured on: CPU model and flags, threads per process, load."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    from translate.infer import nnpack
    from translate.precision import NATIVE_BF16_FLAGS

    cpu = torch.device("cpu")

    return {"cpu": model, "flags": [f for f in FLAGS_THAT_MATTER if f in flags],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16_flags": any(f in flags for f in NATIVE_BF16_FLAGS),
            "native_bf16": native_bf16(),  # what "auto" acts on (TRANSLATE_NATIVE_BF16 may force it)
            # NNPACK runs here, and fp32 apply uses it by default (translate/infer/nnpack.py)
            "nnpack": nnpack.available(), "nnpack_default": nnpack.pays(cpu, "fp32"),
            # Set all three (=0, avx2, AVX2) to measure an AMX machine as an AVX2-only one.
            **{k: os.environ.get(k, "(unset)") for k in (
                "TRANSLATE_NATIVE_BF16", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
            "threads": threads, "cores": os.cpu_count(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__}


# ------------------------------------------------------------ the parent/child protocol
def in_folder(runs: Path | None, prefix: str, fn: Callable[[Path], Any]) -> Any:
    """fn(runs), or with no --runs fn(a temporary folder that is removed afterwards)."""
    if runs is not None:
        return fn(runs)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return fn(Path(tmp))
