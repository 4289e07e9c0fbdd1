"""validate: the GX suite, quarantine of whole conversations, fail-closed batches, parity with the contract."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_factory import conversation, good_conversations, write_jsonl, write_parquet
from pipeline_steps import ingest as ingest_step
from pipeline_steps import validate as validate_step
from pipeline_steps.common.config import ValidateParams
from pipeline_steps.common.contract import LOG_SCHEMA, conversation_rule_violations, turn_rule_violations

REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "data" / "bad_logs"


def params_file(tmp: Path, **validate: object) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["validate"].update(validate)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_validate(tmp: Path, inp: Path, params: Path | None = None) -> tuple[dict, Path]:
    out = tmp / "val"
    summary = validate_step.main([
        "--params", str(params or REPO / "params.yaml"), "--input", str(inp), "--out", str(out / "turns.parquet"),
        "--quarantine", str(out / "quarantine.parquet"), "--docs", str(out / "docs"), "--summary", str(out / "validate.json"),
        "--no-mlflow", "--no-progress",
    ])
    return summary, out


@pytest.fixture(scope="module")
def bad_batch(tmp_path_factory) -> Path:
    """The bad-log corpus's record-level batch, through ingest (as the pipeline does)."""
    tmp = tmp_path_factory.mktemp("ingest")
    ingest_step.main([
        "--params", str(REPO / "params.yaml"), "--input", str(BAD / "batch"), "--out", str(tmp / "turns.parquet"),
        "--rejects", str(tmp / "rejects.jsonl"), "--summary", str(tmp / "ingest.json"), "--no-mlflow", "--no-progress",
    ])
    return tmp / "turns.parquet"


EXPECTED_QUARANTINE = {
    "dup-turn": "unique_turn",
    "gap": "turn_index_contiguous",
    "ts-back": "customer_ts_ordered",
    "after-outcome": "nothing_after_terminal",
    "verbatim-mismatch": "verbatim_equal_text",
}


def test_bad_records_quarantine_whole_conversations_with_reasons(tmp_path, bad_batch):
    received = pq.read_table(bad_batch)
    summary, out = run_validate(tmp_path, bad_batch)
    accepted = pq.read_table(out / "turns.parquet")
    quarantined = pq.read_table(out / "quarantine.parquet")
    assert summary["success"] is True
    assert accepted.num_rows + quarantined.num_rows == received.num_rows  # nothing lost
    assert accepted.schema.equals(LOG_SCHEMA)
    q_ids = set(quarantined["conversation_id"].to_pylist())
    assert q_ids == set(EXPECTED_QUARANTINE)
    assert not q_ids & set(accepted["conversation_id"].to_pylist())
    for cid in q_ids:  # whole conversations: every received record of a bad conversation is quarantined
        assert quarantined["conversation_id"].to_pylist().count(cid) == received["conversation_id"].to_pylist().count(cid)
    for row in quarantined.to_pylist():  # each row names its record, and its conversation's broken rule
        assert row["reasons"].startswith(f"conversation {row['conversation_id']} turn {row['turn_index']}: ")
    for cid, rule in EXPECTED_QUARANTINE.items():
        reasons = " ".join(r["reasons"] for r in quarantined.to_pylist() if r["conversation_id"] == cid)
        assert f"rule '{rule}'" in reasons
    assert {"shuffled", "exact-dup"} <= set(accepted["conversation_id"].to_pylist())
    metrics = json.loads((out / "validate.json").read_text())
    assert metrics["received_rows"] == received.num_rows
    assert metrics["quarantined_conversations"] == len(EXPECTED_QUARANTINE)
    assert metrics["rule_failures"]["verbatim_equal_text"] == 1
    assert metrics["expectations"]["conversations.outcome_rate.expect_column_mean_to_be_between.outcome"]["success"]
    html = (out / "docs" / "index.html").read_text()
    assert "turns" in html and "conversations" in html
    # idempotent: same input, same bytes
    first = (out / "turns.parquet").read_bytes(), (out / "quarantine.parquet").read_bytes()
    run_validate(tmp_path, bad_batch)
    assert ((out / "turns.parquet").read_bytes(), (out / "quarantine.parquet").read_bytes()) == first


def test_empty_batch_fails_closed_and_removes_a_stale_output(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(LOG_SCHEMA.empty_table(), empty)
    stale = tmp_path / "val" / "turns.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"last week's file")
    with pytest.raises(SystemExit) as exc:
        run_validate(tmp_path, empty)
    msg = str(exc.value)
    assert "FAILED (fail closed)" in msg and "[non_empty_batch]" in msg and "[min_batch_size]" in msg
    assert not stale.exists()
    metrics = json.loads((tmp_path / "val" / "validate.json").read_text())
    assert metrics["success"] is False and metrics["received_rows"] == 0
    assert (tmp_path / "val" / "docs" / "index.html").exists()


def test_outcome_rate_out_of_bounds_fails_closed(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", good_conversations(10))
    with pytest.raises(SystemExit) as exc:
        run_validate(tmp_path, path, params_file(tmp_path, outcome_rate_max=0.2))
    assert "[outcome_rate] expect_column_mean_to_be_between(outcome) on conversations: observed 0.5" in str(exc.value)
    assert not (tmp_path / "val" / "turns.parquet").exists()


def test_too_many_bad_rows_fail_the_batch_naming_examples(tmp_path):
    recs = good_conversations(10)
    for r in recs:
        if r["relation"] == "verbatim":
            r["business_message"] = "Something else entirely."
    path = write_parquet(tmp_path / "in.parquet", recs)
    with pytest.raises(SystemExit) as exc:
        run_validate(tmp_path, path, params_file(tmp_path, max_quarantine_fraction=0.05))
    msg = str(exc.value)
    assert "[verbatim_equal_text]" in msg and "e.g. conversation g000 turn 1" in msg
    q = pq.read_table(tmp_path / "val" / "quarantine.parquet")
    metrics = json.loads((tmp_path / "val" / "validate.json").read_text())
    assert metrics["accepted_rows"] + metrics["quarantined_rows"] == len(recs) == q.num_rows + metrics["accepted_rows"]


def test_a_file_with_the_wrong_schema_fails_closed(tmp_path):
    table = pa.Table.from_pylist(good_conversations(10), schema=LOG_SCHEMA).drop_columns(["relation"])
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    with pytest.raises(SystemExit) as exc:
        run_validate(tmp_path, path)
    assert "[schema]" in str(exc.value) and "relation" in str(exc.value)


def corrupt(recs: list[dict], rng: random.Random) -> list[dict]:
    """One random contract-rule violation (or none) in a copy of a conversation."""
    recs = [dict(r) for r in recs]
    k = rng.randrange(len(recs))
    kind = rng.choice(["none", "none", "verbatim", "edited_same", "abstain_with_suggestion", "action_in_terminal",
                       "after_terminal", "gap", "outcome_2", "no_relation", "bad_relation"])
    r = recs[k]
    terminal = r["outcome"] == 1 or r["customer_message"] is None
    if kind == "verbatim" and not terminal:
        r.update(relation="verbatim", business_message=(r["suggestion"] or "x") + "!")
    elif kind == "edited_same" and not terminal and r["suggestion"]:
        r.update(relation="edited", business_message=r["suggestion"])
    elif kind == "abstain_with_suggestion" and not terminal:
        r.update(relation="abstained", suggestion="hello")
    elif kind == "action_in_terminal" and terminal:
        r.update(suggestion="hello")
    elif kind == "after_terminal":
        last = recs[-1]
        recs.append(dict(last, turn_index=last["turn_index"] + 1, outcome=0, customer_message="more?",
                         suggestion="x", business_message="x", relation="verbatim"))
    elif kind == "gap":
        for later in recs[k:]:
            later["turn_index"] += 1
    elif kind == "outcome_2":
        r.update(outcome=2)
    elif kind == "no_relation" and not terminal:
        r.update(relation=None)
    elif kind == "bad_relation" and not terminal:
        r.update(relation="forwarded")
    return recs


def test_vectorised_rules_agree_with_the_contract_functions():
    rng = random.Random(7)
    convs = []
    for i in range(300):
        pool = good_conversations(4, prefix=f"c{i}-")  # valid conversations of every shape and ending
        base = [r for r in pool if r["conversation_id"] == f"c{i}-{i % 4:03d}"]
        convs.append(corrupt(base, rng))
    rows = [r for c in convs for r in c]
    df = pl.from_arrow(pa.Table.from_pylist(rows, schema=pa.schema([f.with_nullable(True) for f in LOG_SCHEMA])))
    df = df.with_row_index("_pos").sort(["conversation_id", "turn_index", "_pos"]).drop("_pos")
    checked = validate_step.with_rule_columns(df)
    flagged = set(checked.filter(~pl.all_horizontal(validate_step.DERIVED_COLUMNS) | ~pl.col("outcome").is_in([0, 1]))
                  .get_column("conversation_id").to_list())
    by_contract = set()
    for c in convs:
        c = sorted(c, key=lambda r: r["turn_index"])
        if conversation_rule_violations(c) or any(turn_rule_violations(r) for r in c):
            by_contract.add(c[0]["conversation_id"])
    assert by_contract and flagged == by_contract


def test_suite_is_real_gx_and_params_reject_unknown_keys():
    import great_expectations.expectations as gxe

    suite = validate_step.turn_suite(ValidateParams())
    assert all(isinstance(e, gxe.Expectation) for e in suite)
    types = {type(e).__name__ for e in suite}
    assert {"ExpectCompoundColumnsToBeUnique", "ExpectColumnValueLengthsToBeBetween", "ExpectColumnValuesToNotBeNull",
            "ExpectTableColumnsToMatchOrderedList", "ExpectColumnValuesToBeOfType"} <= types
    with pytest.raises(Exception):
        ValidateParams(min_conversations=1, bogus=1)


def test_cli_help_and_a_real_run_with_relative_paths(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipeline_steps.validate", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "--quarantine" in res.stdout and "--docs" in res.stdout
    write_parquet(tmp_path / "data" / "ingest" / "turns.parquet", good_conversations(10))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "pipeline_steps.validate", "--no-mlflow", "--no-progress"],  # the defaults
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "data" / "validate" / "data_docs" / "index.html").exists()
    assert json.loads((tmp_path / "metrics" / "validate.json").read_text())["accepted_rows"] == 27
