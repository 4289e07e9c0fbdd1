"""Several cross-fitted ``bench_fit_q.py`` runs on the same rows, averaged: does an ensemble of Qs beat the baselines
by more than one Q does?

    .venv/bin/python benchmarks/ensemble_bench_fit_q_rows.py \
        benchmarks/results/bench_fit_q_crossfit/dnd_cv3_lr_1e-3.rows.parquet \
        benchmarks/results/bench_fit_q_crossfit/dnd_cv3_lr_1e-3_gamma_0.99.rows.parquet \
        benchmarks/results/bench_fit_q_gpu/dnd_cv3_gpu.rows.parquet \
        benchmarks/results/bench_fit_q_gpu/dnd_cv5_gpu.rows.parquet

Every run must have scored every row held out (``--folds``), so the average of their Qs is itself a held-out
score: no model saw the row it scores. The runs' scores are averaged as ranks (each run's scores turned into
fractional ranks over the rows), because runs with another ``--gamma`` or loss regress on targets of another
scale and AUC only reads the order. The baselines are rank-averaged the same way; runs with the same folds and
seed trained the same baseline models, so that average weighs the distinct ones by how many runs share them.
The rows are aligned by conversation and turn; runs that scored different row sets, or files holding several
data sets (``--tasks dnd,world``), are refused (exit 2). CIs resample whole conversations (the dialogue, on
Deal-or-No-Deal), paired on the same rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fit_q import auc, paired_auc_diff_ci  # noqa: E402
from compare_bench_fit_q_rows import KEYS, _aligned  # noqa: E402

BASELINES = ("tfidf_lr", "turn_rate")


def ensemble(paths: list[str], n_boot: int = 1000) -> dict[str, Any]:
    import numpy as np
    import polars as pl

    if len(paths) < 2:
        raise ValueError("an ensemble needs at least two runs")
    frames = [_aligned(pl.read_parquet(p), p) for p in paths]
    for frame, path in zip(frames, paths):
        if frame["task"].n_unique() > 1:
            raise ValueError(f"{path}: rows of several data sets ({', '.join(sorted(frame['task'].unique()))}): "
                             "write one task per file")
    ref = frames[0]
    for frame, path in zip(frames[1:], paths[1:]):
        if frame.height != ref.height or not frame.select(KEYS).equals(ref.select(KEYS)):
            raise ValueError(f"{path} does not score the rows of {paths[0]} ({frame.height} rows against "
                             f"{ref.height}; compared on {', '.join(KEYS)}): no ensemble")
    for frame, path in zip(frames, paths):
        if "fold" not in frame.columns or frame["fold"].null_count():
            raise ValueError(f"{path}: not cross-fitted (a row without a fold): its Q may have trained on rows "
                             "another run holds out, so the mean would not be a held-out score")
    from scipy.stats import rankdata

    y, clusters = ref["outcome"].to_numpy(), ref["cluster"].to_numpy()
    qs = np.stack([f["q"].to_numpy() for f in frames])
    q_mean = rankdata(qs, axis=1).mean(axis=0)
    baselines = {b: rankdata(np.stack([f[b].to_numpy() for f in frames]), axis=1).mean(axis=0) for b in BASELINES}
    best_name = max(BASELINES, key=lambda b: auc(y, baselines[b]))
    best_single = int(np.argmax([auc(y, q) for q in qs]))
    ci_base = paired_auc_diff_ci(y, q_mean, baselines[best_name], clusters, n_boot=n_boot)
    ci_single = paired_auc_diff_ci(y, q_mean, qs[best_single], clusters, n_boot=n_boot)
    runs = [{"path": p, "auc_q": auc(y, q), "auc_tfidf_lr": auc(y, f["tfidf_lr"].to_numpy()),
             "auc_turn_rate": auc(y, f["turn_rate"].to_numpy()),
             "folds": int(f["fold"].n_unique())} for p, f, q in zip(paths, frames, qs)]
    return {
        "rows": ref.height, "clusters": int(len(set(clusters.tolist()))), "runs": runs,
        "auc_q_ensemble": auc(y, q_mean),
        "auc_baselines_ensemble": {b: auc(y, s) for b, s in baselines.items()},
        "best_baseline": best_name,
        "q_ensemble_minus_best_baseline": auc(y, q_mean) - auc(y, baselines[best_name]),
        "q_ensemble_minus_best_baseline_ci95": list(ci_base),
        "best_single_q": paths[best_single],
        "q_ensemble_minus_best_single_q": auc(y, q_mean) - auc(y, qs[best_single]),
        "q_ensemble_minus_best_single_q_ci95": list(ci_single),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="<out>.rows.parquet of two or more cross-fitted runs")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    try:
        result = ensemble(args.runs, args.n_boot)
    except ValueError as err:
        ap.error(str(err))  # exit 2
    table = Table(title=f"ROC-AUC on {result['rows']} held-out rows ({result['clusters']} conversations)")
    for col in ("run", "folds", "Q", "TF-IDF + LR", "turn rate", "Q - best baseline"):
        table.add_column(col, justify="right")
    for r in result["runs"]:
        table.add_row(Path(r["path"]).name, str(r["folds"]), f"{r['auc_q']:.3f}", f"{r['auc_tfidf_lr']:.3f}",
                      f"{r['auc_turn_rate']:.3f}", f"{r['auc_q'] - max(r['auc_tfidf_lr'], r['auc_turn_rate']):+.3f}")
    base = result["auc_baselines_ensemble"]
    lo, hi = result["q_ensemble_minus_best_baseline_ci95"]
    table.add_row(f"rank mean of {len(result['runs'])}", "", f"{result['auc_q_ensemble']:.3f}",
                  f"{base['tfidf_lr']:.3f}", f"{base['turn_rate']:.3f}",
                  f"{result['q_ensemble_minus_best_baseline']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    Console(width=160).print(table)
    lo, hi = result["q_ensemble_minus_best_single_q_ci95"]
    print(f"ensemble - best single Q ({Path(result['best_single_q']).name}): "
          f"{result['q_ensemble_minus_best_single_q']:+.3f} [{lo:+.3f}, {hi:+.3f}], conversations resampled")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
