"""datasets/fetch_cyclegan.py, run as a real subprocess against a local HTTP server (no internet)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "datasets" / "fetch_cyclegan.py"
COUNTS = {"trainA": 3, "trainB": 2, "testA": 1, "testB": 2}


class Server:
    """Serves files from `folder`; /nolength/F omits Content-Length, /short/F sends a truncated
    body, /stall/F sends half the body and then nothing for 3 s, /redirect/F answers 302 to
    `redirect_to`. Records request paths so tests can tell whether a download happened."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.requests, self.redirect_to = folder, [], ""
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                mode, _, name = self.path.strip("/").rpartition("/")
                if mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.folder / name
                if not path.is_file():
                    self.send_error(404, "Not Found")
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                if mode != "nolength":
                    extra = 1000 if mode == "short" else 0
                    self.send_header("Content-Length", str(len(body) + extra))
                self.end_headers()
                if mode == "stall":  # half the body, then silence
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    time.sleep(3)
                    return
                self.wfile.write(body)  # HTTP/1.0: closing the connection ends the body

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, name: str, mode: str = "") -> str:
        return f"{self.base}/{mode + '/' if mode else ''}{name}"


def _serve(folder: Path) -> Iterator[Server]:
    folder.mkdir()
    s = Server(folder)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Server]:
    yield from _serve(tmp_path / "served")


@pytest.fixture()
def elsewhere(tmp_path: Path) -> Iterator[Server]:
    """A second server on another port: where a redirect would lead."""
    yield from _serve(tmp_path / "elsewhere")


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 255 - value, 0)).save(buf, format="PNG")
    return buf.getvalue()


def dataset_members(prefix: str = "horse2zebra/", counts: dict[str, int] = COUNTS) -> dict:
    return {f"{prefix}{split}/{i}.png": png_bytes(i * 40)
            for split, n in counts.items() for i in range(n)}


def make_zip(path: Path, members: dict, symlinks: tuple[str, ...] = ()) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path.read_bytes()


def run(*args: str, cwd: Path, umask: int = 0o022) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=60, umask=umask)


def fetch(server: Server, root: Path, *extra: str, name: str = "horse2zebra.zip",
          mode: str = "", umask: int = 0o022) -> subprocess.CompletedProcess:
    return run("horse2zebra", "--url", server.url(name, mode), "--root", str(root), *extra,
               cwd=root.parent, umask=umask)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def counts_on_disk(folder: Path) -> dict[str, int]:
    return {split: len(list((folder / split).glob("*.png"))) for split in COUNTS}


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"),
                         [(0o022, 0o644, 0o755), (0o000, 0o664, 0o775)])
def test_fetch_layout_counts_and_modes(server: Server, tmp_path: Path, umask: int,
                                       file_mode: int, dir_mode: int) -> None:
    members = dataset_members()
    make_zip(server.folder / "horse2zebra.zip", members)
    root = tmp_path / "data"
    proc = fetch(server, root, umask=umask)
    assert proc.returncode == 0, proc.stderr
    final = root / "horse2zebra"
    assert sorted(p.name for p in final.iterdir()) == sorted(COUNTS)
    assert counts_on_disk(final) == COUNTS
    assert (final / "trainA" / "1.png").read_bytes() == members["horse2zebra/trainA/1.png"]
    for split, n in COUNTS.items():
        assert f"{split} {n}" in proc.stdout
    assert os.listdir(root) == ["horse2zebra"]  # no temp zip or staging folder left
    for path in [final, *final.rglob("*")]:
        want = dir_mode if path.is_dir() else file_mode
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_zip_without_top_folder(server: Server, tmp_path: Path) -> None:
    make_zip(server.folder / "horse2zebra.zip", dataset_members(prefix=""))
    proc = fetch(server, tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    assert counts_on_disk(tmp_path / "data" / "horse2zebra") == COUNTS


def test_missing_content_length_still_works(server: Server, tmp_path: Path) -> None:
    make_zip(server.folder / "horse2zebra.zip", dataset_members())
    proc = fetch(server, tmp_path / "data", mode="nolength")
    assert proc.returncode == 0, proc.stderr
    assert counts_on_disk(tmp_path / "data" / "horse2zebra") == COUNTS


def test_sha256_correct_passes_wrong_fails_cleanly(server: Server, tmp_path: Path) -> None:
    body = make_zip(server.folder / "horse2zebra.zip", dataset_members())
    root = tmp_path / "data"
    root.mkdir()
    wrong = hashlib.sha256(body + b"x").hexdigest()
    assert_one_line_error(fetch(server, root, "--sha256", wrong), "sha256 mismatch", wrong)
    assert os.listdir(root) == []  # no dataset, no temp files
    good = fetch(server, root, "--sha256", hashlib.sha256(body).hexdigest().upper())
    assert good.returncode == 0, good.stderr
    assert counts_on_disk(root / "horse2zebra") == COUNTS


def test_failed_first_fetch_leaves_no_root(server: Server, tmp_path: Path) -> None:
    body = make_zip(server.folder / "horse2zebra.zip", dataset_members())
    proc = fetch(server, tmp_path / "data", "--sha256", hashlib.sha256(body[1:]).hexdigest())
    assert_one_line_error(proc, "sha256")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_unsafe_members_are_refused(server: Server, tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "evil.txt"
    members, links = dataset_members(), ()
    if kind == "dotdot":
        bad = "horse2zebra/../../evil.txt"
        members[bad] = b"pwned"
    elif kind == "absolute":
        bad = str(outside)
        members[bad] = b"pwned"
    else:
        bad, links = "horse2zebra/trainA/link.png", ("horse2zebra/trainA/link.png",)
    make_zip(server.folder / "horse2zebra.zip", members, links)
    root = tmp_path / "data"
    root.mkdir()
    assert_one_line_error(fetch(server, root), "refusing", repr(bad),
                          *(["symlink"] if kind == "symlink" else []))
    assert not outside.exists()
    assert not (tmp_path / "data" / "evil.txt").exists()
    assert os.listdir(root) == []
    assert sorted(os.listdir(tmp_path)) == ["data", "served"]


def test_top_level_dotdot_member_is_refused(server: Server, tmp_path: Path) -> None:
    members = dataset_members()
    members["../evil.txt"] = b"pwned"
    make_zip(server.folder / "horse2zebra.zip", members)
    root = tmp_path / "data"
    assert_one_line_error(fetch(server, root), "refusing", "'../evil.txt'")
    assert not (tmp_path / "evil.txt").exists()
    assert not root.exists()


def test_http_404(server: Server, tmp_path: Path) -> None:
    proc = fetch(server, tmp_path / "data", name="nope.zip")
    assert_one_line_error(proc, "HTTP 404", server.url("nope.zip"))
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("target", ["other-port", "same-server"])
def test_redirects_are_refused_not_followed(server: Server, elsewhere: Server, tmp_path: Path,
                                            target: str) -> None:
    for s in (server, elsewhere):
        make_zip(s.folder / "horse2zebra.zip", dataset_members())
    there = elsewhere if target == "other-port" else server
    server.redirect_to = there.url("horse2zebra.zip")
    root = tmp_path / "data"
    proc = fetch(server, root, mode="redirect")
    line = assert_one_line_error(proc, server.url("horse2zebra.zip", "redirect"),
                                 f"redirects (HTTP 302) to {server.redirect_to}", "--url")
    assert "not followed" in line
    assert server.requests == ["/redirect/horse2zebra.zip"]  # asked once, nothing else
    assert elsewhere.requests == []
    assert not root.exists()
    # Guard: the target itself works when passed explicitly, as the message suggests.
    assert run("horse2zebra", "--url", server.redirect_to, "--root", str(root),
               cwd=tmp_path).returncode == 0
    assert counts_on_disk(root / "horse2zebra") == COUNTS


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/horse2zebra.zip"
    proc = run("horse2zebra", "--url", url, "--root", "data", cwd=tmp_path)
    assert_one_line_error(proc, "connection refused", url)


def test_truncated_download(server: Server, tmp_path: Path) -> None:
    make_zip(server.folder / "horse2zebra.zip", dataset_members())
    root = tmp_path / "data"
    root.mkdir()
    assert_one_line_error(fetch(server, root, mode="short"), "incomplete")
    assert os.listdir(root) == []


def test_read_timeout(server: Server, tmp_path: Path) -> None:
    make_zip(server.folder / "horse2zebra.zip", dataset_members())
    root = tmp_path / "data"
    root.mkdir()
    assert_one_line_error(fetch(server, root, "--timeout", "0.5", mode="stall"), "--timeout")
    assert os.listdir(root) == []


def test_interrupt_leaves_nothing(server: Server, tmp_path: Path) -> None:
    members = dataset_members()
    members["horse2zebra/notes.bin"] = os.urandom(400_000)  # half of it overflows write buffers
    make_zip(server.folder / "horse2zebra.zip", members)
    root = tmp_path / "data"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "horse2zebra", "--url",
                             server.url("horse2zebra.zip", "stall"), "--root", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not any(p.stat().st_size for p in root.glob(".*.part")):  # mid-download
        assert time.monotonic() < deadline and proc.poll() is None, "download never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert os.listdir(root) == []


def test_not_a_zip(server: Server, tmp_path: Path) -> None:
    (server.folder / "horse2zebra.zip").write_text("<html>maintenance</html>")
    root = tmp_path / "data"
    root.mkdir()
    assert_one_line_error(fetch(server, root), "not a valid zip")
    assert os.listdir(root) == []


def test_zip_without_splits(server: Server, tmp_path: Path) -> None:
    make_zip(server.folder / "horse2zebra.zip", dataset_members(counts={"trainA": 1}))
    assert_one_line_error(fetch(server, tmp_path / "data"), "trainB, testA, testB")


def test_rerun_skips_and_force_redownloads(server: Server, tmp_path: Path) -> None:
    make_zip(server.folder / "horse2zebra.zip", dataset_members())
    root = tmp_path / "data"
    assert fetch(server, root).returncode == 0
    assert len(server.requests) == 1

    skip = fetch(server, root)
    assert skip.returncode == 0, skip.stderr
    assert "already complete" in skip.stdout
    assert len(server.requests) == 1  # no download at all

    new_counts = {"trainA": 1, "trainB": 1, "testA": 1, "testB": 1}
    make_zip(server.folder / "horse2zebra.zip", dataset_members(counts=new_counts))
    forced = fetch(server, root, "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(server.requests) == 2
    assert counts_on_disk(root / "horse2zebra") == new_counts
    assert os.listdir(root) == ["horse2zebra"]  # the old copy is gone too


def test_incomplete_existing_folder_needs_force(server: Server, tmp_path: Path) -> None:
    make_zip(server.folder / "horse2zebra.zip", dataset_members())
    (tmp_path / "data" / "horse2zebra" / "trainA").mkdir(parents=True)
    assert_one_line_error(fetch(server, tmp_path / "data"), "--force", "testB")
    assert server.requests == []
    assert fetch(server, tmp_path / "data", "--force").returncode == 0
    assert counts_on_disk(tmp_path / "data" / "horse2zebra") == COUNTS


def test_list(tmp_path: Path) -> None:
    proc = run("--list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == ["horse2zebra", "apple2orange", "summer2winter_yosemite", "monet2photo",
                     "cezanne2photo", "ukiyoe2photo", "vangogh2photo", "maps", "cityscapes",
                     "facades", "iphone2dslr_flower"]


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    proc = run("horse2zebraa", cwd=tmp_path)
    assert_one_line_error(proc, "'horse2zebraa'", "horse2zebra,", "vangogh2photo")
    assert os.listdir(tmp_path) == []


def test_cityscapes_needs_own_url(tmp_path: Path) -> None:
    assert_one_line_error(run("cityscapes", cwd=tmp_path), "cityscapes-dataset.com", "--url")
    assert os.listdir(tmp_path) == []
