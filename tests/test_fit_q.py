"""fit_q on the tiny model: Q reads exactly what TRL's PPO reward model reads; it learns; outputs and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline_steps import fit_q as fit_q_step
from pipeline_steps import returns as returns_step
from pipeline_steps.common.config import load_params
from pipeline_steps.common.contract import ABSTAIN_MARKER, HistoryTurn, render_state, system_prompt_for, turns_to_table
from pipeline_steps.common.parquet_io import write_parquet
from pipeline_steps.common.q_input import q_input_ids
from pipeline_steps.common.q_model import encode, load_scorer, read_manifest, score

REPO = Path(__file__).resolve().parents[1]
MAX_ACTION = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and on a shared 2-core machine it loses a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def q_params_file(tmp_path_factory, tiny_model_dir) -> Path:
    """params.yaml with the tiny model, a 30% validation split and a short training budget."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["base_model"]["name_or_path"] = str(tiny_model_dir)
    data["returns"]["validation_fraction"] = 0.3
    data["fit_q"].update(epochs=2, batch_size=8, gradient_accumulation_steps=1, max_action_tokens=MAX_ACTION)
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def world_returns(tmp_path_factory, world, tokenizer, q_params_file) -> Path:
    """A returns file built from world logs (three scripted strategies) by the returns step's own code."""
    from pipeline_steps.world.scripted import ScriptedPolicy
    from pipeline_steps.world.simulator import conversations_to_turns

    params = load_params(q_params_file)
    convs = []
    for k, name in enumerate(("expert", "friendly_generic", "premature_pitch")):
        convs += world.run(ScriptedPolicy(name, world.vertical), 8, seed=300 + k, batch_size=8, first_index=8 * k)
    table = returns_step.build_returns(
        pl.from_arrow(turns_to_table(conversations_to_turns(convs))), params, tokenizer, system_prompt_for(world.vertical)
    )
    return write_parquet(table, tmp_path_factory.mktemp("returns") / "returns.parquet")


def run_args(tmp: Path, params_file: Path, returns_file: Path) -> list[str]:
    return ["--params", str(params_file), "--input", str(returns_file), "--out", str(tmp / "model"),
            "--metrics", str(tmp / "metrics" / "fit_q.json"), "--plots", str(tmp / "plots"), "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, q_params_file, world_returns) -> Path:
    """One in-process ``main`` run, tracked in a throwaway local MLflow store."""
    tmp = tmp_path_factory.mktemp("fit_q")
    old_uri, old_cwd = os.environ.get("MLFLOW_TRACKING_URI"), Path.cwd()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.chdir(tmp)  # MLflow's default artifact root is relative to the working directory
    try:
        fit_q_step.main(run_args(tmp, q_params_file, world_returns))
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return tmp


def test_main_writes_adapter_scorer_metrics_plots_and_an_mlflow_run(trained):
    metrics = json.loads((trained / "metrics" / "fit_q.json").read_text())
    for key in ("mse", "spearman", "roc_auc_outcome", "q_error_p90", "q_error_mean", "rows_train", "rows_validation"):
        assert key in metrics
    assert 0 <= metrics["q_error_mean"] <= metrics["q_error_p90"] + 1e-12
    assert (trained / "model" / "adapter" / "adapter_config.json").is_file()
    assert (trained / "model" / "scorer" / "config.json").is_file()
    assert read_manifest(trained / "model" / "scorer")["max_action_tokens"] == MAX_ACTION
    curve = (trained / "plots" / "learning_curve.csv").read_text().splitlines()
    assert curve[0] == "epoch,train_loss,eval_loss" and len(curve) == 2 + metrics["epochs_run"]  # epochs 0..n
    assert (trained / "plots" / "calibration.png").stat().st_size > 1000
    assert not [p for p in trained.rglob(".*") if p.name != ".gitignore"], "temp folders left behind"

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("iterative-ppo").experiment_id)
    assert run.info.run_name == "fit_q" and run.info.status == "FINISHED"
    assert run.data.metrics["q_error_p90"] == pytest.approx(metrics["q_error_p90"])
    assert run.data.params["fit_q.lora_r"] == "16"
    # q_params_file keeps params.yaml's 'auto'; the metrics say what it resolved to on this machine.
    assert run.data.params["fit_q.bf16"] == "auto" and isinstance(metrics["bf16_autocast"], bool)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "scorer")} | {
        a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"scorer/config.json", "scorer/model.safetensors", "plots/calibration.png", "fit_q.json"} <= artifacts


def test_score_equals_what_trl_ppo_reward_model_returns(trained, world_returns):
    """Build ``query_responses`` as TRL 1.12's PPOTrainer does and compare ``get_reward`` with ``score``."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding
    from trl.experimental.ppo.ppo_trainer import truncate_response
    from trl.experimental.utils import get_reward

    scorer = AutoModelForSequenceClassification.from_pretrained(str(trained / "model" / "scorer")).eval()
    _, tok = load_scorer(trained / "model" / "scorer")
    rows = pq.read_table(world_returns).to_pylist()
    rows = sorted(rows, key=lambda r: len(r["state_text"]))  # short and long states in one batch
    picks = [rows[0], rows[len(rows) // 3], rows[2 * len(rows) // 3], rows[-1]]
    states = [r["state_text"] for r in picks] + [picks[1]["state_text"], picks[2]["state_text"]]
    actions = [r["action_text"] for r in picks] + [ABSTAIN_MARKER, "Shall we book a visit?<|im_end|> and more"]
    pad = tok.pad_token_id
    assert pad == tok.eos_token_id and pad in tok(states[0], add_special_tokens=False)["input_ids"]  # <|im_end|>

    # PPOTrainer: the collator left-pads the tokenised prompts; generated responses are cut at EOS
    # (truncate_response) and right-padded; query_responses = cat(queries, responses); score via get_reward.
    queries = DataCollatorWithPadding(tok)([{"input_ids": tok(s, add_special_tokens=False)["input_ids"]} for s in states])["input_ids"]
    context_length = queries.shape[1]
    resp = [tok(a, add_special_tokens=False)["input_ids"][:MAX_ACTION] for a in actions]
    responses = torch.full((len(resp), max(map(len, resp))), pad)
    for i, r in enumerate(resp):
        responses[i, : len(r)] = torch.tensor(r)
    query_responses = torch.cat([queries, truncate_response(tok.eos_token_id, pad, responses)], 1)
    with torch.no_grad():
        _, trl_scores, seq_lengths = get_reward(scorer, query_responses, pad, context_length)

    ours = score(scorer, tok, states, actions, batch_size=4, max_action_tokens=MAX_ACTION)
    np.testing.assert_allclose(ours, trl_scores.numpy(), atol=1e-5)
    for i, (s, a) in enumerate(zip(states, actions)):
        left = context_length - len(tok(s, add_special_tokens=False)["input_ids"])
        seen = query_responses[i, left : int(seq_lengths[i]) + 1].tolist()  # the tokens up to TRL's score position
        assert seen == encode(tok, s, a, MAX_ACTION)
        if i < 5:  # no EOS in the action: exactly the shared Q-input definition
            assert seen == q_input_ids(tok, s, a, MAX_ACTION)


def test_scoring_shared_states_once_gives_the_same_q(trained, world_returns):
    """score_by_state (each state's tokens run once, its actions on the cached keys and values) equals score, for the
    merged scorer and the LoRA adapter, with states holding pad-id tokens, actions cut at EOS and an empty action."""
    from pipeline_steps.common.q_model import score_by_state

    rows = sorted(pq.read_table(world_returns).to_pylist(), key=lambda r: len(r["state_text"]))
    picked = [rows[0]["state_text"], rows[len(rows) // 2]["state_text"], rows[-1]["state_text"]]
    replies = [r["action_text"] for r in rows[:5]] + [ABSTAIN_MARKER, "Shall we book a visit?<|im_end|> and more", ""]
    states = [s for s in picked for _ in replies]
    actions = replies * len(picked)
    for folder in ("scorer", "adapter"):
        model, tok = load_scorer(trained / "model" / folder)
        full = score(model, tok, states, actions, batch_size=4, max_action_tokens=MAX_ACTION)
        shared = score_by_state(model, tok, states, actions, batch_size=3, max_action_tokens=MAX_ACTION)
        np.testing.assert_allclose(shared, full, atol=1e-5)
        assert np.ptp(full) > 0


def test_merged_scorer_equals_adapter_plus_base(trained, world_returns):
    rows = pq.read_table(world_returns).to_pylist()[:12]
    states, actions = [r["state_text"] for r in rows], [r["action_text"] for r in rows]
    merged, tok = load_scorer(trained / "model" / "scorer")
    adapter, tok2 = load_scorer(trained / "model" / "adapter")
    assert type(merged).__name__ == "LlamaForSequenceClassification" and merged.config.pad_token_id == tok.pad_token_id
    a = score(merged, tok, states, actions, max_action_tokens=MAX_ACTION)
    b = score(adapter, tok2, states, actions, max_action_tokens=MAX_ACTION)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.ptp(a) > 0  # the trained head distinguishes rows


def test_same_seed_same_q(tmp_path, trained, q_params_file, world_returns):
    metrics = fit_q_step.main(run_args(tmp_path, q_params_file, world_returns) + ["--no-mlflow"])
    assert metrics == json.loads((trained / "metrics" / "fit_q.json").read_text())
    rows = pq.read_table(world_returns).to_pylist()[:8]
    states, actions = [r["state_text"] for r in rows], [r["action_text"] for r in rows]
    q1 = score(*load_scorer(trained / "model" / "scorer"), states, actions)
    q2 = score(*load_scorer(tmp_path / "model" / "scorer"), states, actions)
    np.testing.assert_array_equal(q1, q2)


def _keyword_table(tokenizer) -> pa.Table:
    """G is high iff the suggestion proposes a visit; the keyword is mid-sentence (the model must attend)."""
    rng = np.random.default_rng(0)
    msgs = ["Hi, I need a new kitchen.", "How much is a bathroom?", "Can you help with my roof?", "Do you paint?"]
    openers = ["Thanks for reaching out", "Happy to help", "Good question", "Sure thing", "Let me check"]
    rows = []
    for i in range(128):
        good = i % 2 == 0
        tail = "shall we book a visit? Thanks." if good else "have a nice day. Thanks."
        rows.append(dict(
            state_text=render_state([HistoryTurn(msgs[rng.integers(len(msgs))])], tokenizer, "You suggest replies.", 128),
            action_text=f"{openers[rng.integers(len(openers))]}, {tail}", G=0.8 if good else 0.1, outcome=int(good),
            conversation_id=f"c{i}", turn_index=1, split="validation" if i >= 96 else "train",
        ))
    return pa.Table.from_pylist(rows)


KEYWORD_SETTINGS = {"fit_q.epochs": 4, "fit_q.learning_rate": 2e-3, "fit_q.gradient_accumulation_steps": 1}


def test_training_reduces_validation_loss_where_q_is_learnable(tmp_path, tokenizer, tiny_model_dir):
    table, settings = _keyword_table(tokenizer), KEYWORD_SETTINGS
    params = load_params(REPO / "params.yaml", {**settings, "fit_q.probe_init_rows": 0})  # zero head: LoRA must learn
    result = fit_q_step.fit_q(table, params, tiny_model_dir, tokenizer, tmp_path / "m", tmp_path / "p", progress=False)
    curve, m = result["learning_curve"], result["metrics"]
    assert curve[0]["epoch"] == 0 and curve[0]["eval_loss"] == pytest.approx(np.mean(np.square([0.8, 0.1])), rel=1e-3)
    assert max(r["eval_loss"] for r in curve[1:]) < 0.5 * curve[0]["eval_loss"]
    assert m["mse"] < 0.2 * m["mse_constant_baseline"] and m["probe_rows"] == 0
    # The best epoch was restored: its validation loss (under the bf16 autocast of training) is the fp32 MSE.
    assert m["roc_auc_outcome"] > 0.95 and m["best_eval_loss"] == pytest.approx(m["mse"], rel=0.05)

    # The linear-probe head init alone already fits this set (epoch 0 of the default recipe).
    params = load_params(REPO / "params.yaml", {**settings, "fit_q.epochs": 1})
    result = fit_q_step.fit_q(table, params, tiny_model_dir, tokenizer, tmp_path / "m2", tmp_path / "p2", progress=False)
    assert result["metrics"]["probe_rows"] == 96
    assert result["learning_curve"][0]["eval_loss"] < 0.2 * result["metrics"]["mse_constant_baseline"]


def test_zero_epochs_keeps_the_linear_probe_and_trains_nothing(tmp_path, tokenizer, tiny_model_dir):
    """fit_q.epochs = 0: the head is the ridge probe on every train row, LoRA stays at its identity init, and the
    metrics say so; with no probe either, the params are refused (Q would be 0 everywhere)."""
    from safetensors import safe_open

    table = _keyword_table(tokenizer)
    params = load_params(REPO / "params.yaml", {"fit_q.epochs": 0, "fit_q.probe_init_rows": 1000})
    result = fit_q_step.fit_q(table, params, tiny_model_dir, tokenizer, tmp_path / "m", tmp_path / "p", progress=False)
    m, curve = result["metrics"], result["learning_curve"]
    assert m["probe_rows"] == 96 and m["epochs_run"] == 0 and m["best_epoch"] == 0 and result["train_runtime"] == 0.0
    assert [r["epoch"] for r in curve] == [0] and curve[0]["eval_loss"] == pytest.approx(m["mse"], rel=1e-5)
    assert m["mse"] < 0.2 * m["mse_constant_baseline"] and m["roc_auc_outcome"] > 0.95  # the probe fits this set
    with safe_open(str(tmp_path / "m" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        lora_b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(t) == 0 for t in lora_b)  # peft's init: B = 0, the identity

    with pytest.raises(ValueError, match=r"fit_q.epochs = 0 .*needs fit_q.probe_init_rows > 0"):
        load_params(REPO / "params.yaml", {"fit_q.epochs": 0, "fit_q.probe_init_rows": 0})


def test_lora_on_the_top_layers_only_adapts_those_and_still_learns(tmp_path, tokenizer, tiny_model_dir):
    from safetensors import safe_open

    table = _keyword_table(tokenizer)
    params = load_params(REPO / "params.yaml", {**KEYWORD_SETTINGS, "fit_q.probe_init_rows": 0, "fit_q.lora_top_layers": 1})
    result = fit_q_step.fit_q(table, params, tiny_model_dir, tokenizer, tmp_path / "m", tmp_path / "p", progress=False)
    m = result["metrics"]
    assert m["mse"] < 0.5 * m["mse_constant_baseline"] and m["roc_auc_outcome"] > 0.9
    adapter = tmp_path / "m" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["layers_to_transform"] == [1]  # tiny has 2 layers
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        lora_keys = [k for k in f.keys() if "lora_" in k]
    assert lora_keys and all(".layers.1." in k for k in lora_keys)

    too_many = load_params(REPO / "params.yaml", {"fit_q.lora_top_layers": 3})
    with pytest.raises(ValueError, match="lora_top_layers = 3 but .* has 2 layers"):
        fit_q_step.build_q_model(tiny_model_dir, too_many.fit_q, tokenizer.pad_token_id)


def _rewrite(src: Path, dst: Path, fn=None, metadata=None) -> Path:
    table = pq.read_table(src)
    meta = table.schema.metadata
    if fn is not None:
        table = fn(table)
    write_parquet(table.replace_schema_metadata(metadata or meta), dst)
    return dst


def _set(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, pa.array(values, table.schema.field(name).type))


BAD = {
    "empty": (lambda t: t.slice(0, 0), "non_empty"),
    "constant_G": (lambda t: _set(t, "G", [0.0] * t.num_rows), "G_varies"),
    "no_validation": (lambda t: _set(t, "split", ["train"] * t.num_rows), "validation_rows"),
    "G_out_of_range": (lambda t: _set(t, "G", [1.5] + t.column("G").to_pylist()[1:]), "G_in_unit_interval"),
    "missing_column": (lambda t: t.drop(["G"]), "schema"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_stop_before_training_naming_file_and_rule(tmp_path, q_params_file, world_returns, case):
    fn, rule = BAD[case]
    bad = _rewrite(world_returns, tmp_path / f"{case}.parquet", fn)
    with pytest.raises(SystemExit) as err:
        fit_q_step.main(run_args(tmp_path, q_params_file, bad) + ["--no-mlflow"])
    assert str(bad) in str(err.value) and f"'{rule}'" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]  # nothing written, not even temp folders


def test_returns_from_another_prompt_version_or_tokenizer_are_refused(tmp_path, q_params_file, world_returns):
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(world_returns).metadata.items()}
    for key, value in (("prompt_version", "v0"), ("tokenizer_sha256", "0" * 64), ("state_notes", "customer_needs")):
        bad = _rewrite(world_returns, tmp_path / f"{key}.parquet", metadata={**meta, key: value})
        with pytest.raises(SystemExit) as err:
            fit_q_step.main(run_args(tmp_path, q_params_file, bad) + ["--no-mlflow"])
        msg = str(err.value)
        assert str(bad) in msg and "'returns_compatible'" in msg and "different tokenizer/prompt version" in msg and key in msg
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics").exists()


def test_missing_base_model_is_a_clear_error(tmp_path, q_params_file, world_returns):
    with pytest.raises(SystemExit) as err:
        fit_q_step.main(run_args(tmp_path, q_params_file, world_returns) + ["--no-mlflow", "--base-model", str(tmp_path / "nope")])
    assert "base_model.name_or_path" in str(err.value) and "missing base model" in str(err.value)
    assert not (tmp_path / "model").exists()


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "pipeline_steps.fit_q", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "--metrics" in res.stdout and "--plots" in res.stdout


def test_q_scoring_bench_prints_both_ways_on_the_same_pairs(trained, world_returns, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_q_scoring

    r = bench_q_scoring.main(["--scorer", str(trained / "model" / "scorer"), "--returns", str(world_returns),
                              "--states", "3", "--replies", "4", "--repeats", "1"])
    assert r["pairs"] == 12 and r["max_abs_diff"] < 1e-5 and set(r["pairs_per_second"]) == {"score", "score_by_state"}
    out = capsys.readouterr().out
    assert "score_by_state (state once)" in out and "ratio" in out
    with pytest.raises(SystemExit, match=">= 1"):
        bench_q_scoring.main(["--scorer", str(trained / "model" / "scorer"), "--returns", str(world_returns), "--states", "0"])


def test_start_gradients_diagnostic_shows_a_zero_head_leaves_lora_without_gradient(tmp_path, q_params_file, world_returns):
    """benchmarks/fit_q_start_gradients.py: with a zero head LoRA B gets no gradient; with the probe head it does."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    import fit_q_start_gradients

    data = yaml.safe_load(q_params_file.read_text())
    data["fit_q"]["probe_init_rows"] = 16
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    out = tmp_path / "grads.json"
    res = fit_q_start_gradients.main(["--params", str(params), "--input", str(world_returns), "--batch-rows", "8",
                                      "--out", str(out)])
    zero, probe = res["inits"]["zero head"], res["inits"]["probe head"]
    assert zero["head_mean_abs_w"] == 0 and zero["lora_B"]["share_below_adam_eps"] == 1.0
    assert probe["init"]["probe_rows"] == 16 and probe["head_mean_abs_w"] > 0
    assert probe["lora_B"]["median_abs_grad"] > 0 and probe["head"]["median_abs_grad"] > 0
    assert zero["head_step_in_q"] > 0 and json.loads(out.read_text())["inits"].keys() == res["inits"].keys()


def test_head_learning_rate_puts_the_head_in_its_own_scheduled_group(tmp_path, tiny_model_dir, tokenizer, q_params_file):
    """fit_q.head_learning_rate: the head's weights train at their own rate, scaled by the same schedule as LoRA's."""
    from transformers import TrainerCallback

    fq = load_params(q_params_file, {"fit_q.head_learning_rate": 1e-5, "fit_q.learning_rate": 1e-3,
                                     "fit_q.epochs": 1, "fit_q.probe_init_rows": 0}).fit_q
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 200, size=int(rng.integers(6, 14))).tolist() for _ in range(24)]
    rows = fit_q_step._Rows(ids, rng.random(24).tolist())
    seen: list[list[tuple[float, int]]] = []

    class Groups(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.append([(g["lr"], sum(p.numel() for p in g["params"])) for g in optimizer.param_groups])

    model, _ = fit_q_step.build_q_model(tiny_model_dir, fq, tokenizer.pad_token_id)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "score" in n)
    fit_q_step.train_q(model, rows, rows, fq, tokenizer.pad_token_id, tmp_path / "work", progress=False, callbacks=[Groups()])
    assert seen
    for groups in seen:
        head_lrs = [lr for lr, n in groups if n == head]
        other_lrs = [lr for lr, n in groups if n != head]
        assert len(head_lrs) == 1 and other_lrs and sum(n for _, n in groups) > head
        assert all(abs(head_lrs[0] - lr * 1e-2) <= 1e-12 for lr in other_lrs)  # 1e-5 / 1e-3, whatever the schedule
