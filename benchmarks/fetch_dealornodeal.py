"""Fetch a file of the Deal-or-No-Deal corpus at a pinned commit, checked by sha256, for ``bench_fit_q.py``.

``../shared/data/dealornodeal/`` holds only the corpus's ``val.txt``. The README's across-files result (a Q trained
on one file, every dialogue of the other held out) also needs ``test.txt``: 545 other dialogues, collected apart.

    .venv/bin/python benchmarks/fetch_dealornodeal.py                 # -> data/dealornodeal/test.txt (440 KB)
    .venv/bin/python benchmarks/bench_fit_q.py --threads 2 --precision bf16 --tasks dnd --dnd-train-rows 4000 \
        --dnd-val-rows 4000 --eval-rows 128 --learning-rate 1e-3 --dnd-extra-train data/dealornodeal/test.txt \
        --dnd-folds-by-file

The file comes from ``src/data/negotiate/`` of facebookresearch/end-to-end-negotiator at commit ``7f1c6dc``
(CC BY-NC 4.0, like ``val.txt``), as torchvision's and Hugging Face's dataset loaders do it: a pinned address and
a pinned digest. A file is written only when its sha256 is the pinned one (streamed to a temporary file in the
same folder, then renamed), so a broken or changed download leaves nothing behind; a file already there with
the right digest is kept and nothing is downloaded; one with another digest is never overwritten. Another file
of the corpus (e.g. ``train.txt``) needs its digest on the command line (``--sha256``): nothing unchecked is
written. ``--base-url`` points at a mirror laid out like GitHub's raw files (``<base>/<commit>/<path>``).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

REPOSITORY_RAW_URL = "https://raw.githubusercontent.com/facebookresearch/end-to-end-negotiator"
COMMIT = "7f1c6dcfeeef294ff546a8345f2481a34f03ffea"
CORPUS_DIR = "src/data/negotiate"
# sha256 of the files read at COMMIT (test.txt: 1,052 lines, 545 dialogues; the digest bench_fit_q's JSON records)
PINNED_SHA256 = {"test.txt": "37be3150bf656195b61a7547b45cf307acce929f2a8140036890a561c3597c83"}
LICENSE = "CC BY-NC 4.0 (facebookresearch/end-to-end-negotiator)"
CHUNK = 1 << 16


class FetchError(RuntimeError):
    """A download that could not be written: names the file, the address and the rule it broke."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_url(name: str, base_url: str = REPOSITORY_RAW_URL, commit: str = COMMIT) -> str:
    return f"{base_url.rstrip('/')}/{commit}/{CORPUS_DIR}/{name}"


def fetch(name: str, dest_dir: Path, sha256: str | None = None, base_url: str = REPOSITORY_RAW_URL,
          commit: str = COMMIT, timeout_s: float = 60.0) -> tuple[Path, bool]:
    """Write ``dest_dir/name`` if its download has the pinned digest; ``(path, downloaded)``. Safe to rerun."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise FetchError(f"{name!r}: a file name of {CORPUS_DIR}/ is expected (no folders)")
    pinned = PINNED_SHA256.get(name) if commit == COMMIT else None
    given = sha256.lower() if sha256 else None
    if given and pinned and given != pinned:
        raise FetchError(f"{name}: --sha256 {given} is not the pinned {pinned} of this commit")
    expected = given or pinned
    if not expected:
        raise FetchError(f"{name}: no pinned sha256 at commit {commit} (pinned: {sorted(PINNED_SHA256)} at {COMMIT}); "
                         "pass --sha256 HEX to fetch it, so that nothing unchecked is written")
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise FetchError(f"{name}: --sha256 {expected!r} is not 64 hex digits")
    dest_dir = Path(dest_dir)
    dest = dest_dir / name
    if dest.exists():
        got = file_sha256(dest)
        if got == expected:
            return dest, False
        raise FetchError(f"{dest}: already there with sha256 {got}, not the pinned {expected}; it is left as it is "
                         "(move it away to fetch the pinned file)")
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    url = file_url(name, base_url, commit)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 (https, or a mirror)
            except urllib.error.HTTPError as exc:
                raise FetchError(f"{name}: {url} answered HTTP {exc.code} {exc.reason}") from exc
            except (urllib.error.URLError, http.client.HTTPException, ValueError, OSError) as exc:
                raise FetchError(f"{name}: {url} could not be read: {exc}") from exc
            with response:
                while True:
                    try:
                        block = response.read(CHUNK)
                    except (http.client.HTTPException, OSError) as exc:
                        raise FetchError(f"{name}: reading {url} failed after {out.tell():,} bytes: {exc}") from exc
                    if not block:
                        break
                    digest.update(block)
                    try:
                        out.write(block)
                    except OSError as exc:
                        raise FetchError(f"{name}: writing {tmp} failed: {exc}") from exc
        got = digest.hexdigest()
        if got != expected:
            raise FetchError(f"{name}: the download from {url} has sha256 {got}, not the pinned {expected}; "
                             "nothing was written")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
        try:
            os.link(tmp, dest)  # unlike a rename, fails if the file appeared meanwhile: nothing is overwritten
        except FileExistsError as exc:
            raise FetchError(f"{dest}: appeared while downloading; it is left as it is") from exc
    finally:
        tmp.unlink(missing_ok=True)
        if created and not dest.exists() and not any(dest_dir.iterdir()):
            dest_dir.rmdir()  # a failed first fetch leaves no empty folder behind
    return dest, True


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", default=["test.txt"], help="file names in the corpus's folder (default test.txt)")
    ap.add_argument("--to", default="data/dealornodeal", help="folder to write them to (gitignored by default)")
    ap.add_argument("--sha256", default=None, help="the digest of a file that is not pinned here (one file only)")
    ap.add_argument("--base-url", default=REPOSITORY_RAW_URL, help="a mirror laid out as <base>/<commit>/<path>")
    ap.add_argument("--commit", default=COMMIT, help="the corpus repository's commit (the pins are for the default)")
    args = ap.parse_args(argv)
    if args.sha256 and len(args.files) != 1:
        ap.error("--sha256 names the digest of one file: pass exactly one file with it")
    written = []
    try:
        for name in args.files:
            path, downloaded = fetch(name, Path(args.to), args.sha256, args.base_url, args.commit)
            state = "downloaded" if downloaded else "already there"
            print(f"{path}: {state}, sha256 {file_sha256(path)} ({path.stat().st_size:,} bytes; {LICENSE})")
            written.append(path)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    return written


if __name__ == "__main__":
    main()
