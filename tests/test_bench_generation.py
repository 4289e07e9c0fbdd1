"""benchmarks/bench_generation.py on the tiny model: the batch-size runs meet the same customers, the call
variants reach model.generate, and bad arguments stop before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_generation

    return bench_generation


def test_generation_bench_compares_batch_sizes_and_call_variants(tmp_path, tiny_params_file):
    out = tmp_path / "gen.json"
    result = _bench().main(["--params", str(tiny_params_file), "--conversations", "4", "--batch-sizes", "2,4",
                            "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text())["batch_sizes"] == result["batch_sizes"]
    small, large = result["batch_sizes"]
    assert (small["batch_size"], large["batch_size"]) == (2, 4)
    assert small["conversations"] == large["conversations"] == 4
    assert small["tokens_per_second_vs_baseline"] == pytest.approx(1.0)
    ratio = large["tokens_per_second"] / small["tokens_per_second"]
    assert large["tokens_per_second_vs_baseline"] == pytest.approx(ratio)
    # two groups of two customers take more calls than all four advanced together
    assert small["generate_calls"] > large["generate_calls"] > 0 and small["new_tokens"] > 0

    call = result["call"]
    names = [v["variant"] for v in call["variants"]]
    assert names == list(_bench().CALL_VARIANTS) and call["rows"] >= 1 and call["prompt_tokens"] > 0
    assert call["variants"][0]["vs_collect"] == pytest.approx(1.0) and call["variants"][0]["same_tokens"]
    assert call["prefill_share"] == pytest.approx(call["variants"][1]["seconds"] / call["variants"][0]["seconds"])


def test_generate_overrides_reach_model_generate(tiny_params_file):
    """Overrides change what is generated (one new token at most); without them the call is unchanged."""
    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.contract import HistoryTurn
    from pipeline_steps.common.policies import load_policy
    from pipeline_steps.world.simulator import World

    params = load_params(tiny_params_file)
    world = World(params.world)
    policy = load_policy("pi0", params, world.vertical, seed=3)
    prompts = policy.prompts([[HistoryTurn("Hi, we want a new kitchen. What would it cost?")],
                              [HistoryTurn("Can someone come and look at our bathroom next week?")]])
    plain = policy.generate(prompts, 7)
    assert policy.generate(prompts, 7) == plain
    one = policy.generate(prompts, 7, max_new_tokens=1)
    assert all(len(policy.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 2 for t in one)
    assert one != plain


def test_generation_bench_refuses_a_zero_batch_size(tmp_path, tiny_params_file):
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generation.py"), "--params",
                           str(tiny_params_file), "--batch-sizes", "16,0", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "must be positive" in proc.stderr and not out.exists()
