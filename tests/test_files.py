"""The one atomic-write helper (translate/files.py), and every writer of a final file using it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from translate import files
from translate.files import temp_name as _temp_name
from translate.images import is_temp_name

PACKAGE = Path(__file__).resolve().parent.parent / "translate"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "config.json"
    files.write_text(path, "old\n")
    with pytest.raises(RuntimeError), files.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_temp_names_are_hidden_unique_and_beside_the_file(tmp_path):
    seen = set()
    for _ in range(3):
        with files.atomic_path(tmp_path / "a.png") as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".") and len(tmp.name) == 13
            seen.add(tmp.name)
            tmp.write_bytes(b"x")
    assert len(seen) == 3  # two writers of one file never share a temp file


def test_no_writer_renames_a_hand_made_temp_file():
    # A hand-written "write to NAME.tmp, then rename" (a fixed name two writers would share)
    # instead of files.atomic_path. Checkpoint folders (core/checkpoint.py, core/best.py) are
    # folders, renamed by their own rules.
    pattern = re.compile(r"""with_name\(["']\.["'] \+ .*\)|\.tmp["']\)""")
    found = [f"{p.relative_to(PACKAGE.parent)}:{i}"
             for p in sorted(PACKAGE.rglob("*.py")) if p.name != "files.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == [], "use translate.files.atomic_path: " + ", ".join(found)


def test_temp_names_are_recognised_exactly():
    long_name = "n" * 251 + ".png"  # NAME_MAX bytes: the temp name keeps the first 200
    for name in ("a.png", "x y.JPG", long_name, "ü" * 120 + ".png"):
        tmp = _temp_name(name)
        assert is_temp_name(tmp) and len(os.fsencode(tmp)) <= 255, name
    for name in (".a.png.tmp", "a.png.0123abcd.tmp", ".a.txt.0123abcd.tmp", ".a.png.0123abcd",
                 ".a.png.0123abcg.tmp", "." + "n" * 199 + ".0123abcd.tmp"):
        assert not is_temp_name(name), name
