"""evaluate: offline Theorem 1/2 quantities and the A/B test, on the tiny model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_steps import evaluate
from pipeline_steps.common.contract import history_from_records, render_state, system_prompt_for


@pytest.fixture()
def tiny_q(tmp_path, tiny_model_dir):
    """A Q scorer of the tiny architecture (random head): enough to exercise the plumbing."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline_steps.common.base_model import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    out = tmp_path / "scorer"
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture()
def returns_file(tmp_path, world, tokenizer, params):
    from pipeline_steps.world.scripted import ScriptedPolicy

    convs = world.run(ScriptedPolicy("random", world.vertical), 12, seed=3, batch_size=12)
    sp = system_prompt_for(world.vertical)
    rows = []
    for c in convs:
        for i, r in enumerate(c.records):
            if r["relation"] is None:
                continue
            rows.append({"state_text": render_state(history_from_records(c.records[: i + 1]), tokenizer, sp, params.prompt.max_prompt_tokens),
                         "action_text": r["suggestion"] or "[ABSTAIN]", "G": float(c.converted), "outcome": int(c.converted),
                         "conversation_id": c.conversation_id, "turn_index": r["turn_index"],
                         "split": "validation" if c.index % 2 else "train"})
    path = tmp_path / "returns.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_evaluate_end_to_end_on_tiny_models(tmp_path, tiny_params_file, tiny_model_dir, tiny_q, returns_file):
    import yaml

    data = yaml.safe_load(tiny_params_file.read_text())
    data["evaluate"].update(heldout_states=6, ab_conversations=6, bootstrap_resamples=200)
    tiny_params_file.write_text(yaml.safe_dump(data))
    fq = tmp_path / "fit_q.json"
    fq.write_text(json.dumps({"q_error_p90": 0.4, "q_error_mean": 0.2}))
    metrics = evaluate.main(["--params", str(tiny_params_file), "--baseline", str(tiny_model_dir), "--candidate", str(tiny_model_dir),
                             "--q-model", str(tiny_q), "--returns", str(returns_file), "--fit-q-metrics", str(fq),
                             "--metrics", str(tmp_path / "evaluate.json"), "--samples", str(tmp_path / "samples.json"),
                             "--plots", str(tmp_path / "plots"), "--no-mlflow"])
    off, ab = metrics["offline"], metrics["ab"]
    assert off["states"] == 6 and off["q_error_p90"] == 0.4
    # Same weights, same seed: the candidate is the baseline, so the KL is 0 and the improvement is 0.
    assert off["kl_per_token"] == pytest.approx(0.0, abs=1e-5)
    assert off["improvement"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert off["improvement"]["resampled"] == "groups" and 1 <= off["improvement"]["n_groups"] <= 6  # conversations
    assert set(off["guardrails"]["candidate"]) == {"acceptance", "mean_words", "abstain_rate"}
    assert ab["control"]["trials"] == ab["treatment"]["trials"] == 6 and ab["mode"] == "world"
    assert (tmp_path / "plots" / "ab_conversion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "evaluate.json").read_text())["ab"]["p_value"] == ab["p_value"]


def test_paired_improvement_ci_brackets_the_mean():
    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 0.1, 200)
    cand = base + 0.05 + rng.normal(0, 0.02, 200)
    from pipeline_steps.common.stats import paired_bootstrap

    r = paired_bootstrap(cand, base, 1000, seed=0)
    assert r["ci_low"] < r["mean"] < r["ci_high"] and r["ci_low"] > 0.04 and r["ci_high"] < 0.06


def test_improvement_ci_resamples_whole_conversations():
    """Six states per conversation that repeat one difference add no evidence: with the conversations as groups
    the CI keeps the width of one state per conversation; resampling states shrinks it by about sqrt(6)."""
    from pipeline_steps.common.stats import paired_bootstrap

    rng = np.random.default_rng(1)
    base = rng.normal(0.3, 0.1, 60)
    cand = base + 0.02 + rng.normal(0, 0.05, 60)
    one = paired_bootstrap(cand, base, 2000, seed=0)
    rep = np.repeat(np.arange(60), 6)
    by_conv = paired_bootstrap(cand[rep], base[rep], 2000, seed=0, groups=rep)
    by_state = paired_bootstrap(cand[rep], base[rep], 2000, seed=0)
    width = lambda r: r["ci_high"] - r["ci_low"]  # noqa: E731
    assert by_conv["mean"] == pytest.approx(one["mean"]) and by_conv["n_groups"] == 60 and by_conv["n_states"] == 360
    assert 0.8 < width(by_conv) / width(one) < 1.25
    assert width(by_state) < 0.6 * width(by_conv)
    assert by_conv["ci_low"] < by_conv["mean"] < by_conv["ci_high"]
    one_conversation = paired_bootstrap(cand[:6], base[:6], 200, seed=0, groups=["c"] * 6)
    assert one_conversation["method"] == "degenerate"  # one group: nothing to resample
    with pytest.raises(ValueError, match="5 labels for 6 states"):
        paired_bootstrap(cand[:6], base[:6], 200, seed=0, groups=["c"] * 5)


def test_ab_from_production_logs(tmp_path, params):
    """Production mode: the arms come from the logs' variant column."""
    rows = []
    for k in range(40):
        variant = "control" if k % 2 else "treatment"
        converted = (k % 4 == 0)  # treatment arm: every other conversation converts; control: none
        rows.append({"conversation_id": f"c{k}", "turn_index": 1, "outcome": 0, "variant": variant})
        rows.append({"conversation_id": f"c{k}", "turn_index": 2, "outcome": int(converted), "variant": variant})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "logs.parquet")
    ab, curves = evaluate.ab_from_logs(params, tmp_path / "logs.parquet", "control", "treatment")
    assert ab["control"]["rate"] == 0.0 and ab["treatment"]["rate"] == 0.5 and ab["p_value_better"] < 0.01
    assert curves["treatment"][1] == 0.5
    with pytest.raises(ValueError, match="no conversations with variant 'nope'"):
        evaluate.ab_from_logs(params, tmp_path / "logs.parquet", "nope", "treatment")


def _tiny_pair(tiny_model_dir, scale: float = 0.05):
    """The tiny model and a copy with perturbed weights: two policies that differ by a known amount."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    pi = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for w in ref.parameters():
            w.add_(scale * torch.randn_like(w))
    return pi, ref


def test_kl_per_token_matches_an_unbatched_computation(tiny_model_dir, tokenizer):
    """The batched, right-padded estimate equals the exact KL over the vocabulary at each response position,
    summed and divided by the tokens, computed one response at a time (a slice off by one would not)."""
    from types import SimpleNamespace

    import torch

    from pipeline_steps.common.policies import kl_per_token

    pi, ref = _tiny_pair(tiny_model_dir)
    states = ["Customer: hi, how much for a kitchen?", "Customer: can you come on Monday? We need the bathroom done."]
    responses = [tokenizer("Sure, about 9k.")["input_ids"], tokenizer("Yes, Monday at 10 works for us.")["input_ids"]]
    t = 0.7

    def next_token_logp(model, s, r):
        q = tokenizer(s, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([q + r])).logits.float() / t, dim=-1)
        return lp[0, len(q) - 1 : len(q) + len(r) - 1]

    per_position = torch.cat([
        (next_token_logp(pi, s, r).exp() * (next_token_logp(pi, s, r) - next_token_logp(ref, s, r))).sum(-1)
        for s, r in zip(states, responses)])
    expected = float(per_position.sum() / len(per_position))
    got = kl_per_token(SimpleNamespace(model=pi, tokenizer=tokenizer, temperature=t),
                       SimpleNamespace(model=ref, tokenizer=tokenizer, temperature=1.0), states, responses, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected > 1e-3  # the perturbed reference differs: the check is not 0 == 0
    same = SimpleNamespace(model=pi, tokenizer=tokenizer, temperature=t)
    assert kl_per_token(same, same, states, responses, batch_size=1) == pytest.approx(0.0, abs=1e-6)


def test_exact_token_kl_has_the_sampled_log_ratio_expectation_and_less_variance(tiny_model_dir, tokenizer):
    """On responses sampled from pi, the per-response sum of exact token KLs and the sampled log-ratio
    sum(log pi - log pi_ref) estimate the same KL (their means agree within the log-ratio's noise), but the
    exact one is never negative and varies far less: what makes KL on a few held-out states usable."""
    import torch

    from pipeline_steps.common.policies import response_logprobs, response_token_kls

    pi, ref = _tiny_pair(tiny_model_dir, scale=0.02)
    states = ["Customer: hi, how much for a kitchen?", "Customer: can you come on Monday?"] * 100
    enc_ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in states]
    torch.manual_seed(1)
    responses = []
    with torch.no_grad():
        for q in enc_ids:
            out = pi.generate(torch.tensor([q]), attention_mask=torch.ones(1, len(q), dtype=torch.long), do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4, min_new_tokens=4,
                              pad_token_id=tokenizer.pad_token_id)
            responses.append(out[0, len(q):].tolist())
    exact = np.array([x.sum() for x in response_token_kls(pi, ref, tokenizer, states, responses, 1.0, 16)])
    sampled = np.array([(a - b).sum() for a, b in zip(response_logprobs(pi, tokenizer, states, responses, 1.0, 16),
                                                      response_logprobs(ref, tokenizer, states, responses, 1.0, 16))])
    se = sampled.std(ddof=1) / np.sqrt(len(sampled))
    assert (exact >= 0).all() and exact.mean() > 0
    assert abs(exact.mean() - sampled.mean()) < 4 * se, (exact.mean(), sampled.mean(), se)
    assert exact.var() < 0.5 * sampled.var(), (exact.var(), sampled.var())


def test_kl_estimator_bench_compares_both_estimators_on_the_same_samples(tmp_path, tiny_params_file, tiny_model_dir,
                                                                         tokenizer, returns_file):
    """benchmarks/bench_kl_estimators.py on a perturbed tiny policy: both estimators on the same held-out samples;
    the exact one is never negative and varies less over redrawn subsets; bad arguments stop before any work."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_kl_estimators

    _, perturbed = _tiny_pair(tiny_model_dir, scale=0.05)
    policy = tmp_path / "policy"
    perturbed.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    out = tmp_path / "kl.json"
    r = bench_kl_estimators.main(["--params", str(tiny_params_file), "--returns", str(returns_file), "--policy",
                                  str(policy), "--states", "6", "--samples", "2", "--subset", "3", "--draws", "200",
                                  "--out", str(out)])
    assert json.loads(out.read_text()) == r
    assert r["states"] == 6 and r["samples_per_state"] == 2 and r["tokens_per_response"] > 0
    exact, sampled = r["exact"], r["sampled_log_ratio"]
    assert exact["all_samples_per_token"] > 0 and exact["per_response_negative_fraction"] == 0.0
    assert exact["subset_negative_fraction"] == 0.0
    assert exact["subset_std"] < sampled["subset_std"] and r["subset_variance_ratio_sampled_over_exact"] > 1
    with pytest.raises(SystemExit, match="must be >= 1"):
        bench_kl_estimators.main(["--params", str(tiny_params_file), "--returns", str(returns_file),
                                  "--policy", str(policy), "--samples", "0"])
