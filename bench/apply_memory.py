"""Peak memory of `translate apply` on one large image (issue #4: a 4096x4096 image must be
translated in under 4 GB of RAM). Opt-in and slow with the real generator: a ResNet-9 of ngf 64
over 4096x4096 pixels is ~256 times the work of one 256 px image (many minutes on 2 cores).

    python bench/apply_memory.py                        # ResNet-9 ngf 64, 4096 px, --tile auto
    python bench/apply_memory.py --ngf 8 --blocks 1     # the same path in ~20 s (a smoke run)
    python bench/apply_memory.py --tile 0               # untiled, for comparison
    python bench/apply_memory.py --backend onnx --json

A random-init generator is exported (safetensors, or ONNX with --backend onnx) and a photo-like
PNG written to a temporary folder; `cli.py apply` then runs in a subprocess started by a tiny
probe process, whose RUSAGE_CHILDREN ru_maxrss is the apply process's peak RSS alone (a child
started straight from this process would carry this process's high-water mark across exec).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

LIMIT_MB = 4096  # the bound
PROBE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")


def write_inputs(work: Path, args: argparse.Namespace) -> Path:
    """The exported generator and INPUT/big.png; returns the model path."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from translate.export import metadata
    from translate.nets import build_net, init_weights

    torch.manual_seed(0)
    net = build_net("resnet", ngf=args.ngf, n_blocks=args.blocks)
    init_weights(net, 0.02)
    net.eval()
    meta = metadata(net, SimpleNamespace(method="cyclegan", name="bench"), "G_ab",
                    {"from": "A", "to": "B"}, 0, False)
    model = work / "G.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(model), meta)
    if args.backend == "onnx":
        from translate.onnx_export import export_onnx

        model = work / "G.onnx"
        print("\n".join(export_onnx(net, meta, model)))
    # Smooth colour fields plus noise: decodes and encodes at about a photo's cost.
    n = args.size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    img = np.stack([np.sin(5 * xx + 1), np.cos(3 * yy - 2), np.sin(7 * xx * yy)], -1)
    img = (img + 1) * 110 + rng.normal(0, 12, img.shape).astype(np.float32)
    (work / "in").mkdir()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(work / "in" / "big.png")
    return model


def measure(work: Path, model: Path, args: argparse.Namespace) -> dict[str, object]:
    cmd = [sys.executable, str(ROOT / "cli.py"), "apply", str(model), str(work / "in"),
           str(work / "out"), "--no-progress", "--tile", args.tile,
           "--precision", args.precision, "--batch-size", str(args.batch_size)]
    if args.overlap is not None:
        cmd += ["--overlap", str(args.overlap)]
    if args.backend == "torch":
        cmd += ["--nnpack", args.nnpack]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True,
                          env=env, check=False)
    seconds = time.perf_counter() - start
    peak_kb, code = (int(v) for v in proc.stdout.splitlines()[-1].split())
    if code != 0:
        print(proc.stderr, file=sys.stderr)
    return {"size": args.size, "model": f"resnet ngf {args.ngf}, {args.blocks} blocks",
            "backend": args.backend, "precision": args.precision, "nnpack": args.nnpack,
            "tile": args.tile, "overlap": args.overlap, "batch_size": args.batch_size,
            "threads": args.threads,
            "exit_code": code, "seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024),
            "under_4gb": code == 0 and peak_kb / 1024 < LIMIT_MB}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="image side in pixels")
    ap.add_argument("--ngf", type=int, default=64, help="generator width (64: the paper's)")
    ap.add_argument("--blocks", type=int, default=9, help="residual blocks (9: the paper's)")
    ap.add_argument("--tile", default="auto", help="apply --tile: auto, N, or 0 (never)")
    ap.add_argument("--overlap", type=int, help="apply --overlap (default: apply's)")
    ap.add_argument("--batch-size", type=int, default=4, help="apply --batch-size (tiles)")
    ap.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    ap.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32")
    ap.add_argument("--nnpack", choices=("auto", "on", "off"), default="auto",
                    help="apply --nnpack (torch backend)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the apply run")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="translate-apply-memory-") as tmp:
        work = Path(tmp)
        model = write_inputs(work, args)
        result = measure(work, model, args)
    print(f"apply {result['size']}x{result['size']}, {result['model']}, {args.backend} "
          f"{args.precision}, --nnpack {args.nnpack}, --tile {args.tile}: peak RSS "
          f"{result['peak_rss_mb']} MB in {result['seconds']} s (exit {result['exit_code']}); "
          f"{'under' if result['under_4gb'] else 'NOT under'} {LIMIT_MB} MB")
    if args.json:
        print(json.dumps(result))
    return 0 if result["under_4gb"] else 1


if __name__ == "__main__":
    sys.exit(main())
