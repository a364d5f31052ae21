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
import atexit
import errno
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import NoReturn

from translate import cli_args
from translate.cli_args import TRAIN_FLAGS
from translate.errors import UserError


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
    from translate import config, recipe
    from translate.core.machine import machine_precision
    from translate.runner import train

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
    cfg = recipe.load(args.recipe, overrides)
    note = ""
    if args.resume:  # the run's config.json, changed only by the options given here
        cfg = recipe.resume_config(cfg, args.resume, overrides)
    elif args.steps is not None:  # a short run keeps a few log points and sample grids
        cfg, note = config.fit_intervals(cfg, _keys_given(args))
    recipe.refuse_ignored_steps(cfg, "steps" in _keys_given(args))
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
    from translate.explore.sample import sample_command

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


def cmd_import(args: argparse.Namespace) -> int:
    from translate.reference import import_reference

    for line in import_reference(args.model, args.out, onnx=args.onnx, epoch=args.epoch):
        print(line)
    return 0


_NNPACK = {"auto": None, "on": True, "off": False}  # apply --nnpack -> load_generator(nnpack=)


def cmd_apply(args: argparse.Namespace) -> int:
    from translate.infer import load_generator, translate_folder
    from translate.infer.progress import summary

    gen = load_generator(args.model, backend=args.backend, precision=args.precision,
                         compile=_compile_choice(args),
                         nnpack=_NNPACK[args.nnpack])
    # gen.forward, not gen: image files compute in the precision load_generator resolved (gen
    # itself would take translate_folder's float tensors for float input and run them in fp32).
    report = translate_folder(
        gen.forward, gen.info, args.input, args.output, batch_size=args.batch_size, tile=args.tile,
        overlap=args.overlap, resize=args.resize, format=args.format, overwrite=args.overwrite,
        side_by_side=args.side_by_side, workers=args.workers, max_pixels=args.max_pixels,
        progress=not args.no_progress,
    )
    if args.no_progress:  # with progress on, translate_folder already listed them
        for path, reason in report.failed:
            named = reason.startswith(str(path))  # reasons usually begin with the file already
            print(f"failed: {reason}" if named else f"failed: {path}: {reason}", file=sys.stderr)
        print(summary(report))  # as `train --no-progress` ends with its "done" line
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
    from translate.infer import model_info, read_metadata
    from translate.infer.compiled import image_sizes, sizes_worth_compiling
    from translate.infer.load import runs_nnpack
    from translate.infer.plan import check_format, plan

    model = Path(args.model)
    if args.backend == "onnx" or model.suffix.lower() == ".onnx" or not model.is_file():
        return False  # load_generator reports a missing file
    meta = read_metadata(model)
    if "size_multiple" not in meta:
        return False  # a latent generator: load_generator says what to use instead
    jobs = plan(args.input, args.output, check_format(args.format), False)
    todo = [job.src for job in jobs if args.overwrite or not _exists(job.dst)]
    sizes = image_sizes(todo, args.resize)
    nnpack = runs_nnpack(model, args.precision, nnpack=_NNPACK[args.nnpack], meta=meta)
    return sizes_worth_compiling(sizes, model_info(meta), args.tile, nnpack=nnpack) or False


def cmd_demo(args: argparse.Namespace) -> int:
    from translate.demo import run_demo

    run_demo(root=args.root, run_dir=args.run_dir, steps=args.steps, size=args.size,
             mixed_precision=args.mixed_precision, progress=not args.no_progress,
             overwrite=args.overwrite, method=args.method, overrides=args.set or [])
    return 0



def cmd_eval(args: argparse.Namespace) -> int:
    from translate.eval.report import cmd_eval as run

    return run(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from translate.explore.plot import cmd_plot as run

    return run(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from translate.eval.doctor import cmd_doctor as run

    return run(args)


def cmd_invert(args: argparse.Namespace) -> int:
    from translate.explore.invert import cmd_invert as run

    return run(args)


# Each command's function. They import what they run when called: `translate apply` loads
# inference only, never the training stack.
COMMANDS: cli_args.Commands = {
    "train": cmd_train, "export": cmd_export, "import": cmd_import, "apply": cmd_apply,
    "sample": cmd_sample, "demo": cmd_demo, "eval": cmd_eval, "plot": cmd_plot,
    "doctor": cmd_doctor, "invert": cmd_invert}


def parser() -> argparse.ArgumentParser:
    return cli_args.parser(COMMANDS)


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
    shown = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        code = getattr(e, "exit_code", 2)  # a requested stop: 128 + signal, as shells report it
        if e.same_on_every_rank and os.environ.get("RANK", "0") != "0":
            _await_the_main_rank()  # the main rank says it once
        else:
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


SILENT_RANK_WAIT_S = 30.0


def _await_the_main_rank() -> None:
    """A rank that leaves an error every rank raised alike (settings, divergence) for the main
    rank to say waits to be ended: torchrun stops every rank once one has failed, and a silent
    rank that failed first could have the main rank stopped before its line was printed (seen:
    no line at all, under load). Once the main rank has failed the launcher ends this one; the
    wait is capped for launchers that do not. A rank that is alone (no WORLD_SIZE above 1) has
    nobody to wait for."""
    if _world_size() > 1:
        time.sleep(SILENT_RANK_WAIT_S)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def leave(code: int) -> NoReturn:
    """End the process with `code`. A rank of a multi-process run (WORLD_SIZE > 1) runs the exit
    handlers, flushes its output and ends without interpreter finalization: torch's gloo worker
    threads may still be freeing the last collectives' work (tensors with Python references)
    after the final barrier, and doing that during finalization aborts the process (SIGABRT,
    "terminate called without an active exception", after a finished run; a core dump shows
    ProcessGroupGloo::runLoop destroying an AsyncBarrierWork; pytorch/pytorch PR 179291)."""
    if _world_size() > 1:
        atexit._run_exitfuncs()  # what finalization would run first, while all is alive
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run() -> NoReturn:
    """The `translate` command (pyproject's script, cli.py, python -m translate)."""
    leave(main())


if __name__ == "__main__":
    run()
