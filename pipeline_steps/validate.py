"""validate: the Great Expectations gate on the canonical dataset; fails closed, quarantines bad conversations.

    python -m pipeline_steps.validate --params params.yaml --input data/ingest/turns.parquet \\
        --out data/validate/turns.parquet --quarantine data/validate/quarantine.parquet \\
        --docs data/validate/data_docs --summary metrics/validate.json

The suite is code (:func:`turn_suite`, :func:`conversation_suite`), run by GX 1.x with an ephemeral
context and a pandas datasource; Data Docs (HTML) are built into ``--docs``.

* **turns** (every received record): schema and types; required fields; outcome in {0, 1}; turn index
  range; text length bounds; unique ``(conversation_id, turn_index)``; and the contract rules GX has no
  built-in for, computed as vectorised boolean columns ``rule__<name>`` (turn indices contiguous, nothing
  after a terminal record, no action in a terminal state, relation valid and consistent with suggestion
  and message, verbatim means equal text, customer timestamps non-decreasing) and checked with
  ``ExpectColumnValuesToBeInSet([True])``. Row-level expectations tolerate up to
  ``validate.max_quarantine_fraction`` failing rows (``mostly``); GX's unexpected row indices decide what
  is quarantined.
* **conversations** (the accepted conversations, one row each): minimum batch size, outcome rate within
  ``[outcome_rate_min, outcome_rate_max]``, unique ids.

Quarantine policy: a conversation with any failing record is quarantined whole (a partial conversation
would falsify its returns), each row with a ``reasons`` column naming the record and rule; accepted +
quarantined = received, asserted. Fail closed: if any expectation fails, the metrics, quarantine and Data
Docs are still written (the evidence), the validated dataset is not (a stale one is removed) and the step
exits non-zero naming the failed expectations and example rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_steps.common.config import ConfigError, ValidateParams, load_params
from pipeline_steps.common.contract import LOG_SCHEMA, RELATIONS, REQUIRED_FIELDS
from pipeline_steps.common.parquet_io import remove_stale, staged_dir, write_parquet
from pipeline_steps.common.tracking import flat_metrics, step_run, write_json

STEP = "validate"
LOG_COLUMNS: list[str] = [f.name for f in LOG_SCHEMA]
TEXT_COLUMNS = ("customer_message", "suggestion", "business_message")
# Contract rules (names as in contract.turn_rule_violations / conversation_rule_violations) that GX has no
# built-in expectation for: computed as boolean columns, checked by GX.
DERIVED_RULES = (
    "turn_index_contiguous",
    "nothing_after_terminal",
    "customer_ts_ordered",
    "no_action_in_terminal_state",
    "relation_valid",
    "relation_consistent",
    "verbatim_equal_text",
)
DERIVED_COLUMNS = [f"rule__{r}" for r in DERIVED_RULES]
# How GX (pandas) names the dtype of each contract column after Arrow -> pandas conversion.
PANDAS_TYPES = {pa.string(): "str", pa.int32(): "int32", pa.int8(): "int8"}
QUARANTINE_SCHEMA = pa.schema([f.with_nullable(True) for f in LOG_SCHEMA] + [pa.field("reasons", pa.string(), nullable=False)])


# ------------------------------------------------------------------------------------------------
# Derived rule columns (vectorised, polars window functions)
# ------------------------------------------------------------------------------------------------


def schema_problems(schema: pa.Schema) -> list[str]:
    """Differences from the contract's column names and types (empty when the file conforms)."""
    problems = []
    if schema.names != LOG_COLUMNS:
        problems.append(f"columns {schema.names} != contract {LOG_COLUMNS}")
    for f in LOG_SCHEMA:
        if f.name in schema.names and not schema.field(f.name).type.equals(f.type):
            problems.append(f"column '{f.name}' has type {schema.field(f.name).type}, contract says {f.type}")
    return problems


def with_rule_columns(df: pl.DataFrame) -> pl.DataFrame:
    """Add ``rule__<name>`` booleans (True = the record keeps the rule); ``df`` sorted by conversation, turn.

    Mirrors :func:`contract.turn_rule_violations` and :func:`contract.conversation_rule_violations` (a test
    checks they agree) but runs as column expressions over the whole batch instead of a Python loop.
    """
    conv = "conversation_id"
    sug, msg, rel = pl.col("suggestion"), pl.col("business_message"), pl.col("relation")
    terminal = ((pl.col("outcome") == 1) | pl.col("customer_message").is_null()).fill_null(False)
    ends = (terminal | msg.is_null()).cast(pl.Int64)
    position = pl.int_range(1, pl.len() + 1).over(conv)
    valid_rel = rel.is_in(list(RELATIONS)).fill_null(False)
    # abstained <=> no suggestion; edited needs a sent message that differs from the suggestion
    consistent = ((rel == "abstained") == sug.is_null()) & ~((rel == "edited") & (msg == sug).fill_null(True))
    rules = {
        "turn_index_contiguous": pl.col("turn_index") == position,
        "nothing_after_terminal": (ends.cum_sum().over(conv) - ends) == 0,
        "customer_ts_ordered": (pl.col("customer_ts") >= pl.col("customer_ts").shift(1).over(conv)).fill_null(True),
        "no_action_in_terminal_state": ~terminal | (sug.is_null() & msg.is_null() & rel.is_null()),
        "relation_valid": terminal | valid_rel,
        "relation_consistent": terminal | ~valid_rel | consistent.fill_null(False),
        "verbatim_equal_text": (rel != "verbatim").fill_null(True) | (msg == sug).fill_null(False),
    }
    return df.with_columns([expr.fill_null(False).alias(f"rule__{name}") for name, expr in rules.items()])


def conversations_frame(df: pl.DataFrame) -> pl.DataFrame:
    """One row per conversation: id, number of records, final outcome (the batch-level view)."""
    return df.group_by("conversation_id", maintain_order=True).agg(
        turns=pl.len(), outcome=pl.col("outcome").max().cast(pl.Float64)
    )


# ------------------------------------------------------------------------------------------------
# The suites (kept in code; GX renders them into the Data Docs)
# ------------------------------------------------------------------------------------------------


def turn_suite(params: ValidateParams, derived: bool = True) -> list[Any]:
    """Expectations on the received records. ``meta.rule`` names the contract rule; ``meta.row_level``
    marks those whose failing rows are quarantined (with ``mostly``) rather than failing the batch outright."""
    import great_expectations.expectations as gxe

    mostly = 1.0 - params.max_quarantine_fraction

    def row(exp: type, rule: str, **kw: Any) -> Any:
        return exp(**kw, mostly=mostly, meta={"rule": rule, "row_level": True})

    columns = LOG_COLUMNS + (DERIVED_COLUMNS if derived else [])
    exps: list[Any] = [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=columns, meta={"rule": "schema"}),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta={"rule": "non_empty_batch"}),
    ]
    for f in LOG_SCHEMA:
        type_name = "Timestamp" if pa.types.is_timestamp(f.type) else PANDAS_TYPES[f.type]
        exps.append(gxe.ExpectColumnValuesToBeOfType(column=f.name, type_=type_name, meta={"rule": "schema_types"}))
    if not derived:
        return exps
    exps += [row(gxe.ExpectColumnValuesToNotBeNull, "required_field", column=c) for c in REQUIRED_FIELDS]
    exps += [
        row(gxe.ExpectColumnValuesToBeInSet, "outcome_binary", column="outcome", value_set=[0, 1]),
        row(gxe.ExpectColumnValuesToBeBetween, "turn_index_range", column="turn_index", min_value=1, max_value=params.max_turns),
        row(gxe.ExpectCompoundColumnsToBeUnique, "unique_turn", column_list=["conversation_id", "turn_index"]),
    ]
    exps += [
        row(gxe.ExpectColumnValueLengthsToBeBetween, "text_length", column=c, min_value=1, max_value=params.max_text_chars)
        for c in TEXT_COLUMNS
    ]
    exps += [row(gxe.ExpectColumnValuesToBeInSet, r, column=f"rule__{r}", value_set=[True]) for r in DERIVED_RULES]
    return exps


def conversation_suite(params: ValidateParams) -> list[Any]:
    """Batch-level expectations on the accepted conversations."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=params.min_conversations, meta={"rule": "min_batch_size"}),
        gxe.ExpectColumnMeanToBeBetween(
            column="outcome", min_value=params.outcome_rate_min, max_value=params.outcome_rate_max, meta={"rule": "outcome_rate"}
        ),
        gxe.ExpectColumnValuesToBeUnique(column="conversation_id", meta={"rule": "unique_conversation"}),
    ]


@dataclass
class SuiteRun:
    """What GX said about one batch: overall success and one entry per expectation."""

    name: str
    success: bool
    results: list[dict[str, Any]]


class GXRunner:
    """One ephemeral GX context with a pandas datasource and a local Data Docs site.

    Every batch is validated by a checkpoint whose action updates the Data Docs, with results in COMPLETE
    format so row-level expectations list every failing row index.
    """

    SITE = "local_site"

    def __init__(self, docs_dir: Path | None, progress: bool = False):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.checkpoint import UpdateDataDocsAction
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.gx = gx
        sites = {}
        if docs_dir is not None:
            sites[self.SITE] = {
                "class_name": "SiteBuilder",
                # GX wants an absolute folder when there is no project root (the ephemeral context has none)
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites=sites,
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=progress, metric_calculations=progress),
        )
        self.ctx = gx.get_context(project_config=config, mode="ephemeral")
        self.actions = [UpdateDataDocsAction(name="data_docs", site_names=[self.SITE])] if sites else []
        self.datasource = self.ctx.data_sources.add_pandas("canonical")

    def run(self, name: str, frame: Any, expectations: list[Any]) -> SuiteRun:
        gx = self.gx
        batch_def = self.datasource.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = self.ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
        cp = self.ctx.checkpoints.add(gx.Checkpoint(
            name=f"{STEP}_{name}", validation_definitions=[vd], actions=self.actions,
            result_format={"result_format": "COMPLETE"},
        ))
        (vr,) = cp.run(batch_parameters={"dataframe": frame}).run_results.values()
        entries = []
        for r in vr.results:
            cfg = r.expectation_config
            kwargs, meta, exc = cfg.kwargs, cfg.meta or {}, r.exception_info or {}
            entries.append(dict(
                type=cfg.type,
                column=kwargs.get("column") or ",".join(kwargs.get("column_list", [])) or None,
                rule=meta.get("rule"),
                row_level=bool(meta.get("row_level")),
                success=bool(r.success),
                unexpected_count=r.result.get("unexpected_count"),
                unexpected_index_list=r.result.get("unexpected_index_list"),
                observed_value=r.result.get("observed_value"),
                exception=exc.get("exception_message") if exc.get("raised_exception") else None,
                kwargs={k: v for k, v in kwargs.items() if k not in ("batch_id", "column", "column_list")},
            ))
        return SuiteRun(name, bool(vr.success), entries)


# ------------------------------------------------------------------------------------------------
# Quarantine
# ------------------------------------------------------------------------------------------------


def split_quarantine(df: pl.DataFrame, run: SuiteRun) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Accepted rows and quarantined rows (whole conversations, with ``reasons``) from GX's failing rows."""
    failures: dict[int, list[str]] = {}
    for e in run.results:
        if e["row_level"] and e["unexpected_index_list"]:
            label = f"rule '{e['rule']}' ({e['type']}" + (f" on {e['column']})" if e["column"] else ")")
            for idx in e["unexpected_index_list"]:
                failures.setdefault(int(idx), []).append(label)
    if not failures:
        return df, df.clear().with_columns(reasons=pl.lit("", pl.String))
    ids = df.get_column("conversation_id").to_list()
    turns = df.get_column("turn_index").to_list()
    row_reason = {
        i: "; ".join(f"conversation {ids[i]} turn {turns[i]}: {label}" for label in labels)
        for i, labels in sorted(failures.items())
    }
    culprits: dict[str | None, list[str]] = {}
    for i, text in row_reason.items():
        culprits.setdefault(ids[i], []).append(text)
    bad = [cid in culprits for cid in ids]
    reasons = [
        row_reason.get(i) or f"conversation {cid} turn {turns[i]}: quarantined with its conversation because "
        + "; ".join(culprits[cid])[:2000]
        for i, (cid, is_bad) in enumerate(zip(ids, bad)) if is_bad
    ]
    mask = pl.Series(bad, dtype=pl.Boolean)
    quarantined = df.filter(mask).with_columns(reasons=pl.Series(reasons, dtype=pl.String))
    return df.filter(~mask), quarantined


def _plain(value: Any) -> Any:
    """A JSON/readable form of a GX observed value (numpy scalars become Python numbers)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def describe_failures(runs: Sequence[SuiteRun], df: pl.DataFrame | None, examples: int = 3) -> list[str]:
    """One line per failed expectation, with the observed value or example rows."""
    lines = []
    for run in runs:
        for e in run.results:
            if e["success"]:
                continue
            what = f"[{e['rule']}] {e['type']}" + (f"({e['column']})" if e["column"] else "") + f" on {run.name}"
            if e["exception"]:
                lines.append(f"{what}: could not be evaluated: {e['exception'].splitlines()[0][:300]}")
            elif e["unexpected_index_list"] and df is not None:
                rows = [
                    f"conversation {df['conversation_id'][int(i)]} turn {df['turn_index'][int(i)]}"
                    for i in e["unexpected_index_list"][:examples]
                ]
                mostly = e["kwargs"].get("mostly", 1)
                lines.append(f"{what}: {e['unexpected_count']} failing rows (tolerated share {1 - mostly:.0%}); e.g. {', '.join(rows)}")
            else:
                bounds = {k: v for k, v in e["kwargs"].items() if k in ("min_value", "max_value", "value_set", "column_list", "type_")}
                lines.append(f"{what}: observed {_plain(e['observed_value'])!r}, expected {bounds}")
    return lines


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


def validate(table: pa.Table, params: ValidateParams, docs_dir: Path | None, progress: bool = False) -> dict[str, Any]:
    """Run the gate on ``table``; returns accepted/quarantined tables, the metrics and failure lines."""
    received = table.num_rows
    problems = schema_problems(table.schema)
    df = pl.from_arrow(table)
    if problems:
        # Fail closed before the row checks: the records cannot be read as the contract says.
        runs = [GXRunner(docs_dir, progress).run("turns", table.to_pandas(), turn_suite(params, derived=False))]
        failed = [f"[schema] {p}" for p in problems] + describe_failures(runs, None)
        return dict(accepted=None, quarantined=None, runs=runs, failures=failed, received=received, ledger=None)
    df = df.with_row_index("_pos").sort(["conversation_id", "turn_index", "_pos"], maintain_order=True).drop("_pos")
    checked = with_rule_columns(df)
    pdf = checked.to_arrow().to_pandas()
    gx_runner = GXRunner(docs_dir, progress)
    turn_run = gx_runner.run("turns", pdf, turn_suite(params))
    accepted, quarantined = split_quarantine(df, turn_run)
    assert accepted.height + quarantined.height == received, (accepted.height, quarantined.height, received)
    convs = conversations_frame(accepted)
    conv_run = gx_runner.run("conversations", convs.to_pandas(), conversation_suite(params))
    runs = [turn_run, conv_run]
    return dict(
        accepted=accepted, quarantined=quarantined, runs=runs, failures=describe_failures(runs, df), received=received,
        conversations=convs,
    )


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The metrics JSON: counts, success, per-rule and per-expectation results (no timestamps)."""
    accepted, quarantined = result["accepted"], result["quarantined"]
    expectations = {}
    for run in result["runs"]:
        for e in run.results:
            key = f"{run.name}.{e['rule']}.{e['type']}" + (f".{e['column']}" if e["column"] else "")
            expectations[key] = dict(
                success=e["success"], unexpected_count=e["unexpected_count"], observed_value=_plain(e["observed_value"])
            )
    rules: dict[str, int] = {}
    for run in result["runs"]:
        for e in run.results:
            if e["row_level"]:
                rules[e["rule"]] = rules.get(e["rule"], 0) + int(e["unexpected_count"] or 0)
    out = dict(
        success=not result["failures"],
        received_rows=result["received"],
        accepted_rows=accepted.height if accepted is not None else 0,
        quarantined_rows=quarantined.height if quarantined is not None else 0,
        accepted_conversations=accepted.get_column("conversation_id").n_unique() if accepted is not None and accepted.height else 0,
        quarantined_conversations=quarantined.get_column("conversation_id").n_unique() if quarantined is not None and quarantined.height else 0,
        rule_failures=rules,
        expectations=expectations,
        failures=result["failures"],
    )
    convs = result.get("conversations")
    out["outcome_rate"] = float(convs.get_column("outcome").mean()) if convs is not None and convs.height else None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline_steps.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="params.yaml to read (section 'validate').")
    p.add_argument("--input", default="data/ingest/turns.parquet", help="Canonical dataset written by ingest.")
    p.add_argument("--out", default="data/validate/turns.parquet", help="Validated (accepted) records.")
    p.add_argument("--quarantine", default="data/validate/quarantine.parquet", help="Quarantined records with reasons.")
    p.add_argument("--docs", default="data/validate/data_docs", help="Folder for the GX Data Docs (HTML).")
    p.add_argument("--summary", default="metrics/validate.json", help="Metrics JSON (DVC metrics).")
    p.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        raise SystemExit(f"validate: error: {exc}") from exc
    try:
        table = pq.read_table(args.input)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SystemExit(f"validate: error: {args.input}: rule 'parquet_readable' violated: {exc}") from exc
    t0 = time.perf_counter()
    with step_run(STEP, params.validation.model_dump(), enabled=not args.no_mlflow) as run:
        with staged_dir(args.docs) as docs_tmp:
            result = validate(table, params.validation, docs_tmp, progress=not args.no_progress)
        summary = summarise(result)
        if result["quarantined"] is not None:
            q = result["quarantined"].to_arrow().cast(QUARANTINE_SCHEMA)
            write_parquet(q, args.quarantine)
        if summary["success"]:
            write_parquet(result["accepted"].to_arrow().cast(LOG_SCHEMA), args.out)
        else:
            remove_stale(args.out)
        if run is not None:
            import mlflow

            mlflow.log_metrics(flat_metrics({k: v for k, v in summary.items() if k not in ("expectations", "failures")}))
            mlflow.log_artifacts(args.docs, artifact_path="data_docs")
    write_json(args.summary, summary)
    seconds = time.perf_counter() - t0
    counts = (f"{summary['received_rows']} received = {summary['accepted_rows']} accepted + "
              f"{summary['quarantined_rows']} quarantined ({summary['quarantined_conversations']} conversations)")
    if not summary["success"]:
        lines = "\n  - ".join(summary["failures"])
        raise SystemExit(
            f"validate: FAILED (fail closed) on {args.input}: {counts}; {len(summary['failures'])} expectation(s) failed:\n"
            f"  - {lines}\nNo validated dataset was written. Data Docs: {args.docs}/index.html; quarantine: {args.quarantine}"
        )
    print(f"validate: passed: {counts} -> {args.out}; Data Docs {args.docs}/index.html ({seconds:.1f}s)", file=sys.stdout)
    return summary


if __name__ == "__main__":
    main()
