"""Do the frozen base model's features carry the outcome? Linear read-outs of them against fit_q's baselines.

    .venv/bin/python benchmarks/probe_q_features.py --world-logs DIR --folds 2 --out benchmarks/results/probe.json
    .venv/bin/python benchmarks/probe_q_features.py --tasks dnd --folds 3 --out probe_dnd.json

A diagnostic for a Q that does not beat the baselines (``bench_fit_q.py``): is it the features or the recipe?
fit_q starts its head as a ridge probe on the last-token states of ``fit_q.probe_init_rows`` train rows (LP-FT),
then trains LoRA. Here the same states are computed once for every row (cached beside ``--out`` as ``.npy``, so
a rerun costs seconds) and read out, on the same folds and with the same statistics as ``bench_fit_q.py``
(``fold_of``, ``quality``: ROC-AUC of the final outcome, a CI that resamples conversations), by:

* ``ridge_G_probe_rows``: fit_q's probe as configured (ridge on G, ``fit_q.probe_init_rows`` rows, no intercept);
* ``ridge_G_all``: the same ridge on every train row of the fold;
* ``logistic_all``: logistic regression on the outcome (standardised states, C by 3-fold CV over the train
  rows' conversations, class-balanced), the read-out TF-IDF's baseline uses;
* ``tfidf_state_only`` and ``tfidf_action_only``: the TF-IDF + LR baseline on one half of the text. Where the
  outcome lives matters for PPO: Q must rank *actions* in a state, so an outcome that only the state predicts
  gives the reward model nothing to rank with.

Each is set against TF-IDF + LR and the outcome rate by turn index trained on the same rows. Rows are built
exactly as in ``bench_fit_q.py`` (the returns step's code and prompt budget ``--max-prompt-tokens``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fit_q as bench  # noqa: E402

READOUTS = ("ridge_G_probe_rows", "ridge_G_all", "logistic_all", "tfidf_state_only", "tfidf_action_only")


def last_token_states(params: Any, base: Path, tokenizer: Any, df: Any, cache: Path, progress: bool = True) -> Any:
    """Frozen last-token states of every row's ``(s, a)`` as fit_q's Q reads it (cached in ``cache``), under bf16
    autocast on a CPU where fit_q's probe would use it (``fit_q.bf16``), else fp32."""
    import hashlib

    import numpy as np
    import torch

    from pipeline_steps.common.base_model import bf16_autocast_pays

    fq = params.fit_q.model_copy(update={"probe_init_rows": 0})
    autocast = bf16_autocast_pays(fq.bf16) and not torch.cuda.is_available()
    # The cache holds for the same model, precision and token ids (rows, prompt budget and action cut included).
    from pipeline_steps.common.q_model import encode, hidden_ids

    ids = [encode(tokenizer, s, a, fq.max_action_tokens) for s, a in zip(df["state_text"].to_list(), df["action_text"].to_list())]
    key = hashlib.sha256(json.dumps([str(Path(base).resolve()), autocast, ids]).encode()).hexdigest()
    if cache.exists() and cache.with_suffix(".key").exists() and cache.with_suffix(".key").read_text() == key:
        return np.load(cache)
    from pipeline_steps import fit_q
    model, _ = fit_q.build_q_model(base, fq, tokenizer.pad_token_id, probe=None)  # LoRA starts at zero: the base model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        feats = hidden_ids(model, ids, tokenizer.pad_token_id, fq.eval_batch_size, progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, feats)
    cache.with_suffix(".key").write_text(key)
    return feats


def logistic_by_conversation(clusters: Any) -> Any:
    """A class-balanced logistic regression on standardised features whose C is chosen by ROC-AUC over three folds
    of whole conversations (``clusters``: one label per training row), so no conversation is on both sides."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    by_conversation = list(GroupKFold(3).split(np.zeros(len(clusters)), groups=clusters))
    return make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 1, 11), cv=by_conversation,
                                                                class_weight="balanced", max_iter=3000, scoring="roc_auc"))


def readouts(feats: Any, tr: Any, va: Any, probe_rows: int, seed: int) -> dict[str, Any]:
    """Held-out scores of each linear read-out fitted on the fold's train rows."""
    import warnings

    import numpy as np
    import polars as pl
    from sklearn.linear_model import RidgeCV

    from pipeline_steps.fit_q import sample_train

    xtr, xva = feats[tr["feat_row"].to_numpy()], feats[va["feat_row"].to_numpy()]
    g, y = tr["G"].to_numpy(), tr["outcome"].to_numpy()
    alphas = np.logspace(-2, 5, 30)  # fit_q.probe_head's grid
    take = sample_train(len(xtr), probe_rows, seed)
    out = {"ridge_G_probe_rows": RidgeCV(alphas=alphas, fit_intercept=False).fit(xtr[take], g[take]).predict(xva),
           "ridge_G_all": RidgeCV(alphas=alphas, fit_intercept=False).fit(xtr, g).predict(xva)}
    with warnings.catch_warnings():  # scikit-learn's notices of its 1.10 defaults
        warnings.simplefilter("ignore", FutureWarning)
        out["logistic_all"] = logistic_by_conversation(tr["cluster"].to_numpy()).fit(xtr, y).predict_proba(xva)[:, 1]
    for name, blank in (("tfidf_state_only", "action_text"), ("tfidf_action_only", "state_text")):  # the other half empty
        out[name] = bench.tfidf_baseline(tr.with_columns(pl.lit("").alias(blank)), va.with_columns(pl.lit("").alias(blank)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--base-model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--tasks", choices=("world", "dnd"), default="world")
    ap.add_argument("--world-logs", default=None, help="logs a collect run wrote (default: the scripted mix)")
    ap.add_argument("--world-per-strategy", type=int, default=40)
    ap.add_argument("--max-prompt-tokens", type=int, default=256, help="as bench_fit_q.py")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/probe_q_features.json")
    args = ap.parse_args()
    if args.folds < 2:
        ap.error(f"--folds {args.folds}: at least 2 (every conversation held out once)")

    import torch
    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline_steps.common.base_model import load_tokenizer, resolve_base_model
    from pipeline_steps.common.config import load_params

    t0 = time.perf_counter()
    params = load_params(args.params, {"base_model.name_or_path": args.base_model,
                                       "prompt.max_prompt_tokens": args.max_prompt_tokens, "fit_q.seed": args.seed,
                                       "fit_q.data_seed": args.seed})
    base = Path(resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir))
    tokenizer = load_tokenizer(base)
    if args.tasks == "dnd":
        df, info = bench.dnd_returns(params, tokenizer, 0.3)
        info.pop("keys")  # the dialogue keys (a set), for overlap checks only
    elif args.world_logs:
        df, info = bench.world_log_returns(params, tokenizer, args.world_logs)
    else:
        df, info = bench.world_returns(params, tokenizer, args.world_per_strategy)
    df = df.with_row_index("feat_row")
    out_path = Path(args.out)
    t_feat = time.perf_counter()
    feats = last_token_states(params, base, tokenizer, df, out_path.with_suffix(".states.npy"))
    feat_s = time.perf_counter() - t_feat
    probe_rows = params.fit_q.probe_init_rows

    def fit(tr: Any, va: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        # The read-outs travel with the baselines, so that cross_fit pools every score in the same row order.
        preds = readouts(feats, tr, va, probe_rows, args.seed)
        preds |= {"tfidf_lr": bench.tfidf_baseline(tr, va), "turn_rate": bench.turn_rate_baseline(tr, va)}
        return preds[READOUTS[0]], preds, {"train_rows": tr.height, "val_rows": va.height}

    va, _, pooled, fold_runs = bench.cross_fit(df, args.folds, 10**9, 10**9, args.seed, 0, fit)
    scores = {name: pooled.pop(name) for name in READOUTS}
    base_preds = pooled  # the two baselines
    y, g, clusters = va["outcome"].to_numpy(), va["G"].to_numpy(), va["cluster"].to_numpy()
    results = {name: bench.quality(y, g, scores[name], base_preds, 0, clusters) for name in READOUTS}

    console = Console(width=160)
    table = Table(title=f"Linear read-outs of the frozen {args.base_model} states, cross-fitted over {args.folds} folds "
                        f"({df.height} rows, {info.get('conversations', '?')} conversations; ROC-AUC of the final outcome)")
    for col in ("read-out", "AUC", "AUC TF-IDF+LR", "AUC turn-rate", "read-out - best [95% CI] (conversations)", "Spearman(., G)"):
        table.add_column(col, justify="right")
    for name, m in results.items():
        lo, hi = m["auc_margin_ci95"]
        table.add_row(name, f"{m['auc_q']:.3f}", f"{m['auc_tfidf_lr']:.3f}", f"{m['auc_turn_rate']:.3f}",
                      f"{m['auc_margin']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({m['clusters']})", f"{m['spearman_q_g']:.3f}")
    console.print(table)
    console.print(f"states: {feats.shape[0]} rows x {feats.shape[1]} in {feat_s:.0f} s; total {time.perf_counter() - t0:.0f} s")
    out = {"args": vars(args), "info": info, "probe_init_rows": probe_rows, "returns_gamma": params.returns.gamma,
           "rows": df.height, "state_seconds": feat_s, "folds": fold_runs,
           "readouts": {name: {k: v for k, v in m.items()} for name, m in results.items()},
           "seconds": time.perf_counter() - t0}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    # bench_fit_q's row format ("q" = fit_q's probe read-out), so its compare/pool scripts read these rows too.
    bench.prediction_rows(f"{args.tasks}_probe_cv{args.folds}", va, scores[READOUTS[0]], {**scores, **base_preds}
                          ).write_parquet(out_path.with_suffix(".rows.parquet"))
    console.print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
