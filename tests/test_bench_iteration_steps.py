"""``benchmarks/bench_iteration_steps.py``: one iteration's steps, timed and projected to the profile's budgets.

Runs the real step commands on the tiny model, cheap steps only (collect, ingest, returns): the projection
undoes the ``--set`` budget, ``--skip validate`` feeds ingest's output to returns, and a failing step stops
the run with its name and exit 1 rather than a table that hides it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_iteration_steps", REPO / "benchmarks" / "bench_iteration_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_driving_budget_multiplies_the_cost_keys_and_caps_fit_q_rows(bench):
    data = {"collect": {"conversations": 120}, "fit_q": {"epochs": 3, "max_train_rows": None},
            "ppo_tune": {"total_episodes": 64, "num_ppo_epochs": 2}, "evaluate": {"ab_conversations": 50}}
    assert bench.driving_budget(data, "fit_q") == 360
    assert bench.driving_budget(data, "fit_q", rows_per_conversation=4.5) == 120 * 4.5 * 3
    assert bench.driving_budget(data, "ppo_tune") == 128
    assert bench.driving_budget(data, "evaluate") == 50
    data["fit_q"]["max_train_rows"] = 60  # the cap binds at ~13 conversations of 4.5 rows
    assert bench.driving_budget(data, "fit_q", rows_per_conversation=4.5) == 60 * 3
    data["fit_q"]["max_train_rows"] = 0
    assert bench.driving_budget(data, "fit_q", rows_per_conversation=4.5) == 0  # a zero cap is a cap
    assert bench.parse_sets(["a.b=3", "c.d=null", "e.f=x"]) == {"a.b": 3, "c.d": None, "e.f": "x"}
    with pytest.raises(SystemExit, match="section.key=value"):
        bench.parse_sets(["oops"])


def test_cheap_steps_run_timed_and_project_to_the_profiles_budget(bench, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = (tmp_path / "steps").resolve()
    skip = ["validate", "fit_q", "ppo_tune", "evaluate"]  # register: skipped without being named
    args = ["--profile", "profiles/tiny.yaml", "--set", "collect.conversations=4", "--set", "collect.batch_size=4",
            "--out", str(out)] + [a for s in skip for a in ("--skip", s)]
    assert bench.main(args) == 0
    result = json.loads((out / "steps.json").read_text())
    assert [r["step"] for r in result["steps"]] == ["collect", "ingest", "returns"]
    assert result["skipped"] == sorted([*skip, "register"])
    collect = result["steps"][0]
    assert collect["budget"] == 4 and collect["profile_budget"] == 12  # profiles/tiny.yaml's conversations
    assert collect["projected_seconds"] == pytest.approx(3 * collect["seconds"])
    assert collect["headline"]["conversion.rate"] is not None
    assert result["error"] is None and result["sets"]["collect.conversations"] == 4
    assert result["not_projected"] == ["collect.batch_size"]  # outside the cost model: said, not hidden
    assert result["command"].endswith(" ".join(args)) and "transformers" in result["versions"]
    # returns read ingest's output in place of the skipped validate step's
    first_line = (out / "logs" / "returns.log").read_text().splitlines()[0]
    assert f"--input {out}/data/ingest/turns.parquet" in first_line
    assert (out / "data" / "returns" / "returns.parquet").is_file()

    # the same --out with another budget is refused rather than mixing the two runs' times
    assert bench.main([*args, "--set", "collect.max_new_tokens=4"]) == 2
    assert json.loads((out / "steps.json").read_text())["steps"] == result["steps"]
    # ... and re-running the same command re-runs nothing
    assert bench.main(args) == 0
    assert json.loads((out / "steps.json").read_text())["steps"] == result["steps"]

    # a step that fails stops the run: named, exit 1, no projection
    broken = tmp_path / "broken"
    args = ["--profile", "profiles/tiny.yaml", "--out", str(broken), "--skip", "collect", "--skip", "validate",
            "--skip", "returns", "--skip", "fit_q", "--skip", "ppo_tune", "--skip", "evaluate"]
    assert bench.main(args) == 1
    failed = json.loads((broken / "steps.json").read_text())
    assert failed["error"].startswith("ingest: exit code") and failed["projected_seconds"] is None
