"""ppo_tune: PPO (and RLOO/GRPO) with Q as the reward raises held-out Q with bounded KL; outputs deploy in collect.

The fixtures build, in a temp folder, everything the step reads, small enough for seconds per run:

* **pi_i**: the tiny SmolLM2 architecture with random weights and an untied output layer scaled so that its
  next-token distribution is broad (about 7 nats) yet a LoRA adapter can move it within a few steps;
* **Q_i**: a hand-made ``LlamaForSequenceClassification`` whose token embeddings are pi_i's output
  embeddings, with every attention output and MLP down projection zeroed: the hidden state at a position
  is just the embedding of its token, so Q(s, a) depends only on the last action token -- 1 for pi_i's
  favourite first token (about 10% of its mass), about N(0, 1/8) for the others, a deterministic and
  dense reward that pi_i can learn;
* **returns rows**: short chat-templated states with the returns step's metadata, split by conversation.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOGIT_SCALE = 2.0  # pi_i: entropy ~7 nats, about 10% on its favourite token, a LoRA can sharpen it
ROOMS = ["kitchen", "bathroom", "attic", "basement", "garage", "living room", "bedroom", "hallway",
         "porch", "office", "laundry room", "patio"]


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------


def build_policy(tiny_model_dir: Path, out: Path) -> Path:
    """pi_i: the tiny SmolLM2 architecture with an untied output layer of logit scale LOGIT_SCALE, seeded."""
    import torch
    from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM

    from pipeline_steps.common.base_model import load_tokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits = W_out . RMSNorm(h) with |RMSNorm(h)| = sqrt(d): std LOGIT_SCALE per token
        model.lm_head.weight.normal_(0, LOGIT_SCALE / config.hidden_size**0.5, generator=torch.Generator().manual_seed(3))
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


def favourite_token(policy) -> int:
    """pi_i's most likely first response token on the first test state."""
    import torch

    from pipeline_steps.common.base_model import load_tokenizer

    tok = load_tokenizer(policy.name_or_path)
    ids = tok(short_states(tok, 1), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return int(policy(**ids).logits[0, -1].argmax())


def build_token_scorer(policy_dir: Path, out: Path, tokenizer=None, random_body: bool = False) -> Path:
    """Q_i: a tiny sequence classifier whose score depends only on the last token read (see module doc).

    ``random_body=True`` keeps random attention/MLP weights instead (a scorer whose output depends on the
    whole context: used to check masks and positions). ``tokenizer`` overrides the saved tokenizer.
    """
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    from pipeline_steps.common.base_model import load_causal_lm, load_tokenizer

    policy = load_causal_lm(policy_dir)
    config = AutoConfig.from_pretrained(policy_dir)
    config.num_labels = 1
    torch.manual_seed(7)
    q = LlamaForSequenceClassification(config)
    with torch.no_grad():
        w_out = policy.lm_head.weight
        q.model.embed_tokens.weight.copy_(w_out)
        if not random_body:
            for layer in q.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
        e = w_out[favourite_token(policy)]  # RMSNorm(e) has norm sqrt(d): Q(favourite) = 1
        q.score.weight.copy_((e / e.norm() / config.hidden_size**0.5).unsqueeze(0))
    q.save_pretrained(out)
    (tokenizer or load_tokenizer(policy_dir)).save_pretrained(out)
    return out


def short_states(tokenizer, n: int) -> list[str]:
    """``n`` distinct chat-templated states (system turn, customer turn, generation prompt), ~40 tokens each.

    Shorter than the world's rendered states (~150 tokens) so a PPO update takes a fraction of the time, with
    the same structure: ``<|im_end|>`` inside the prompt, the assistant generation prompt at the end.
    """
    return [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "Suggest the next business message."},
             {"role": "user", "content": f"Customer: Hi, I want to redo my {ROOMS[i % len(ROOMS)]}, project {i}."}],
            tokenize=False, add_generation_prompt=True)
        for i in range(n)
    ]


def build_returns(params_file: Path, tokenizer, out: Path, n: int = 24, heldout_every: int = 3) -> Path:
    """Returns rows (one state per conversation; every ``heldout_every``-th conversation held out) carrying the
    metadata the returns step writes for this params file and tokenizer, so the compatibility check passes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.returns import RETURNS_SCHEMA, returns_metadata
    from pipeline_steps.world.simulator import load_vertical

    params = load_params(params_file)
    states = short_states(tokenizer, n)
    rows = [dict(state_text=s, action_text="Happy to help!", G=0.5 * (i % 2), outcome=i % 2, conversation_id=f"c{i:03d}",
                 turn_index=1, split="validation" if i % heldout_every == 0 else "train", relation="verbatim",
                 prompt_version=params.prompt.version) for i, s in enumerate(states)]
    meta = returns_metadata(params, tokenizer, system_prompt_for(load_vertical(params.world.vertical)))
    pq.write_table(pa.Table.from_pylist(rows, schema=RETURNS_SCHEMA).replace_schema_metadata(meta), out)
    return out


# One-token responses: pi_i's next-token distribution is then explicit, so the test can compute the exact
# KL-regularised objective of Theorem 2 for pi_i, pi_{i+1} and its optimum pi* ~ pi_i exp(Q / beta).
TINY_PPO = dict(
    total_episodes=64, per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=2,
    local_rollout_forward_batch_size=16, response_length=1, learning_rate=0.001, kl_coef=0.5,
    missing_eos_penalty=None, temperature=0.7, lora_r=8, lora_alpha=16, num_generations=4,
    eval_states=8, eval_samples_per_state=8, eval_batch_size=32, bootstrap_resamples=500, sample_rows=3,
)


@pytest.fixture(scope="module")
def world_files(tmp_path_factory, tiny_model_dir, tokenizer):
    """pi_i, Q_i, a params file (tiny budgets) and returns rows in one temp folder."""
    root = tmp_path_factory.mktemp("ppo_tune")
    policy = build_policy(tiny_model_dir, root / "pi_i")
    scorer = build_token_scorer(policy, root / "q_scorer")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["base_model"]["name_or_path"] = str(policy)
    data["base_model"]["num_threads"] = 1  # tiny models: one thread is fastest on a shared machine
    data["collect"].update(conversations=2, batch_size=2, max_new_tokens=8)
    data["ppo_tune"].update(TINY_PPO)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(data))
    returns = build_returns(params_file, tokenizer, root / "returns.parquet")
    return dict(root=root, policy=policy, scorer=scorer, params=params_file, returns=returns)


def step_args(files: dict, out: Path, *extra: str) -> list[str]:
    return ["--params", str(files["params"]), "--returns", str(files["returns"]), "--q-model", str(files["scorer"]),
            "--policy", str(files["policy"]), "--out", str(out), "--metrics", str(out.parent / f"{out.name}.json"),
            "--curve", str(out.parent / f"{out.name}_curve.csv"), "--no-progress", *extra]


@pytest.fixture(scope="module")
def ppo_run(world_files):
    """One PPO run through the real command line (MLflow on, local SQLite in the temp folder)."""
    out = world_files["root"] / "ppo"
    proc = subprocess.run([sys.executable, "-m", "pipeline_steps.ppo_tune", *step_args(world_files, out)],
                          cwd=world_files["root"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(out=out, metrics=json.loads((out.parent / "ppo.json").read_text()), stdout=proc.stdout,
                curve=out.parent / "ppo_curve.csv", cwd=world_files["root"])


# ------------------------------------------------------------------------------------------------
# Learning: Theorem 1 on held-out states
# ------------------------------------------------------------------------------------------------


def exact_one_token_objective(policy_dir: Path, scorer_dir: Path, states: list[str], beta: float, temperature: float,
                              reference_dir: Path | None = None) -> dict[str, float]:
    """Exact E_pi[Q], KL(pi || pi_ref) and the Theorem 2 objective E[Q] - beta KL for one-token responses.

    Q of every token is read off the hand-made scorer (its hidden state is the token embedding); also the
    optimum max_pi E[Q] - beta KL(pi || pi_ref) = beta log E_{pi_ref}[exp(Q / beta)].
    """
    import torch

    from pipeline_steps.common.base_model import load_causal_lm, load_tokenizer
    from pipeline_steps.common.q_model import load_scorer

    tok = load_tokenizer(policy_dir)
    clf, _ = load_scorer(scorer_dir)
    with torch.no_grad():
        q = clf.score(clf.model.norm(clf.model.embed_tokens.weight))[:, 0].double()  # Q(s, t) for every token t

        def logp(path: Path) -> torch.Tensor:  # one state at a time: no padding, positions as in generation
            model = load_causal_lm(path)
            logits = [model(**tok(s, return_tensors="pt", add_special_tokens=False)).logits[0, -1] for s in states]
            return torch.log_softmax(torch.stack(logits).double() / temperature, dim=-1)

        lp = logp(policy_dir)
        lp_ref = logp(reference_dir) if reference_dir is not None else lp
    p = lp.exp()
    e_q = (p * q).sum(-1)
    kl = (p * (lp - lp_ref)).sum(-1)
    optimum = beta * torch.logsumexp(lp_ref + q / beta, dim=-1)
    return {"e_q": float(e_q.mean()), "kl": float(kl.mean()), "objective": float((e_q - beta * kl).mean()),
            "optimum": float(optimum.mean())}


def test_ppo_improves_heldout_q_with_bounded_kl_as_theorem_2_expects(ppo_run, world_files):
    """On held-out states: a significant single-turn improvement (Theorem 1's premise), a KL far below the
    collapse onto the best token, and most of the way to the KL-regularised optimum (Theorem 2's objective)."""
    from pipeline_steps.ppo_tune import read_returns, single_turn_prompts

    m = ppo_run["metrics"]
    check, imp = m["theorem1"], m["theorem1"]["improvement"]
    assert m["algorithm"] == "ppo" and m["prompts"]["heldout_states"] == 8
    assert m["training"]["episodes"] == 64 and m["training"]["updates"] == 4
    assert imp["ci_low"] > 0, imp
    assert imp["resampled"] == "groups" and 1 <= imp["n_groups"] <= 8
    assert "improvement (95% CI)" in ppo_run["stdout"]

    p = TINY_PPO
    heldout = single_turn_prompts(read_returns(world_files["returns"]), "r", p["eval_states"], 0).heldout
    old = exact_one_token_objective(world_files["policy"], world_files["scorer"], heldout, p["kl_coef"], p["temperature"])
    new = exact_one_token_objective(ppo_run["out"] / "policy", world_files["scorer"], heldout, p["kl_coef"],
                                    p["temperature"], reference_dir=world_files["policy"])
    # The step's sampled estimates agree with the exact values.
    assert abs(check["q_pi_i_mean"] - old["e_q"]) < 0.1 and abs(check["q_pi_next_mean"] - new["e_q"]) < 0.1
    assert abs(check["kl_per_token"] - new["kl"]) < 0.25, (check["kl_per_token"], new)
    # Theorem 2's objective went up, towards (never past) its optimum, with the KL bounded by beta.
    assert old["objective"] < new["objective"] <= new["optimum"] + 1e-6
    assert new["objective"] - old["objective"] > 0.5 * (new["optimum"] - old["objective"]), (old, new)
    assert 0 < new["kl"] < 1.0  # pi_{i+1} stays near pi_i: collapsing onto the Q = 1 token would cost ~2.4 nats


def test_ppo_outputs_adapter_policy_samples_curve_and_mlflow(ppo_run):
    import pandas as pd

    out = ppo_run["out"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "policy" / "config.json").is_file() and (out / "policy" / "tokenizer_config.json").is_file()
    assert not (out / "trainer").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ppo-")]  # no staging folders left
    samples = pd.read_csv(out / "samples.csv")
    assert list(samples.columns[:5]) == ["state_tail", "pi_i", "q_pi_i", "pi_next", "q_pi_next"] and len(samples) == 3
    assert "Q(pi_i+1)" in (out / "samples.md").read_text()
    curve = pd.read_csv(ppo_run["curve"])
    assert len(curve) == 4 and {"step", "episode", "q_reward", "objective/kl", "objective/entropy",
                                "policy/clipfrac_avg", "loss/value_avg"} <= set(curve.columns)
    with sqlite3.connect(ppo_run["cwd"] / "mlflow.db") as db:
        keys = {k for (k,) in db.execute("select distinct key from metrics")}
        names = {n for (n,) in db.execute("select name from runs")}
    assert "ppo_tune" in names
    assert {"train/q_reward", "train/objective/kl", "theorem1.improvement.mean", "theorem1.kl_per_token"} <= keys


def test_saved_policy_tokenizer_matches_the_returns_fingerprint(ppo_run, world_files):
    """pi_{i+1} can be the next iteration's pi_i: its tokenizer renders states exactly like pi_i's."""
    from pipeline_steps.common.base_model import load_tokenizer
    from pipeline_steps.returns import read_metadata, tokenizer_fingerprint

    saved = load_tokenizer(ppo_run["out"] / "policy")
    assert tokenizer_fingerprint(saved) == read_metadata(str(world_files["returns"]))["tokenizer_sha256"]
    assert saved.pad_token_id == saved.eos_token_id  # PPO's own pad token never leaks into the artifact


def test_saved_policy_deploys_in_collect(ppo_run, tmp_path, tiny_params_file):
    from pipeline_steps import collect

    summary = collect.main(["--params", str(tiny_params_file), "--policy", str(ppo_run["out"] / "policy"),
                            "--conversations", "2", "--out", str(tmp_path / "raw"), "--summary", str(tmp_path / "c.json"),
                            "--no-mlflow", "--no-progress"])
    assert summary["conversations"] == 2 and summary["policy"]["policy_id"] == "policy"


# ------------------------------------------------------------------------------------------------
# PPO's reward is exactly Q
# ------------------------------------------------------------------------------------------------


def test_ppo_reward_model_equals_q_score(world_files, tmp_path, tokenizer):
    """TRL's get_reward through PPORewardModel (own pad token, EOS kept) == q_model.score of (state, action)."""
    import torch
    from trl.experimental.utils import get_reward

    from pipeline_steps.common.q_model import load_scorer, score
    from pipeline_steps.ppo_tune import PPORewardModel, ppo_pad_token

    scorer, q_tok = load_scorer(build_token_scorer(world_files["policy"], tmp_path / "q_random", random_body=True))
    import polars as pl

    states = pl.read_parquet(world_files["returns"])["state_text"].unique(maintain_order=True).to_list()[:4]
    actions = ["Happy to help! When can we visit?", "[ABSTAIN]", "Sure", "What size is the room?"]
    queries = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in states]
    pad_tok = ppo_pad_token(tokenizer, queries)
    pad, eos = tokenizer.convert_tokens_to_ids(pad_tok), tokenizer.eos_token_id
    responses = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in actions]
    responses = [r + [eos] if i % 2 == 0 else r for i, r in enumerate(responses)]  # some end with EOS, some hit the limit
    width_q, width_r = max(map(len, queries)), max(map(len, responses))
    rows = [[pad] * (width_q - len(q)) + q + r + [pad] * (width_r - len(r)) for q, r in zip(queries, responses)]
    reward_model = PPORewardModel(scorer, q_tok.pad_token_id, pad, eos)
    with torch.no_grad():
        _, got, _ = get_reward(reward_model, torch.tensor(rows), pad, width_q)
    expected = score(scorer, q_tok, states, actions)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert np.ptp(expected) > 0  # a scorer that reads the context, not a constant


def test_q_reward_function_subtracts_the_missing_eos_penalty_only_when_asked(world_files, tmp_path, tokenizer):
    """RLOO/GRPO's reward is Q alone by default (params.yaml: missing_eos_penalty null); with a penalty, exactly
    the responses that hit the limit without EOS lose it, and Q itself is read the same either way."""
    import polars as pl

    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.q_model import load_scorer
    from pipeline_steps.ppo_tune import QRewardFunction

    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml").ppo_tune.missing_eos_penalty is None
    scorer, q_tok = load_scorer(build_token_scorer(world_files["policy"], tmp_path / "q_random", random_body=True))
    states = pl.read_parquet(world_files["returns"])["state_text"].unique(maintain_order=True).to_list()[:4]
    eos = tokenizer.eos_token_id
    completions = ["Happy to help! When can we visit?", "Sure", "What size is the room?", "We can start Monday"]
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    ids = [r + [eos] if i % 2 == 0 else r for i, r in enumerate(ids)]  # rows 1 and 3 hit the limit
    plain = QRewardFunction(scorer, q_tok, 2, None, None)(prompts=states, completions=completions, completion_ids=ids)
    penalised = QRewardFunction(scorer, q_tok, 2, 0.1, None)(prompts=states, completions=completions,
                                                             completion_ids=ids)
    np.testing.assert_allclose(np.subtract(plain, penalised), [0.0, 0.1, 0.0, 0.1], atol=1e-6)
    assert np.ptp(plain) > 0


# ------------------------------------------------------------------------------------------------
# Other single-turn improvers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_rloo_and_grpo_run_end_to_end(world_files, algorithm):
    from pipeline_steps import ppo_tune

    out = world_files["root"] / algorithm
    m = ppo_tune.main(step_args(world_files, out, "--algorithm", algorithm, "--total-episodes", "32", "--no-mlflow"))
    assert m["algorithm"] == algorithm and m["training"]["updates"] >= 2
    assert np.isfinite(m["theorem1"]["improvement"]["mean"]) and m["theorem1"]["kl_per_token"] >= -1e-6
    assert (out / "policy" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert "q_reward" in (out.parent / f"{algorithm}_curve.csv").read_text().splitlines()[0]


def test_ppo_runs_with_bf16_policy_weights_on_the_cpu(world_files):
    """``base_model.dtype: bfloat16`` (profiles/gpu.yaml; on a CPU with fast bf16 it makes generation 1.7x,
    README) loads pi_i and its reference in bf16: PPO still updates, and the merged policy it saves is fp32."""
    import torch

    from pipeline_steps import ppo_tune
    from pipeline_steps.common.base_model import load_causal_lm

    data = yaml.safe_load(world_files["params"].read_text())
    data["base_model"]["dtype"] = "bfloat16"
    params = world_files["root"] / "params_bf16.yaml"
    params.write_text(yaml.safe_dump(data))
    out = world_files["root"] / "bf16"
    m = ppo_tune.main(step_args({**world_files, "params": params}, out, "--total-episodes", "32", "--no-mlflow"))
    assert m["training"]["updates"] >= 2 and np.isfinite(m["theorem1"]["improvement"]["mean"])
    assert m["theorem1"]["kl_per_token"] > 0  # the policy moved
    # the merged policy is fp32: pi_i reloaded in fp32 plus the saved LoRA delta, not rounded to bf16 (where an
    # update under half a bf16 step per weight would vanish)
    config = json.loads((out / "policy" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    from peft import PeftModel

    saved = load_causal_lm(out / "policy")
    expected = PeftModel.from_pretrained(load_causal_lm(world_files["policy"]), str(out / "adapter")).merge_and_unload()
    base = load_causal_lm(world_files["policy"])
    name = "model.layers.0.self_attn.q_proj.weight"
    w, w_exp, w0 = (dict(m.named_parameters())[name] for m in (saved, expected, base))
    assert torch.allclose(w, w_exp, atol=1e-7) and not torch.equal(w, w0)
    assert not torch.equal(w, w.to(torch.bfloat16).float())  # off the bf16 grid
    assert load_causal_lm(out / "policy", dtype="bfloat16").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Prompts and bad input
# ------------------------------------------------------------------------------------------------


def test_single_turn_prompts_dedupe_split_and_keep_heldout_unseen():
    import polars as pl

    from pipeline_steps.ppo_tune import PPOTuneError, single_turn_prompts

    rows = pl.DataFrame({
        "state_text": ["a", "a", "b", "c", "a", "d", "d"], "action_text": ["x"] * 7, "G": [0.0] * 7, "outcome": [0] * 7,
        "conversation_id": ["1", "2", "2", "3", "4", "4", "5"], "turn_index": [1, 1, 2, 1, 1, 2, 1],
        "split": ["train", "train", "train", "validation", "validation", "validation", "validation"],
    })
    sets = single_turn_prompts(rows, "returns.parquet", max_heldout=10, seed=0)
    assert sets.train == ["a", "b"] and sets.heldout == ["c", "d"]  # 'a' was seen in training
    assert sets.heldout_conversations == ["3", "4"]  # where each first occurs: the Theorem 1 CI's resampling unit
    assert sets.info["heldout_states_overlapping_train"] == 1
    assert len(single_turn_prompts(rows, "r", max_heldout=1, seed=0).heldout) == 1
    with pytest.raises(PPOTuneError, match="non_empty_prompts"):
        single_turn_prompts(rows.filter(pl.col("split") == "validation"), "r", 10, 0)
    with pytest.raises(PPOTuneError, match="non_empty_heldout"):
        single_turn_prompts(rows.filter(pl.col("split") == "train"), "r", 10, 0)
    with pytest.raises(PPOTuneError, match="schema"):
        single_turn_prompts(rows.drop("split"), "r", 10, 0)


def _fails_cleanly(files: dict, out: Path, args: list[str], *fragments: str) -> None:
    from pipeline_steps import ppo_tune

    with pytest.raises(SystemExit) as err:
        ppo_tune.main(args + ["--no-mlflow"])
    for f in fragments:
        assert f in str(err.value), str(err.value)
    assert not out.exists() and not (out.parent / f"{out.name}.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}-")]


def test_q_scorer_with_another_tokenizer_is_refused(world_files, tmp_path):
    from pipeline_steps.common.base_model import load_tokenizer

    other = load_tokenizer(world_files["policy"])
    other.add_tokens(["<not_in_the_policy_vocab>"])
    scorer = build_token_scorer(world_files["policy"], tmp_path / "q_other", tokenizer=other)
    files = dict(world_files, scorer=scorer)
    out = tmp_path / "out"
    _fails_cleanly(files, out, step_args(files, out), "same_tokenizer", str(scorer))


def test_empty_prompt_set_is_refused(world_files, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(world_files["returns"])
    empty = tmp_path / "empty.parquet"
    pq.write_table(table.slice(0, 0), empty)
    files = dict(world_files, returns=empty)
    out = tmp_path / "out"
    _fails_cleanly(files, out, step_args(files, out), "non_empty_prompts", str(empty))


def test_reference_policy_that_fails_to_load_is_refused(world_files, tmp_path):
    broken = tmp_path / "broken_policy"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    out = tmp_path / "out"
    args = step_args(world_files, out)
    args[args.index("--policy") + 1] = str(broken)
    _fails_cleanly(world_files, out, args, "policy_loads", str(broken))
    args[args.index("--policy") + 1] = str(tmp_path / "missing")
    _fails_cleanly(world_files, out, args, "policy_loads", "missing")


def test_params_section_rejects_unknown_keys_and_bad_batches(world_files):
    from pipeline_steps.common.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="ppo_tune.nope"):
        load_params(world_files["params"], {"ppo_tune.nope": 1})
    with pytest.raises(ConfigError, match="num_mini_batches"):
        load_params(world_files["params"], {"ppo_tune.num_mini_batches": 3})
    with pytest.raises(ConfigError, match="num_generations"):
        load_params(world_files["params"], {"ppo_tune.algorithm": "grpo", "ppo_tune.num_generations": 3})


def test_fewer_prompts_than_a_rollout_batch_are_cycled_not_spun_on(world_files, tmp_path):
    """16 training prompts and 32 episodes per rollout batch: TRL's dataloader alone would loop forever."""
    from pipeline_steps import ppo_tune

    assert ppo_tune.fill_rollout_batch([1, 2, 3], 8) == [1, 2, 3] * 3
    assert ppo_tune.fill_rollout_batch([1, 2, 3], 3) == [1, 2, 3]
    data = yaml.safe_load(world_files["params"].read_text())
    data["ppo_tune"].update(per_device_train_batch_size=16, gradient_accumulation_steps=2)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    out = tmp_path / "ppo"
    args = step_args(world_files, out, "--total-episodes", "32", "--no-mlflow")
    args[args.index("--params") + 1] = str(params)
    m = ppo_tune.main(args)
    assert m["prompts"]["train_states"] < 32 and m["training"]["updates"] == 1 and m["training"]["episodes"] == 32


def test_gradient_checkpointing_engages_in_ppo_and_leaves_the_update_unchanged(world_files, tmp_path, monkeypatch):
    """``ppo_tune.gradient_checkpointing``: TRL's PPO loop ignores the flag, so the step enables it on the policy
    and the value model itself. Recomputing activations must not change what is learned."""
    import transformers.modeling_utils as modeling_utils
    from safetensors.torch import load_file

    from pipeline_steps import ppo_tune

    calls = {"n": 0}
    real_checkpoint = modeling_utils.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls["n"] += 1
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting_checkpoint)
    adapters = {}
    for on in (False, True):
        data = yaml.safe_load(world_files["params"].read_text())
        data["ppo_tune"]["gradient_checkpointing"] = on
        params = tmp_path / f"params_{on}.yaml"
        params.write_text(yaml.safe_dump(data))
        out = tmp_path / f"ppo_{on}"
        args = step_args(world_files, out, "--total-episodes", "16", "--no-mlflow")
        args[args.index("--params") + 1] = str(params)
        before = calls["n"]
        ppo_tune.main(args)
        assert (calls["n"] > before) == on  # checkpointed decoder layers ran only when asked for
        adapters[on] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    for name, weight in adapters[False].items():
        np.testing.assert_allclose(adapters[True][name].numpy(), weight.numpy(), atol=1e-5, err_msg=name)
