"""prompt.state_notes: the reader of what the customer has said, and the notes line pi and Q read in every state."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from data_factory import conversation, good_conversations
from pipeline_steps import returns as returns_step
from pipeline_steps.common.config import ConfigError, load_params
from pipeline_steps.common.contract import (
    LOG_SCHEMA,
    NOTES_LABEL,
    HistoryTurn,
    history_from_records,
    render_state,
    system_prompt_for,
)
from pipeline_steps.world.simulator import load_vertical
from pipeline_steps.world.state_reader import CustomerStateReader, notes_reader, prompt_notes

REPO = Path(__file__).resolve().parents[1]
VERTICAL = load_vertical("home_renovation")


def notes_params(**overrides):
    return load_params(REPO / "params.yaml", {"prompt.state_notes": "customer_needs", **overrides})


def test_reader_reads_project_needs_and_the_last_message_from_the_customer_only():
    reader = CustomerStateReader(VERTICAL)
    assert reader.notes([HistoryTurn("Hello there")]) == (
        "Project: not named yet. Needs stated: none yet. Last message: answers or comments.")
    first = HistoryTurn("Hi, we want a new kitchen. What would it cost?", "What is your budget?",
                        "Do you have a budget in mind, e.g. 30 thousand? Cabinets or countertops?", "edited")
    # The business's message names a budget and cabinets: only the customer's own words count.
    assert reader.notes([first]) == ("Project: kitchen. Needs stated: none yet (0 of 3). "
                                     "Not yet stated: scope, budget, timeline. Last message: asks a question.")
    second = HistoryTurn("New cabinets and quartz countertops, around 30 thousand.")
    assert reader.notes([first, second]) == ("Project: kitchen. Needs stated: scope, budget (2 of 3). "
                                             "Not yet stated: timeline. Last message: answers or comments.")
    ready = HistoryTurn("Ideally before the holidays. I think that covers it. What would be the next step?")
    s = reader.read([first, second, ready])
    assert s.revealed == ("scope", "budget", "timeline") and s.unstated == () and s.ready and not s.asked_question
    assert reader.notes([first, second, ready]).endswith(
        "(3 of 3). All needs stated. Last message: says they are ready for the next step.")
    decline = HistoryTurn("Not yet, I want to compare a few options first.")
    assert reader.notes([first, decline]).endswith("Last message: declines for now.")


def test_unknown_kind_is_refused_by_the_config_and_the_reader():
    with pytest.raises(ConfigError, match="state_notes"):
        load_params(REPO / "params.yaml", {"prompt.state_notes": "crm"})
    with pytest.raises(ValueError, match="unknown kind 'crm'"):
        notes_reader("crm", VERTICAL)
    assert notes_reader("none", VERTICAL) is None and prompt_notes(load_params(REPO / "params.yaml")) is None


def test_notes_stay_under_truncation_and_remember_the_turns_dropped(tokenizer):
    sp = system_prompt_for(VERTICAL)
    history = [HistoryTurn("We want a new bathroom: replace the tub with a walk-in shower. " * 3, "Lovely!", "Lovely!", "verbatim")]
    history += [HistoryTurn(f"Turn {k}: still thinking about colours and tiles, nothing else to add. " * 2, "Noted.",
                            "Noted.", "verbatim") for k in range(5)]
    history += [HistoryTurn("Maybe 15 thousand, less if we can.")]
    notes = CustomerStateReader(VERTICAL).notes(history)
    assert "Needs stated: scope, budget (2 of 3)" in notes
    full = render_state(history, tokenizer, sp, 4096, notes)
    assert f"{NOTES_LABEL} {notes}" in full and full.index(NOTES_LABEL) > full.index("Maybe 15 thousand")
    cut = render_state(history, tokenizer, sp, 260, notes)
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 260
    assert "walk-in shower" not in cut  # the turn that stated the scope was dropped ...
    assert f"{NOTES_LABEL} {notes}" in cut  # ... and the notes still carry it
    assert render_state(history, tokenizer, sp, 4096) == full.replace(f"{NOTES_LABEL} {notes}\n\n", "")


def test_returns_render_the_notes_batched_exactly_as_render_state_and_record_them(tokenizer):
    sp = system_prompt_for(VERTICAL)
    recs = good_conversations(6) + conversation("long", [
        (f"Turn {k}: about the kitchen cabinets, " + "and the hallway too, " * 8, "Tell me more.", "Tell me more.", "verbatim")
        for k in range(6)])
    turns = pl.from_arrow(pa.Table.from_pylist(recs, schema=LOG_SCHEMA)).sort(["conversation_id", "turn_index"])
    records = turns.to_dicts()
    idx = [i for i, r in enumerate(records) if r["outcome"] == 0 and r["customer_message"] is not None]
    notes = CustomerStateReader(VERTICAL).notes
    for budget in (384, 160):
        got = returns_step.render_states(turns, idx, tokenizer, sp, budget, batch_size=5, notes=notes)
        want = []
        for i in idx:
            first = next(j for j, r in enumerate(records) if r["conversation_id"] == records[i]["conversation_id"])
            h = history_from_records(records[first: i + 1])
            want.append(render_state(h, tokenizer, sp, budget, notes(h)))
        assert got == want and all(NOTES_LABEL in t for t in got)

    params = notes_params()
    table = returns_step.build_returns(turns, params, tokenizer, sp)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["state_notes"] == "customer_needs"
    assert all(NOTES_LABEL in t for t in table.column("state_text").to_pylist())

    plain = load_params(REPO / "params.yaml")
    with pytest.raises(returns_step.ReturnsError, match="state_notes: file has 'customer_needs', expected 'none'"):
        returns_step.check_compatible(meta, returns_step.returns_metadata(plain, tokenizer, sp), "returns.parquet")
    # A file written before the key existed was rendered without notes: accepted as 'none', refused for notes.
    legacy = {k: v for k, v in returns_step.returns_metadata(plain, tokenizer, sp).items() if k != "state_notes"}
    returns_step.check_compatible(legacy, returns_step.returns_metadata(plain, tokenizer, sp), "old.parquet")
    with pytest.raises(returns_step.ReturnsError, match="state_notes: file has 'none', expected 'customer_needs'"):
        returns_step.check_compatible(legacy, returns_step.returns_metadata(params, tokenizer, sp), "old.parquet")


def test_the_policy_renders_the_notes_its_params_configure(tiny_model_dir):
    from pipeline_steps.common.policies import load_policy

    h = [[HistoryTurn("Hi, we want a new kitchen. What would it cost?")]]
    base = load_params(REPO / "params.yaml", {"base_model.name_or_path": str(tiny_model_dir)})
    with_notes = notes_params(**{"base_model.name_or_path": str(tiny_model_dir)})
    plain_prompt = load_policy("pi0", base, VERTICAL).prompts(h)[0]
    noted = load_policy("pi0", with_notes, VERTICAL)
    assert NOTES_LABEL not in plain_prompt
    assert f"{NOTES_LABEL} Project: kitchen. Needs stated: none yet (0 of 3)." in noted.prompts(h)[0]
    assert load_policy("explore", with_notes, VERTICAL).prompts(h)[0] == noted.prompts(h)[0]
