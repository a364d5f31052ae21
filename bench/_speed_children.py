"""The child side of bench/speed.py: each case runs in a process of its own (`speed.py --child
KIND SPEC`), which builds one timed unit from its JSON spec (a GEMM, a training step through
the real loop, an `apply` pass over a folder) and serves it to the parent (_paired.serve), which
times it in alternation with the fp32 child of the same case."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

Unit = tuple[Callable[[], int], Callable[[], dict]]  # (one timed unit -> items, final report)


def child_gemm(spec: dict[str, Any]) -> Unit:
    import torch
    from _common import gemm_gflops, peak_rss_mb

    rate, n = gemm_gflops(getattr(torch, spec["dtype"]), budget_s=spec["budget"])
    return lambda: 1, lambda: {"gflops": rate, "n": n, "rss_mb": peak_rss_mb()}


def child_train(spec: dict[str, Any]) -> Unit:
    from _common import peak_rss_mb, train_steps
    from torch.utils.flop_counter import FlopCounterMode

    from translate.nets.nnpack import TrainConv2d

    s, batches, train_step = train_steps(spec["recipe"], spec["overrides"])
    on_nnpack = any(isinstance(m, TrainConv2d) for n in s.nets.values() for m in n.modules())
    draw, waited = batches.next, [0.0, 0]

    def timed_next():  # data loading in-process: its whole cost, nothing hidden by workers
        t = time.perf_counter()
        out = draw()
        waited[0] += time.perf_counter() - t
        return out

    batches.next = timed_next

    def step() -> int:
        train_step()
        waited[1] += 1
        return 1

    def finish() -> dict[str, Any]:
        flops = None
        if spec["count_flops"]:
            count_nnpack_flops()
            try:
                with FlopCounterMode(display=False) as counter:
                    step()
                flops = counter.get_total_flops()
            except RuntimeError:  # the counter cannot follow a penalty's double backward
                flops = None
        return {"flops": flops, "rss_mb": peak_rss_mb(), "data_s": waited[0] / max(waited[1], 1),
                "resolved": {"no": "fp32"}.get(s.accelerator.mixed_precision,
                                               s.accelerator.mixed_precision)
                + (" nnpack" if on_nnpack else ""),
                "warmup_s": warm}

    began = time.perf_counter()
    for _ in range(spec["warmup"]):
        step()
    warm = time.perf_counter() - began  # with torch.compile: the compile
    return step, finish


def child_apply(spec: dict[str, Any]) -> Unit:
    from _common import apply_folder, peak_rss_mb

    from translate.export import load_generator
    from translate.infer.nnpack import NnpackConv2d

    args = spec["args"]
    onnx = args.get("backend") == "onnx"
    gen = load_generator(spec["onnx"] if onnx else spec["model"], **args)

    def run() -> int:
        return apply_folder(gen, spec["input"], spec["output"])

    began = time.perf_counter()
    for _ in range(spec["warmup"]):
        run()
    warm = time.perf_counter() - began  # compiled: the compile, once per size
    on_nnpack = any(isinstance(m, NnpackConv2d) for m in (gen.net.modules() if gen.net else ()))
    resolved = f"{gen.precision}{' nnpack' if on_nnpack else ''}"
    return run, lambda: {"rss_mb": peak_rss_mb(), "resolved": resolved, "warmup_s": warm}


def count_nnpack_flops() -> None:
    """FlopCounterMode counts NNPACK's convolutions (train.nnpack) as the direct convolutions
    they stand for, so a step's FLOPs do not depend on which kernels ran it."""
    import torch
    from torch.utils.flop_counter import conv_flop_count, register_flop_formula

    op = torch.ops.aten._nnpack_spatial_convolution
    if op in torch.utils.flop_counter.flop_registry:
        return

    @register_flop_formula(op)
    def _flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


CHILDREN: dict[str, Callable[[dict[str, Any]], Unit]] = {
    "gemm": child_gemm, "train": child_train, "apply": child_apply}


def child_main(kind: str, spec_json: str) -> None:
    import torch
    from _paired import serve

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    serve(*CHILDREN[kind](spec))
