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
    ratio = large["tokens_per_second"] / small["tokens_per_second"]
    assert large["tokens_per_second_vs_baseline"] == pytest.approx(ratio)
    assert small["generate_calls"] > 0 and large["generate_calls"] > 0 and small["new_tokens"] > 0

    call = result["call"]
    names = [v["variant"] for v in call["variants"]]
    assert names == list(_bench().CALL_VARIANTS) and call["rows"] >= 1 and call["prompt_tokens"] > 0
    assert call["rows"] <= 2  # the heaviest call of the baseline run (batch size 2)
    assert call["baseline_reproduces_the_world_run"] is True  # the same prompts and seed as collect's call
    by_name = {v["variant"]: v for v in call["variants"]}
    assert by_name["prefill only (1 new token)"]["same_text"] is None
    assert all(isinstance(v["same_text"], bool) for n, v in by_name.items() if not n.startswith("prefill"))
    assert by_name["greedy (no sampling)"]["overrides"]["do_sample"] is False
    assert call["prefill_share"] == pytest.approx(by_name["prefill only (1 new token)"]["seconds"]
                                                  / by_name["as collect calls it"]["seconds"])


def test_generation_bench_compares_weights_dtypes(tmp_path, tiny_params_file):
    """--dtypes loads the policy again in bf16, runs it on the same customers and scores its divergence from
    the fp32 policy on the fp32 policy's own replies: not zero (bf16 rounds the weights), far from total."""
    result = _bench().main(["--params", str(tiny_params_file), "--conversations", "4", "--batch-sizes", "2",
                            "--dtypes", "float32,bfloat16", "--skip-calls", "--out", str(tmp_path / "gen.json")])
    first, other = result["dtypes"]["rows"]
    assert (first["dtype"], other["dtype"]) == ("float32", "bfloat16") and first["divergence"] is None
    assert first["call_speedup_vs_first"] == 1.0 and first["call_seconds"] > 0 and other["call_seconds"] > 0
    assert other["call_speedup_vs_first"] == pytest.approx(first["call_seconds"] / other["call_seconds"])
    assert other["conversations"] == 4 and other["batch_size"] == 2 and other["new_tokens"] > 0
    assert other["tokens_per_second_vs_first"] == pytest.approx(other["tokens_per_second"] / first["tokens_per_second"])
    d = other["divergence"]
    assert d["reply_tokens"] > 0 and d["rows_scored"] >= 1
    assert 0.0 < d["kl_per_token"] < 1.0 and 0.5 < d["same_argmax_fraction"] <= 1.0


def test_reply_divergence_is_zero_against_itself(tiny_params_file):
    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.contract import HistoryTurn
    from pipeline_steps.common.policies import load_policy
    from pipeline_steps.world.simulator import World

    params = load_params(tiny_params_file)
    policy = load_policy("pi0", params, World(params.world).vertical, seed=3)
    prompts = policy.prompts([[HistoryTurn("Hi, we want a new kitchen. What would it cost?")]])
    d = _bench()._reply_divergence(policy, policy, prompts, policy.generate(prompts, 7))
    assert d["reply_tokens"] > 0 and d["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert d["same_argmax_fraction"] == 1.0 and d["temperature"] == params.collect.temperature


def test_reply_divergence_scores_the_reply_tokens_themselves(tiny_params_file):
    """The positions it scores are the reply's: the reply's log-probability under the policy equals what
    ``policies.response_logprobs`` (evaluate's KL) gives for the same tokens (a slice off by one would not)."""
    import numpy as np

    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.contract import HistoryTurn
    from pipeline_steps.common.policies import load_policy, response_logprobs
    from pipeline_steps.world.simulator import World

    params = load_params(tiny_params_file)
    policy = load_policy("pi0", params, World(params.world).vertical, seed=3)
    prompts = policy.prompts([[HistoryTurn("Hi, we want a new kitchen. What would it cost?")],
                              [HistoryTurn("Can someone come and look at our bathroom next week?")]])
    replies = ["Great, how big is the room?", "Sure! Which day suits you best?"]
    d = _bench()._reply_divergence(policy, policy, prompts, replies)
    tok = policy.tokenizer
    ids = [tok(p + r, add_special_tokens=False)["input_ids"][len(tok(p, add_special_tokens=False)["input_ids"]):]
           for p, r in zip(prompts, replies)]
    lp = response_logprobs(policy.model, tok, prompts, ids, policy.temperature, batch_size=2)
    assert d["rows_scored"] == 2 and d["reply_tokens"] == sum(len(x) for x in ids)
    assert d["reply_logprob_per_token"] == pytest.approx(float(np.concatenate(lp).mean()), abs=1e-4)


def test_generate_overrides_reach_model_generate(tiny_params_file):
    """Without overrides the call is model.generate with the policy's sampling settings, token for token;
    an override changes what is generated (one new token at most)."""
    import torch

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
    enc = policy.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(7)
    with torch.inference_mode():
        out = policy.model.generate(**enc, max_new_tokens=params.collect.max_new_tokens, do_sample=True,
                                    temperature=params.collect.temperature, top_p=params.collect.top_p, top_k=None,
                                    repetition_penalty=params.collect.repetition_penalty,
                                    pad_token_id=policy.tokenizer.pad_token_id)
    assert plain == policy.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    one = policy.generate(prompts, 7, max_new_tokens=1)
    assert all(len(policy.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 2 for t in one)
    assert one != plain


def test_generation_bench_refuses_bad_batch_sizes(tmp_path, tiny_params_file):
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generation.py"), "--params",
                           str(tiny_params_file), "--batch-sizes", "16,0", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "must be positive" in proc.stderr and not out.exists()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generation.py"), "--params",
                           str(tiny_params_file), "--batch-sizes", "16,", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "comma-separated list of integers" in proc.stderr and not out.exists()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generation.py"), "--params",
                           str(tiny_params_file), "--dtypes", "float32,float16", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "distinct values of" in proc.stderr and not out.exists()
