"""The log contract: terminal rules (paper 2.1), relation consistency, deterministic state rendering."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pipeline_steps.common.contract import (
    ABSTAIN_MARKER,
    ContractViolation,
    HistoryTurn,
    Turn,
    render_state,
    state_messages,
    turns_to_table,
    validate_conversation,
)

TS = datetime(2026, 1, 5, tzinfo=timezone.utc)


def turn(i, c="hi", o=0, a="Hello!", m="Hello!", rel="verbatim"):
    return Turn("conv-1", i, c, o, a, m, rel, "pi0", "0", "control", TS)


def test_valid_conversation_with_outcome_last():
    validate_conversation([turn(1), turn(2, a=None, m="ours", rel="abstained"), turn(3, o=1, a=None, m=None, rel=None)])


@pytest.mark.parametrize(
    "turns, rule",
    [
        ([turn(1, o=1, a=None, m=None, rel=None), turn(2)], "nothing_after_terminal"),
        ([turn(1, a="x", m=None, rel="rejected"), turn(2)], "nothing_after_terminal"),
        ([turn(1, c=None, a=None, m=None, rel=None), turn(2)], "nothing_after_terminal"),
        ([turn(1, o=1)], "no_action_in_terminal_state"),
        ([turn(1, a="a", m="b", rel="verbatim")], "verbatim_equal_text"),
        ([turn(1, a=None, m="b", rel="verbatim")], "relation_consistent"),
        ([turn(1, a="a", m="b", rel="abstained")], "relation_consistent"),
        ([turn(1, rel="maybe")], "relation_valid"),
        ([turn(1), turn(3)], "turn_index_contiguous"),
        ([turn(1, o=2)], "outcome_binary"),
    ],
)
def test_rule_violations_name_the_rule(turns, rule):
    with pytest.raises(ContractViolation) as err:
        validate_conversation(turns)
    assert err.value.rule == rule
    assert "conv-1" in str(err.value)


def test_terminal_properties():
    assert turn(1, o=1, a=None, m=None, rel=None).is_terminal_state
    assert turn(1, c=None, a=None, m=None, rel=None).is_terminal_state
    stop = turn(1, a="x", m=None, rel="rejected")
    assert not stop.is_terminal_state and stop.ends_conversation


def test_table_round_trip_keeps_schema():
    table = turns_to_table([turn(1), turn(2, o=1, a=None, m=None, rel=None)])
    assert table.num_rows == 2
    assert table.schema.field("outcome").type.bit_width == 8


def test_state_carries_suggestion_and_sent_message():
    hist = [
        HistoryTurn("I need a new kitchen", "What budget?", "What budget do you have?", "edited"),
        HistoryTurn("About 30k", None, "Thanks!", "abstained"),
        HistoryTurn("Any news?", "Buy now", "Hello", "rejected"),
        HistoryTurn("When can you start?"),
    ]
    msgs = state_messages(hist, "SYS")
    assert [m["role"] for m in msgs] == ["system", "user"]
    body = msgs[1]["content"]
    assert "Customer: I need a new kitchen" in body
    assert "Business (edited your suggestion): What budget do you have?" in body  # m_1 and its relation to a_1
    assert "Business (you abstained): Thanks!" in body  # a_2 = abstain
    assert 'ignored your suggestion "Buy now"): Hello' in body  # a rejected a_3 stays visible
    assert body.index("Customer: When can you start?") > body.index("Hello")
    assert "When can you start?" not in body.split("Customer: When can you start?")[1]


def test_render_is_deterministic_and_truncates_oldest_first(tokenizer):
    hist = [HistoryTurn(f"message number {i} " + "words " * 20, f"reply {i}", f"reply {i}", "verbatim") for i in range(12)]
    hist.append(HistoryTurn("latest question?"))
    full = render_state(hist, tokenizer, "SYS PROMPT", 10_000)
    assert full == render_state(hist, tokenizer, "SYS PROMPT", 10_000)
    budget = 200
    short = render_state(hist, tokenizer, "SYS PROMPT", budget)
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= budget
    assert "SYS PROMPT" in short and "latest question?" in short
    assert "message number 0 " not in short and "message number 11 " in short  # oldest dropped first
    assert short.endswith("<|im_start|>assistant\n")  # generation prompt kept


def test_render_cuts_an_overlong_latest_message_from_the_front(tokenizer):
    hist = [HistoryTurn("start " + "blah " * 400 + "the real question at the end?")]
    text = render_state(hist, tokenizer, "SYS", 120)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 120
    assert "the real question at the end?" in text and "SYS" in text
