"""Writing a final file whole or not at all: every writer of a file that a reader or a resume
relies on (config.json, log.jsonl, exports, pictures) goes through `atomic_path`."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_STEM_BYTES = 200
TEMP_NAME = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp", re.DOTALL)


def temp_name(name: str) -> str:
    # Hidden, unique (two writers of one file never share a temp file), and short enough for
    # NAME_MAX (255 bytes) even when the name itself is.
    stem = os.fsdecode(os.fsencode(name)[:TEMP_STEM_BYTES])
    return f".{stem}.{uuid.uuid4().hex[:8]}.tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path, temp: str | None = None) -> Iterator[Path]:
    """A temporary path beside `path` to write the whole file to. When the block ends it
    replaces `path` in one rename, so a reader (or a run killed mid-write) sees the old file or
    the new one, never a part; when the block raises, the temporary file is removed.

    `temp`: the temporary file's name; by default a short unique one (".<8 hex>.tmp"), which
    makes the path no longer than a short final name does, so whatever fits PATH_MAX and
    NAME_MAX as a file also fits while it is written."""
    path = Path(path)
    tmp = path.with_name(temp or f".{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)  # no fsync: a killed process is the case to guard, not power loss
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. the path is too long to unlink either
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """`text` (UTF-8) as the whole content of `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
