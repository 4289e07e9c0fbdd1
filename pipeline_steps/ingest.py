"""ingest: conversation logs -> one canonical, de-duplicated, PII-redacted Parquet dataset.

    python -m pipeline_steps.ingest --params params.yaml --input data/raw \\
        --out data/ingest/turns.parquet --rejects data/ingest/rejects.jsonl --summary metrics/ingest.json
    python -m pipeline_steps.ingest --input s3://bucket/logs/ \\
        --window-start 2026-01-05T00:00:00Z --window-end 2026-01-12T00:00:00Z
    python -m pipeline_steps.ingest --format dealornodeal --input ../shared/data/dealornodeal/val.txt

Input: a file, a folder or an ``s3://bucket/prefix`` (boto3; endpoint and credentials come from the
standard AWS environment/config, e.g. ``AWS_ENDPOINT_URL``), holding JSONL or Parquet logs in the contract
of :mod:`pipeline_steps.common.contract`, optionally in hive-style ``date=YYYY-MM-DD/`` folders (files and
folders whose name starts with ``.`` or ``_`` are skipped). Output: the contract's ``LOG_SCHEMA``, sorted
by ``(conversation_id, turn_index)``; the same input gives byte-identical output.

What happens to bad input (nothing is lost, nothing half-written):

* bytes that cannot be attributed to a conversation (non-UTF-8 file, malformed JSON line, a line that is
  not an object, a record without a string ``conversation_id``, an unreadable Parquet file, an S3 error)
  stop the step with an error naming the file, line and rule: dropping such a line silently could truncate
  a conversation and falsify its returns;
* a record that does not fit the schema (a required field missing or null, a wrong type) is rejected
  together with every other record of its conversation into the rejects JSONL (``where``, ``rule``,
  ``reasons``, the redacted raw record), since a partial conversation would falsify its returns;
* contract rules on well-typed records (turn order, terminal rules, relations, ...) are the validate step's.

Ledger, asserted: records read = written + exact duplicates + rejected + outside the window.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import hmac
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline_steps.common.config import ConfigError, IngestParams, load_params
from pipeline_steps.common.contract import LOG_SCHEMA
from pipeline_steps.common.parquet_io import write_parquet, write_text
from pipeline_steps.common.tracking import flat_metrics, step_run, write_json

STEP = "ingest"
LOG_COLUMNS: list[str] = [f.name for f in LOG_SCHEMA]
# Working schema: like LOG_SCHEMA but everything nullable (nulls are checked, not assumed) + provenance.
_NULLABLE_LOG_SCHEMA = pa.schema([f.with_nullable(True) for f in LOG_SCHEMA])
WORK_SCHEMA = pa.schema(list(_NULLABLE_LOG_SCHEMA) + [pa.field("_source", pa.int32()), pa.field("_line", pa.int64())])
# pyarrow's JSON reader parses timestamps as strings; we cast them (zone offset required) afterwards.
_JSON_SCHEMA = pa.schema([pa.field(f.name, pa.string()) if pa.types.is_timestamp(f.type) else f.with_nullable(True) for f in LOG_SCHEMA])
TIMESTAMP_COLUMNS = tuple(f.name for f in LOG_SCHEMA if pa.types.is_timestamp(f.type))
REQUIRED_COLUMNS = tuple(f.name for f in LOG_SCHEMA if not f.nullable)

# PII redaction. Free-text columns get typed placeholders; identifier columns that contain PII (a chat
# keyed by a phone number, say) are replaced whole by a pseudonym, so conversations stay distinct.
TEXT_COLUMNS = ("customer_message", "suggestion", "business_message", "behaviour")
ID_COLUMNS = ("conversation_id", "policy_id", "policy_version", "variant")
# Plain regex syntax understood identically by Python's `re` (rejects file) and polars' Rust engine.
# Order matters: cards before phones, so a card number is not half-redacted as a phone number.
PII_PATTERNS: tuple[tuple[str, str], ...] = (
    ("EMAIL", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    ("CARD", r"\b(?:\d[ -]?){12,18}\d\b"),
    (
        "PHONE",
        r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\b\d{2,4}[\s.-])\d{3,4}[\s.-]?\d{3,4}\b"
        r"|\+\d{10,14}\b|\b\d{10,11}\b|\b\d{3}[\s.-]\d{4}\b",
    ),
)
_PII_RES = tuple((label, re.compile(p)) for label, p in PII_PATTERNS)
PII_KEY_ENV = "IPPO_PII_KEY"  # optional secret for identifier pseudonyms (HMAC); set it in production

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
DND_SUFFIXES = (".txt",)
_PARTITION_RE = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})(?:/|$)")


class IngestError(RuntimeError):
    """Input the step cannot safely use; ``where`` names the file/line (or record), ``rule`` the broken rule."""

    def __init__(self, where: str, rule: str, detail: str):
        self.where, self.rule, self.detail = where, rule, detail
        super().__init__(f"{where}: rule '{rule}' violated: {detail}")


# ------------------------------------------------------------------------------------------------
# Window and sources
# ------------------------------------------------------------------------------------------------


def parse_ts(value: str, what: str) -> datetime:
    """An ISO 8601 timestamp with zone, in UTC (naive times are ambiguous, so they are refused)."""
    try:
        ts = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{what}: not an ISO 8601 timestamp: {value!r}") from exc
    if ts.tzinfo is None:
        raise ValueError(f"{what}: timestamp {value!r} has no zone offset")
    return ts.astimezone(timezone.utc)


@dataclass(frozen=True)
class Window:
    """The iteration's half-open window [start, end) on a conversation's first customer message."""

    start: datetime | None = None
    end: datetime | None = None

    def may_hold(self, day: date | None, late_days: int) -> bool:
        """Whether a ``date=`` partition can hold turns of conversations that began in the window."""
        if day is None:
            return True
        if self.start is not None and day < (self.start - timedelta(days=1)).date():
            return False
        if self.end is not None and day > (self.end + timedelta(days=late_days)).date():
            return False
        return True


@dataclass(frozen=True)
class Source:
    """One input file (local or S3): ``name`` is what messages show, ``relpath`` orders and partitions it."""

    name: str
    relpath: str
    fmt: str
    read: Callable[[], bytes] = field(compare=False, repr=False)

    @property
    def partition_date(self) -> date | None:
        m = _PARTITION_RE.search(self.relpath)
        return date.fromisoformat(m.group(1)) if m else None


def format_of(name: str, fmt: str) -> str | None:
    """The parser for a file name under the configured format; None = not a log file (skipped)."""
    lower = name.lower()
    if fmt == "dealornodeal":
        return "dealornodeal" if lower.endswith(DND_SUFFIXES) else None
    if lower.endswith(JSONL_SUFFIXES) and fmt in ("auto", "jsonl"):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES) and fmt in ("auto", "parquet"):
        return "parquet"
    return None


def _hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


def list_local(root: Path, fmt: str) -> tuple[list[Source], list[str]]:
    """Log files under a local file or folder, sorted by relative path; also the skipped file names."""
    if not root.exists():
        raise IngestError(str(root), "input_present", "no such file or folder")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    sources, skipped = [], []
    for p in files:
        rel = p.name if root.is_file() else p.relative_to(root).as_posix()
        kind = format_of(p.name, fmt)
        if kind is None or (not root.is_file() and _hidden(rel)):
            skipped.append(rel)
            continue
        sources.append(Source(str(p), rel, kind, p.read_bytes))
    return sources, skipped


def split_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise IngestError(uri, "s3_uri", "expected s3://bucket/prefix")
    return bucket, prefix


def s3_client() -> Any:
    """A boto3 S3 client configured only by the environment (AWS_ENDPOINT_URL, AWS_* credentials, profiles)."""
    import boto3
    from botocore.config import Config

    # Bounded timeouts, so an unreachable endpoint fails in seconds, not minutes; retries follow the standard
    # AWS settings (AWS_MAX_ATTEMPTS / AWS_RETRY_MODE / config file) when given, else 3 attempts.
    retries = {} if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE") else {"retries": {"max_attempts": 3, "mode": "standard"}}
    return boto3.session.Session().client("s3", config=Config(connect_timeout=5, read_timeout=60, **retries))


def _s3_error(where: str, exc: Exception, client: Any) -> IngestError:
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", "?")
    return IngestError(where, "s3_reachable", f"S3 request to {endpoint} failed: {type(exc).__name__}: {exc}")


def list_s3(uri: str, fmt: str, client: Any | None = None) -> tuple[list[Source], list[str]]:
    """Log objects under ``s3://bucket/prefix``, sorted by key; reading is deferred to the caller."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(uri)
    client = client or s3_client()
    base = prefix if prefix.endswith("/") or not prefix else prefix + "/"
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(uri, exc, client) from exc

    def reader(key: str) -> Callable[[], bytes]:
        def read() -> bytes:
            try:
                return client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except (BotoCoreError, ClientError) as exc:
                raise _s3_error(f"s3://{bucket}/{key}", exc, client) from exc

        return read

    sources, skipped = [], []
    for key in sorted(keys):
        rel = key[len(base) :] if key.startswith(base) else key.rsplit("/", 1)[-1]
        kind = format_of(key, fmt)
        if kind is None or _hidden(rel) or key.endswith("/"):
            skipped.append(rel)
            continue
        sources.append(Source(f"s3://{bucket}/{key}", rel, kind, reader(key)))
    return sources, skipped


def list_sources(input_path: str, fmt: str, window: Window, late_days: int) -> tuple[list[Source], list[str]]:
    """Every log file of a local path or S3 prefix whose date partition can matter for ``window``."""
    sources, skipped = list_s3(input_path, fmt) if input_path.startswith("s3://") else list_local(Path(input_path), fmt)
    kept = [s for s in sources if window.may_hold(s.partition_date, late_days)]
    skipped += [f"{s.relpath} (partition outside the window)" for s in sources if s not in kept]
    if not kept:
        raise IngestError(input_path, "input_present", f"no log files ({fmt}) found; skipped: {skipped[:10]}")
    return kept, skipped


# ------------------------------------------------------------------------------------------------
# Parsing: a fast columnar path for clean files, a per-record path that says what is wrong
# ------------------------------------------------------------------------------------------------


@dataclass
class Reject:
    """A record kept out of the dataset, with where it came from and why."""

    where: str
    conversation_id: str
    turn_index: Any
    rule: str
    detail: str
    record: dict[str, Any]
    first_ts: datetime | None = None


def _where(src: Source, line: int) -> str:
    return f"{src.name}:{line}" if src.fmt != "parquet" else f"{src.name}#row{line}"


def decode_utf8(data: bytes, name: str) -> str:
    """The text of a file, or an error naming the line with the first invalid byte."""
    if data.startswith(b"\x1f\x8b"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise IngestError(f"{name}:{line}", "utf8", f"not UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start})") from exc


_INT_RANGES = {pa.int8(): (-(2**7), 2**7 - 1), pa.int32(): (-(2**31), 2**31 - 1)}


def _coerce(value: Any, typ: pa.DataType, name: str) -> Any:
    if pa.types.is_string(typ):
        if isinstance(value, str):
            return value
        if name == "behaviour" and isinstance(value, (dict, list)):
            return json.dumps(value, sort_keys=True, ensure_ascii=False)
        raise ValueError(f"'{name}' must be a string, got {type(value).__name__} {value!r}"[:200])
    if pa.types.is_integer(typ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"'{name}' must be an integer, got {type(value).__name__} {value!r}"[:200])
        lo, hi = _INT_RANGES[typ]
        if not lo <= value <= hi:
            raise ValueError(f"'{name}' = {value} is out of range for {typ}")
        return value
    if pa.types.is_timestamp(typ):
        if isinstance(value, str):
            return parse_ts(value, f"'{name}'")
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError(f"'{name}' = {value.isoformat()} has no time zone")
            return value.astimezone(timezone.utc)
        raise ValueError(f"'{name}' must be an ISO 8601 timestamp, got {type(value).__name__} {value!r}"[:200])
    raise TypeError(f"unsupported contract type {typ}")  # pragma: no cover - the contract has no other types


def coerce_record(raw: dict[str, Any], where: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Fit one raw record to the contract's types: ``(record, problems)``; problems are ``(rule, detail)``.

    A record without a string ``conversation_id`` cannot be attributed to a conversation, so it cannot
    be quarantined with it: that raises :class:`IngestError` instead.
    """
    cid = raw.get("conversation_id")
    if not isinstance(cid, str) or not cid:
        raise IngestError(where, "required_field", f"'conversation_id' is missing or not a string ({cid!r}): the "
                          "record cannot be attributed to a conversation")
    rec: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for f in LOG_SCHEMA:
        value = raw.get(f.name)
        if value is None:
            rec[f.name] = None
            if not f.nullable:
                problems.append(("required_field", f"'{f.name}' is missing or null"))
            continue
        try:
            rec[f.name] = _coerce(value, f.type, f.name)
        except ValueError as exc:
            rec[f.name] = None
            problems.append(("field_type", str(exc)))
    return rec, problems


def _records_table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=WORK_SCHEMA)


def _with_provenance(table: pa.Table, source_idx: int, first_line: int = 1) -> pa.Table:
    n = table.num_rows
    table = table.append_column("_source", pa.array([source_idx] * n, pa.int32()))
    return table.append_column("_line", pa.array(range(first_line, first_line + n), pa.int64()))


def _no_required_nulls(table: pa.Table) -> bool:
    return all(table.column(c).null_count == 0 for c in REQUIRED_COLUMNS)


def _jsonl_fast(data: bytes, text: str) -> pa.Table | None:
    """Columnar parse of a clean JSONL file, or None when anything needs the per-record path."""
    n_lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    if "\n\n" in text or text.startswith("\n") or "\r" in text:
        return None  # blank lines would shift line numbers; let the per-record path report exactly
    try:
        table = pa_json.read_json(
            io.BytesIO(text.encode("utf-8") if data.startswith(b"\x1f\x8b") else data),
            parse_options=pa_json.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore"),
        )
        if table.num_rows != n_lines:
            return None
        table = table.select(LOG_COLUMNS)
        for name in TIMESTAMP_COLUMNS:
            idx = table.schema.get_field_index(name)
            table = table.set_column(idx, name, table.column(name).cast(pa.timestamp("us", tz="UTC")))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    return table if _no_required_nulls(table) else None


def parse_jsonl(src: Source, idx: int, data: bytes) -> tuple[pa.Table, list[Reject]]:
    """JSONL: each non-blank line one record. Syntax errors raise; ill-typed records become rejects."""
    text = decode_utf8(data, src.name)
    fast = _jsonl_fast(data, text)
    if fast is not None:
        return _with_provenance(fast, idx), []
    good, rejects = [], []
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        where = _where(src, lineno)
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IngestError(where, "json_syntax", f"{exc.msg} at column {exc.colno}") from exc
        if not isinstance(raw, dict):
            raise IngestError(where, "json_object", f"expected a JSON object, got {type(raw).__name__}")
        rec, problems = coerce_record(raw, where)
        if problems:
            rejects.extend(_rejects_for(where, raw, rec, problems))
        else:
            good.append({**rec, "_source": idx, "_line": lineno})
    return _records_table(good), rejects


def _rejects_for(where: str, raw: dict[str, Any], rec: dict[str, Any], problems: list[tuple[str, str]]) -> list[Reject]:
    ts = rec.get("customer_ts")
    return [Reject(where, raw["conversation_id"], raw.get("turn_index"), rule, detail, raw, ts) for rule, detail in problems]


def _parquet_compatible(table: pa.Table) -> bool:
    """Column types that cast losslessly to the contract (anything else takes the per-record path)."""
    for f in LOG_SCHEMA:
        if f.name not in table.column_names:
            if not f.nullable:
                return False
            continue
        src = table.schema.field(f.name).type
        if pa.types.is_timestamp(f.type):
            ok = pa.types.is_timestamp(src) and src.tz is not None
        elif pa.types.is_integer(f.type):
            ok = pa.types.is_integer(src)
        else:
            ok = pa.types.is_string(src) or pa.types.is_large_string(src) or pa.types.is_string_view(src) or pa.types.is_null(src)
        if not ok:
            return False
    return True


def parse_parquet(src: Source, idx: int, data: bytes) -> tuple[pa.Table, list[Reject]]:
    """Parquet: cast to the contract when the columns fit; otherwise check record by record."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise IngestError(src.name, "parquet_readable", f"cannot read Parquet: {exc}") from exc
    if _parquet_compatible(table):
        cols = [
            table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in LOG_SCHEMA
        ]
        try:
            cast = pa.Table.from_arrays(cols, names=LOG_COLUMNS).cast(_NULLABLE_LOG_SCHEMA)
            if _no_required_nulls(cast):
                return _with_provenance(cast, idx), []
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    good, rejects = [], []
    for row, raw in enumerate(table.to_pylist(), 1):
        where = _where(src, row)
        rec, problems = coerce_record(raw, where)
        if problems:
            rejects.extend(_rejects_for(where, raw, rec, problems))
        else:
            good.append({**rec, "_source": idx, "_line": row})
    return _records_table(good), rejects


# ------------------------------------------------------------------------------------------------
# Deal or No Deal adapter (Lewis et al., 2017): real human negotiations with a binary outcome
# ------------------------------------------------------------------------------------------------

DND_OPENING = "(conversation opened by the business)"
DND_SELECTION = "<selection>"
_DND_TAG = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>") for tag in ("input", "dialogue", "output", "partner_input")}


def dnd_deal(input_tokens: Sequence[str], output_tokens: Sequence[str]) -> bool:
    """A deal: both sides selected items (no ``<disagree>``/``<no_agreement>``/``<disconnect>``) that add up
    to the item counts, i.e. the two selections are complementary."""
    if len(output_tokens) != 6 or any(t.startswith("<") for t in output_tokens):
        return False
    counts = [int(x) for x in input_tokens[0::2]]
    vals = [int(t.split("=", 1)[1]) for t in output_tokens]
    return all(vals[i] + vals[i + 3] == counts[i] for i in range(3))


def dealornodeal_records(line: str, where: str, conversation_id: str, start: datetime, relation: str) -> list[dict[str, Any]]:
    """One dialogue line, from YOU's side, as contract records (business = YOU, customer = THEM).

    Mapping (documented choices):

    * each THEM message is a customer message ``c_i``; the YOU message that answers it is ``m_i``, and with
      ``relation='verbatim'`` also the suggestion ``a_i`` (the human negotiator is the behaviour policy,
      so Q learns from real actions); with ``'abstained'`` the suggestion is null;
    * a dialogue YOU opens starts with the placeholder customer message ``(conversation opened by the
      business)``: the contract has no business-first turn, and dropping YOU's opening would lose the
      action that shaped the talk;
    * when YOU ends the talk with ``<selection>``, that is YOU's last action (``m_T = '<selection>'``);
    * the last record is the terminal state that carries the outcome: a deal (complementary selections)
      is ``outcome=1`` with customer message ``<selection>``; no deal (``<disagree>``, ``<no_agreement>``,
      ``<disconnect>``) is the customer leaving (``customer_message=null``, ``outcome=0``).
    """
    parts = {}
    for tag, rx in _DND_TAG.items():
        m = rx.search(line)
        if m is None:
            raise IngestError(where, "dealornodeal_format", f"missing <{tag}>...</{tag}>")
        parts[tag] = m.group(1).split() if tag != "dialogue" else m.group(1)
    msgs: list[tuple[str, str]] = []
    for chunk in parts["dialogue"].split("<eos>"):
        speaker, sep, text = chunk.strip().partition(":")
        if not sep or speaker not in ("YOU", "THEM") or not text.strip():
            raise IngestError(where, "dealornodeal_format", f"turn {chunk.strip()[:40]!r} is not 'YOU: ...' or 'THEM: ...'")
        if msgs and msgs[-1][0] == speaker and text.strip() != DND_SELECTION:  # not in the data; one turn
            msgs[-1] = (speaker, f"{msgs[-1][1]} {text.strip()}")
        else:
            msgs.append((speaker, text.strip()))
    if msgs[-1][1] != DND_SELECTION:
        raise IngestError(where, "dealornodeal_format", "the dialogue does not end with a <selection> turn")
    try:
        deal = dnd_deal(parts["input"], parts["output"])
    except (ValueError, IndexError) as exc:
        raise IngestError(where, "dealornodeal_format", f"unreadable <input>/<output>: {exc}") from exc
    body = msgs[:-1]
    if not body or body[0][0] == "YOU":
        body = [("THEM", DND_OPENING), *body]
    behaviour = json.dumps(
        {"source": "dealornodeal", "you_input": " ".join(parts["input"]), "partner_input": " ".join(parts["partner_input"])},
        sort_keys=True,
    )
    base = dict(policy_id="human", policy_version="dealornodeal", variant="control", behaviour=behaviour)
    records: list[dict[str, Any]] = []
    customer_turns = [i for i, (speaker, _) in enumerate(body) if speaker == "THEM"]
    for k, i in enumerate(customer_turns):
        reply = body[i + 1][1] if i + 1 < len(body) and body[i + 1][0] == "YOU" else DND_SELECTION
        ts = start + timedelta(seconds=30 * k)
        records.append(dict(
            base, conversation_id=conversation_id, turn_index=k + 1, customer_message=body[i][1], outcome=0,
            suggestion=reply if relation == "verbatim" else None, business_message=reply, relation=relation,
            customer_ts=ts, business_ts=ts + timedelta(seconds=15),
        ))
    ts = start + timedelta(seconds=30 * len(records))
    records.append(dict(
        base, conversation_id=conversation_id, turn_index=len(records) + 1,
        customer_message=DND_SELECTION if deal else None, outcome=int(deal),
        suggestion=None, business_message=None, relation=None, customer_ts=ts, business_ts=None,
    ))
    return records


def parse_dealornodeal(src: Source, idx: int, data: bytes, params: IngestParams) -> tuple[pa.Table, list[Reject]]:
    """Every non-blank line is its own conversation ``dnd-<file stem>-<line:05d>`` (ids stable by line)."""
    text = decode_utf8(data, src.name)
    start = parse_ts(params.dealornodeal_start_time, "ingest.dealornodeal_start_time")
    stem = Path(src.relpath).stem
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        recs = dealornodeal_records(
            line, _where(src, lineno), f"dnd-{stem}-{lineno:05d}", start + timedelta(minutes=10 * (lineno - 1)),
            params.dealornodeal_relation,
        )
        rows.extend({**r, "_source": idx, "_line": lineno} for r in recs)
    return _records_table(rows), []


# ------------------------------------------------------------------------------------------------
# Redaction
# ------------------------------------------------------------------------------------------------


def redact_text(text: str) -> str:
    """Replace emails, card-like numbers and phone numbers by ``[EMAIL]``, ``[CARD]``, ``[PHONE]``."""
    for label, rx in _PII_RES:
        text = rx.sub(f"[{label}]", text)
    return text


def has_pii(text: str) -> bool:
    return any(rx.search(text) for _, rx in _PII_RES)


def pseudonym(value: str) -> str:
    """A stable stand-in for an identifier that contains PII (HMAC with ``IPPO_PII_KEY`` when set)."""
    key = os.environ.get(PII_KEY_ENV, "").encode()
    digest = hmac.new(key, value.encode(), hashlib.sha256).hexdigest() if key else hashlib.sha256(value.encode()).hexdigest()
    return f"redacted-{digest[:20]}"


def redact_frame(df: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """Redact every string column (vectorised); returns the frame and how many values changed per column."""
    exprs = []
    for col in TEXT_COLUMNS:
        e = pl.col(col)
        for label, pattern in PII_PATTERNS:
            e = e.str.replace_all(pattern, f"[{label}]")
        exprs.append(e.alias(col))
    out = df.with_columns(exprs)
    any_pii = "|".join(f"(?:{p})" for _, p in PII_PATTERNS)
    id_exprs = []
    for col in ID_COLUMNS:
        bad = df.filter(pl.col(col).str.contains(any_pii)).get_column(col).unique().to_list()
        if bad:
            mapping = {v: pseudonym(v) for v in bad}
            id_exprs.append(pl.col(col).replace(mapping).alias(col))
    if id_exprs:
        out = out.with_columns(id_exprs)
    changed = {
        col: int(df.height and (df.get_column(col) != out.get_column(col)).fill_null(False).sum())
        for col in (*TEXT_COLUMNS, *ID_COLUMNS)
    }
    return out, changed


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


def read_sources(sources: Sequence[Source], params: IngestParams, progress: bool = False) -> tuple[pa.Table, list[Reject]]:
    """Parse every source into one working table (contract columns + provenance) and the rejects."""
    from tqdm.auto import tqdm

    tables, rejects = [], []
    for idx, src in enumerate(tqdm(sources, desc="ingest: read", unit="file", disable=not progress or len(sources) < 4)):
        data = src.read()
        if src.fmt == "jsonl":
            t, r = parse_jsonl(src, idx, data)
        elif src.fmt == "parquet":
            t, r = parse_parquet(src, idx, data)
        else:
            t, r = parse_dealornodeal(src, idx, data, params)
        tables.append(t)
        rejects.extend(r)
    table = pa.concat_tables(tables) if tables else WORK_SCHEMA.empty_table()
    return table, rejects


def _redact_id(value: str) -> str:
    return pseudonym(value) if has_pii(value) else value


def _record_json(rec: dict[str, Any]) -> str:
    """A rejected record as JSON, redacted like the dataset (identifiers pseudonymised, text redacted)."""
    rec = {k: _redact_id(v) if k in ID_COLUMNS and isinstance(v, str) else v for k, v in rec.items()}
    return redact_text(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v)))


def canonicalise(
    table: pa.Table, rejects: list[Reject], sources: Sequence[Source], window: Window
) -> tuple[pa.Table, list[dict[str, Any]], dict[str, Any]]:
    """Quarantine conversations with rejected records, de-duplicate, keep the window, redact, sort.

    Returns the canonical table (``LOG_SCHEMA``), the reject rows for the rejects file and the counts.
    """
    df = pl.from_arrow(table)
    read = df.height + len(rejects)
    bad_ids = sorted({r.conversation_id for r in rejects})
    # 1. whole conversations of rejected records go to the rejects file (a partial conversation would
    #    falsify its returns).
    cascaded = df.filter(pl.col("conversation_id").is_in(bad_ids))
    df = df.filter(~pl.col("conversation_id").is_in(bad_ids))
    first_bad = {}
    for r in rejects:
        first_bad.setdefault(r.conversation_id, r)
    reject_rows: list[dict[str, Any]] = []
    first_ts: dict[str, datetime] = {}
    for r in rejects:
        if r.first_ts is not None:
            first_ts[r.conversation_id] = min(r.first_ts, first_ts.get(r.conversation_id, r.first_ts))
    for rec in cascaded.iter_rows(named=True):
        ts = rec["customer_ts"]
        first_ts[rec["conversation_id"]] = min(ts, first_ts.get(rec["conversation_id"], ts))

    def in_window(ts: datetime | None) -> bool:
        return ts is None or ((window.start is None or ts >= window.start) and (window.end is None or ts < window.end))

    out_of_window = 0
    for r in rejects:
        if not in_window(first_ts.get(r.conversation_id)):
            out_of_window += 1
            continue
        reject_rows.append(dict(
            where=r.where, conversation_id=_redact_id(r.conversation_id), turn_index=r.turn_index, rule=r.rule,
            reasons=redact_text(f"{r.where}: conversation {_redact_id(r.conversation_id)} turn {r.turn_index}: "
                                f"rule '{r.rule}' violated: {r.detail}"),
            record=_record_json(r.record),
        ))
    for rec in cascaded.iter_rows(named=True):
        cid = rec["conversation_id"]
        if not in_window(first_ts.get(cid)):
            out_of_window += 1
            continue
        src, line = rec.pop("_source"), rec.pop("_line")
        where = _where(sources[src], line)
        culprit = first_bad[cid]
        reject_rows.append(dict(
            where=where, conversation_id=_redact_id(cid), turn_index=rec["turn_index"], rule="conversation_quarantined",
            reasons=f"{where}: conversation {_redact_id(cid)} turn {rec['turn_index']}: quarantined with its conversation "
            f"because {culprit.where} broke rule '{culprit.rule}'",
            record=_record_json(rec),
        ))
    # 2. exact duplicate records (same values in every contract column) are dropped, first one kept.
    before = df.height
    df = df.unique(subset=LOG_COLUMNS, keep="first", maintain_order=True)  # rows are in source, line order
    duplicates = before - df.height
    # 3. the window: conversations whose first customer message lies in [start, end).
    before = df.height
    if window.start is not None or window.end is not None:
        first = pl.col("customer_ts").min().over("conversation_id")
        cond = pl.lit(True)
        if window.start is not None:
            cond = cond & (first >= window.start)
        if window.end is not None:
            cond = cond & (first < window.end)
        df = df.filter(cond)
    out_of_window += before - df.height
    # 4. PII redaction, then 5. a fixed order (content tie-breaks make it independent of file order).
    df, redacted = redact_frame(df.select(LOG_COLUMNS))
    df = df.sort(LOG_COLUMNS, nulls_last=True)
    canonical = df.to_arrow().cast(LOG_SCHEMA) if df.height else LOG_SCHEMA.empty_table()
    reject_rows.sort(key=lambda r: (r["conversation_id"], str(r["turn_index"]), r["where"], r["rule"]))
    counts = dict(
        records_read=read,
        records_written=canonical.num_rows,
        exact_duplicates_removed=duplicates,
        records_rejected=len(reject_rows),
        conversations_rejected=len({r["conversation_id"] for r in reject_rows}),
        records_outside_window=out_of_window,
        conversations_written=df.get_column("conversation_id").n_unique() if df.height else 0,
        values_redacted=redacted,
    )
    # The ledger: nothing is lost silently.
    assert read == counts["records_written"] + duplicates + len(reject_rows) + out_of_window, counts
    return canonical, reject_rows, counts


def ingest(input_path: str, params: IngestParams, progress: bool = False) -> tuple[pa.Table, list[dict[str, Any]], dict[str, Any]]:
    """List, read and canonicalise the logs under ``input_path`` for ``params``' window."""
    window = Window(
        parse_ts(params.window_start, "window_start") if params.window_start else None,
        parse_ts(params.window_end, "window_end") if params.window_end else None,
    )
    if window.start and window.end and window.start >= window.end:
        raise IngestError("window", "window_ordered", f"window start {window.start} is not before end {window.end}")
    sources, skipped = list_sources(input_path, params.format, window, params.late_days)
    table, rejects = read_sources(sources, params, progress)
    canonical, reject_rows, counts = canonicalise(table, rejects, sources, window)
    counts.update(files_read=len(sources), files_skipped=len(skipped), outcome_records=int(
        pc.sum(canonical.column("outcome")).as_py() or 0) if canonical.num_rows else 0)
    return canonical, reject_rows, counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline_steps.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="params.yaml to read (section 'ingest').")
    p.add_argument("--input", default="data/raw", help="Log file, folder, or s3://bucket/prefix.")
    p.add_argument("--format", choices=["auto", "jsonl", "parquet", "dealornodeal"], help="Override ingest.format.")
    p.add_argument("--window-start", help="Override ingest.window_start (ISO 8601 with zone), e.g. the data interval start.")
    p.add_argument("--window-end", help="Override ingest.window_end (ISO 8601 with zone), exclusive.")
    p.add_argument("--out", default="data/ingest/turns.parquet", help="Canonical Parquet dataset to write.")
    p.add_argument("--rejects", default="data/ingest/rejects.jsonl", help="JSONL of rejected records with reasons.")
    p.add_argument("--summary", default="metrics/ingest.json", help="Counts JSON (DVC metrics).")
    p.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    overrides = {
        f"ingest.{k}": v
        for k, v in {"format": args.format, "window_start": args.window_start, "window_end": args.window_end}.items()
        if v is not None
    }
    try:
        params = load_params(args.params, overrides)
    except ConfigError as exc:
        raise SystemExit(f"ingest: error: {exc}") from exc
    t0 = time.perf_counter()
    try:
        canonical, reject_rows, counts = ingest(args.input, params.ingest, progress=not args.no_progress)
    except IngestError as exc:
        raise SystemExit(f"ingest: error: {exc}\nNothing was written; fix or remove the input and rerun.") from exc
    with step_run(STEP, params.ingest.model_dump(), enabled=not args.no_mlflow) as run:
        write_parquet(canonical, args.out)
        write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in reject_rows), args.rejects)
        summary = {**counts, "input": args.input, "format": params.ingest.format}
        if run is not None:
            import mlflow

            mlflow.log_metrics(flat_metrics(counts))
    write_json(args.summary, summary)
    print(
        f"ingest: {counts['records_written']} records ({counts['conversations_written']} conversations) -> {args.out}; "
        f"{counts['exact_duplicates_removed']} duplicates, {counts['records_rejected']} rejected -> {args.rejects}, "
        f"{counts['records_outside_window']} outside the window ({time.perf_counter() - t0:.1f}s)"
    )
    return summary


if __name__ == "__main__":
    main()
