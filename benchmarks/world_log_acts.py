"""Which of a policy's actions go with conversions? The world's own dialogue acts, read off conversation logs.

    .venv/bin/python benchmarks/world_log_acts.py benchmarks/results/bench_fit_q_world_logs_gpu/explore_logs_2048 \
        --out benchmarks/results/bench_fit_q_world_logs_gpu/explore_2048_acts.json

A companion to ``probe_q_features.py``: when neither Q nor the text baselines rank the outcome, does the logged
policy's behaviour vary in ways the world rewards at all? Each suggestion (the action Q scores) and each message
the business sent is labelled with the world featuriser's dialogue act (MiniLM against the vertical's prototypes,
as the simulated customer reads it). Printed and saved, per act of the suggestion: its share of the actions, the
conversion rate of the conversations those rows belong to (row-weighted: a conversation counts once per such
row), how often the business sent it verbatim (``relation``), and the ROC-AUC of "this row's suggestion is act X" for the final outcome (how far one act alone ranks outcomes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def label_acts(texts: list[str | None], featurizer: Any) -> dict[str, str]:
    """The world featuriser's dialogue act of each distinct text (labelled once; None, an abstention, is skipped)."""
    distinct = [t for t in dict.fromkeys(texts) if t is not None]
    return dict(zip(distinct, (f.act for f in featurizer(distinct))))


def act_table(logs: Any, featurizer: Any) -> tuple[Any, dict[str, Any]]:
    """Per suggestion act: rows, share, conversion of their conversations, sent as suggested, one-act AUC."""
    import polars as pl
    from sklearn.metrics import roc_auc_score

    outcome = logs.group_by("conversation_id").agg(pl.col("outcome").max().alias("converted"))
    rows = logs.filter(pl.col("suggestion").is_not_null()).join(outcome, on="conversation_id")
    acts = label_acts(rows["suggestion"].to_list() + rows["business_message"].to_list(), featurizer)
    rows = rows.with_columns(pl.Series("suggestion_act", [acts[t] for t in rows["suggestion"].to_list()]),
                             pl.Series("sent_act", [acts.get(m) for m in rows["business_message"].to_list()]))
    y = rows["converted"].to_numpy()
    table = (rows.group_by("suggestion_act")
             .agg(pl.len().alias("rows"), pl.col("converted").mean().alias("conversion_of_their_conversations"),
                  (pl.col("relation") == "verbatim").mean().alias("sent_verbatim"))
             .with_columns((pl.col("rows") / rows.height).alias("share"))
             .sort("conversion_of_their_conversations", descending=True))
    one_act_auc = {a: float(roc_auc_score(y, (rows["suggestion_act"] == a).to_numpy())) if 0 < y.sum() < len(y) else None
                   for a in table["suggestion_act"].to_list()}
    table = table.with_columns(pl.Series("one_act_auc", [one_act_auc[a] for a in table["suggestion_act"].to_list()]))
    info = {"conversations": outcome.height, "conversions": int(outcome["converted"].sum()), "rows": rows.height,
            "sent_by_relation": {r: n for r, n in rows.group_by("relation").len().iter_rows()},
            # Who wrote what was sent: per act of the sent message, how many were the suggestion as is, edited, or
            # the business's own after a rejection.
            "sent_act_by_relation": {a: dict(sorted(zip(g["relation"].to_list(), g["len"].to_list())))
                                     for (a,), g in rows.filter(pl.col("sent_act").is_not_null())
                                     .group_by("sent_act", "relation").len().group_by("sent_act")}}
    return table, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", help="conversation logs under the contract (a folder collect wrote)")
    ap.add_argument("--params", default="params.yaml", help="params.yaml whose world (vertical) labels the acts")
    ap.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = ap.parse_args()

    import polars as pl
    from rich.console import Console
    from rich.table import Table

    from bench_fit_q import read_world_logs
    from pipeline_steps.common.config import load_params
    from pipeline_steps.world.featurizer import Featurizer
    from pipeline_steps.world.simulator import load_vertical

    params = load_params(args.params)
    table, info = act_table(pl.from_arrow(read_world_logs(args.logs)), Featurizer(load_vertical(params.world.vertical)))

    t = Table(title=f"Suggestion acts in {args.logs} ({info['conversations']} conversations, {info['conversions']} "
                    f"converted, {info['rows']} suggestions)")
    for col in ("suggestion act", "share", "conversion of their conversations", "sent verbatim", "one-act AUC"):
        t.add_column(col, justify="right")
    for r in table.iter_rows(named=True):
        auc = "-" if r["one_act_auc"] is None else f"{r['one_act_auc']:.3f}"
        t.add_row(r["suggestion_act"], f"{r['share']:.1%}", f"{r['conversion_of_their_conversations']:.3f}",
                  f"{r['sent_verbatim']:.1%}", auc)
    Console(width=140).print(t)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"logs": args.logs, **info, "acts": table.to_dicts()}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
