"""Start a real ``mlflow server`` process on localhost for tests (PostgreSQL backend when reachable)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

PG_DSN = os.environ.get("IPPO_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_available() -> bool:
    try:
        import psycopg2

        psycopg2.connect(PG_DSN + "/postgres", connect_timeout=3).close()
        return True
    except Exception:
        return False


def create_pg_database() -> str:
    import psycopg2

    name = f"ippo_test_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(PG_DSN + "/postgres")
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return name


def drop_pg_database(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_DSN + "/postgres")
    conn.autocommit = True
    conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@contextmanager
def mlflow_server(workdir: Path, backend: str = "auto") -> Iterator[dict]:
    """Yields ``{"uri", "backend"}``; the server serves artifacts over HTTP from ``workdir``."""
    use_pg = backend == "postgresql" or (backend == "auto" and postgres_available())
    db = create_pg_database() if use_pg else None
    store = f"{PG_DSN.replace('postgresql://', 'postgresql+psycopg2://')}/{db}" if use_pg else f"sqlite:///{workdir / 'mlflow.db'}"
    port = free_port()
    log = open(workdir / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", store, "--artifacts-destination", str(workdir / "artifacts"),
         "--serve-artifacts", "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(workdir / 'mlflow-server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError("mlflow server did not become healthy in 180 s")
            time.sleep(1)
        yield {"uri": uri, "backend": "postgresql" if use_pg else "sqlite", "store": store}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if db:
            drop_pg_database(db)
