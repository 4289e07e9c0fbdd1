"""The two baselines of ``bench_fit_q.py`` (TF-IDF + LR, outcome rate by turn) on two files of the Deal-or-No-Deal
corpus, trained within a file (cross-fitted by dialogue) against trained on the other file: does a baseline score
higher on dialogues collected with its training dialogues? Seconds on a CPU: no Q is trained.

    .venv/bin/python benchmarks/dnd_baselines_across_files.py ../shared/data/dealornodeal/val.txt data/dealornodeal/test.txt

For each file, every row is held out once: ``within`` (K folds by dialogue, the others of the same file train),
``other file`` (the whole other file trains), ``within + other file`` (both). Rows are built exactly as
``bench_fit_q.py`` builds them (ingest adapter, returns step, the same folds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fit_q as bench  # noqa: E402


def _baselines_only(train: Any, val: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``bench_fit_q.cross_fit``'s ``fit`` with no Q: the two baselines' scores of ``val``."""
    import numpy as np

    return np.zeros(val.height), {"tfidf_lr": bench.tfidf_baseline(train, val),
                                  "turn_rate": bench.turn_rate_baseline(train, val)}, {}


def baseline_aucs(train: Any, val: Any) -> dict[str, float]:
    y = val["outcome"].to_numpy()
    return {name: bench.auc(y, p) for name, p in _baselines_only(train, val)[1].items()}


def cross_fitted_aucs(df: Any, folds: int, extra: Any = None) -> dict[str, float]:
    """The baselines cross-fitted by ``bench_fit_q.cross_fit`` (same folds; ``extra`` rows join every fold's training)."""
    val, _, preds, _ = bench.cross_fit(df, folds, df.height, df.height, 0, 0, _baselines_only, extra)
    y = val["outcome"].to_numpy()
    return {name: bench.auc(y, p) for name, p in preds.items()}


def across_files(a: Any, b: Any, folds: int) -> dict[str, dict[str, dict[str, float]]]:
    return {name: {"within": cross_fitted_aucs(df, folds), "other file": baseline_aucs(other, df),
                   "within + other file": cross_fitted_aucs(df, folds, other)}
            for name, df, other in (("a", a, b), ("b", b, a))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file_a")
    ap.add_argument("file_b")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--folds", type=int, default=3, help="folds of the within-file cross-fit (bench_fit_q's --folds)")
    ap.add_argument("--base-model", default="smollm2-135m-instruct", help="its tokenizer renders the rows")
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--out", default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)
    if args.folds < 2:
        ap.error(f"--folds {args.folds}: at least 2")
    from rich.console import Console
    from rich.table import Table

    from pipeline_steps.common.base_model import load_tokenizer, resolve_base_model
    from pipeline_steps.common.config import load_params

    params = load_params(args.params, {"base_model.name_or_path": args.base_model,
                                         "prompt.max_prompt_tokens": args.max_prompt_tokens})
    tokenizer = load_tokenizer(resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir))
    frames, infos = [], []
    for path in (args.file_a, args.file_b):
        df, info = bench.dnd_returns(params, tokenizer, 0.0, path=path)
        frames.append(df)
        infos.append(info)
    shared = infos[0].pop("keys") & infos[1].pop("keys")
    if shared:
        ap.error(f"{len(shared)} dialogues are in both files: the 'other file' rows would not be held out")
    result = {"files": infos, "folds": args.folds, "held_out": across_files(*frames, args.folds)}
    table = Table(title="Baselines' held-out ROC-AUC of the deal, by where their training rows come from")
    for col in ("held out", "rows / dialogues", "trained on", "TF-IDF + LR", "turn rate"):
        table.add_column(col, justify="right")
    for key, df, info, other in (("a", frames[0], infos[0], infos[1]), ("b", frames[1], infos[1], infos[0])):
        for how, aucs in result["held_out"][key].items():
            trained = {"within": f"the other dialogues of {Path(info['file']).name} ({args.folds} folds)",
                       "other file": Path(other["file"]).name,
                       "within + other file": f"both ({args.folds} folds of {Path(info['file']).name})"}[how]
            table.add_row(Path(info["file"]).name, f"{df.height} / {info['dialogues']}", trained,
                          f"{aucs['tfidf_lr']:.3f}", f"{aucs['turn_rate']:.3f}")
    Console(width=160).print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
