"""Pools ``bench_fit_q.py`` runs that held out *disjoint* rows into one held-out set: the folds of a cross-fit run
as separate commands, e.g. the Deal-or-No-Deal corpus's two files, each scored by a Q trained on the other.

    IPPO_DND_FILE=data/dealornodeal/test.txt .venv/bin/python benchmarks/bench_fit_q.py ... \
        --dnd-extra-train ../shared/data/dealornodeal/val.txt --dnd-hold-out-all \
        --out B.json                                     # train on val.txt, score every test.txt row
    .venv/bin/python benchmarks/pool_bench_fit_q_rows.py A.rows.parquet B.rows.parquet   # A: the reverse

Each run's rows must all be held out (a fold on every row), and no row, nor any conversation (the dialogue, on
Deal-or-No-Deal), may be held out by two runs: otherwise it would count twice. The pooled margin of Q over the
best baseline gets the same statistics as one run's (``bench_fit_q.quality``): its CI resamples whole
conversations of every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fit_q import auc, quality  # noqa: E402
from compare_bench_fit_q_rows import ROW_ID  # noqa: E402
from ensemble_bench_fit_q_rows import BASELINES  # noqa: E402


def pool(paths: list[str]) -> dict[str, Any]:
    import numpy as np
    import polars as pl

    if len(paths) < 2:
        raise ValueError("pooling needs at least two runs")
    frames = []
    for k, path in enumerate(paths):
        frame = pl.read_parquet(path)
        if frame["task"].n_unique() > 1:
            raise ValueError(f"{path}: rows of several data sets ({', '.join(sorted(frame['task'].unique()))}): "
                             "write one task per file")
        if "fold" not in frame.columns or frame["fold"].null_count():
            raise ValueError(f"{path}: a row without a fold: not every row was held out by a model that did not "
                             "train on it (use --folds or --dnd-hold-out-all)")
        frames.append(frame.with_columns(pl.lit(k).alias("run")))
    both = pl.concat(frames, how="diagonal_relaxed")
    if both.select(ROW_ID).is_duplicated().any():
        raise ValueError("a (conversation_id, turn_index) is held out by two runs: pool disjoint runs only")
    shared = both.group_by("cluster").agg(pl.col("run").n_unique()).filter(pl.col("run") > 1)
    if shared.height:
        raise ValueError(f"{shared.height} conversations (clusters) are held out by two runs, e.g. "
                         f"{shared['cluster'][0]}: pool disjoint runs only")
    y, g, clusters = both["outcome"].to_numpy(), both["G"].to_numpy(), both["cluster"].to_numpy()
    pooled = quality(y, g, both["q"].to_numpy(), {b: both[b].to_numpy() for b in BASELINES}, 0, clusters)
    runs = []
    for path, frame in zip(paths, frames):
        yk = frame["outcome"].to_numpy()
        runs.append({"path": path, "task": frame["task"][0], "rows": frame.height,
                     "clusters": frame["cluster"].n_unique(), "outcome_rate": float(yk.mean()),
                     "auc_q": auc(yk, frame["q"].to_numpy()),
                     **{f"auc_{b}": auc(yk, frame[b].to_numpy()) for b in BASELINES}})
    return {"rows": both.height, "runs": runs, "pooled": pooled,
            "rows_per_run": [int(n) for n in np.bincount(both["run"].to_numpy())]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="<out>.rows.parquet of two or more runs that held out disjoint rows")
    ap.add_argument("--out", default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    try:
        result = pool(args.runs)
    except ValueError as err:
        ap.error(str(err))  # exit 2
    pooled = result["pooled"]
    table = Table(title=f"ROC-AUC of the final outcome, {result['rows']} held-out rows pooled "
                        f"({pooled['clusters']} conversations)")
    for col in ("run", "rows / conversations", "outcome rate", "Q", "TF-IDF + LR", "turn rate", "Q - best baseline"):
        table.add_column(col, justify="right")
    for r in result["runs"]:
        table.add_row(f"{Path(r['path']).name} ({r['task']})", f"{r['rows']} / {r['clusters']}",
                      f"{r['outcome_rate']:.2f}", f"{r['auc_q']:.3f}", f"{r['auc_tfidf_lr']:.3f}",
                      f"{r['auc_turn_rate']:.3f}", f"{r['auc_q'] - max(r['auc_tfidf_lr'], r['auc_turn_rate']):+.3f}")
    lo, hi = pooled["auc_margin_ci95"]
    table.add_row("pooled", f"{result['rows']} / {pooled['clusters']}", f"{pooled['outcome_rate']:.2f}",
                  f"{pooled['auc_q']:.3f}", f"{pooled['auc_tfidf_lr']:.3f}", f"{pooled['auc_turn_rate']:.3f}",
                  f"{pooled['auc_margin']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    Console(width=160).print(table)
    print(f"pooled: Spearman(Q, G) {pooled['spearman_q_g']:.2f}, MSE {pooled['mse_q_g']:.3f}, "
          f"p90 |Q - G| {pooled['q_error_p90']:.2f}; CI: conversations resampled")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result


if __name__ == "__main__":
    main()
