"""Deterministic, atomic writes for the data steps (ingest, validate, returns).

Two promises every data step makes: a retried step never leaves half a file behind (write to a temp
file in the same folder, then ``os.replace``, which is atomic on one filesystem), and the same input
gives byte-identical output (fixed row order, fixed compression settings, no timestamps in metadata),
so DVC sees "unchanged" and an idempotent Airflow retry changes nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

# Fixed writer settings: part of the byte-identical promise (changing them changes every output hash).
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=3,
    row_group_size=128 * 1024,
    use_dictionary=True,
    write_statistics=True,
    data_page_version="2.0",
)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` atomically, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are shared with other users/containers
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` atomically with the fixed settings above (same table, same bytes)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **PARQUET_OPTIONS)
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` (old content removed).

    Readers see either the old folder or the complete new one, never a half-built one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        old = final.with_name(f".{final.name}.{os.getpid()}.old")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(path: str | Path) -> None:
    """Delete an output left by an earlier run, so a failed run cannot be mistaken for a passed one."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
