"""Two ``bench_fit_q.py`` runs on the same rows, paired: ROC-AUC of each run's Q per fold and pooled, and the
difference of the pooled AUCs with a 95% CI that resamples whole conversations (the dialogue, on Deal-or-No-Deal).

    .venv/bin/python benchmarks/compare_bench_fit_q_rows.py \
        benchmarks/results/bench_fit_q_crossfit/dnd_cv3_lr_1e-3.rows.parquet \
        benchmarks/results/bench_fit_q_crossfit/dnd_cv3_lr_1e-3_gamma_0.99.rows.parquet

Two runs with the same folds, seed and row sample score the same rows, so comparing their Qs row for row
removes the validation sample's own variation, which two separate CIs would count twice. Runs that did not
score the same rows in the same order are refused (exit 2): pairing them would be meaningless. ``--align``
pairs runs that scored the same rows in another order (another ``--folds``, another precision): both are sorted
by conversation and turn, the row sets must be equal, and per-fold rows are shown only where the folds agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fit_q import auc, paired_auc_diff_ci  # noqa: E402

KEYS = ("task", "conversation_id", "turn_index", "cluster", "outcome")
ROW_ID = ("conversation_id", "turn_index")


def _aligned(frame: Any, path: str) -> Any:
    """The rows sorted by conversation and turn, the task reduced to its data set (``dnd_fp32_cv5`` -> ``dnd``)."""
    import polars as pl

    if frame.select(ROW_ID).is_duplicated().any():
        raise ValueError(f"{path}: a (conversation_id, turn_index) occurs twice: rows cannot be aligned")
    return frame.with_columns(pl.col("task").str.split("_").list.first()).sort(list(ROW_ID))


def compare(path_a: str, path_b: str, n_boot: int = 1000, align: bool = False, task_a: str | None = None,
            task_b: str | None = None) -> dict[str, Any]:
    import polars as pl

    a, b = pl.read_parquet(path_a), pl.read_parquet(path_b)
    for frame, task, path in ((a, task_a, path_a), (b, task_b, path_b)):
        if task is not None and task not in frame["task"].unique().to_list():
            raise ValueError(f"{path}: no task {task!r} (has {', '.join(sorted(frame['task'].unique().to_list()))})")
    a = a if task_a is None else a.filter(pl.col("task") == task_a)
    b = b if task_b is None else b.filter(pl.col("task") == task_b)
    if align:
        a, b = _aligned(a, path_a), _aligned(b, path_b)
    if a.height != b.height or not a.select(KEYS).equals(b.select(KEYS)):
        raise ValueError(f"{path_b} does not score the rows of {path_a} in the same order "
                         f"({b.height} rows against {a.height}; compared on {', '.join(KEYS)}): not paired")
    y, clusters = a["outcome"].to_numpy(), a["cluster"].to_numpy()
    qa, qb = a["q"].to_numpy(), b["q"].to_numpy()
    # per fold only where both runs have the same folds (a single-split run's rows have none, or no column)
    same_folds = "fold" in a.columns and "fold" in b.columns and a["fold"].equals(b["fold"])
    folds = [] if not same_folds or a["fold"].null_count() == a.height else sorted(set(a["fold"].drop_nulls().to_list()))
    per_fold = []
    for f in folds:
        m = (a["fold"] == f).to_numpy()
        per_fold.append({"fold": f, "rows": int(m.sum()), "auc_a": auc(y[m], qa[m]), "auc_b": auc(y[m], qb[m])})
    lo, hi = paired_auc_diff_ci(y, qb, qa, clusters, n_boot=n_boot)
    auc_a, auc_b = auc(y, qa), auc(y, qb)
    return {"a": str(path_a), "b": str(path_b), "task_a": task_a, "task_b": task_b, "rows": a.height,
            "clusters": int(len(set(clusters.tolist()))), "aligned": align, "folds": per_fold, "auc_a": auc_a,
            "auc_b": auc_b, "auc_diff": auc_b - auc_a, "auc_diff_ci95": [lo, hi]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="<out>.rows.parquet of the reference run")
    ap.add_argument("b", help="<out>.rows.parquet of the run compared with it")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--align", action="store_true",
                    help="pair runs that scored the same rows in another order (e.g. another --folds)")
    ap.add_argument("--task-a", default=None, help="only this task's rows of a (a file with several runs)")
    ap.add_argument("--task-b", default=None, help="only this task's rows of b")
    ap.add_argument("--out", default=None, help="also write the comparison as JSON")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    try:
        result = compare(args.a, args.b, args.n_boot, align=args.align, task_a=args.task_a, task_b=args.task_b)
    except ValueError as err:
        ap.error(str(err))  # exit 2
    table = Table(title="ROC-AUC of Q, run b against run a, paired on the same rows")
    for col in ("held out", "rows", "a", "b", "b - a"):
        table.add_column(col, justify="right")
    for f in result["folds"]:
        table.add_row(f"fold {f['fold']}", str(f["rows"]), f"{f['auc_a']:.3f}", f"{f['auc_b']:.3f}",
                      f"{f['auc_b'] - f['auc_a']:+.3f}")
    lo, hi = result["auc_diff_ci95"]
    table.add_row("pooled", str(result["rows"]), f"{result['auc_a']:.3f}", f"{result['auc_b']:.3f}",
                  f"{result['auc_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({result['clusters']} conversations resampled)")
    Console(width=160).print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
