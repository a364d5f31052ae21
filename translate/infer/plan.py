"""Planning a `translate apply` run: which images, where each output goes, and every check on
INPUT and OUTPUT that must fail before any file is written.

The one promise checked here: nothing in INPUT is ever written to. OUTPUT may be neither
inside INPUT nor contain it (outputs mirror INPUT's relative paths, so from a parent folder
they could land on the input files themselves), and as a last guard no planned file may
resolve to a place inside INPUT or onto an input file (e.g. through a symlinked folder).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from translate.errors import UserError
from translate.images import IMAGE_EXTENSIONS, list_images

PAIRS_DIR = "_pairs"


@dataclass(frozen=True)
class Job:
    index: int  # position in input order, to report failures deterministically
    src: Path
    dst: Path
    pair: Path | None  # where the side-by-side image goes, if asked for


def plan(spec: str | Path, output: str | Path, fmt: str | None, side_by_side: bool
         ) -> list[Job]:
    """Every (input, output) pair, after every check that can fail before any work is done."""
    base, sources, single = _find_inputs(spec)
    if not sources:
        raise UserError(f"{spec}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}) — "
                        "check the folder or pattern")
    out = Path(output)
    suffix = None if fmt is None else "." + fmt
    if single and out.suffix.lower() in IMAGE_EXTENSIONS and not out.is_dir():
        dst = out if suffix is None else out.with_suffix(suffix)
        if dst.resolve() == sources[0].resolve():
            raise UserError(f"{dst}: is the input file — choose another OUTPUT")
        pair = dst.parent / PAIRS_DIR / dst.name if side_by_side else None
        return _guarded([Job(0, sources[0], dst, pair)], base, single)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file — OUTPUT must be a folder for this INPUT")
    real_base, real_out = base.resolve(), out.resolve()
    if real_out == real_base or (not single and real_base in real_out.parents):
        raise UserError(f"{out}: is {'inside ' if not single else ''}the input folder {base} — "
                        "choose an OUTPUT folder outside it (the input is never written to)")
    if not single and real_out in real_base.parents:
        raise UserError(f"{out}: contains the input folder {base}, so outputs mirroring its "
                        "relative paths could overwrite input files — choose an OUTPUT folder "
                        "outside it (the input is never written to)")
    jobs, claimed = [], {}
    for i, src in enumerate(sources):
        rel = src.relative_to(base) if not single else Path(src.name)
        rel = rel if suffix is None else rel.with_suffix(suffix)
        if rel in claimed:
            raise UserError(f"{src}: would be written to {out / rel}, as would {claimed[rel]} — "
                            "rename one of them or drop --format")
        claimed[rel] = src
        jobs.append(Job(i, src, out / rel, out / PAIRS_DIR / rel if side_by_side else None))
    return _guarded(jobs, base, single)


def _guarded(jobs: list[Job], base: Path, single: bool) -> list[Job]:
    """Refuse a plan in which any write would land inside INPUT or on an input file.

    Writes are a temp file plus os.replace in the target's folder, which replaces a symlinked
    target rather than following it; so a write lands at (real folder) / name, and that is
    what is compared."""
    real_dirs: dict[Path, Path] = {}  # one realpath per folder, not per file

    def entry(path: Path) -> Path:
        if path.parent not in real_dirs:
            real_dirs[path.parent] = Path(os.path.realpath(path.parent))
        return real_dirs[path.parent] / path.name

    inputs = {entry(job.src) for job in jobs}
    real_base = None if single else base.resolve()
    for job in jobs:
        for target in (job.dst, job.pair):
            if target is None:
                continue
            place = entry(target)
            if place in inputs or (real_base is not None and real_base in place.parents):
                raise UserError(f"{target}: would be written inside INPUT ({place}) — choose "
                                "an OUTPUT folder outside the input (it is never written to)")
    return jobs


def _find_inputs(spec: str | Path) -> tuple[Path, list[Path], bool]:
    """(base folder the relative paths start from, images, the input is one file)."""
    text = str(spec)
    if any(c in text for c in "*?[") and not Path(text).exists():
        base = Path(*_leading_plain_parts(text) or ["."])
        found: dict[Path, None] = {}
        for match in sorted(glob.glob(text, recursive=True)):
            for image in list_images(match)[0]:
                found.setdefault(image)
        return base, list(found), False
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder — check the INPUT path")
    if path.is_file():
        return path.parent, [path], True
    return path, list_images(path)[0], False


def _leading_plain_parts(pattern: str) -> list[str]:
    parts = []
    for part in Path(pattern).parts:
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return parts


def check_format(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    fmt = fmt.lower().lstrip(".")
    if "." + fmt not in IMAGE_EXTENSIONS:
        raise UserError(f"--format {fmt}: unknown image format — use one of "
                        f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS)}")
    return fmt
