"""returns: Monte-Carlo returns per logged action, the regression targets of the Q-fit (paper Observation 2).

    python -m pipeline_steps.returns --params params.yaml --input data/validate/turns.parquet \\
        --out data/returns/returns.parquet --summary metrics/returns.json

For every non-terminal turn ``i`` (a state where an action was taken) one row:

* ``state_text``: the exact prompt the policy saw for ``s_i`` (:func:`contract.render_state` with the base
  model's tokenizer, ``prompt.max_prompt_tokens`` and the world vertical's system prompt);
* ``action_text``: the suggestion ``a_i``; abstain turns keep the row with ``action_text`` = ``[ABSTAIN]``
  (``returns.abstain: keep``, so Q learns the value of abstaining) or are dropped (``drop``);
* ``G`` = ``sum_j gamma^j r_{i+j+1}`` with ``r_k = R(s_k) = o_k``. Validated logs carry an outcome only on
  the last record ``T``, so ``G_i = gamma^(T-i-1)`` when the conversation converts and 0 otherwise,
  computed with column expressions over the whole table (no per-row Python loop);
* ``outcome`` (the conversation's final outcome), ``conversation_id``, ``turn_index``, ``relation``,
  ``prompt_version`` and ``split`` (train/validation by a salted SHA-256 of the conversation id, so
  every turn of a conversation lands on the same side: no leakage).

The file's Parquet metadata records the base model, a tokenizer fingerprint, the prompt version and
budget, the system prompt hash and gamma; :func:`check_compatible` lets later steps refuse a file
rendered for another tokenizer or prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from typing import Any, Callable, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_steps.common.config import ConfigError, Params, load_params
from pipeline_steps.common.contract import ABSTAIN_MARKER, CONTRACT_VERSION, LOG_SCHEMA, HistoryTurn, render_state, state_messages
from pipeline_steps.common.parquet_io import write_parquet
from pipeline_steps.common.tracking import flat_metrics, step_run, write_json
from pipeline_steps.world.state_reader import prompt_notes

STEP = "returns"
RETURNS_FORMAT = "1"
RETURNS_SCHEMA = pa.schema(
    [
        pa.field("state_text", pa.string(), nullable=False),
        pa.field("action_text", pa.string(), nullable=False),
        pa.field("G", pa.float64(), nullable=False),
        pa.field("outcome", pa.int8(), nullable=False),
        pa.field("conversation_id", pa.string(), nullable=False),
        pa.field("turn_index", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("relation", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
    ]
)
# Metadata keys a consumer must match before training on the file.
COMPAT_KEYS = ("returns_format", "base_model", "tokenizer_sha256", "prompt_version", "state_notes", "max_prompt_tokens",
               "system_prompt_sha256")
# What a file written before a key existed was rendered with.
COMPAT_DEFAULTS = {"state_notes": "none"}


class ReturnsError(ValueError):
    """Input or metadata the step cannot use; the message names the record/file and the rule."""


# ------------------------------------------------------------------------------------------------
# G (vectorised) and the split
# ------------------------------------------------------------------------------------------------


def discounted_returns(turns: pl.DataFrame, gamma: float) -> pl.DataFrame:
    """Add ``G`` and ``final_outcome`` to every record: column expressions over the whole table, no Python loop.

    ``G_i = sum_j gamma^j o_{i+j+1}``; with the outcome only on the last record ``T`` (a validated log)
    that is ``gamma^(T-i-1) * o_T``. ``turns`` must be sorted by conversation and turn, so a conversation is
    a run of rows and ``T``/``o_T`` are back-filled from its last row (cheaper than a hash group-by). The
    preconditions are checked, so unvalidated input fails loudly instead of producing wrong targets.
    """
    conv, turn, outcome = pl.col("conversation_id"), pl.col("turn_index"), pl.col("outcome")
    df = turns.with_columns(
        _first=(conv != conv.shift(1)).fill_null(True),
        _final=(conv != conv.shift(-1)).fill_null(True),
    )
    contiguous = pl.when("_first").then(turn == 1).otherwise(turn == turn.shift(1) + 1)
    bad = df.filter(~contiguous.fill_null(False) | ((outcome == 1) & ~pl.col("_final")) | ~outcome.is_in([0, 1]).fill_null(False))
    if bad.height:
        r = bad.row(0, named=True)
        raise ReturnsError(
            f"conversation {r['conversation_id']} turn {r['turn_index']}: rule 'validated_input' violated: records "
            "must be sorted by conversation and turn with turn indices 1, 2, ..., and outcomes 0/1 only on the last "
            "record (run the validate step first)"
        )
    df = df.with_columns(
        _last=pl.when("_final").then(turn).backward_fill(),
        final_outcome=pl.when("_final").then(outcome).backward_fill().cast(pl.Int8),
    )
    exponent = (pl.col("_last") - turn - 1).cast(pl.Float64)
    return df.with_columns(
        G=pl.when(pl.col("final_outcome") == 1).then(pl.lit(gamma, pl.Float64).pow(exponent)).otherwise(pl.lit(0.0))
    ).drop("_first", "_final", "_last")


def split_of(conversation_id: str, validation_fraction: float, seed: str) -> str:
    """'validation' or 'train', from a salted SHA-256 of the id: stable across runs, machines and versions."""
    digest = hashlib.sha256(f"{seed}:{conversation_id}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"


def assign_splits(ids: pl.Series, validation_fraction: float, seed: str) -> pl.Series:
    """The split of every row, hashing each run of equal ids once (rows come grouped by conversation)."""
    runs = ids.rle()
    values = runs.struct.field("value").to_list()
    is_val = np.fromiter((split_of(v, validation_fraction, seed) == "validation" for v in values), bool, len(values))
    per_row = pl.Series(np.repeat(is_val, runs.struct.field("len").to_numpy()))
    return pl.select(pl.when(per_row).then(pl.lit("validation")).otherwise(pl.lit("train")).alias("split")).to_series()


def action_rows(turns: pl.DataFrame, gamma: float, abstain: str) -> pl.DataFrame:
    """The non-terminal records (an action was taken) with G, final outcome and ``action_text``."""
    df = discounted_returns(turns, gamma).with_row_index("_record")
    acted = df.filter((pl.col("outcome") == 0) & pl.col("customer_message").is_not_null())
    if abstain == "drop":
        acted = acted.filter(pl.col("suggestion").is_not_null())
    return acted.with_columns(action_text=pl.col("suggestion").fill_null(ABSTAIN_MARKER))


# ------------------------------------------------------------------------------------------------
# State rendering
# ------------------------------------------------------------------------------------------------


def render_states(
    turns: pl.DataFrame,
    record_indices: Sequence[int],
    tokenizer: Any,
    system_prompt: str,
    max_prompt_tokens: int,
    batch_size: int = 256,
    progress: bool = False,
    notes: Callable[[Sequence[HistoryTurn]], str] | None = None,
) -> list[str]:
    """``render_state`` of the state at each record index (``turns`` sorted by conversation, turn).

    Identical output to calling :func:`render_state` per state, faster: the chat template is applied once
    per state and token counts come from one batched tokenizer call; only states over the token budget
    (where ``render_state`` would truncate) go through ``render_state`` itself.
    """
    from tqdm.auto import tqdm

    cols = turns.select("conversation_id", "customer_message", "suggestion", "business_message", "relation").to_dict(as_series=False)
    ids = cols["conversation_id"]
    wanted = sorted(record_indices)
    # The first record of each wanted record's conversation, so each history is a slice of the log.
    starts: list[int] = []
    start = 0
    for i in range(len(ids)):
        if i and ids[i] != ids[i - 1]:
            start = i
        starts.append(start)
    history = [
        HistoryTurn(c if c is not None else "", s, m, r)
        for c, s, m, r in zip(cols["customer_message"], cols["suggestion"], cols["business_message"], cols["relation"])
    ]
    out: dict[int, str] = {}
    bar = tqdm(total=len(wanted), desc="returns: render states", unit="state", disable=not progress)
    for b in range(0, len(wanted), batch_size):
        chunk = wanted[b : b + batch_size]
        hists = [history[starts[i] : i + 1] for i in chunk]
        lines = [notes(h) if notes is not None else None for h in hists]
        texts = [
            tokenizer.apply_chat_template(state_messages(h, system_prompt, line), tokenize=False, add_generation_prompt=True)
            for h, line in zip(hists, lines)
        ]
        lengths = [len(ids_) for ids_ in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for i, h, line, text, n in zip(chunk, hists, lines, texts, lengths):
            out[i] = text if n <= max_prompt_tokens else render_state(h, tokenizer, system_prompt, max_prompt_tokens, line)
        bar.update(len(chunk))
    bar.close()
    return [out[i] for i in record_indices]


# ------------------------------------------------------------------------------------------------
# Metadata: what the rows were rendered with
# ------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's full definition and chat template (same text in, same tokens out)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256((body + "\x00" + str(template)).encode()).hexdigest()


def returns_metadata(params: Params, tokenizer: Any, system_prompt: str) -> dict[str, str]:
    return {
        "returns_format": RETURNS_FORMAT,
        "contract_version": CONTRACT_VERSION,
        "base_model": params.base_model.name_or_path,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "prompt_version": params.prompt.version,
        "state_notes": params.prompt.state_notes,
        "max_prompt_tokens": str(params.prompt.max_prompt_tokens),
        "system_prompt_sha256": hashlib.sha256(system_prompt.encode()).hexdigest(),
        "gamma": repr(params.returns.gamma),
        "abstain": params.returns.abstain,
        "validation_fraction": repr(params.returns.validation_fraction),
        "split_seed": params.returns.split_seed,
    }


def read_metadata(path: str) -> dict[str, str]:
    """The returns metadata of a file written by this step."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k != b"ARROW:schema"}


def compat_diffs(found: dict[str, str], expected: dict[str, str], expected_from: str = "expected") -> list[str]:
    """Each ``COMPAT_KEYS`` value the file's metadata ``found`` has other than ``expected`` (a key a file predates
    reads as its ``COMPAT_DEFAULTS`` value)."""
    def value(meta: dict[str, str], k: str) -> str | None:
        return meta.get(k, COMPAT_DEFAULTS.get(k))

    return [f"{k}: file has {value(found, k)!r}, {expected_from} {value(expected, k)!r}" for k in COMPAT_KEYS
            if value(found, k) != value(expected, k)]


def check_compatible(found: dict[str, str], expected: dict[str, str], where: str) -> None:
    """Refuse a returns file rendered with another tokenizer, prompt or format (later steps call this)."""
    diffs = compat_diffs(found, expected)
    if diffs:
        raise ReturnsError(f"{where}: rule 'returns_compatible' violated: " + "; ".join(diffs))


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


def build_returns(
    turns: pl.DataFrame, params: Params, tokenizer: Any, system_prompt: str, progress: bool = False
) -> pa.Table:
    """All returns rows of a validated log (``turns`` in LOG_SCHEMA), sorted by conversation and turn."""
    turns = turns.sort(["conversation_id", "turn_index"], maintain_order=True)
    rows = action_rows(turns, params.returns.gamma, params.returns.abstain)
    states = render_states(
        turns, rows.get_column("_record").to_list(), tokenizer, system_prompt, params.prompt.max_prompt_tokens,
        progress=progress, notes=prompt_notes(params),
    )
    out = rows.select(
        pl.Series("state_text", states, dtype=pl.String),
        "action_text",
        "G",
        pl.col("final_outcome").alias("outcome"),
        "conversation_id",
        "turn_index",
        assign_splits(rows.get_column("conversation_id"), params.returns.validation_fraction, params.returns.split_seed),
        "relation",
        pl.lit(params.prompt.version, pl.String).alias("prompt_version"),
    )
    return returns_table(out, params, tokenizer, system_prompt)


def returns_table(rows: pl.DataFrame, params: Params, tokenizer: Any, system_prompt: str) -> pa.Table:
    """``rows`` (the RETURNS_SCHEMA columns, any others dropped) as the step writes them: that schema and the
    metadata later steps check (:func:`check_compatible`)."""
    rows = rows.select(RETURNS_SCHEMA.names)
    table = rows.to_arrow().cast(RETURNS_SCHEMA) if rows.height else RETURNS_SCHEMA.empty_table()
    return table.replace_schema_metadata(returns_metadata(params, tokenizer, system_prompt))


def summarise(table: pa.Table) -> dict[str, Any]:
    df = pl.from_arrow(table)
    split_counts = df.group_by("split").len().sort("split").rows() if df.height else []
    return dict(
        rows=df.height,
        conversations=df.get_column("conversation_id").n_unique() if df.height else 0,
        rows_by_split={k: int(v) for k, v in split_counts},
        abstain_rows=int((df.get_column("action_text") == ABSTAIN_MARKER).sum()) if df.height else 0,
        mean_G=float(df.get_column("G").mean()) if df.height else 0.0,
        positive_G_share=float((df.get_column("G") > 0).mean()) if df.height else 0.0,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline_steps.returns", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml", help="params.yaml to read (sections returns, prompt, base_model, world).")
    p.add_argument("--input", default="data/validate/turns.parquet", help="Validated records (validate step output).")
    p.add_argument("--out", default="data/returns/returns.parquet", help="Returns rows to write.")
    p.add_argument("--summary", default="metrics/returns.json", help="Metrics JSON (DVC metrics).")
    p.add_argument("--base-model", help="Override base_model.name_or_path (whose tokenizer renders the states).")
    p.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    overrides = {"base_model.name_or_path": args.base_model} if args.base_model else None
    try:
        params = load_params(args.params, overrides)
    except ConfigError as exc:
        raise SystemExit(f"returns: error: {exc}") from exc
    try:
        table = pq.read_table(args.input)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SystemExit(f"returns: error: {args.input}: rule 'parquet_readable' violated: {exc}") from exc
    missing = [f.name for f in LOG_SCHEMA if f.name not in table.column_names]
    if missing:
        raise SystemExit(f"returns: error: {args.input}: rule 'schema' violated: missing columns {missing}")

    from pipeline_steps.common.base_model import BaseModelError, load_tokenizer, resolve_base_model
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.world.simulator import load_vertical

    t0 = time.perf_counter()
    try:
        tokenizer = load_tokenizer(resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir))
        system_prompt = system_prompt_for(load_vertical(params.world.vertical))
        result = build_returns(pl.from_arrow(table), params, tokenizer, system_prompt, progress=not args.no_progress)
    except (ReturnsError, BaseModelError, ConfigError) as exc:
        raise SystemExit(f"returns: error: {exc}") from exc
    summary = summarise(result)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    with step_run(STEP, params.returns.model_dump(), enabled=not args.no_mlflow) as run:
        write_parquet(result, args.out)
        if run is not None:
            import mlflow

            mlflow.log_metrics(flat_metrics(summary))
    write_json(args.summary, {k: v for k, v in summary.items() if k != "seconds"})
    print(
        f"returns: {summary['rows']} rows from {summary['conversations']} conversations "
        f"({summary['rows_by_split']}), mean G {summary['mean_G']:.3f} -> {args.out} ({summary['seconds']:.1f}s)"
    )
    return summary


if __name__ == "__main__":
    main()
