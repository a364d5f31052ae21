"""The `translate` command line's arguments: every command's parser, in one place.

Imports only light modules (constants and the argparse), so that building the parser for
`translate apply` loads no training stack; what each command runs is given by translate/cli.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from translate.config import DEMO_RECIPES as RECIPES
from translate.config import PRECISIONS
from translate.eval.metrics import PACGAN_SAMPLES

DESCRIPTION = ("The `translate` command. Thin: parses arguments, calls the package, prints "
               "errors as one line.")
Commands = dict[str, Callable[[argparse.Namespace], int]]

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



def _add_train(sub, commands: Commands) -> None:
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
    p.set_defaults(func=commands["train"])


def tile_size(text: str) -> int | str:
    """--tile: pixels, or auto."""
    return text if text == "auto" else int(text)


def _add_inference(sub, commands: Commands) -> None:
    p = sub.add_parser("export", help="export a run's generators (safetensors, optional ONNX)")
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--best", action="store_true", help="the best checkpoint (train.keep_best) "
                   "instead of the newest")
    p.add_argument("--out", help="output folder (default RUN/export)")
    p.add_argument("--onnx", action="store_true", help="also write <name>.onnx, checked vs torch")
    p.set_defaults(func=commands["export"])

    p = sub.add_parser("import", help="a generator trained by the reference CycleGAN/pix2pix "
                       "code (latest_net_G_A.pth) as an exported generator")
    p.add_argument("model", help="the reference's generator state dict (.pth: ResnetGenerator "
                   "or UnetGenerator; G_B files translate B to A), or its checkpoints/NAME "
                   "folder (both generators)")
    p.add_argument("out", help="the .safetensors file to write (translate apply reads it); for "
                   "a folder MODEL, the folder to write G_ab / G_ba.safetensors into")
    p.add_argument("--epoch", default="latest", help="with a folder MODEL: whose files "
                   "(<epoch>_net_G_A.pth ...), e.g. 200")
    p.add_argument("--onnx", action="store_true", help="also write each .onnx, checked vs torch")
    p.set_defaults(func=commands["import"])

    p = sub.add_parser("apply", help="translate a file, folder or glob of images")
    p.add_argument("model", help="exported generator (.safetensors or .onnx)")
    p.add_argument("input", help="image file, folder (recursive) or glob")
    p.add_argument("output", help="output folder (mirrors the input's relative paths)")
    p.add_argument("--batch-size", type=int, default=4, help="images of one size (or tiles of "
                   "a large image) per generator call; memory grows with it (on a CPU with 2+ "
                   "threads, torch runs take whole images in two lanes instead)")
    p.add_argument("--tile", type=tile_size, default="auto",
                   help="translate large images in tiles of at most NxN px (default auto: 512 "
                   "for images above 1024x1024 px, bounding memory; 0: never tile)")
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
                   "whose images add up to 16 megapixels or more, e.g. 250 images of 256x256; "
                   "28 with --nnpack)")
    p.add_argument("--nnpack", choices=("auto", "on", "off"), default="auto",
                   help="torch backend, fp32 on a CPU: run the large convolutions on NNPACK "
                   "(Winograd/FFT; ~2x faster on 2 cores; auto: on CPUs without AMX)")
    p.add_argument("--workers", type=int, default=2, help="decode/encode threads")
    p.add_argument("--max-pixels", type=int, default=128_000_000, help="refuse larger images")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar, summary or per-file lines (failures still listed)")
    p.set_defaults(func=commands["apply"])


def _add_other(sub, commands: Commands) -> None:
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
    p.set_defaults(func=commands["sample"])

    p = sub.add_parser("demo", help="the main job: train a small CycleGAN (or CUT) on the "
                       "embedded demo data, export it, translate the test folder and print scores")
    p.add_argument("--root", default="datasets/demo", help="where the demo data is built")
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
    p.set_defaults(func=commands["demo"])

    add_eval_parser(sub, commands)
    add_plot_parser(sub, commands)
    add_doctor_parser(sub, commands)
    add_invert_parser(sub, commands)


class _HelpWithDefaults(argparse.HelpFormatter):
    """--help shows each option's default, unless there is none (None, off) or its help
    already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def parser(commands: Commands) -> argparse.ArgumentParser:
    """The whole command line; `commands` maps each command's name to what runs it."""
    p = argparse.ArgumentParser(prog="translate", description=DESCRIPTION,
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub, commands)
    _add_inference(sub, commands)
    _add_other(sub, commands)
    for command in sub.choices.values():
        command.formatter_class = _HelpWithDefaults
    return p




def add_eval_parser(sub, commands: Commands) -> None:
    p = sub.add_parser("eval", help="scores: PSNR/SSIM vs truth, cycle, FID/KID, toy modes")
    p.add_argument("run", nargs="?", metavar="RUN_OR_EXPORT",
                   help="run folder, export folder or exported generator (.safetensors/.onnx)")
    p.add_argument("--folders", nargs=2, metavar=("DIR1", "DIR2"),
                   help="FID and KID between two image folders instead")
    p.add_argument("--data", metavar="ROOT", help="dataset root with testA/testB (default: "
                   "the run's data.root; needed for an exported generator)")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="which half of the dataset to score (ROOT/<split>A, <split>B)")
    p.add_argument("--input", metavar="DIR", help="your own aligned pairs: the images to "
                   "translate (with --truth; instead of --data)")
    p.add_argument("--truth", metavar="DIR", help="the true translation of each --input image, "
                   "under the same relative name (any image extension): PSNR/SSIM against it")
    p.add_argument("--direction", choices=("ab", "ba"), help="with --input: which generator "
                   "of a run or export folder translates (default ab, G_ab)")
    p.add_argument("--fid-features", metavar="small|PATH", help="add FID/KID: 'small' (a fixed "
                   "random net, relative measure only) or the pytorch-fid Inception weights file")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="Inception weights for FID/KID (same as --fid-features PATH)")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    p.add_argument("--ema", action="store_true", help="use the EMA generator weights")
    p.add_argument("--best", action="store_true", help="the run's best checkpoint "
                   "(train.keep_best) instead of the newest")
    p.add_argument("--samples", type=int, default=PACGAN_SAMPLES, help="toy runs: samples drawn")
    p.add_argument("--seed", type=int, default=0, help="toy runs: seed of the latent codes")
    p.add_argument("--batch-size", type=int, default=8, help="images per generator call")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=commands["eval"])


def add_plot_parser(sub, commands: Commands) -> None:
    p = sub.add_parser("plot", help="plot a run's logged losses and scalars as a PNG")
    p.add_argument("run", help="run folder (runs/<name>) or its log.jsonl")
    p.add_argument("--out", help="output PNG (default RUN/plot.png)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="exponential smoothing weight in [0, 1), e.g. 0.9 for noisy GAN losses")
    p.set_defaults(func=commands["plot"])


def add_doctor_parser(sub, commands: Commands) -> None:
    p = sub.add_parser("doctor", help="a run's health timeline, best steps and warnings, read "
                       "from its log without touching it")
    p.add_argument("run", help="run folder (runs/<name>)")
    for flag, text in (("--all", "every health check, not a sample"),
                       ("--json", "print one JSON object instead")):
        p.add_argument(flag, action="store_true", help=text)
    p.set_defaults(func=commands["doctor"])


def add_invert_parser(sub, commands: Commands) -> None:
    p = sub.add_parser("invert", help="find the latent code of an image (GAN inversion)")
    p.add_argument("run", help="run folder of an image GAN (dcgan, wgan_gp)")
    p.add_argument("image", help="image file; resized and centre-cropped to G's size")
    p.add_argument("--out", default="inverted.png",
                   help="target|reconstruction PNG; the code goes to the same name .safetensors")
    p.add_argument("--steps", type=int, default=500, help="Adam steps on z")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on z")
    p.add_argument("--restarts", type=int, default=4, help="random starts; the best is kept")
    p.add_argument("--feature-loss", type=float, nargs="?", const=1.0, default=0.0,
                   metavar="WEIGHT", help="add D's feature-map L2 with this weight (flag "
                   "alone: 1.0)")
    p.add_argument("--encoder", action="store_true",
                   help="start from a small encoder trained on G's own samples")
    p.add_argument("--encoder-steps", type=int, default=300, help="encoder training steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts (and the "
                   "encoder's training samples)")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    p.add_argument("--ema", action="store_true", help="use the EMA generator")
    p.set_defaults(func=commands["invert"])
