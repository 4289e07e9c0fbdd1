"""register + the review workflow against a real ``mlflow server`` process (PostgreSQL backend store)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from pipeline_steps import register as register_step
from pipeline_steps.common import registry
from pipeline_steps.common.ab_stats import ab_test
from pipeline_steps.common.registry import RegistryError
from mlflow_server import mlflow_server, postgres_available


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow")
    with mlflow_server(work) as srv:
        yield srv


def evaluate_metrics(improvement_low=0.01, lift=0.05, p_worse=0.9, acceptance=0.8):
    return {
        "offline": {
            "improvement": {"mean": improvement_low + 0.02, "ci_low": improvement_low, "ci_high": improvement_low + 0.04, "n": 64},
            "kl_per_token": 0.05, "q_error_p90": 0.3,
            "guardrails": {"candidate": {"acceptance": acceptance, "mean_words": 20.0, "abstain_rate": 0.0},
                           "baseline": {"acceptance": 0.8, "mean_words": 25.0, "abstain_rate": 0.0}},
        },
        "ab": {"lift_abs": lift, "lift_ci_low": lift - 0.05, "lift_ci_high": lift + 0.05, "p_value": 0.2,
               "p_value_better": 1 - p_worse, "p_value_worse": p_worse},
    }


@pytest.fixture()
def files(tmp_path):
    def make(metrics):
        ev = tmp_path / f"evaluate-{len(list(tmp_path.iterdir()))}.json"
        ev.write_text(json.dumps(metrics))
        fq = tmp_path / "fit_q.json"
        fq.write_text(json.dumps({"q_error_p90": 0.3}))
        return ev, fq

    return make


def run_register(server, tiny_model_dir, ev, fq, tmp_path, model_name, extra=(), prompt=None):
    params = tmp_path / "params.yaml"
    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    data["prompt"].update(prompt or {})
    data["register"]["policy_model_name"] = model_name
    data["register"]["q_model_name"] = model_name + "-q"
    params.write_text(yaml.safe_dump(data))
    return register_step.main([
        "--params", str(params), "--policy", str(tiny_model_dir), "--q-model", str(tiny_model_dir),
        "--evaluate-metrics", str(ev), "--fit-q-metrics", str(fq), "--data", f"params={params}",
        "--tracking-uri", server["uri"], "--out", str(tmp_path / "register.json"), *extra,
    ])


def test_server_uses_postgresql_where_available(server):
    if not postgres_available():
        if os.environ.get("IPPO_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required in CI (IPPO_REQUIRE_POSTGRES=1) but 127.0.0.1:5432 is unreachable")
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432; the server ran on SQLite")
    assert server["backend"] == "postgresql"


def test_register_approve_promote_rollback(server, tiny_model_dir, files, tmp_path):
    name, uri = "flow-policy", server["uri"]
    v1 = run_register(server, tiny_model_dir, *files(evaluate_metrics()), tmp_path, name)
    assert v1["gates"]["passed"] and v1["alias"] == "challenger"
    ver1 = v1["policy"]["version"]
    with pytest.raises(RegistryError, match="no reviewer approval"):
        registry.promote(name, ver1, uri)  # a version without approval cannot be promoted
    registry.approve(name, ver1, "dana", "looks good", uri)
    assert registry.promote(name, ver1, uri) is None
    assert registry.current_champion(name, uri) == ver1

    v2 = run_register(server, tiny_model_dir, *files(evaluate_metrics()), tmp_path, name)
    ver2 = v2["policy"]["version"]
    assert v2["parent_version"] == ver1 and v2["iteration"] == 2
    registry.approve(name, ver2, "lee", "", uri)
    assert registry.promote(name, ver2, uri) == ver1
    assert registry.rollback(name, uri) == ver1
    assert registry.current_champion(name, uri) == ver1
    rows = {r["version"]: r for r in registry.status(name, uri)}
    assert "champion" in rows[ver1]["aliases"] and rows[ver2]["reviewer"] == "lee"

    from mlflow import MlflowClient

    mv = MlflowClient(uri, uri).get_model_version(name, ver2)
    for tag in ("ippo.git_commit", "ippo.data.params", "ippo.params_md5", "ippo.iteration", "ippo.parent_version", "ippo.gx_success"):
        assert mv.tags.get(tag), tag


def test_failing_gate_is_kept_tagged_never_aliased_and_not_approvable(server, tiny_model_dir, files, tmp_path):
    name, uri = "gated-policy", server["uri"]
    res = run_register(server, tiny_model_dir, *files(evaluate_metrics(improvement_low=-0.05, p_worse=0.01, lift=-0.1)), tmp_path, name)
    assert not res["gates"]["passed"] and res["alias"] is None
    assert any("improvement_ci_low" in r for r in res["gates"]["reasons"]) and any("p_value_worse" in r for r in res["gates"]["reasons"])
    ver = res["policy"]["version"]
    with pytest.raises(RegistryError, match="cannot be approved"):
        registry.approve(name, ver, "dana", "", uri)
    with pytest.raises(RegistryError, match="cannot be promoted"):
        registry.promote(name, ver, uri)
    row = registry.status(name, uri)[0]
    assert row["gates"] == "failed" and row["aliases"] == ""


def test_deliberately_worse_policy_is_stopped_by_the_ab_gate(params, world):
    """A policy that pitches prematurely, A/B-tested against the outcome-driven one, fails the A/B gate."""
    from pipeline_steps.evaluate import ab_in_world
    from pipeline_steps.world.scripted import ScriptedPolicy

    p = params.model_copy(deep=True)
    p.evaluate.ab_conversations = 150
    ab, curves = ab_in_world(p, ScriptedPolicy("expert", world.vertical), ScriptedPolicy("premature_pitch", world.vertical), world)
    gate = registry.ab_gate({"ab": ab}, p.registry.ab_gate)
    assert not gate.passed and ab["lift_abs"] < 0 and ab["p_value_worse"] < 0.05
    assert len(curves["control"]) == p.world.max_turns


def test_registered_policy_loads_and_suggests(server, tiny_model_dir, files, tmp_path):
    import mlflow

    name = "loadable-policy"
    res = run_register(server, tiny_model_dir, *files(evaluate_metrics()), tmp_path, name)
    mlflow.set_tracking_uri(server["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    conv = [{"customer_message": "Hi, do you renovate bathrooms?"}]
    out = model.predict(pd.DataFrame({"conversation": [json.dumps(conv)]}))
    assert isinstance(out, pd.DataFrame) and len(out) == 1 and isinstance(out["suggestion"][0], str)
    assert model.metadata.signature is not None
    assert res["policy"]["uri"].startswith("models:/")

    # collect/evaluate/ppo_tune deploy a registered policy by alias (models:/<name>@<alias>).
    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.policies import load_policy, resolve_policy_dir
    from pipeline_steps.common.contract import HistoryTurn

    import os

    os.environ["MLFLOW_TRACKING_URI"] = server["uri"]
    try:
        params = load_params(Path(__file__).parents[1] / "params.yaml")
        assert (Path(resolve_policy_dir(f"models:/{name}@challenger", params)) / "config.json").is_file()
        policy = load_policy(f"models:/{name}@challenger", params, {"business_name": "B", "business_description": "d"})
        assert len(policy.suggest([[HistoryTurn("hello?")]], ["k"])) == 1
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_registered_policy_renders_the_state_notes_it_was_trained_with(server, tiny_model_dir, files, tmp_path):
    """prompt.state_notes travels with the registered policy: served, it renders the prompts pi saw in training."""
    import mlflow

    from pipeline_steps.common.contract import NOTES_LABEL, HistoryTurn

    name = "noted-policy"
    run_register(server, tiny_model_dir, *files(evaluate_metrics()), tmp_path, name, prompt={"state_notes": "customer_needs"})
    mlflow.set_tracking_uri(server["uri"])
    policy = mlflow.pyfunc.load_model(f"models:/{name}@challenger").unwrap_python_model().policy
    prompt = policy.prompts([[HistoryTurn("Hi, we want a new bathroom, maybe 15 thousand.")]])[0]
    assert f"{NOTES_LABEL} Project: bathroom. Needs stated: budget (1 of 3)." in prompt


def test_failed_registration_moves_no_alias_and_leaves_no_version(server, tiny_model_dir, files, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    name, uri = "atomic-policy", server["uri"]
    run_register(server, tiny_model_dir, *files(evaluate_metrics()), tmp_path, name)
    before = {r["version"]: r["aliases"] for r in registry.status(name, uri)}
    original = MlflowClient.set_model_version_tag

    def failing(self, n, v, key, value):
        if key == "ippo.ab_gate":
            raise RuntimeError("simulated outage while tagging")
        return original(self, n, v, key, value)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", failing)
    with pytest.raises(RuntimeError, match="simulated outage"):
        run_register(server, tiny_model_dir, *files(evaluate_metrics()), tmp_path, name)
    monkeypatch.undo()
    after = {r["version"]: r["aliases"] for r in registry.status(name, uri)}
    assert after == before
    assert MlflowClient(uri, uri).search_model_versions(f"name='{name}-q'")  # earlier Q version intact
    assert len(MlflowClient(uri, uri).search_model_versions(f"name='{name}-q'")) == 1


def test_bad_inputs_give_clear_errors(server, tiny_model_dir, files, tmp_path):
    ev, fq = files(evaluate_metrics())
    with pytest.raises(SystemExit, match="evaluate metrics file not found"):
        register_step.main(["--policy", str(tiny_model_dir), "--q-model", str(tiny_model_dir), "--evaluate-metrics",
                            str(tmp_path / "missing.json"), "--fit-q-metrics", str(fq), "--tracking-uri", server["uri"]])
    with pytest.raises(SystemExit, match="unreachable at http://127.0.0.1:9"):
        register_step.main(["--policy", str(tiny_model_dir), "--q-model", str(tiny_model_dir), "--evaluate-metrics",
                            str(ev), "--fit-q-metrics", str(fq), "--tracking-uri", "http://127.0.0.1:9"])
    with pytest.raises(SystemExit, match="run 'deadbeef' does not exist"):
        register_step.main(["--policy", str(tiny_model_dir), "--q-model", str(tiny_model_dir), "--evaluate-metrics",
                            str(ev), "--fit-q-metrics", str(fq), "--tracking-uri", server["uri"], "--link-run", "fit_q=deadbeef"])
    with pytest.raises(RegistryError, match="has no version 999"):
        registry.approve("flow-policy", "999", "dana", "", server["uri"])


def test_ab_statistics_match_a_hand_computed_2x2_table():
    # control 30/200, treatment 50/200: pooled p = 0.2, SE = sqrt(0.2*0.8*(2/200)) = 0.04, z = 0.1/0.04 = 2.5
    r = ab_test(30, 200, 50, 200)
    assert r["lift_abs"] == pytest.approx(0.10)
    assert r["lift_rel"] == pytest.approx(0.10 / 0.15)
    assert r["p_value"] == pytest.approx(0.012419, abs=1e-5)  # 2 * (1 - Phi(2.5))
    assert r["p_value_better"] == pytest.approx(0.0062097, abs=1e-6)
    # Newcombe hybrid score CI from the two Wilson intervals: [0.0215, 0.1773]
    assert r["lift_ci_low"] == pytest.approx(0.02153, abs=1e-4) and r["lift_ci_high"] == pytest.approx(0.17731, abs=1e-4)
    # Cohen's h = 2 asin(sqrt(.25)) - 2 asin(sqrt(.15)) = 0.25178; n = 2 ((1.95996 + 0.84162) / h)^2
    assert r["sample_size_per_arm_needed"] == pytest.approx(2 * ((1.959964 + 0.841621) / 0.251780) ** 2, rel=1e-3)


def test_undefined_ab_quantities_are_null_and_metrics_files_are_strict_json(tmp_path):
    import json
    import math

    from pipeline_steps.common.tracking import flat_metrics, write_json

    r = ab_test(0, 40, 1, 40)  # the CPU bench's first iteration: relative lift over 0 is undefined
    assert r["lift_rel"] is None and r["lift_abs"] == pytest.approx(0.025)
    assert ab_test(3, 40, 3, 40)["sample_size_per_arm_needed"] is None  # no observed lift to detect

    def strict(token):
        raise AssertionError(f"non-standard JSON token {token}")

    path = write_json(tmp_path / "m.json", {"ab": r, "curve": [1.0, math.nan], "auc": math.inf})
    back = json.loads(path.read_text(), parse_constant=strict)
    assert back["ab"]["lift_rel"] is None and back["curve"] == [1.0, None] and back["auc"] is None
    assert flat_metrics({"a": {"b": math.nan, "c": 2}, "d": math.inf}) == {"a.c": 2.0}


def test_gates_fail_closed_on_an_undefined_metric(params):
    from pipeline_steps.common.registry import ab_gate, offline_gate

    guard = {"acceptance": 0.9, "mean_words": 20.0, "abstain_rate": 0.0}
    off = {"improvement": {"ci_low": None}, "kl_per_token": 0.01, "q_error_p90": None, "guardrails": {"candidate": guard}}
    g = offline_gate({"offline": off}, params.registry.offline_gate)
    assert not g.passed and g.reasons == [f"offline.improvement_ci_low: None >= {params.registry.offline_gate.min_improvement_ci_low} (undefined value)"]
    a = ab_gate({"ab": {"lift_abs": float("nan"), "p_value_worse": 0.9, "p_value_better": 0.1}}, params.registry.ab_gate)
    assert not a.passed and list(a.checks) == ["lift", "p_value_worse"] and a.checks["p_value_worse"]["passed"]
