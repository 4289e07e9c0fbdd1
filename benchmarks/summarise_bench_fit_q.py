"""Across-seed summary of ``bench_fit_q.py`` runs: one row per run, then the mean margin with a t interval.

    .venv/bin/python benchmarks/summarise_bench_fit_q.py benchmarks/results/bench_fit_q_seeds/*.json \
        --out benchmarks/results/bench_fit_q_seeds/summary.json

One run's bootstrap CI covers the validation sample only; a second seed also redraws the LoRA init, the
train order and the validation sample, and moved the margin by more than that CI's half-width would suggest.
So the claim "Q beats the best baseline by >= 0.05" is judged on the mean over seeds, with a Student-t 95%
interval over the per-seed margins (scipy), beside the count of seeds that reach the target. The seeds share
one validation split (each scores its own sample of it), so that interval measures training and sampling
variation; the uncertainty of a finite validation set is each run's own (conversation-bootstrap) CI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGET = 0.05


def load_runs(paths: list[str], task_prefix: str) -> list[dict[str, Any]]:
    """One record per (file, task) whose task name starts with ``task_prefix``; a clear error otherwise."""
    rows = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        tasks = {k: v for k, v in result.get("tasks", {}).items() if k.startswith(task_prefix)}
        if not tasks:
            raise SystemExit(f"{path}: no task named {task_prefix}* (tasks: {sorted(result.get('tasks', {}))})")
        for name, t in tasks.items():
            run = result["runs"][name]
            rows.append({
                "file": str(path), "task": name, "seed": result["args"]["seed"],
                "learning_rate": result["args"]["learning_rate"], "train_rows": run["train_rows"],
                "val_rows": run["val_rows"], "auc_q": t["auc_q"], "auc_tfidf_lr": t["auc_tfidf_lr"],
                "auc_turn_rate": t["auc_turn_rate"], "auc_margin": t["auc_margin"],
                "auc_margin_ci95": t["auc_margin_ci95"], "ci_by": "conversation" if "clusters" in t else "row",
                "auc_margin_unselected": t.get("auc_margin_unselected"), "kept": run["kept"], "seconds": result["seconds"],
            })
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and Student-t 95% interval of the per-seed margins (and of the unselected-row margins)."""
    import numpy as np
    from scipy import stats

    def t_interval(values: list[float]) -> dict[str, Any]:
        x = np.asarray(values, dtype=float)
        mean = float(x.mean())
        if len(x) < 2:
            return {"n": len(x), "mean": mean, "sd": None, "ci95": None}
        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=mean, scale=stats.sem(x))
        return {"n": len(x), "mean": mean, "sd": float(x.std(ddof=1)), "ci95": [float(lo), float(hi)]}

    margins = [r["auc_margin"] for r in rows]
    unselected = [r["auc_margin_unselected"] for r in rows if r["auc_margin_unselected"] is not None]
    return {
        "runs": len(rows), "target": TARGET,
        "auc_margin": t_interval(margins),
        "auc_margin_unselected": t_interval(unselected) if unselected else None,
        "auc_q": t_interval([r["auc_q"] for r in rows]),
        "runs_meeting_target": sum(m >= TARGET for m in margins),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="bench_fit_q.py JSON files (one per seed)")
    ap.add_argument("--task", default="dnd_", help="task-name prefix to summarise (dnd_, world_)")
    ap.add_argument("--out", help="write the summary JSON here")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    rows = sorted(load_runs(args.results, args.task), key=lambda r: (r["learning_rate"], r["seed"]))
    summary = summarise(rows)
    table = Table(title=f"bench_fit_q across seeds: AUC of the final outcome, Q against the best baseline (target +{TARGET})")
    for col in ("seed", "lr", "train/val rows", "AUC Q", "TF-IDF+LR", "turn-rate", "Q - best [95% CI]", "CI resamples",
                "unselected rows", "kept", "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        lo, hi = r["auc_margin_ci95"]
        uns = "-" if r["auc_margin_unselected"] is None else f"{r['auc_margin_unselected']:+.3f}"
        table.add_row(str(r["seed"]), f"{r['learning_rate']:g}", f"{r['train_rows']}/{r['val_rows']}", f"{r['auc_q']:.3f}",
                      f"{r['auc_tfidf_lr']:.3f}", f"{r['auc_turn_rate']:.3f}", f"{r['auc_margin']:+.3f} [{lo:+.3f}, {hi:+.3f}]",
                      r["ci_by"], uns, r["kept"], f"{r['seconds']:.0f}")
    console = Console(width=160)
    console.print(table)
    for key, label in (("auc_margin", "margin, every validation row"), ("auc_margin_unselected", "margin, unselected rows"),
                       ("auc_q", "AUC Q")):
        s = summary[key]
        if s is None:
            continue
        f = ".3f" if key == "auc_q" else "+.3f"
        ci = "n/a (one run)" if s["ci95"] is None else f"[{s['ci95'][0]:{f}}, {s['ci95'][1]:{f}}], sd {s['sd']:.3f}"
        console.print(f"{label}: mean {s['mean']:{f}} over {s['n']} runs, t 95% CI {ci}")
    console.print(f"runs with margin >= +{TARGET}: {summary['runs_meeting_target']} of {summary['runs']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "runs": rows}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
