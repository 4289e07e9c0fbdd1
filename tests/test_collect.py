"""collect: a policy deployed in the world writes contract logs and a summary; idempotent."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from pipeline_steps import collect
from pipeline_steps.common.contract import LOG_SCHEMA, conversation_rule_violations, turn_rule_violations


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.parquet")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_pi0_on_tiny_model_writes_valid_logs_and_summary(tmp_path, tiny_params_file):
    out, summary_path = tmp_path / "raw", tmp_path / "collect.json"
    summary = collect.main(["--params", str(tiny_params_file), "--out", str(out), "--summary", str(summary_path), "--no-mlflow", "--no-progress"])
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert set(LOG_SCHEMA.names) <= set(table.column_names)
    rows = table.to_pylist()
    assert len({r["conversation_id"] for r in rows}) == 8
    by_conv = {}
    for r in sorted(rows, key=lambda r: (r["conversation_id"], r["turn_index"])):
        assert turn_rule_violations(r) == []
        by_conv.setdefault(r["conversation_id"], []).append(r)
    for recs in by_conv.values():
        assert conversation_rule_violations(recs) == []
    assert all(r["policy_id"] for r in rows)
    saved = json.loads(summary_path.read_text())
    assert saved["conversations"] == 8 and 0 <= saved["conversion"]["rate"] <= 1
    assert saved["generation"]["new_tokens"] > 0
    assert summary["turns_total"] == len(rows)


def test_collect_is_idempotent_and_retry_safe(tmp_path, tiny_params_file):
    out = tmp_path / "raw"
    args = ["--params", str(tiny_params_file), "--out", str(out), "--summary", str(tmp_path / "s.json"), "--no-mlflow", "--no-progress"]
    collect.main(args + ["--policy", "script:random", "--conversations", "20"])
    first = _digest(out)
    collect.main(args + ["--policy", "script:random", "--conversations", "20"])
    assert _digest(out) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw-")]  # no temp folders left


def test_exploration_policy_logs_its_persona(tmp_path, tiny_params_file):
    out = tmp_path / "raw"
    collect.main(["--params", str(tiny_params_file), "--out", str(out), "--summary", str(tmp_path / "s.json"), "--no-mlflow", "--no-progress", "--policy", "explore", "--conversations", "4"])
    rows = ds.dataset(out, format="parquet", partitioning="hive").to_table().to_pylist()
    acted = [r for r in rows if r["suggestion"] is not None]
    assert acted and all(json.loads(r["behaviour"])["persona"]["tone"] for r in acted)


def test_missing_base_model_is_a_clear_error(tmp_path, tiny_params_file):
    with pytest.raises(Exception) as err:
        collect.main(["--params", str(tiny_params_file), "--base-model", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), "--summary", str(tmp_path / "s.json"), "--no-mlflow", "--no-progress"])
    assert "base_model.name_or_path" in str(err.value)
    assert not (tmp_path / "r").exists()


def test_module_runs_as_a_command(tmp_path, repo_root, tiny_params_file):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_steps.collect", "--params", str(tiny_params_file), "--policy", "script:expert",
         "--conversations", "6", "--out", str(tmp_path / "raw"), "--summary", str(tmp_path / "s.json"), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "conversion (95% CI)" in proc.stdout
    assert (tmp_path / "mlflow.db").exists()  # tracked locally by default
