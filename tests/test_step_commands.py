"""step_commands: the one description of each step's command line, and the files generated from it."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_steps.common import step_commands as sc

REPO = Path(__file__).resolve().parents[1]


def test_generated_files_are_in_sync():
    """dvc.yaml and the DAG's defaults block are what step_commands + params.yaml render (`... write` fixes it)."""
    assert sc.stale(REPO) == []
    proc = subprocess.run([sys.executable, "-m", "pipeline_steps.common.step_commands", "check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_dvc_yaml_stages_are_the_step_commands():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(sc.STEPS)
    for step, stage in stages.items():
        assert stage == sc.dvc_stage(step), step
        assert " ".join(stage["cmd"].split()) == " ".join(sc.argv(step)), step


def test_steps_are_the_cli_steps_in_algorithm_order():
    from pipeline_steps import cli

    assert sc.STEPS == cli.STEPS
    assert sc.GPU_STEPS == ("collect", "fit_q", "ppo_tune", "evaluate")


@pytest.mark.parametrize("step", sc.STEPS)
def test_every_argument_is_accepted_by_the_step(step):
    """The command line parses with the step's own argparse parser (no flag drifts from the module)."""
    module = importlib.import_module(f"pipeline_steps.{step}")
    args = sc.argv(step, root="runs/x", params_file="runs/x/params.yaml", value=lambda key: "pi0")
    assert args[:3] == ["python", "-m", f"pipeline_steps.{step}"]
    parsed = vars(module.build_parser().parse_args(args[3:]))
    assert parsed["params"] == "runs/x/params.yaml"
    # Every path of the DVC stage is passed as an argument (nothing the step would hard-code).
    for token in sc.STEP[step].tokens():
        if isinstance(token, sc.P):
            assert token.prefix + "runs/x/" + token.path in args


@pytest.mark.parametrize("step", sc.STEPS)
def test_params_keys_exist_and_code_deps_cover_direct_imports(step):
    from pipeline_steps.common.config import load_params

    data = load_params(REPO / "params.yaml").model_dump(by_alias=True)
    stage = sc.dvc_stage(step)
    for key in stage["params"]:
        node = data
        for part in key.split("."):
            assert part in node, f"{step}: params key {key} is not in params.yaml"
            node = node[part]
    # Direct imports of pipeline_steps modules by the step module are among the stage's deps.
    source = (REPO / f"pipeline_steps/{step}.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("pipeline_steps.")}
    deps = stage["deps"]
    for mod in imported:
        path = mod.replace(".", "/") + ".py"
        assert any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps), f"{step}: {path} missing from deps"


def test_pi_i_reaches_evaluate_as_the_baseline():
    stage = sc.dvc_stage("evaluate")
    assert "--baseline ${collect.policy}" in stage["cmd"] and "collect.policy" in stage["params"]


def test_dag_defaults_come_from_params_yaml():
    from pipeline_steps.common.config import load_params

    block = sc.render_dag_defaults(REPO / "params.yaml")
    ns: dict = {}
    exec(block, ns)  # noqa: S102 - our own generated literal block
    params = load_params(REPO / "params.yaml")
    assert ns["PARAM_DEFAULTS"]["collect.conversations"] == params.collect.conversations
    assert ns["PARAM_DEFAULTS"]["collect.policy"] == params.orchestration.policy
    assert ns["ORCHESTRATION"]["image"] == params.orchestration.image
    assert "policy" not in ns["ORCHESTRATION"]


def test_exp_args_flatten_a_profile(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("fit_q: {epochs: 2, bf16: true}\nregister: {ab_gate: {alpha: 0.1}}\nbase_model: {name_or_path: x}\n")
    assert sc.exp_args(prof) == ["-S", "fit_q.epochs=2", "-S", "fit_q.bf16=true", "-S", "register.ab_gate.alpha=0.1",
                                 "-S", "base_model.name_or_path=x"]
    for name in ("tiny", "gpu"):
        from pipeline_steps.common.config import Params

        data = sc.deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load((REPO / f"profiles/{name}.yaml").read_text()))
        Params.model_validate(data)  # every profile key is a real params.yaml key


def test_configure_writes_the_run_params(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out, result = tmp_path / "run/params.yaml", tmp_path / "run/configure.json"
    sets = {"collect.policy": "auto", "collect.conversations": 9, "ingest.window_start": "2026-01-05T00:00:00Z"}
    rc = sc.main(["configure", "--base", str(REPO / "params.yaml"), "--out", str(out), "--result", str(result),
                  "--cache-dir", "/cache", "--set-json", json.dumps(sets)])
    assert rc == 0
    data = yaml.safe_load(out.read_text())
    assert data["collect"]["conversations"] == 9 and data["base_model"]["cache_dir"] == "/cache"
    assert data["collect"]["policy"] == "pi0"  # auto without a champion = params.yaml's collect.policy
    res = json.loads(result.read_text())
    assert res["values"] == {"collect.policy": "pi0"} and res["params"] == str(out)


def test_configure_rejects_a_bad_override(tmp_path):
    with pytest.raises(SystemExit, match="collect.conversations"):
        sc.main(["configure", "--base", str(REPO / "params.yaml"), "--out", str(tmp_path / "p.yaml"),
                 "--result", str(tmp_path / "r.json"), "--set-json", '{"collect.conversations": -1}'])
    assert not (tmp_path / "p.yaml").exists()


def test_flatten_dotted_inverts_apply_overrides():
    from pipeline_steps.common.config import apply_overrides, flatten_dotted

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    flat = flatten_dotted(params)
    assert flat["register.offline_gate.max_kl"] == params["register"]["offline_gate"]["max_kl"]
    assert flatten_dotted({"a": {}, "b": {"c": None}}) == {"a": {}, "b.c": None}  # an empty mapping is kept
    params["orchestration"].pop("node_selector")  # its keys (nvidia.com/gpu.present) hold dots themselves
    assert apply_overrides({}, flatten_dotted(params)) == params


def test_load_params_applies_dotted_overrides_and_names_the_bad_field(tmp_path):
    from pipeline_steps.common.config import ConfigError, load_params

    p = load_params(REPO / "params.yaml", {"fit_q.epochs": 3, "register.ab_gate.alpha": 0.1})
    assert p.fit_q.epochs == 3 and p.registry.ab_gate.alpha == 0.1
    with pytest.raises(ConfigError, match=r"params\.yaml: invalid configuration\n  - field 'fit_q.epochs'"):
        load_params(REPO / "params.yaml", {"fit_q.epochs": -1})
    merged = sc.deep_merge({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 5}, "d": [2]})
    assert merged == {"a": {"b": 5, "c": 2}, "d": [2]}  # mappings merge, lists replace
