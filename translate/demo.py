"""`translate demo`, the main job: build the embedded demo data, train a small CycleGAN (or CUT,
FastCUT) on it, export the generators, translate the test folder and score the result against
the known truth."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from translate import recipe as recipe_mod
from translate.config import DEMO_RECIPES as RECIPES
from translate.data.demo import build_demo
from translate.errors import UserError
from translate.eval.metrics import cycle_scores, psnr, ssim
from translate.export import export_run
from translate.images import list_images, load_image, to_tensor
from translate.infer import load_generator, read_metadata, translate_folder
from translate.methods import METHODS
from translate.runner import train

DEMO_RUN_DIRS = {"cyclegan": "runs/demo", "cut": "runs/demo_cut", "fastcut": "runs/demo_fastcut"}


def find_recipe(name: str) -> Path:
    """recipes/<name> from the working directory, else from the source checkout."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / "recipes" / name).is_file():
            return base / "recipes" / name
    raise UserError(f"recipes/{name} not found; run from the translate checkout")


def _load_folder(folder: Path) -> tuple[list[str], torch.Tensor]:
    paths, _ = list_images(folder)
    return ([p.name for p in paths],
            torch.cat([to_tensor(load_image(p)) for p in paths]))


def score(gen_ab, gen_ba, test_a: Path, test_b: Path, translated: Path) -> dict[str, float]:
    """PSNR/SSIM of G_ab(testA) against the true translation testB, the do-nothing baseline
    (testA against testB), and the cycle reconstruction G_ba(G_ab(testA)) against testA when
    there is a G_ba (`gen_ba` None: CUT has none)."""
    names, a = _load_folder(test_a)
    _, b = _load_folder(test_b)
    fake_names, fake = _load_folder(translated)
    if fake_names != names:
        raise UserError(f"{translated}: translated files do not match {test_a}")
    out = {
        "psnr": float(psnr(fake, b)), "ssim": float(ssim(fake, b)),
        "baseline_psnr": float(psnr(a, b)), "baseline_ssim": float(ssim(a, b)),
        "n_test": len(names),
    }
    if gen_ba is not None:
        cyc = cycle_scores(a, gen_ba(gen_ab(a).clamp(-1, 1)).clamp(-1, 1))
        out.update(cycle_psnr=float(cyc["cycle_psnr"]), cycle_l1=float(cyc["cycle_l1"]))
    return out


def side_by_side(test_a: Path, translated: Path, test_b: Path, out: Path, n: int = 8) -> Path:
    """Columns: input | translated | truth, for the first n test images."""
    rows = []
    for p in sorted(test_a.iterdir())[:n]:
        imgs = [np.asarray(Image.open(d / p.name).convert("RGB")) for d in (test_a, translated,
                                                                             test_b)]
        rows.append(np.concatenate(imgs, axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).save(out)
    return out


def run_demo(root: str = "datasets/demo", run_dir: str | None = None, steps: int | None = None,
             size: int = 64, mixed_precision: str | None = None, progress: bool = True,
             overwrite: bool = False, method: str = "cyclegan",
             overrides: list[str] | None = None) -> dict[str, float]:
    """The demo in `run_dir`, its own folder (None: runs/demo for CycleGAN, runs/demo_cut,
    runs/demo_fastcut): a rerun continues (or reuses) the run there as its config.json says;
    `overwrite` moves it aside and trains anew. `method`: a key of RECIPES; `overrides`: --set
    items applied last."""
    console = Console(stderr=True, soft_wrap=True)
    t0 = time.perf_counter()
    root_p = build_demo(Path(root), size=size)
    console.print(f"demo data: {root_p} ({size}x{size}, hue-rotated domain B; see README.txt)")
    recipe = find_recipe(RECIPES[method])
    run_dir = run_dir or DEMO_RUN_DIRS[method]
    sets = [f'data.root="{root_p}"', f'run_dir="{run_dir}"', f"data.load_size={size}",
            f"data.crop_size={size}"]
    if steps is not None:
        sets.append(f"train.steps={steps}")
    if mixed_precision is not None:
        sets.append(f'train.mixed_precision="{mixed_precision}"')
    sets += overrides or []
    cfg = recipe_mod.load(recipe, sets)
    resume = None if overwrite else "auto-or-new"  # a finished run resumes instantly
    if resume:
        cfg = recipe_mod.resume_config(cfg, resume, sets)
    again = ["translate", "demo", "--method", method, "--root", str(root), "--run-dir",
             str(run_dir), "--size", str(size),
             *(["--steps", str(steps)] if steps is not None else []),
             *(["--mixed-precision", mixed_precision] if mixed_precision else []),
             *[a for item in overrides or [] for a in ("--set", item)]]
    result = train(cfg, resume=resume, progress=progress, overwrite=overwrite, again=again)
    t_train = time.perf_counter() - t0
    export = Path(run_dir) / "export"
    names = list(METHODS[cfg.method].build(cfg).generators)
    if _exported_step(export, names) != result.step:  # a rerun of a finished demo: no export
        # With train.ema the averaged generators are the ones to ship (as in the sample grids).
        for line in export_run(run_dir, onnx=_has_onnx(), ema=cfg.train.ema > 0):
            console.print(line)
    gen_ab = load_generator(export / "G_ab.safetensors")
    gen_ba = load_generator(export / "G_ba.safetensors") if "G_ba" in names else None
    translated = Path(run_dir) / "translated" / "testA"
    report = translate_folder(gen_ab.forward, gen_ab.info, root_p / "testA", translated,
                              overwrite=True, progress=progress)
    scores = score(gen_ab, gen_ba, root_p / "testA", root_p / "testB", translated)
    scores.update(method=method, steps=result.step, train_seconds=round(t_train, 1),
                  total_seconds=round(time.perf_counter() - t0, 1),
                  apply_images_per_s=round(report.images_per_s, 1))
    pairs = side_by_side(root_p / "testA", translated, root_p / "testB",
                         Path(run_dir) / "demo_side_by_side.png")
    (Path(run_dir) / "demo_scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    _print_scores(console, scores, pairs)
    return scores


def _exported_step(export: Path, names: list[str]) -> int | None:
    """The step of the exported generators `names` when all are there from one step."""
    try:
        steps = {int(read_metadata(export / f"{g}.safetensors")["step"]) for g in names}
    except (UserError, KeyError, ValueError):
        return None
    return steps.pop() if len(steps) == 1 else None


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _print_scores(console: Console, s: dict[str, float], pairs: Path) -> None:
    table = Table(title=f"demo ({s['method']}): G_ab(testA) vs the true translation testB")
    table.add_column("metric")
    table.add_column("translated", justify="right")
    table.add_column("do nothing (testA)", justify="right")
    table.add_row("PSNR (dB)", f"{s['psnr']:.2f}", f"{s['baseline_psnr']:.2f}")
    table.add_row("SSIM", f"{s['ssim']:.3f}", f"{s['baseline_ssim']:.3f}")
    if "cycle_psnr" in s:  # CUT has no G_ba
        table.add_row("cycle PSNR A->B->A (dB)", f"{s['cycle_psnr']:.2f}", "")
    Console().print(table)
    Console().print(f"{s['n_test']} test images, {s['steps']} steps, trained in "
                    f"{s['train_seconds']:.0f} s, total {s['total_seconds']:.0f} s; "
                    f"side by side (input | translated | truth): {pairs}")
