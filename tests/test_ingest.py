"""ingest: local/S3 inputs, windows, de-duplication, PII redaction, idempotency, Deal-or-No-Deal, bad input."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_factory import T0, conversation, good_conversations, write_jsonl, write_parquet
from pipeline_steps import ingest as ingest_step
from pipeline_steps.common.contract import LOG_SCHEMA, conversation_rule_violations, turn_rule_violations

REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "data" / "bad_logs"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def run_ingest(tmp: Path, inp: Path | str, *extra: str, name: str = "out") -> tuple[dict, Path]:
    out = tmp / name
    summary = ingest_step.main([
        "--params", str(REPO / "params.yaml"), "--input", str(inp), "--out", str(out / "turns.parquet"),
        "--rejects", str(out / "rejects.jsonl"), "--summary", str(out / "ingest.json"), "--no-mlflow", "--no-progress", *extra,
    ])
    return summary, out


def test_jsonl_and_partitioned_parquet_give_identical_bytes_and_reruns_are_idempotent(tmp_path):
    recs = good_conversations(12)
    # the same records, laid out two ways: two JSONL files (shuffled), and date-partitioned Parquet
    write_jsonl(tmp_path / "a" / "part-1.jsonl", recs[::2])
    write_jsonl(tmp_path / "a" / "sub" / "part-2.jsonl", list(reversed(recs[1::2])))
    (tmp_path / "a" / "_SUCCESS").write_text("")  # marker files are skipped
    by_day: dict[str, list] = {}
    for r in recs:
        by_day.setdefault(r["customer_ts"].strftime("%Y-%m-%d"), []).append(r)
    for day, rows in by_day.items():
        write_parquet(tmp_path / "b" / f"date={day}" / "part-control.parquet", rows)

    s1, out1 = run_ingest(tmp_path, tmp_path / "a", name="o1")
    _, out2 = run_ingest(tmp_path, tmp_path / "b", name="o2")
    _, out3 = run_ingest(tmp_path, tmp_path / "a", name="o3")
    assert md5(out1 / "turns.parquet") == md5(out2 / "turns.parquet") == md5(out3 / "turns.parquet")
    assert s1["records_written"] == len(recs) and s1["records_rejected"] == 0
    table = pq.read_table(out1 / "turns.parquet")
    assert table.schema.equals(LOG_SCHEMA, check_metadata=True)
    keys = list(zip(table["conversation_id"].to_pylist(), table["turn_index"].to_pylist()))
    assert keys == sorted(keys)
    assert json.loads((out1 / "ingest.json").read_text())["records_read"] == len(recs)


PII = {
    "email": "jane.doe+reno@example.co.uk",
    "phone": "+1 (555) 123-4567",
    "phone2": "555.987.6543",
    "card": "4111 1111 1111 1111",
}


def test_pii_is_gone_from_every_output_column_and_the_rejects(tmp_path):
    e, p, p2, c = PII.values()
    turns = [
        (f"Hi, I'm at {e} or {p}.", f"Thanks! We'll call {p2}.", f"Thanks! We'll call {p2}.", "verbatim"),
        (f"Card {c} ok?", "Never send card numbers here.", f"Please don't share {c}; email {e}.", "edited"),
    ]
    recs = conversation(f"whatsapp:{p}", turns, closing=f"Booked, mail {e}", behaviour=json.dumps({"note": f"lead {e}"}))
    recs += good_conversations(3)
    bad = conversation(f"sms:{p2}", turns)
    bad[0]["outcome"] = f"call {p}"  # rejected: its id, raw record and reason all carry PII
    write_jsonl(tmp_path / "in" / "logs.jsonl", recs + bad)

    summary, out = run_ingest(tmp_path, tmp_path / "in")
    assert summary["records_rejected"] == len(bad)
    values = [str(v) for col in pq.read_table(out / "turns.parquet").columns for v in col.to_pylist()]
    rejects = (out / "rejects.jsonl").read_text()
    for text in [*values, rejects]:
        for secret in PII.values():
            assert secret not in text
        for _, pattern in ingest_step.PII_PATTERNS:
            assert not re.search(pattern, text), text
    table = pq.read_table(out / "turns.parquet").to_pylist()
    pii_conv = [r for r in table if r["conversation_id"].startswith("redacted-")]
    assert len(pii_conv) == len(turns) + 1  # the id was pseudonymised consistently
    assert pii_conv[0]["customer_message"] == "Hi, I'm at [EMAIL] or [PHONE]."
    assert pii_conv[1]["business_message"] == "Please don't share [CARD]; email [EMAIL]."
    assert pii_conv[0]["suggestion"] == pii_conv[0]["business_message"]  # verbatim still holds
    assert summary["values_redacted"]["customer_message"] == 3


def test_window_selects_conversations_by_first_turn_and_reads_late_partitions(tmp_path):
    day = datetime(2026, 1, 5, tzinfo=timezone.utc)
    before = conversation("before", [("hi", "hello", "hello", "verbatim")], start=day - timedelta(hours=2))
    inside = conversation("inside", [("hi", "hello", "hello", "verbatim")] * 3, start=day + timedelta(hours=23, minutes=59))
    after = conversation("after", [("hi", "hello", "hello", "verbatim")], start=day + timedelta(days=1, hours=1))
    far = conversation("far", [("hi", "hello", "hello", "verbatim")], start=day + timedelta(days=15))
    parts: dict[str, list] = {}
    for rec in before + inside + after + far:
        parts.setdefault(rec["customer_ts"].strftime("%Y-%m-%d"), []).append(rec)
    for d, rows in parts.items():
        write_jsonl(tmp_path / "raw" / f"date={d}" / "logs.jsonl", rows)
    summary, out = run_ingest(tmp_path, tmp_path / "raw", "--window-start", "2026-01-05T00:00:00Z", "--window-end", "2026-01-06T00:00:00+00:00")
    table = pq.read_table(out / "turns.parquet")
    assert set(table["conversation_id"].to_pylist()) == {"inside"}
    assert table.num_rows == len(inside)  # the turns after midnight (next partition) are kept
    assert summary["files_skipped"] == 1  # date=2026-01-20 is outside window_end + late_days
    assert summary["records_outside_window"] == len(before) + len(after)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_env(monkeypatch):
    """moto's S3 in server mode, over HTTP on 127.0.0.1; boto3 finds it only through the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_ingest_reads_an_s3_prefix_over_http(tmp_path, s3_env):
    import boto3

    recs = good_conversations(10)
    local = tmp_path / "local"
    write_parquet(local / "date=2026-01-05" / "part-control.parquet", recs[:20])
    write_jsonl(local / "date=2026-01-06" / "part-control.jsonl", recs[20:])
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="logs")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "logs", f"sr-agent/{path.relative_to(local).as_posix()}")
    s3.put_object(Bucket="logs", Key="other/ignored.jsonl", Body=b"not even json")

    summary, out = run_ingest(tmp_path, "s3://logs/sr-agent/", name="from_s3")
    _, ref = run_ingest(tmp_path, local, name="from_local")
    assert summary["files_read"] == 2 and summary["records_written"] == len(recs)
    assert md5(out / "turns.parquet") == md5(ref / "turns.parquet")


def test_unreachable_s3_endpoint_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # standard AWS setting, honoured by ingest: fail fast
    with pytest.raises(SystemExit) as exc:
        run_ingest(tmp_path, "s3://logs/sr-agent/")
    msg = str(exc.value)
    assert "s3://logs/sr-agent/" in msg and "rule 's3_reachable'" in msg and "127.0.0.1" in msg
    assert not (tmp_path / "out").exists()


def test_dealornodeal_adapter_imports_every_dialogue_with_its_outcome(tmp_path, dealornodeal_file):
    DND = dealornodeal_file
    lines = [ln for ln in DND.read_text(encoding="utf-8").split("\n") if ln.strip()]
    no_deal = sum(bool(re.search(r"<output>[^<]*<(disagree|no_agreement|disconnect)>", ln)) for ln in lines)
    summary, out = run_ingest(tmp_path, DND, "--format", "dealornodeal")
    rows = pq.read_table(out / "turns.parquet").to_pylist()
    convs: dict[str, list] = {}
    for r in rows:
        convs.setdefault(r["conversation_id"], []).append(r)
    assert len(convs) == len(lines) == 1087 and summary["conversations_written"] == 1087
    finals = [c[-1]["outcome"] for c in convs.values()]
    deals = sum(finals)
    assert deals == len(lines) - no_deal == 844
    # The data README says "about 68%"; the file itself has 844/1087 = 77.6% complementary selections.
    assert 0.6 < deals / len(lines) < 0.85
    for cid, recs in convs.items():  # every conversation keeps the contract and ends with its outcome
        assert not conversation_rule_violations(recs), cid
        assert all(not turn_rule_violations(r) for r in recs), cid
        assert recs[-1]["suggestion"] is None and all(r["outcome"] == 0 for r in recs[:-1])
    first = convs["dnd-val-00001"]  # YOU opens, THEM selects without agreement
    assert first[0]["customer_message"] == ingest_step.DND_OPENING
    assert first[0]["business_message"] == first[0]["suggestion"] == "you can have all the hats if i get the book and basketballs ."
    assert first[-1]["customer_message"] is None and first[-1]["outcome"] == 0
    third = convs["dnd-val-00003"]  # THEM opens, YOU selects, deal
    assert third[0]["customer_message"].startswith("im a reader") and third[-2]["business_message"] == "<selection>"
    assert third[-1]["outcome"] == 1 and third[-1]["customer_message"] == "<selection>"


def test_dealornodeal_can_log_the_human_messages_as_abstained(tmp_path, dealornodeal_file):
    DND = dealornodeal_file
    line = DND.read_text(encoding="utf-8").split("\n")[1]
    recs = ingest_step.dealornodeal_records(line, "val.txt:2", "dnd-val-00002", T0, "abstained")
    assert all(r["suggestion"] is None and r["relation"] == "abstained" for r in recs[:-1])
    assert all(not turn_rule_violations(r) for r in recs)


def test_bad_batch_rejects_ill_typed_records_with_their_conversations(tmp_path):
    summary, out = run_ingest(tmp_path, BAD / "batch")
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    by_rule = {(r["conversation_id"], r["rule"]) for r in rejects}
    assert ("missing-field", "required_field") in by_rule and ("wrong-type", "field_type") in by_rule
    missing = next(r for r in rejects if r["rule"] == "required_field")
    assert missing["where"].endswith("missing_field.jsonl:2") and "'outcome' is missing" in missing["reasons"]
    wrong = next(r for r in rejects if r["rule"] == "field_type")
    assert wrong["where"].endswith("wrong_type.jsonl:2") and "'turn_index' must be an integer" in wrong["reasons"]
    assert {r["conversation_id"] for r in rejects} == {"missing-field", "wrong-type"}  # whole conversations
    assert summary["exact_duplicates_removed"] == 1
    written = pq.read_table(out / "turns.parquet")
    assert not {"missing-field", "wrong-type"} & set(written["conversation_id"].to_pylist())
    assert summary["records_read"] == written.num_rows + len(rejects) + 1  # nothing lost


@pytest.mark.parametrize(
    "folder, where, rule",
    [("malformed_json", "logs.jsonl:3", "json_syntax"), ("non_utf8", "logs.jsonl:2", "utf8")],
)
def test_unreadable_input_stops_with_file_line_and_rule(tmp_path, folder, where, rule):
    with pytest.raises(SystemExit) as exc:
        run_ingest(tmp_path, BAD / folder)
    assert f"{folder}/{where}: rule '{rule}'" in str(exc.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_no_input_files_is_an_error(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(SystemExit, match="input_present"):
        run_ingest(tmp_path, tmp_path / "raw")


def test_empty_file_gives_an_empty_dataset(tmp_path):
    summary, out = run_ingest(tmp_path, BAD / "empty")
    assert summary["records_written"] == 0
    assert pq.read_table(out / "turns.parquet").schema.equals(LOG_SCHEMA)


def test_cli_help_and_a_real_run(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipeline_steps.ingest", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "--window-start" in res.stdout
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "pipeline_steps.ingest", "--input", str(BAD / "malformed_json"), "--out", str(out / "t.parquet"),
         "--rejects", str(out / "r.jsonl"), "--summary", str(out / "s.json"), "--no-mlflow"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert res.returncode != 0 and "json_syntax" in res.stderr and not out.exists()
