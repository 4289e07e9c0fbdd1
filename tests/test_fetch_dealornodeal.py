"""benchmarks/fetch_dealornodeal.py against a real HTTP server on localhost laid out like GitHub's raw files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import fetch_dealornodeal as fetch_dnd  # noqa: E402

BODY = b"<input> 1 4 4 1 1 2 </input> <dialogue> YOU: i need the book <eos> THEM: deal <eos> </dialogue>\n"


class _Mirror:
    """A directory served over HTTP that counts the GET requests it answers."""

    def __init__(self, root: Path):
        self.root, self.requests = root, []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mirror"

    def put(self, name: str, body: bytes, commit: str = fetch_dnd.COMMIT) -> None:
        path = self.root / "mirror" / commit / fetch_dnd.CORPUS_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


@pytest.fixture
def mirror(tmp_path):
    m = _Mirror(tmp_path / "served")
    yield m
    m.server.shutdown()
    m.server.server_close()


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def test_fetch_writes_a_file_with_the_pinned_digest_and_a_rerun_downloads_nothing(mirror, tmp_path, monkeypatch):
    mirror.put("test.txt", BODY)
    monkeypatch.setitem(fetch_dnd.PINNED_SHA256, "test.txt", _sha(BODY))
    dest_dir = tmp_path / "data" / "dealornodeal"
    path, downloaded = fetch_dnd.fetch("test.txt", dest_dir, base_url=mirror.url)
    assert downloaded and path == dest_dir / "test.txt" and path.read_bytes() == BODY
    assert path.stat().st_mode & 0o044  # readable by others as umask allows, not mkstemp's 0600
    assert mirror.requests == [f"/mirror/{fetch_dnd.COMMIT}/src/data/negotiate/test.txt"]
    # Idempotent: the file with the right digest is kept and the server is not asked again.
    assert fetch_dnd.fetch("test.txt", dest_dir, base_url=mirror.url) == (path, False)
    assert len(mirror.requests) == 1
    assert [p.name for p in dest_dir.iterdir()] == ["test.txt"]  # no temporary file left behind


def test_a_download_with_another_digest_writes_nothing(mirror, tmp_path):
    mirror.put("test.txt", BODY)  # not the real test.txt: its digest differs from the pinned one
    dest_dir = tmp_path / "out"
    dest_dir.mkdir()
    with pytest.raises(fetch_dnd.FetchError, match=r"test.txt: the download from .* has sha256 .*not the pinned "
                                                    + fetch_dnd.PINNED_SHA256["test.txt"]):
        fetch_dnd.fetch("test.txt", dest_dir, base_url=mirror.url)
    assert list(dest_dir.iterdir()) == []  # neither test.txt nor the temporary .part file


def test_an_existing_file_with_another_digest_is_never_overwritten(mirror, tmp_path, monkeypatch):
    mirror.put("test.txt", BODY)
    monkeypatch.setitem(fetch_dnd.PINNED_SHA256, "test.txt", _sha(BODY))
    dest_dir = tmp_path / "out"
    dest_dir.mkdir()
    (dest_dir / "test.txt").write_bytes(b"my own edits\n")
    with pytest.raises(fetch_dnd.FetchError, match="already there with sha256 .* left as it is"):
        fetch_dnd.fetch("test.txt", dest_dir, base_url=mirror.url)
    assert (dest_dir / "test.txt").read_bytes() == b"my own edits\n" and mirror.requests == []


def test_unpinned_files_need_a_digest_and_missing_files_name_the_address(mirror, tmp_path):
    mirror.put("train.txt", BODY * 3)
    with pytest.raises(fetch_dnd.FetchError, match="train.txt: no pinned sha256.*--sha256"):
        fetch_dnd.fetch("train.txt", tmp_path / "out", base_url=mirror.url)
    assert mirror.requests == []
    path, downloaded = fetch_dnd.fetch("train.txt", tmp_path / "out", sha256=_sha(BODY * 3).upper(), base_url=mirror.url)
    assert downloaded and path.read_bytes() == BODY * 3
    with pytest.raises(fetch_dnd.FetchError, match=r"valid.txt: http://127.0.0.1:\d+/mirror/.*/valid.txt answered HTTP 404"):
        fetch_dnd.fetch("valid.txt", tmp_path / "out", sha256=_sha(BODY), base_url=mirror.url)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["train.txt"]  # no valid.txt, no .part file
    with pytest.raises(fetch_dnd.FetchError, match="is not the pinned"):  # a pinned file's digest is not overridden
        fetch_dnd.fetch("test.txt", tmp_path / "out", sha256=_sha(BODY), base_url=mirror.url)
    with pytest.raises(fetch_dnd.FetchError, match="could not be read"):
        fetch_dnd.fetch("train.txt", tmp_path / "other", sha256=_sha(BODY), base_url="no-scheme/mirror")
    assert not (tmp_path / "other").exists()  # a failed first fetch leaves no empty folder
    with pytest.raises(fetch_dnd.FetchError, match="not 64 hex digits"):
        fetch_dnd.fetch("valid.txt", tmp_path / "out", sha256="abc", base_url=mirror.url)
    with pytest.raises(fetch_dnd.FetchError, match="no folders"):
        fetch_dnd.fetch("../test.txt", tmp_path / "out", sha256=_sha(BODY), base_url=mirror.url)


def test_command_line_prints_the_digest_and_fails_with_rc_1_and_the_rule(mirror, tmp_path):
    mirror.put("train.txt", BODY)
    script = str(REPO / "benchmarks" / "fetch_dealornodeal.py")
    ok = subprocess.run([sys.executable, script, "train.txt", "--sha256", _sha(BODY), "--to", str(tmp_path / "d"),
                         "--base-url", mirror.url], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert f"train.txt: downloaded, sha256 {_sha(BODY)}" in ok.stdout and "CC BY-NC 4.0" in ok.stdout
    bad = subprocess.run([sys.executable, script, "--to", str(tmp_path / "e"), "--base-url", mirror.url],
                         capture_output=True, text=True, timeout=60)  # default test.txt: not on this mirror
    assert bad.returncode == 1 and "error: test.txt:" in bad.stderr and "HTTP 404" in bad.stderr
    assert not (tmp_path / "e" / "test.txt").exists()
