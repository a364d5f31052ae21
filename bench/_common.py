"""Helpers shared by the benchmarks: synthetic image folders, timing, GEMM ceiling, peak RSS,
and the prototype Winograd convolution that bench/speed.py measures as a candidate speed-up."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn


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


def write_unpaired(root: Path, size: int, count: int = 8) -> Path:
    """ROOT/trainA + ROOT/trainB of synthetic images, the layout data.kind = "unpaired" reads."""
    write_pngs(root / "trainA", size, count, seed=1)
    write_pngs(root / "trainB", size, count, seed=2)
    return root


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
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 BF16 or AMX); without them every
    bf16 conv and matmul falls back to slow reference loops."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def machine() -> dict[str, object]:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16(), "cores": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__}


# ------------------------------------------------------------ the parent/child protocol
# A child sets up one case (nets, data, warm-up), prints READY, then runs one timed unit per
# "step" line on stdin and answers TIME <seconds per item>; "done" gets DONE <json>. A parent
# can so alternate two live children step by step: their time ratio then holds even while
# other jobs on the machine speed up or slow down both.

MARK = "BENCH "


class ChildError(RuntimeError):
    """A child failed or timed out; the message is its last stderr line."""


def serve(unit: Callable[[], int], finish: Callable[[], dict[str, Any]]) -> None:
    """Child side: `unit()` does one timed piece of work and returns how many items it did."""
    print(MARK + "READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t = time.perf_counter()
            items = unit()
            print(f"{MARK}TIME {(time.perf_counter() - t) / items!r}", flush=True)
        elif line.strip() == "done":
            print(MARK + "DONE " + json.dumps(finish()), flush=True)
            return


class Worker:
    """Parent side: one live child running `script --child kind spec`."""

    def __init__(self, script: Path, kind: str, spec: dict[str, Any], log: Path,
                 timeout: float) -> None:
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), "--child", kind, json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                cwd=script.parent.parent)
        self.timer = threading.Timer(timeout, self.proc.kill)  # unblocks a hung readline
        self.timer.start()
        self._expect("READY")

    def _expect(self, tag: str) -> str:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith(MARK + tag):
                return line[len(MARK + tag):].strip()
        self.proc.wait()
        self.timer.cancel()
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {self.proc.returncode} (killed: timeout?)"
        raise ChildError(reason[:200])

    def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died; _expect reports why

    def step(self) -> float:
        self._send("step")
        return float(self._expect("TIME"))

    def close(self) -> dict[str, Any]:
        self._send("done")
        result = json.loads(self._expect("DONE"))
        self.proc.wait()
        self.timer.cancel()
        return result

    def kill(self) -> None:
        self.timer.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------- prototype: Winograd 3x3 convs
# NNPACK (bundled with the PyTorch CPU wheels) computes 3x3 stride-1 convolutions with
# Winograd F(6x6, 3x3): about 4x fewer multiplications than the direct convolution oneDNN
# runs. The ResNet generator spends ~88% of its FLOPs in such convs (the residual blocks).
# Forward and input gradient (itself a 3x3 stride-1 conv with the flipped, transposed
# weights) go through NNPACK; the weight gradient stays on oneDNN.


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, pad: int) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.pad, ctx.has_bias = pad, b is not None
        bias = b if b is not None else x.new_zeros(w.shape[0])
        return torch._nnpack_spatial_convolution(x.contiguous(), w.contiguous(), bias,
                                                 [pad, pad], [1, 1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        pad, need = ctx.pad, ctx.needs_input_grad
        grad = grad.contiguous()
        dx = dw = db = None
        if need[0]:
            w_t = w.flip(2, 3).transpose(0, 1).contiguous()
            dx = torch._nnpack_spatial_convolution(grad, w_t, x.new_zeros(w.shape[1]),
                                                   [2 - pad, 2 - pad], [1, 1])
        if need[1] or (ctx.has_bias and need[2]):
            _, dw, db = torch.ops.aten.convolution_backward(
                grad, x, w, [w.shape[0]] if ctx.has_bias else None, [1, 1], [pad, pad],
                [1, 1], False, [0, 0], 1, [False, need[1], ctx.has_bias and need[2]])
        return dx, dw, db, None


def _winograd_ok(conv: nn.Conv2d, x: Tensor) -> bool:
    pad = conv.padding
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(pad, tuple)
            and pad[0] == pad[1] < 3 and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.dim() == 4 and not torch.is_autocast_enabled("cpu"))


def install_winograd() -> None:
    """Route every eligible nn.Conv2d in this process through NNPACK's Winograd kernels."""
    if not torch._nnpack_available():  # also initialises NNPACK; calls fail without it
        raise RuntimeError("this PyTorch build has no NNPACK")
    direct = nn.Conv2d.forward

    def forward(self: nn.Conv2d, x: Tensor) -> Tensor:
        if _winograd_ok(self, x):
            return _WinogradConv.apply(x, self.weight, self.bias, self.padding[0])
        return direct(self, x)

    nn.Conv2d.forward = forward


def winograd_error(size: int = 32) -> float:
    """Largest |winograd - direct| / max|direct| of one 3x3 conv on random data."""
    torch._nnpack_available()
    x, w = torch.randn(1, 64, size, size), torch.randn(64, 64, 3, 3) * 0.05
    ref = F.conv2d(x, w, padding=1)
    got = _WinogradConv.apply(x, w, None, 1)
    return float((got - ref).abs().max() / ref.abs().max())
