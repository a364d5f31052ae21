#!/usr/bin/env python3
"""Fetch a public CycleGAN dataset into ROOT/NAME/{trainA,trainB,testA,testB}.

    python datasets/fetch_cyclegan.py horse2zebra         # -> datasets/horse2zebra/
    python datasets/fetch_cyclegan.py --list
    python datasets/fetch_cyclegan.py maps --url https://mirror.example/maps.zip --sha256 HEX

Standard library plus `rich` (progress bar only), so it runs before the package is installed.
It downloads only the URL it is given: an HTTP redirect is reported with its target, not followed.
The zip goes to a hidden temp file next to the destination, is checked (sha256 when known, every
member's path) and unpacked into a hidden temp folder that is renamed to ROOT/NAME only once
complete: an interrupted fetch never leaves a half dataset under the final name.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import stat
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

try:  # The bar is a nicety: without rich the download still works, silently.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
except ImportError:  # pragma: no cover
    Progress = None

DATASETS: dict[str, str] = {
    "horse2zebra": "ImageNet horses <-> zebras",
    "apple2orange": "ImageNet apples <-> oranges",
    "summer2winter_yosemite": "Flickr photos of Yosemite, summer <-> winter",
    "monet2photo": "Monet paintings <-> Flickr landscape photos",
    "cezanne2photo": "Cezanne paintings <-> Flickr landscape photos",
    "ukiyoe2photo": "Ukiyo-e prints <-> Flickr landscape photos",
    "vangogh2photo": "Van Gogh paintings <-> Flickr landscape photos",
    "maps": "Google Maps aerial photos <-> map tiles",
    "cityscapes": "Cityscapes semantic labels <-> street photos (not on the server, see --help)",
    "facades": "CMP Facades labels <-> building photos",
    "iphone2dslr_flower": "Flickr flower photos, iPhone <-> DSLR (shallow depth of field)",
}
SPLITS = ("trainA", "trainB", "testA", "testB")
DEFAULT_BASE_URL = "https://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
CITYSCAPES_SITE = "https://www.cityscapes-dataset.com"
# sha256 of the zips at DEFAULT_BASE_URL. Add an entry only after verifying the digest of a real
# download; a guessed digest would reject every good file. Unlisted names print their digest.
KNOWN_SHA256: dict[str, str] = {}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHUNK = 1 << 16                          # bytes per read/write while downloading and unpacking
FILE_MODE = 0o664                        # before the umask; never world-writable, even at umask 0
DIR_MODE = 0o775
JUNK = re.compile(r"^(__MACOSX|\.DS_Store|\._.*|Thumbs\.db)$")  # archiver litter, skipped


class FetchError(Exception):
    """A failure shown to the user as one line: what went wrong, where, and what to do."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fetch a public CycleGAN dataset into ROOT/NAME/{trainA,trainB,testA,testB}.",
        epilog="cityscapes cannot be redistributed: prepare it from "
               f"{CITYSCAPES_SITE} (see datasets/README.md) or pass --url to your own zip.")
    p.add_argument("name", nargs="?", metavar="NAME", help="dataset name (see --list)")
    p.add_argument("--list", action="store_true", help="print the dataset names and exit")
    p.add_argument("--root", type=Path, default=Path("datasets"),
                   help="folder that receives NAME/ (default: datasets)")
    p.add_argument("--url", help="zip to download instead of the default server's")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help="server folder holding NAME.zip (default: %(default)s)")
    p.add_argument("--sha256", help="expected sha256 of the zip (64 hex digits)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the connection and for each read (default: 30)")
    p.add_argument("--force", action="store_true",
                   help="download and replace ROOT/NAME even if it is already complete")
    return p.parse_args(argv)


def resolve_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """The URL to fetch and the sha256 it must have (None = unknown)."""
    if args.name not in DATASETS:
        raise FetchError(f"unknown dataset {args.name!r}; choose one of: {', '.join(DATASETS)}")
    if args.name == "cityscapes" and args.url is None:
        raise FetchError(
            "cityscapes cannot be redistributed by the CycleGAN server: download it from "
            f"{CITYSCAPES_SITE}, arrange it as trainA/trainB/testA/testB (datasets/README.md), "
            "or pass --url to your own zip")
    expected = args.sha256
    if expected is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected):
        raise FetchError(f"--sha256 {expected!r} is not 64 hex digits; copy the full digest")
    if args.url is not None:
        url = args.url
    else:
        url = f"{args.base_url.rstrip('/')}/{args.name}.zip"
        # Known digests describe the default server's files (and exact mirrors), not --url.
        expected = expected or KNOWN_SHA256.get(args.name)
    return url, expected.lower() if expected else None


class RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """The script talks only to the URL it is given: a redirect (to another host, or from
    https to http) is reported with its target instead of being followed."""

    def redirect_request(self, req: urllib.request.Request, fp: BinaryIO, code: int, msg: str,
                         headers: object, newurl: str) -> urllib.request.Request | None:
        fp.close()
        raise FetchError(f"{req.full_url}: the server redirects (HTTP {code}) to {newurl}; not "
                         "followed, this script only downloads the URL it is given — if you "
                         "trust that address, pass it with --url (or its folder with --base-url)")


def open_url(url: str, timeout: float) -> http.client.HTTPResponse:
    """Open `url`, turning every network failure into one FetchError line."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError(f"{url!r} is not an http(s) URL; pass --url http://... or https://...")
    request = urllib.request.Request(url, headers={"User-Agent": "translate-fetch/1"})
    try:
        return urllib.request.build_opener(RefuseRedirects).open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        hint = "check the dataset name and --base-url/--url" if e.code == 404 else "retry later"
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}; {hint}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ConnectionRefusedError):
            raise FetchError(f"{url}: connection refused; check the host and port in the "
                             "URL, or that the server is up") from None
        if isinstance(reason, TimeoutError):
            raise FetchError(f"{url}: no answer within {timeout:g} s; check your network "
                             "or raise --timeout") from None
        raise FetchError(f"{url}: cannot connect ({reason}); check your network or the "
                         "URL") from None
    except TimeoutError:
        raise FetchError(f"{url}: no answer within {timeout:g} s; check your network or "
                         "raise --timeout") from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise FetchError(f"{url}: cannot download ({e}); check the URL") from None


def copy_body(response: http.client.HTTPResponse, out: BinaryIO, url: str) -> str:
    """Stream the response into `out` with a progress bar; return the sha256 hex digest."""
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None  # None: bar without ETA
    digest, done = hashlib.sha256(), 0
    progress = None
    if Progress is not None:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                            TransferSpeedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True))
        progress.start()
        task = progress.add_task(url.rsplit("/", 1)[-1] or url, total=total)
    try:
        while chunk := response.read(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress.update(task, advance=len(chunk))
    except TimeoutError:
        raise FetchError(f"{url}: the server stopped sending data; retry, or raise "
                         "--timeout") from None
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"{url}: download interrupted after {done} bytes ({e!r}); "
                         "retry") from None
    finally:
        if progress is not None:
            progress.stop()
    if total is not None and done != total:
        raise FetchError(f"{url}: download incomplete ({done} of {total} bytes); retry")
    return digest.hexdigest()


def download(url: str, dest: Path, timeout: float) -> str:
    """Download `url` into the (already created) file `dest`; return its sha256."""
    with open_url(url, timeout) as response, open(dest, "wb") as out:
        return copy_body(response, out, url)


def member_path(info: zipfile.ZipInfo, archive: str) -> PurePosixPath | None:
    """The member's safe relative path, None for archiver litter; refuse anything that could
    land outside the destination (zip-slip) or that is not a plain file or folder."""
    raw, kind = info.filename, stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise FetchError(f"{archive}: refusing symlink member {raw!r}; the zip is unsafe, "
                         "get it from a trusted source")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise FetchError(f"{archive}: refusing special-file member {raw!r}; the zip is unsafe")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or "\\" in raw or "\0" in raw:
        raise FetchError(f"{archive}: refusing absolute or non-portable member path {raw!r}; "
                         "the zip is unsafe, get it from a trusted source")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FetchError(f"{archive}: refusing member {raw!r} that climbs out with '..'; "
                         "the zip is unsafe, get it from a trusted source")
    if not parts or any(JUNK.match(p) for p in parts):
        return None
    return PurePosixPath(*parts)


def plan_members(zf: zipfile.ZipFile, archive: str) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Check every member before writing anything; map each one to its path under ROOT/NAME.

    The public zips hold one top-level NAME/ folder; zips made by hand often do not, so a single
    top-level folder that is not itself a split is stripped."""
    planned = [(i, p) for i in zf.infolist() if (p := member_path(i, archive)) is not None]
    tops = {p.parts[0] for _, p in planned}
    if len(tops) == 1 and next(iter(tops)) not in SPLITS:
        top = tops.pop()
        if all(len(p.parts) > 1 or i.is_dir() for i, p in planned):
            planned = [(i, p.relative_to(top)) for i, p in planned if len(p.parts) > 1]
    missing = [s for s in SPLITS if not any(p.parts[0] == s for _, p in planned)]
    if missing:
        raise FetchError(f"{archive}: no {', '.join(missing)} folder inside; a CycleGAN dataset "
                         "zip holds trainA, trainB, testA, testB (optionally under NAME/)")
    return planned


def unpack(zip_path: Path, staging: Path, url: str) -> None:
    """Unpack the archive into the empty folder `staging`, after checking every member."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            planned = plan_members(zf, url)
            needed = sum(i.file_size for i, _ in planned)
            free = shutil.disk_usage(staging).free
            if needed > free:
                raise FetchError(f"{url}: unpacking needs {needed >> 20} MiB but "
                                 f"{staging.parent} has {free >> 20} MiB free; free some space")
            for info, rel in planned:
                write_member(zf, info, staging / rel, url)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise FetchError(f"{url}: not a valid zip ({e}); the server may have sent an error page "
                         "or a truncated file, retry or check --url") from None
    except (NotImplementedError, RuntimeError) as e:  # unsupported compression, encryption
        raise FetchError(f"{url}: cannot unpack ({e}); repack it as a plain zip") from None


def write_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, url: str) -> None:
    # Modes come from FILE_MODE/DIR_MODE and the umask, never from the archive's attributes.
    try:
        if info.is_dir():
            dest.mkdir(DIR_MODE, parents=True, exist_ok=True)
            return
        dest.parent.mkdir(DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        with zf.open(info) as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    except OSError as e:
        raise FetchError(f"{url}: cannot unpack member {info.filename!r} ({e.strerror or e}); "
                         "the zip may hold duplicate names, or the disk is full") from None


def missing_splits(folder: Path) -> list[str]:
    return [s for s in SPLITS if not (folder / s).is_dir()]


def split_counts(folder: Path) -> dict[str, int]:
    return {s: sum(1 for f in (folder / s).rglob("*")
                   if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS))
            for s in SPLITS}


def describe(folder: Path) -> str:
    return ", ".join(f"{s} {n}" for s, n in split_counts(folder).items())


def install(staging: Path, final: Path) -> None:
    """Rename the finished folder into place. An old copy (--force) is moved aside first, put
    back if the rename fails, and deleted only once the new one is in place."""
    old: Path | None = None
    try:
        if final.exists() or final.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.rename(staging, final)
    except OSError as e:
        kept = ""
        if old is not None and (old / final.name).exists():
            try:
                os.replace(old / final.name, final)
                old.rmdir()
            except OSError:
                kept = f"; the previous copy is in {old / final.name}"
        raise FetchError(f"cannot move the dataset into {final} ({e.strerror or e}){kept}; "
                         "check that nothing else is writing there and retry") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fetch(args: argparse.Namespace) -> Path | None:
    """Fetch args.name into args.root; return its folder, or None when it was already there."""
    url, expected = resolve_source(args)
    root: Path = args.root
    final = root / args.name
    if final.exists() and not args.force:
        missing = missing_splits(final) if final.is_dir() else list(SPLITS)
        if not missing:
            print(f"{final} is already complete ({describe(final)}); pass --force to fetch again")
            return None
        raise FetchError(f"{final} exists but is not a complete dataset (missing "
                         f"{', '.join(missing)}); move it away or pass --force to replace it")
    made_root = not root.exists()
    try:
        root.mkdir(DIR_MODE, parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create {root} ({e.strerror or e}); pass a writable "
                         "--root") from None
    try:
        fetch_into(url, expected, final, args.timeout)
    except BaseException:
        if made_root and not any(root.iterdir()):
            root.rmdir()  # a failed first fetch leaves no trace, not even an empty --root
        raise
    return final


def fetch_into(url: str, expected: str | None, final: Path, timeout: float) -> None:
    """Download, verify, unpack and install; temp files are removed whatever happens."""
    # Temp names are hidden and live next to the destination, so the final rename is atomic.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}-", suffix=".zip.part",
                                    dir=final.parent)
    os.close(fd)
    zip_path, staging = Path(tmp_name), None
    try:
        print(f"downloading {url}", file=sys.stderr)
        actual = download(url, zip_path, timeout)
        if expected is not None and actual != expected:
            raise FetchError(f"{url}: sha256 mismatch (got {actual}, expected {expected}); the "
                             "file is corrupt or changed, retry or check --sha256")
        note = "verified" if expected else "not verified: pass --sha256 to pin it"
        print(f"sha256 {actual} ({note})", file=sys.stderr)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", suffix=".partial",
                                        dir=final.parent))
        # mkdtemp makes 0700; the folder becomes ROOT/NAME, so give it the usual mode.
        os.chmod(staging, DIR_MODE & ~current_umask())
        unpack(zip_path, staging, url)
        install(staging, final)
    finally:
        zip_path.unlink(missing_ok=True)
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        width = max(map(len, DATASETS))
        for name, about in DATASETS.items():
            print(f"{name:<{width}}  {about}")
        return 0
    if args.name is None:
        print(f"error: give a dataset NAME, one of: {', '.join(DATASETS)} (or --list)",
              file=sys.stderr)
        return 2
    try:
        final = fetch(args)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; temp files removed, {args.root / args.name} left as it was",
              file=sys.stderr)
        return 130
    if final is not None:
        print(f"{final}: {describe(final)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
