"""Regenerate the bad-input corpus (the files beside this script): ``python tests/data/bad_logs/make_corpus.py``.

See README.md here for what each file breaks and what the pipeline must do with it.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/ (data_factory)
sys.path.insert(0, str(HERE.parents[2]))  # repo root (pipeline_steps)

from data_factory import T0, conversation, good_conversations, jsonable, write_jsonl  # noqa: E402

TURNS = [
    ("Hi, my bathroom needs work.", "Sorry to hear! What is wrong with it?", "Sorry to hear! What is wrong with it?", "verbatim"),
    ("The shower leaks.", "Can we come and look on Monday?", "Can we come and look on Monday?", "verbatim"),
]


def main() -> None:
    batch = HERE / "batch"
    write_jsonl(batch / "good.jsonl", good_conversations(10, prefix="good-"))

    recs = conversation("missing-field", TURNS, start=T0 + timedelta(minutes=5))
    del recs[1]["outcome"]
    write_jsonl(batch / "missing_field.jsonl", recs)

    recs = conversation("wrong-type", TURNS, start=T0 + timedelta(minutes=6))
    recs[1]["turn_index"] = "two"
    write_jsonl(batch / "wrong_type.jsonl", recs)

    recs = conversation("dup-turn", TURNS, start=T0 + timedelta(minutes=7))
    clash = dict(recs[1], customer_message="The shower leaks, and the tiles are cracked.")
    exact = conversation("exact-dup", TURNS, start=T0 + timedelta(minutes=8))
    write_jsonl(batch / "duplicate_turn.jsonl", [*recs, clash, *exact, exact[1]])

    gap = conversation("gap", TURNS, start=T0 + timedelta(minutes=9))
    gap[1]["turn_index"], gap[2]["turn_index"] = 3, 4
    back = conversation("ts-back", TURNS, start=T0 + timedelta(minutes=10))
    back[1]["customer_ts"] = back[0]["customer_ts"] - timedelta(minutes=30)
    shuffled = conversation("shuffled", TURNS, start=T0 + timedelta(minutes=11))
    write_jsonl(batch / "out_of_order.jsonl", [*gap, *back, *reversed(shuffled)])

    recs = conversation("after-outcome", TURNS[:1], start=T0 + timedelta(minutes=12))
    recs.append(dict(recs[-1], turn_index=3, customer_message="Also, one more thing.", outcome=0))
    write_jsonl(batch / "outcome_after_terminal.jsonl", recs)

    recs = conversation("verbatim-mismatch", TURNS, start=T0 + timedelta(minutes=13))
    recs[1]["business_message"] = "We can come on Tuesday instead."
    write_jsonl(batch / "verbatim_mismatch.jsonl", recs)

    good = [json.dumps(jsonable(r)) for r in conversation("ok", TURNS)]
    (HERE / "malformed_json").mkdir(exist_ok=True)
    (HERE / "malformed_json" / "logs.jsonl").write_text(
        good[0] + "\n" + good[1] + "\n" + '{"conversation_id": "broken", "turn_index": 1,\n' + good[2] + "\n", encoding="utf-8"
    )
    (HERE / "non_utf8").mkdir(exist_ok=True)
    (HERE / "non_utf8" / "logs.jsonl").write_bytes(
        (good[0] + "\n").encode() + good[1].encode().replace(b"shower", b"sh\xff\xfewer") + b"\n"
    )
    (HERE / "empty").mkdir(exist_ok=True)
    (HERE / "empty" / "logs.jsonl").write_bytes(b"")


if __name__ == "__main__":
    main()
