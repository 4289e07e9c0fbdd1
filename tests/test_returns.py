"""returns: hand-computed G with gamma, early termination and abstains; exact state rendering; split; metadata."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_factory import conversation, good_conversations, write_parquet
from pipeline_steps import returns as returns_step
from pipeline_steps.common.config import load_params
from pipeline_steps.common.contract import ABSTAIN_MARKER, LOG_SCHEMA, history_from_records, render_state, system_prompt_for
from pipeline_steps.world.simulator import load_vertical

REPO = Path(__file__).resolve().parents[1]


def hand_example() -> list[dict]:
    """Five conversations whose returns are easy to compute by hand (gamma = 0.5)."""
    a = conversation("A", [  # converts at T=4: G = 0.5^(4-i-1)
        ("I need a new kitchen.", "Great! What size is it?", "Great! What size is it?", "verbatim"),
        ("About 10 square meters.", None, "When could we visit?", "abstained"),
        ("Tuesday works.", "Shall I book Tuesday 9am?", "Shall I book Tuesday 10am?", "edited"),
    ], end="convert", closing="Yes, book it.")
    b = conversation("B", [  # the business stops replying after turn 2: no outcome, G = 0
        ("Hi there.", "Hello! How can I help?", "Hello! How can I help?", "verbatim"),
        ("What are your prices?", "Let me check and come back to you.", None, "rejected"),
    ], end="stop")
    c = conversation("C", [("Hi.", "Hello!", "Hello there, how can we help?", "edited")], end="leave")
    d = conversation("D", [], end="convert", closing="Book me a visit now.")  # terminal at once: no action, no row
    e = conversation("E", [("Can you visit Monday?", None, "Sure, Monday at 9?", "abstained")], end="convert")
    return a + b + c + d + e


def frame(records: list[dict]) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(records, schema=LOG_SCHEMA))


@pytest.fixture(scope="module")
def system_prompt(params) -> str:
    return system_prompt_for(load_vertical(params.world.vertical))


def build(records, tokenizer, system_prompt, **overrides):
    params = load_params(REPO / "params.yaml", {f"returns.{k}" if "." not in k else k: v for k, v in overrides.items()})
    return pl.from_arrow(returns_step.build_returns(frame(records), params, tokenizer, system_prompt))


def test_hand_computed_returns_with_discount_early_termination_and_abstains(tokenizer, system_prompt):
    out = build(hand_example(), tokenizer, system_prompt, gamma=0.5, abstain="keep")
    got = [(r["conversation_id"], r["turn_index"], r["G"], r["outcome"], r["action_text"], r["relation"]) for r in out.iter_rows(named=True)]
    assert got == [
        ("A", 1, 0.25, 1, "Great! What size is it?", "verbatim"),
        ("A", 2, 0.5, 1, ABSTAIN_MARKER, "abstained"),
        ("A", 3, 1.0, 1, "Shall I book Tuesday 9am?", "edited"),  # the suggestion a_i, not the sent m_i
        ("B", 1, 0.0, 0, "Hello! How can I help?", "verbatim"),
        ("B", 2, 0.0, 0, "Let me check and come back to you.", "rejected"),
        ("C", 1, 0.0, 0, "Hello!", "edited"),
        ("E", 1, 1.0, 1, ABSTAIN_MARKER, "abstained"),
    ]
    dropped = build(hand_example(), tokenizer, system_prompt, gamma=0.5, abstain="drop")
    assert [(r["conversation_id"], r["turn_index"], r["G"]) for r in dropped.iter_rows(named=True)] == [
        ("A", 1, 0.25), ("A", 3, 1.0), ("B", 1, 0.0), ("B", 2, 0.0), ("C", 1, 0.0),
    ]
    # the state of A3 is exactly what the policy saw: history up to c_3, rendered by render_state
    a = [r for r in hand_example() if r["conversation_id"] == "A"]
    expected = render_state(history_from_records(a[:3]), tokenizer, system_prompt, 384)
    assert out.filter((pl.col("conversation_id") == "A") & (pl.col("turn_index") == 3))["state_text"][0] == expected
    assert "When could we visit?" in expected and "Shall I book Tuesday 9am?" not in expected  # m_2 in, a_3 not yet
    assert set(out["prompt_version"]) == {"v1"}


def test_batched_rendering_equals_render_state_also_when_truncating(tokenizer, system_prompt):
    recs = good_conversations(8) + hand_example()
    long_turns = [(f"Turn {k}: " + "we also need the hallway redone, " * 6, "Noted, tell me more.", "Noted, tell me more.", "verbatim") for k in range(6)]
    recs += conversation("long", long_turns)
    turns = frame(recs).sort(["conversation_id", "turn_index"])
    records = turns.to_dicts()
    idx = [i for i, r in enumerate(records) if r["outcome"] == 0 and r["customer_message"] is not None]
    for budget in (384, 120):
        got = returns_step.render_states(turns, idx, tokenizer, system_prompt, budget, batch_size=7)
        want = []
        for i in idx:
            cid = records[i]["conversation_id"]
            first = next(j for j, r in enumerate(records) if r["conversation_id"] == cid)
            want.append(render_state(history_from_records(records[first : i + 1]), tokenizer, system_prompt, budget))
        assert got == want
    assert any(len(tokenizer(t, add_special_tokens=False)["input_ids"]) > 120 for t in
               returns_step.render_states(turns, idx, tokenizer, system_prompt, 384))  # truncation was exercised


def test_split_is_by_conversation_deterministic_and_near_the_fraction():
    ids = pl.Series("conversation_id", [f"conv-{i // 5}" for i in range(10_000)])
    split = returns_step.assign_splits(ids, 0.1, "v1")
    df = pl.DataFrame({"conversation_id": ids, "split": split})
    assert df.group_by("conversation_id").agg(pl.col("split").n_unique()).get_column("split").max() == 1  # no leakage
    share = (df.unique("conversation_id").get_column("split") == "validation").mean()
    assert 0.08 < share < 0.12
    assert split.to_list() == returns_step.assign_splits(ids, 0.1, "v1").to_list()
    assert split.to_list() != returns_step.assign_splits(ids, 0.1, "v2").to_list()


def test_unvalidated_input_is_refused_naming_the_conversation():
    recs = hand_example()
    recs[0]["outcome"] = 1  # an outcome in the middle of A
    with pytest.raises(returns_step.ReturnsError, match="conversation A turn 1: rule 'validated_input'"):
        returns_step.discounted_returns(frame(recs), 0.9)


def test_main_end_to_end_idempotent_with_metadata(tmp_path, tiny_model_dir):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["base_model"]["name_or_path"] = str(tiny_model_dir)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    inp = write_parquet(tmp_path / "validated.parquet", good_conversations(10) + hand_example())
    argv = ["--params", str(params), "--input", str(inp), "--out", str(tmp_path / "r" / "returns.parquet"),
            "--summary", str(tmp_path / "r" / "returns.json"), "--no-mlflow", "--no-progress"]
    summary = returns_step.main(argv)
    first = (tmp_path / "r" / "returns.parquet").read_bytes()
    returns_step.main(argv)
    assert (tmp_path / "r" / "returns.parquet").read_bytes() == first
    table = pq.read_table(tmp_path / "r" / "returns.parquet")
    assert table.schema.equals(returns_step.RETURNS_SCHEMA) and table.num_rows == summary["rows"]
    meta = returns_step.read_metadata(str(tmp_path / "r" / "returns.parquet"))
    assert meta["base_model"] == str(tiny_model_dir) and meta["prompt_version"] == "v1" and meta["gamma"] == "0.9"
    returns_step.check_compatible(meta, dict(meta), "returns.parquet")
    with pytest.raises(returns_step.ReturnsError, match="prompt_version: file has 'v1', expected 'v2'"):
        returns_step.check_compatible(meta, {**meta, "prompt_version": "v2"}, "returns.parquet")


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "pipeline_steps.returns", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "--base-model" in res.stdout
