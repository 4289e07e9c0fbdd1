"""``ippo bench iterate``: K pipeline iterations against the baselines, on the tiny model.

The end-to-end test runs two real iterations of the eight step commands plus every baseline, then checks
what the README's table is built from: one row per policy on the same personas, the A/B of iteration 2
replaying pi_1 exactly (common random numbers), the myopic baseline trained on the immediate reward, the
targets evaluated, resuming that does no work, and a different configuration refused in the same folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipeline_steps.bench.iterate import BenchError, bench_config, bench_iterate, iteration_config
from pipeline_steps.common.config import ConfigError, Params

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("IPPO_MODEL_CACHE", REPO / "models")).resolve()


def test_fit_q_target_sent_is_the_immediate_reward():
    from pipeline_steps.fit_q import target_values

    table = pa.table({"G": [0.9, 0.0, 0.81, 0.0], "relation": ["verbatim", "edited", "rejected", "abstained"]})
    assert target_values(table, "return").tolist() == [0.9, 0.0, 0.81, 0.0]
    assert target_values(table, "sent").tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("profiles", [["gpu.yaml"], ["bench-cpu.yaml"], ["gpu.yaml", "bench-gpu.yaml"], ["tiny.yaml"]])
def test_shipped_profiles_validate_and_change_what_they_say(profiles):
    """Each profile combination the README names merges over params.yaml into valid params (a typo'd key in a
    GPU profile fails here, not an hour into a lent GPU), and every value it sets reaches the merged params."""
    from pipeline_steps.common.config import flatten_dotted, get_dotted, read_yaml

    merged = Params.model_validate(bench_config(REPO / "params.yaml", [REPO / "profiles" / p for p in profiles]))
    dumped = merged.model_dump(by_alias=True)
    for p in profiles:
        for key, value in flatten_dotted(read_yaml(REPO / "profiles" / p)).items():
            if key != "base_model.cache_dir":  # made absolute by bench_config
                got = get_dotted(dumped, key)
                assert got == value or (isinstance(value, dict) and not value), (p, key, got, value)


def test_bench_config_refuses_a_misspelt_profile_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fit_q:\n  learing_rate: 0.001\n")
    with pytest.raises(ConfigError, match="learing_rate"):
        bench_config(REPO / "params.yaml", [bad])


def test_iteration_config_deploys_the_previous_policy_a_week_later():
    base = bench_config(REPO / "params.yaml", [REPO / "profiles/tiny.yaml"])
    before = json.dumps(base, sort_keys=True)
    it3 = iteration_config(base, 3, "/runs/iter_2/policy")
    assert json.dumps(base, sort_keys=True) == before  # the base is not mutated
    p = Params.model_validate(it3)
    b = Params.model_validate(base)
    assert p.collect.policy == "/runs/iter_2/policy"
    assert p.collect.seed == b.collect.seed + 2 * b.bench.collect_seed_stride
    assert p.collect.start_time == "2026-01-19T00:00:00Z"  # params.yaml starts 2026-01-05
    assert Path(p.base_model.cache_dir).is_absolute()  # steps may run from any folder


def test_bad_bench_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="bench.best_of_n"):
        bench_config(REPO / "params.yaml", [], {"bench.best_of_n": 1})
    with pytest.raises(ConfigError, match="bench.baselines"):
        bench_config(REPO / "params.yaml", [], {"bench.baselines": ["oracle"]})


def test_best_of_n_returns_the_sample_q_ranks_highest(tiny_model_dir, params, world, tmp_path):
    """Record the n samples per state, score them independently, and check the policy returned the argmax."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    from pipeline_steps.common.base_model import load_tokenizer
    from pipeline_steps.common.policies import BestOfNPolicy, load_policy
    from pipeline_steps.common.q_input import action_text
    from pipeline_steps.common.q_model import score

    p = params.model_copy(deep=True)
    p.base_model.name_or_path = str(tiny_model_dir)
    p.collect.max_new_tokens = 8
    base = load_policy(str(tiny_model_dir), p, world.vertical, seed=3)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(0)
    q_model = LlamaForSequenceClassification(config).eval()
    q_tok = load_tokenizer(tiny_model_dir)

    recorded: list[tuple[list[str], list[str]]] = []
    generate = base.generate

    def recording(prompts, seed):
        out = generate(prompts, seed)
        recorded.append((prompts, out))
        return out

    base.generate = recording  # type: ignore[method-assign]
    pol = BestOfNPolicy(base, q_model, q_tok, n=3)
    from datetime import datetime, timezone

    convs = world.new_conversations(5, 0, 4, datetime(2026, 1, 5, tzinfo=timezone.utc))
    got = pol.suggest([c.history for c in convs], [c.conversation_id for c in convs])
    prompts, raw = recorded[0]
    assert len(prompts) == 12 and prompts[0] == prompts[1] == prompts[2] != prompts[3]
    from pipeline_steps.common.policies import clean_generation

    texts = [clean_generation(r) for r in raw]
    q = score(q_model, q_tok, prompts, [action_text(t) for t in texts]).reshape(4, 3)
    for i, s in enumerate(got):
        assert s.text == texts[i * 3 + int(np.argmax(q[i]))]
        assert s.behaviour["best_of_n"]["q"] == pytest.approx(q[i].max(), abs=1e-5)
    assert pol.policy_id == "best_of_3"


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """Two iterations + every baseline with the tiny model (profiles/tiny.yaml plus a few bench keys)."""
    tmp = tmp_path_factory.mktemp("bench")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["base_model"]["cache_dir"] = str(MODEL_CACHE)
    (tmp / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    profile = tmp / "bench-tiny.yaml"
    # Q needs converting conversations in every iteration's logs, and the tiny model's random text is mostly
    # rejected: eager customers (trusting, ready, one need to reveal) and a business that books more often
    # convert ~3 in 16 conversations, whatever the policy says.
    eager = {"trust": {"low": 0.8, "high": 0.9}, "readiness": {"low": 0.9, "high": 0.95},
             "needs_to_reveal": {"low": 1, "high": 1}}
    profile.write_text(yaml.safe_dump({
        "bench": {"iterations": 2, "best_of_n": 2, "kl_states": 4},
        "collect": {"conversations": 16, "batch_size": 16},
        "world": {"personas": {name: eager for name in data["world"]["personas"]},
                  "business": {"habit_mix": {"generic_question": 0.3, "friendly": 0.1, "book": 0.4, "probe": 0.2}}},
    }))
    os.environ["TQDM_DISABLE"] = "1"
    out = tmp / "run"
    profiles = [REPO / "profiles/tiny.yaml", profile]
    res = bench_iterate(tmp / "params.yaml", profiles, out)
    return {"tmp": tmp, "out": out, "res": res, "profiles": profiles}


def test_bench_reports_every_policy_on_the_same_personas(tiny_bench):
    res, out = tiny_bench["res"], tiny_bench["out"]
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds == ["start", "iteration", "iteration", "best_of_n", "myopic", "expert"]
    assert [r["policy"] for r in res["rows"][:3]] == ["pi_0", "pi_1", "pi_2"]
    n = Params.model_validate(yaml.safe_load((out / "params.yaml").read_text())).evaluate.ab_conversations
    for r in res["rows"]:
        assert r["trials"] == n
        assert r["ci_low"] <= r["rate"] <= r["ci_high"]
    # Iteration 2's control arm is pi_1 again on the same customers: common random numbers reproduce it.
    assert res["rows"][2]["previous_reproduced"] is True
    expert = res["rows"][-1]
    assert expert["rate"] > res["rows"][0]["rate"]  # the scripted ceiling beats the random tiny model
    assert res["rows"][0]["normalised"] == 0.0 and expert["normalised"] == 1.0
    for r in res["rows"][1:3]:
        assert set(r["lift_vs_previous"]) >= {"lift_abs", "lift_ci_low", "lift_ci_high", "p_value"}
        assert r["kl_from_pi0"] is not None and np.isfinite(r["kl_from_pi0"]) and r["kl_from_pi0"] >= 0
        assert str(r["registered_version"]) == r["policy"].split("_")[1]  # one model version per iteration
    assert set(res["step_seconds"]["pi_1"]) == {"collect", "ingest", "validate", "returns", "fit_q", "ppo_tune",
                                               "evaluate", "register"}
    assert set(res["targets"]) == {"ab_lift_not_significantly_negative", "pi_K_beats_pi_0", "pi_K_beats_myopic",
                                   "normalised_score"}
    for f in ("results.json", "results.md", "results.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", res["meta"]["commit"]) and f"commit {res['meta']['commit']};" in md
    assert "| pi_2 |" in md and "best-of-2" in md and "Wall time per step" in md and "Peak resident memory" in md
    peaks = res["step_peak_rss_gb"]["pi_1"]
    assert set(peaks) == set(res["step_seconds"]["pi_1"]) and all(0.01 < v < 64 for v in peaks.values())
    # The myopic baseline's own fit_q and ppo_tune are rows of both per-step tables, blank elsewhere.
    assert set(res["step_peak_rss_gb"]["myopic"]) == set(res["step_seconds"]["myopic"]) == {"fit_q", "ppo_tune"}
    assert all(0.01 < v < 64 for v in res["step_peak_rss_gb"]["myopic"].values())
    myopic_lines = [line for line in md.splitlines() if line.startswith("| myopic |")]
    assert len(myopic_lines) == 2 and all(line.count("|") == md.splitlines()[md.splitlines().index(line) - 1].count("|")
                                          for line in myopic_lines)


def test_each_iteration_deploys_the_previous_candidate(tiny_bench):
    out = tiny_bench["out"]
    it1 = yaml.safe_load((out / "iter_1" / "params.yaml").read_text())
    it2 = yaml.safe_load((out / "iter_2" / "params.yaml").read_text())
    assert it1["collect"]["policy"] == "pi0"
    assert it2["collect"]["policy"] == str(out / "iter_1" / "data/ppo_tune/model/policy")
    assert it2["collect"]["seed"] == it1["collect"]["seed"] + 1
    ev2 = json.loads((out / "iter_2" / "metrics/evaluate.json").read_text())
    assert ev2["policies"]["baseline"] == it2["collect"]["policy"]


def test_myopic_baseline_learns_the_immediate_reward(tiny_bench):
    out = tiny_bench["out"]
    manifest = json.loads((out / "baselines/myopic/data/fit_q/model/scorer/q_manifest.json").read_text())
    assert manifest["fit_q"]["target"] == "sent"
    assert manifest["target"].startswith("sent")
    assert (out / "baselines/myopic/data/ppo_tune/model/policy/config.json").is_file()
    q0 = json.loads((out / "iter_1/data/fit_q/model/scorer/q_manifest.json").read_text())
    assert q0["fit_q"]["target"] == "return"


def test_rerun_resumes_without_work_and_other_params_are_refused(tiny_bench):
    out, tmp = tiny_bench["out"], tiny_bench["tmp"]
    markers = {p: p.stat().st_mtime_ns for p in (out / ".done").glob("*.json")}
    assert len(markers) >= 8 * 2 + 5  # 16 steps, expert, best-of-n, myopic fit_q/ppo/world, KL
    again = bench_iterate(tmp / "params.yaml", tiny_bench["profiles"], out, echo=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in (out / ".done").glob("*.json")} == markers
    assert [r["rate"] for r in again["rows"]] == [r["rate"] for r in tiny_bench["res"]["rows"]]
    # Fewer iterations report from the same run; any other change of configuration is refused.
    first = bench_iterate(tmp / "params.yaml", tiny_bench["profiles"], out, iterations=1, echo=lambda _: None)
    assert [r["policy"] for r in first["rows"][:2]] == ["pi_0", "pi_1"] and first["rows"][2]["kind"] == "best_of_n"
    with pytest.raises(BenchError, match="other params"):
        bench_iterate(tmp / "params.yaml", tiny_bench["profiles"][:1], out, echo=lambda _: None)


def test_cli_bench_iterate_reports_a_failed_step_with_its_log(tmp_path):
    """A step that fails stops the bench with the step's name, exit code and log tail; nothing is marked done."""
    from typer.testing import CliRunner

    from pipeline_steps.cli import app

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["base_model"]["cache_dir"] = str(MODEL_CACHE)
    data["base_model"]["name_or_path"] = str(tmp_path / "no-such-model")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(app, ["bench", "iterate", "--params", str(tmp_path / "params.yaml"),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "iter_1/collect: exit code" in result.output and "collect.log" in result.output
    assert not list((tmp_path / "run" / ".done").glob("*.json"))


def test_follow_gates_acts_as_the_reviewer_only_when_both_gates_pass(tiny_bench):
    """bench.follow_gates: a version that passed both gates is approved by 'ippo-bench' and becomes champion."""
    from pipeline_steps.bench.iterate import REVIEWER, Runner, _approve_and_promote
    from pipeline_steps.common import registry

    out = tiny_bench["out"]
    runner = Runner(out, echo=lambda _: None)
    uri = runner.env["MLFLOW_TRACKING_URI"]
    reg = json.loads((out / "iter_1/metrics/register.json").read_text())
    assert reg["gates"]["passed"]  # profiles/tiny.yaml opens the gates
    assert _approve_and_promote(runner, {**reg, "gates": {**reg["gates"], "passed": False}}) is False
    assert registry.current_champion(reg["policy"]["name"], tracking_uri=uri) is None
    assert _approve_and_promote(runner, reg) is True
    assert str(registry.current_champion(reg["policy"]["name"], tracking_uri=uri)) == str(reg["policy"]["version"])
    history = registry.status(reg["policy"]["name"], tracking_uri=uri)
    assert any(REVIEWER in json.dumps(v) for v in history)


def test_a_step_killed_by_a_signal_is_named():
    from pipeline_steps.bench.iterate import killed_by

    assert killed_by(0) == "" and killed_by(1) == ""
    assert killed_by(-9).startswith(" (killed by SIGKILL: the kernel's out-of-memory killer")
    assert killed_by(-15) == " (killed by SIGTERM)"


def test_a_step_s_peak_memory_is_its_own_process_s(tmp_path):
    """Each step command records the peak RSS of its own process (VmHWM), not the bench's or an earlier step's."""
    import sys

    from pipeline_steps.bench.iterate import Runner

    runner = Runner(tmp_path, echo=lambda _: None)
    big = runner.command("big", [sys.executable, "-c", "import time; b = bytearray(400_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"],
                         tmp_path / "big.log")
    small = runner.command("small", [sys.executable, "-c", "import time; time.sleep(1.5)"], tmp_path / "small.log")
    assert big["result"]["peak_rss_gb"] >= 0.4
    assert small["result"]["peak_rss_gb"] < 0.1
    assert json.loads(runner.marker("big").read_text())["result"] == big["result"]
    with pytest.raises(BenchError, match="exit code 3"):
        runner.command("fails", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fails.log")
