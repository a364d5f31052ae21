"""The `translate` command. Thin: parses arguments, calls the package, prints errors as one line.

    translate demo [--method cut]                   build the demo data, train, export, apply, score
    translate train RECIPE [--set k=v ...]          train any method from a TOML recipe
    translate export RUN_DIR [--onnx]               write generators as safetensors (+ ONNX)
    translate apply MODEL INPUT OUTPUT              translate a file, folder or glob of images
    translate sample RUN_OR_CHECKPOINT              sample grid / interpolation of a latent GAN
    translate eval RUN | --folders A B              scores (PSNR/SSIM, FID/KID, toy modes)
    translate plot RUN_DIR                          loss and metric curves as a PNG
    translate doctor RUN_DIR                        health timeline, best steps, warnings
    translate invert RUN IMAGE --out OUT.png        the latent code of an image (GAN inversion)
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from pathlib import Path

# Flags that are shorthands for recipe keys: (flag, dest, recipe key).
TRAIN_FLAGS = [
    ("--data", "data", "data.root", str, "dataset root (trainA/trainB) or image folder"),
    ("--steps", "steps", "train.steps", int, "total generator steps"),
    ("--run-dir", "run_dir", "run_dir", str, "run folder (default runs/<name>-<data folder>)"),
    ("--batch-size", "batch_size", "train.batch_size", int, "images per process per step"),
    ("--seed", "seed", "seed", int, "random seed (CPU runs repeat exactly)"),
    ("--mixed-precision", "mixed_precision", "train.mixed_precision", str, "{precisions}"),
    ("--save-every", "save_every", "train.save_every", int, "steps between checkpoints"),
    ("--sample-every", "sample_every", "train.sample_every", int, "steps between sample grids"),
    ("--log-every", "log_every", "train.log_every", int, "steps between log lines"),
    ("--eval-every", "eval_every", "train.eval_every", int, "steps between scores (0 = off)"),
]


def _quote(value: object) -> str:
    if isinstance(value, str) and not _is_unicode(value):
        # A path with non-UTF-8 bytes (os.fsdecode's surrogates) has no TOML spelling; the raw
        # text is not TOML either, so the override takes it verbatim as a string.
        return value
    return json.dumps(value) if isinstance(value, str) else str(value)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cmd_train(args: argparse.Namespace) -> int:
    from translate import config
    from translate.core import rundir
    from translate.core.loop import machine_precision, train

    overrides = list(args.set or [])
    for _flag, dest, key, _type, _help in TRAIN_FLAGS:
        value = getattr(args, dest)
        if value is not None:
            overrides.append(f"{key}={_quote(value)}")
    if args.strict:
        overrides.append("data.strict=true")
    if args.log_with:
        overrides.append(f"train.log_with={_quote(','.join(args.log_with))}")
    if args.steps is not None:  # an explicit step count wins over the recipe's epochs
        overrides += ["train.epochs=0", "train.epochs_decay=0"]
    cfg = config.load(args.recipe, overrides)
    note = ""
    if args.resume:  # the run's config.json, changed only by the options given here
        cfg = rundir.resume_config(cfg, args.resume, overrides)
    elif args.steps is not None:  # a short run keeps a few log points and sample grids
        cfg, note = config.fit_intervals(cfg, _keys_given(args))
    if args.dry_run:
        machine_precision(cfg)  # refuses what this machine cannot run (fp16 on CPU), as a run does
        print(json.dumps(config.to_dict(cfg), indent=2))
        if note:
            print(note, file=sys.stderr)
        return 0
    again = ["translate", "train", args.recipe, "--run-dir", str(cfg.out_dir), "--resume", "auto"]
    result = train(cfg, resume=args.resume, progress=not args.no_progress,
                   overwrite=args.overwrite, again=again)
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        if note:  # after the run: a refused run says only why (one line)
            print(note, file=sys.stderr)
        print(f"done: {result.step} steps in {result.run_dir}; checkpoint {result.checkpoint}")
    return 0


def _keys_given(args: argparse.Namespace) -> set[str]:
    """The train.* keys the command line sets (by flag or --set), short names."""
    given = {key.split(".", 1)[1] for _f, dest, key, _t, _h in TRAIN_FLAGS
             if key.startswith("train.") and getattr(args, dest) is not None}
    sets = (item.partition("=")[0].strip() for item in args.set or [])
    return given | {k.split(".", 1)[1] for k in sets if k.startswith("train.")}


def cmd_sample(args: argparse.Namespace) -> int:
    from translate.sample import sample_command

    path = sample_command(args.run, n=args.n, out=args.out, interpolate=args.interpolate,
                          seed=args.seed, step=args.step, ema=args.ema, linear=args.linear,
                          arithmetic=args.arithmetic, class_name=args.class_name,
                          vary_code=args.vary_code, separate=args.separate)
    print(f"wrote {args.n} samples into {path}" if args.separate else f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from translate.export import export_run

    for line in export_run(args.run, step=args.step, ema=args.ema, out=args.out, onnx=args.onnx,
                           best=args.best):
        print(line)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from translate.export import load_generator
    from translate.infer import translate_folder

    gen = load_generator(args.model, backend=args.backend, precision=args.precision,
                         compile=_compile_choice(args))
    report = translate_folder(
        gen, gen.info, args.input, args.output, batch_size=args.batch_size, tile=args.tile,
        overlap=args.overlap, resize=args.resize, format=args.format, overwrite=args.overwrite,
        side_by_side=args.side_by_side, workers=args.workers, max_pixels=args.max_pixels,
        progress=not args.no_progress,
    )
    if args.no_progress:  # with progress on, translate_folder already listed them
        for path, reason in report.failed:
            named = reason.startswith(str(path))  # reasons usually begin with the file already
            print(f"failed: {reason}" if named else f"failed: {path}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def _exists(path: Path) -> bool:
    """Path.exists, with an unusable path (too long, ...) as not there: the run itself then
    reports that file in its one line."""
    try:
        return path.exists()
    except OSError:
        return False


def _compile_choice(args: argparse.Namespace):
    """--compile on/off, or for auto the image sizes whose images repay a compile."""
    if args.compile != "auto":
        return args.compile == "on"
    from translate.compiled import image_sizes, sizes_worth_compiling
    from translate.export import model_info, read_metadata
    from translate.infer_plan import check_format, plan

    model = Path(args.model)
    if args.backend == "onnx" or model.suffix.lower() == ".onnx" or not model.is_file():
        return False  # load_generator reports a missing file
    meta = read_metadata(model)
    if "size_multiple" not in meta:
        return False  # a latent generator: load_generator says what to use instead
    jobs = plan(args.input, args.output, check_format(args.format), False)
    todo = [job.src for job in jobs if args.overwrite or not _exists(job.dst)]
    sizes = image_sizes(todo, args.resize)
    return sizes_worth_compiling(sizes, model_info(meta), args.tile) or False


def cmd_demo(args: argparse.Namespace) -> int:
    from translate.demo import run_demo

    run_demo(root=args.root, run_dir=args.run_dir, steps=args.steps, size=args.size,
             mixed_precision=args.mixed_precision, progress=not args.no_progress,
             overwrite=args.overwrite, method=args.method, overrides=args.set or [])
    return 0


def _add_train(sub) -> None:
    from translate.config import PRECISIONS

    p = sub.add_parser("train", help="train a method from a TOML recipe")
    p.add_argument("recipe", help="recipes/<name>.toml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.lr_g=1e-4 (repeatable)")
    for flag, dest, _key, typ, help_ in TRAIN_FLAGS:
        p.add_argument(flag, dest=dest, type=typ,
                       help=help_.format(precisions=" | ".join(PRECISIONS)))
    p.add_argument("--log-with", action="append", metavar="TRACKER",
                   help="tensorboard, wandb or mlflow (comma-separated or repeated); files go "
                   "under RUN/tracking, wandb offline unless WANDB_MODE is set")
    p.add_argument("--resume", metavar="auto|auto-or-new|PATH",
                   help="continue the run as its config.json says (options given again may "
                   "extend --steps or change how it is logged and saved, nothing else): auto = "
                   "the newest checkpoint of the run folder (none there is an error), "
                   "auto-or-new = the same or a new run where there is none, PATH = a checkpoint "
                   "or run folder")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that "
                   "holds a run; the old run is moved to RUN.old-<time>, not deleted")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image "
                   "instead of skipping it with a warning (data.strict=true)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no live bar")
    p.set_defaults(func=cmd_train)


def tile_size(text: str) -> int | str:
    """--tile: pixels, or auto."""
    return text if text == "auto" else int(text)


def _add_inference(sub) -> None:
    p = sub.add_parser("export", help="export a run's generators (safetensors, optional ONNX)")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--best", action="store_true", help="the best checkpoint (train.keep_best) "
                   "instead of the newest")
    p.add_argument("--out", help="output folder (default RUN/export)")
    p.add_argument("--onnx", action="store_true", help="also write <name>.onnx, checked vs torch")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("apply", help="translate a file, folder or glob of images")
    p.add_argument("model", help="exported generator (.safetensors or .onnx)")
    p.add_argument("input", help="image file, folder (recursive) or glob")
    p.add_argument("output", help="output folder (mirrors the input's relative paths)")
    p.add_argument("--batch-size", type=int, default=4, help="images of one size (or tiles of "
                   "a large image) per generator call; memory grows with it")
    p.add_argument("--tile", type=tile_size, default="auto",
                   help="translate large images in NxN tiles (default auto: 512 for images "
                   "above 1024x1024 px, bounding memory; 0: never tile)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels (U-Nets "
                   "reach further: 96-128)")
    p.add_argument("--resize", type=int, help="resize so the longer side is N pixels")
    p.add_argument("--format", help="output format, e.g. png (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--side-by-side", action="store_true", help="also write input|output pairs")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="default: by the MODEL file (.onnx: onnxruntime, .safetensors: torch)")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto",
                   help="torch backend compute precision (auto: bf16 where the CPU/GPU has it)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch backend: torch.compile the generator with frozen weights (~2x "
                   "faster after a warm-up of 10-40 s per image size; auto: on for the sizes "
                   "whose images add up to 16 megapixels or more, e.g. 250 images of 256x256)")
    p.add_argument("--workers", type=int, default=2, help="decode/encode threads")
    p.add_argument("--max-pixels", type=int, default=128_000_000, help="refuse larger images")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar, summary or per-file lines (failures still listed)")
    p.set_defaults(func=cmd_apply)


def _add_other(sub) -> None:
    from translate.config import PRECISIONS

    p = sub.add_parser("sample", help="draw samples from a latent GAN run")
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", help="output PNG (default: RUN/samples/<kind>_step<S>_n<N>_seed"
                   "<SEED>.png, one name per kind of picture)")
    p.add_argument("--separate", metavar="DIR", help="write the N samples as separate PNGs "
                   "into DIR instead (<seed>_<i>.png; cgan without --class: DIR/<class>/), "
                   "e.g. for `translate eval --folders DIR DATA`")
    p.add_argument("--interpolate", action="store_true",
                   help="a latent interpolation strip between random codes instead")
    p.add_argument("--linear", action="store_true",
                   help="with --interpolate: straight lines instead of slerp")
    p.add_argument("--arithmetic", metavar="EXPR",
                   help='latent vector arithmetic, e.g. "3,7,9 - 1,2 + 4,5": means of the codes '
                   "of those samples of the grid drawn with the same --n and --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent codes (the same "
                   "--n and --seed draw the same samples)")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    p.add_argument("--ema", action="store_true", help="use the EMA generator")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="cgan runs: a grid of this class (default: one row per class)")
    p.add_argument("--vary-code", type=int, metavar="I",
                   help="infogan runs: each row varies code I, z and the other codes fixed")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the main job: train a small CycleGAN (or CUT) on the "
                       "embedded demo data, export it, translate the test folder and print scores")
    p.add_argument("--root", default="datasets/demo", help="where the demo data is built")
    from translate.demo import RECIPES

    p.add_argument("--method", default="cyclegan", choices=tuple(RECIPES),
                   help="what to train: " + ", ".join(f"{k} (recipes/{v})"
                                                      for k, v in RECIPES.items()))
    p.add_argument("--run-dir", help="default: runs/demo (cyclegan), runs/demo_cut, "
                   "runs/demo_fastcut")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    p.add_argument("--size", type=int, default=64, help="demo image size")
    p.add_argument("--mixed-precision", choices=PRECISIONS,
                   help="as for train (auto: bf16 where the hardware has it); default: recipe's")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set model.num_patches=64 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no live bar")
    p.add_argument("--overwrite", action="store_true", help="train the demo anew; the earlier "
                   "run is moved to RUN.old-<time> (default: continue or reuse it)")
    p.set_defaults(func=cmd_demo)

    from translate.doctor import add_doctor_parser
    from translate.eval_report import add_eval_parser
    from translate.plot import add_plot_parser

    add_eval_parser(sub)
    add_plot_parser(sub)
    add_doctor_parser(sub)
    from translate.invert import add_invert_parser

    add_invert_parser(sub)


class _HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each option's default, unless there is none (None, off) or its help
    already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="translate", description=__doc__.split("\n")[0],
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_inference(sub)
    _add_other(sub)
    for command in sub.choices.values():
        command.formatter_class = _HelpWithDefaults
    return p


# Errors of the machine rather than of the program: disk full, read-only or forbidden folder,
# a path longer than the file system allows.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space",
                       errno.EROFS: "choose a writable folder", errno.EACCES: "fix permissions",
                       errno.EPERM: "fix permissions", errno.ENAMETOOLONG: "use a shorter path"}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our own warnings (skipped images, ...) are messages for the user: one line each."""
    if category.__module__.startswith("translate"):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def _no_world_writable() -> None:
    """Add o+w to the umask, so nothing this process creates (our files or a library's:
    accelerate, ONNX, TensorBoard) is world-writable even at umask 000. Masks that already
    have it (022, 077) are unchanged. Set once at start, before any thread exists."""
    mask = os.umask(0o022)
    os.umask(mask | 0o002)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    _no_world_writable()
    from translate.errors import ConfigError, UserError

    shown = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        code = getattr(e, "exit_code", 2)  # a requested stop: 128 + signal, as shells report it
        if not (isinstance(e, ConfigError) and os.environ.get("RANK", "0") != "0"):
            # Under a launcher every rank reads the same settings: the main one says it once.
            print(f"error: {e}" if code == 2 else str(e), file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror}; {_ENVIRONMENT_ERRNOS[e.errno]} and run again",
                  file=sys.stderr)
            return 2
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"internal error: {type(e).__name__}: {first} (rerun with --debug for the "
              "traceback and please report it)", file=sys.stderr)
        return 3
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
