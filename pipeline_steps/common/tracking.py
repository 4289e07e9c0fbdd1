"""MLflow tracking that degrades gracefully: local SQLite + local artifacts unless a server is configured.

``MLFLOW_TRACKING_URI`` (or ``--tracking-uri``) points at a server; otherwise runs go to
``sqlite:///mlflow.db`` in the working directory. Every step also writes its metrics JSON for DVC, so
``dvc metrics diff`` works without MLflow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from pipeline_steps.common.config import flatten_dotted

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "iterative-ppo"


def tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite numeric leaves of a nested dict as ``a.b.c`` keys (what MLflow accepts as metrics)."""
    return {k.replace("@", "_"): float(v) for k, v in flatten_dotted(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@contextlib.contextmanager
def step_run(step: str, params: dict[str, Any] | None = None, uri: str | None = None, enabled: bool = True) -> Iterator[Any]:
    """An MLflow run named after the step (one name everywhere), or a no-op when disabled."""
    if not enabled:
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(uri))
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    with mlflow.start_run(run_name=step, tags={"ippo.step": step}) as run:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in flatten_dotted(params).items()})
        yield run


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write a JSON file atomically (a retried step never leaves half a file).

    Strict JSON (RFC 8259): NaN and +-inf become null, so jq, browsers and other languages read every
    metrics file (Python's default would write the non-standard ``NaN``/``Infinity`` tokens).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(_finite_or_null(data), indent=2, sort_keys=True, default=str, allow_nan=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def git_commit(cwd: str | Path | None = None, short: bool = False, mark_dirty: bool = False) -> str:
    """The checkout's commit (tags ignored), so a registered model or a results table names the code behind it.

    ``mark_dirty`` appends ``-dirty`` when tracked files differ from it; "unknown" outside a git checkout.
    """
    cmd = ["git", "describe", "--always", "--exclude=*", *([] if short else ["--abbrev=40"]),
           *(["--dirty"] if mark_dirty else [])]
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
