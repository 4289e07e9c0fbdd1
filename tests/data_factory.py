"""Hand-made contract records for the data-step tests (ingest, validate, returns) and the bad-log corpus.

A conversation is written as a list of action turns ``(customer, suggestion, business, relation)`` plus how it
ends: ``"convert"`` (a terminal record with outcome 1), ``"leave"`` (terminal record, customer message null),
``"stop"`` (the last action turn's business message is null) or ``"open"`` (no terminal record).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_steps.common.contract import LOG_SCHEMA

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


def conversation(
    cid: str,
    turns: Sequence[tuple[str, str | None, str | None, str]],
    end: str = "convert",
    start: datetime = T0,
    closing: str = "Great, book me in for Tuesday.",
    **extra: Any,
) -> list[dict[str, Any]]:
    """Contract records of one conversation (timestamps 60 s apart, the business answering after 20 s)."""
    base = dict(policy_id="pi0", policy_version="0", variant="control", behaviour=None)
    base.update(extra)
    recs = []
    for k, (c, s, m, rel) in enumerate(turns, 1):
        ts = start + timedelta(seconds=60 * (k - 1))
        recs.append(dict(base, conversation_id=cid, turn_index=k, customer_message=c, outcome=0, suggestion=s,
                         business_message=m, relation=rel, customer_ts=ts, business_ts=ts + timedelta(seconds=20) if m else None))
    if end in ("convert", "leave"):
        k = len(turns) + 1
        recs.append(dict(base, conversation_id=cid, turn_index=k, customer_message=closing if end == "convert" else None,
                         outcome=1 if end == "convert" else 0, suggestion=None, business_message=None, relation=None,
                         customer_ts=start + timedelta(seconds=60 * (k - 1)), business_ts=None))
    return recs


def good_conversations(n: int = 10, prefix: str = "g", start: datetime = T0) -> list[dict[str, Any]]:
    """``n`` valid conversations cycling through every ending and relation (about half convert)."""
    recs: list[dict[str, Any]] = []
    for i in range(n):
        s = start + timedelta(hours=i)
        turns = [
            ("Hi, I want to redo my kitchen.", "Happy to help! How big is it?", "Happy to help! How big is it?", "verbatim"),
            ("About 12 square meters.", "What style do you like?", "What style do you like, modern or classic?", "edited"),
            ("Modern, and soon.", None, "Can we visit on Tuesday?", "abstained"),
        ][: 1 + i % 3]
        end = ("convert", "leave", "stop", "convert")[i % 4]
        if end == "stop":
            turns = [*turns[:-1], (turns[-1][0], "Shall we book a visit?", None, "rejected")]
        recs += conversation(f"{prefix}{i:03d}", turns, end=end, start=s)
    return recs


def jsonable(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in rec.items()}


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(jsonable(r)) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(records), schema=LOG_SCHEMA), path)
    return path
