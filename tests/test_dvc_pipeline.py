"""The full pipeline under `dvc repro` on the tiny model, in a throw-away git + DVC workspace.

One iteration (collect -> ... -> register) with profiles/tiny.yaml's budgets; every stage's outputs exist,
the second `dvc repro` runs nothing, and a parameter sweep (`dvc exp run -S`) reruns only the stages that read
the changed key. This is the heaviest test of the default suite (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline_steps.common import step_commands as sc

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("IPPO_MODEL_CACHE", REPO / "models")).resolve()


def tiny_params(extra: dict | None = None) -> dict:
    """params.yaml with profiles/tiny.yaml merged in and the shared model cache (no re-download per copy)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    sc.deep_merge(data, yaml.safe_load((REPO / "profiles/tiny.yaml").read_text()))
    data["base_model"]["cache_dir"] = str(MODEL_CACHE)
    return sc.deep_merge(data, extra or {})


def pipeline_env(workspace: Path) -> dict[str, str]:
    """Stage commands call `python`: the interpreter running the tests comes first on PATH."""
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{workspace}/mlflow.db", TQDM_DISABLE="1",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def make_workspace(dest: Path) -> Path:
    """A copy of the repository's pipeline (working tree, not HEAD) as a fresh git + DVC repository."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "pipeline_steps", dest / "pipeline_steps", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("dvc.yaml", ".dvcignore"):
        if (REPO / f).exists():
            shutil.copy2(REPO / f, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (dest / ".gitignore").write_text("/mlflow.db\n/mlruns/\n/mlartifacts/\n__pycache__/\n")
    env = pipeline_env(dest)
    run(["git", "init", "-q"], dest, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest, env)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "pipeline"], dest, env)
    return dest


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def repro(tmp_path_factory, tiny_model_dir):
    """Run the whole pipeline once (module-scoped: the later tests inspect the same workspace)."""
    ws = make_workspace(tmp_path_factory.mktemp("dvc_ws"))
    t0 = time.perf_counter()
    first = run([sys.executable, "-m", "dvc", "repro"], ws, pipeline_env(ws))
    seconds = time.perf_counter() - t0
    print(f"\ndvc repro (tiny pipeline, {len(sc.STEPS)} stages): {seconds:.1f} s")
    return ws, first, seconds


def test_every_stage_runs_and_writes_its_outputs(repro):
    ws, first, _ = repro
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert list(lock) == list(sc.STEPS)
    for step in sc.STEPS:
        assert f"Running stage '{step}'" in first.stdout, first.stdout[-3000:]
        stage = sc.dvc_stage(step)
        declared = [next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics") for o in stage.get(key, [])]
        for path in declared:
            assert (ws / path).exists(), f"{step}: {path} missing"
    for sub in ("adapter", "scorer"):
        assert (ws / sc.Q_MODEL / sub / "config.json").exists() or any((ws / sc.Q_MODEL / sub).iterdir())
    assert (ws / sc.POLICY / "policy" / "config.json").exists()
    for plot in ("plots/fit_q/calibration.png", "plots/fit_q/learning_curve.csv", "plots/evaluate/ab_conversion.png",
                 "plots/ppo_tune/training_curve.csv"):
        assert (ws / plot).exists(), plot
    reg = json.loads((ws / "metrics/register.json").read_text())
    assert reg["policy"]["name"] == "ippo-policy" and reg["gates"]["passed"] is True  # tiny profile: gates wide open
    ev = json.loads((ws / "metrics/evaluate.json").read_text())
    assert ev["policies"]["baseline"] == "pi0"  # collect.policy, interpolated into the stage command


def test_second_repro_runs_nothing(repro):
    ws, _, _ = repro
    again = run([sys.executable, "-m", "dvc", "repro"], ws, pipeline_env(ws))
    assert "Running stage" not in again.stdout, again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    status = run([sys.executable, "-m", "dvc", "status", "--json"], ws, pipeline_env(ws))
    assert json.loads(status.stdout) == {}


def test_parameter_sweep_reruns_only_the_stages_that_read_the_key(repro):
    """`dvc exp run -S register...` reruns register alone (params are tracked per stage) and records an experiment."""
    ws, _, _ = repro
    env = pipeline_env(ws)
    run(["git", "add", "-A"], ws, env)
    run(["git", "commit", "-qm", "iteration 1"], ws, env)
    exp = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "register.ab_gate.min_lift=-0.5"], ws, env)
    ran = [s for s in sc.STEPS if f"Running stage '{s}'" in exp.stdout]
    assert ran == ["register"], exp.stdout
    assert yaml.safe_load((ws / "params.yaml").read_text())["register"]["ab_gate"]["min_lift"] == -0.5
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--json"], ws, env)
    assert "register.ab_gate.min_lift" in shown.stdout or "min_lift" in shown.stdout
