"""How well does the world's hidden customer state rank the outcomes of these logs? Replay them and read it.

    .venv/bin/python benchmarks/world_q_ceiling.py benchmarks/results/bench_fit_q_world_logs_gpu/explore_logs_2048 \
        --rows benchmarks/results/bench_fit_q_world_logs_gpu/world_explore_2048_cv2.rows.parquet --train-rows 3000 \
        --out benchmarks/results/bench_fit_q_world_logs_gpu/world_q_ceiling_cv2.json    # Q's rows: 5 min on 2 cores
    (the same without --train-rows, every other-fold row: world_q_ceiling_cv2_all_rows.json)

A companion to ``probe_q_features.py`` and ``world_log_acts.py``. Q, TF-IDF + LR and the turn rate see only the
text. The world also knows each customer's hidden state (needs revealed against needs required, trust, annoyance,
patience, readiness, persona), which the text only hints at. This script puts a hidden-state model beside Q.

1. **Replay.** Every logged conversation is run again in the world, with the same seed and index (read from its
   id, ``c<seed>-<index>``, as ``collect`` writes it), the logged suggestion at each turn, and the logged
   behaviour. The logs are read as ``collect`` wrote them (Parquet, before ingest redacts PII), so the world gets
   the very texts it got. The world's random streams belong to each conversation, so a faithful replay writes
   the logged conversation again: a conversation counts as reproduced only if every customer message, suggestion,
   business message, relation and outcome is equal, and the others are listed. The hidden state is read just
   before each suggestion: the state ``s_i`` that Q scores with the action ``a_i``.
2. **Hidden-state models**, cross-fitted with the folds of a ``bench_fit_q.py`` rows file (``--rows``), on the rows
   of reproduced conversations, each fold's model trained on the other folds' rows (``--train-rows`` caps them,
   as ``bench_fit_q.py --world-train-rows`` capped Q's):
   * a logistic regression on the hidden state (C chosen over whole conversations, as ``probe_q_features.py``
     chooses it);
   * the same with the world's dialogue act of the suggestion (how the customer reads it);
   * the same with the act's products with ``understood``, ``trust``, ``needs_left`` and ``annoyance`` too: the
     world's rules gate what an act does on that state (a booking converts only once the needs are understood);
   * gradient-boosted trees on the same features (early stopping), which may find other interactions but
     overfit when few conversations convert.
   These are models that can be fitted from this many rows, not upper bounds: the world's conversion rule is
   not linear, and some state that the text does show (which needs, the last acts) is not among the features.
3. **The table.** ROC-AUC for the final outcome, all on the same rows: the hidden-state models, Q, TF-IDF + LR
   and the turn rate, with paired 95% CIs that resample whole conversations; and each hidden variable alone.

If the hidden state ranks the outcomes poorly too, most of the outcome is chance given the state, and no reward
model can do much better on logs of this size. If it ranks well and Q does not, Q's input or training is what
falls short.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fit_q as bench  # noqa: E402
from pipeline_steps.common.tracking import write_json  # noqa: E402

WORLD_ID_RE = re.compile(r"^c(\d+)-(\d+)$")  # World.new_conversations' default id_prefix "c", as collect runs it
HIDDEN_STATE = ("revealed", "required", "needs_left", "understood", "trust", "annoyance", "patience", "readiness",
                "proposals", "friendly_count", "pending_question", "ready_cue_given", "likes_emoji", "max_words")
GATES = ("understood", "trust", "needs_left", "annoyance")  # the state an act's effect depends on in the world's rules
COMPARED = ("tfidf_lr", "turn_rate", "q")
REPLAYED = ("turn_index", "outcome", "relation", "customer_message", "suggestion", "business_message")
SEES = {"hidden_state": "the world's hidden customer state (logistic)",
        "hidden_state_and_act": "hidden state + the suggestion's act (logistic)",
        "hidden_state_and_act_gated": "hidden state + the act + act x state products (logistic)",
        "hidden_state_and_act_trees": "the same features (gradient-boosted trees)",
        "q": "text (bench_fit_q's Q)", "tfidf_lr": "text (1-2 grams)", "turn_rate": "turn index"}


def world_ids(conversation_ids: list[str]) -> dict[str, tuple[int, int]]:
    """``c<seed>-<index>`` -> (seed, index); any other id stops the replay, naming it."""
    out = {}
    for cid in conversation_ids:
        m = WORLD_ID_RE.match(cid)
        if not m:
            raise SystemExit(f"conversation_id {cid!r}: not an id the world wrote (c<seed>-<index>); "
                             "only logs of the simulated world can be replayed")
        out[cid] = (int(m.group(1)), int(m.group(2)))
    return out


def read_collected_logs(logs: str) -> Any:
    """The Parquet files ``collect`` wrote under ``logs``, as written: the world's own texts, PII included (ingest
    would redact the phone numbers and addresses the world's customers and suggestions contain)."""
    import polars as pl

    files = sorted(Path(logs).rglob("*.parquet"))
    if not files:
        raise SystemExit(f"{logs}: no Parquet files: the folder collect wrote is expected")
    frame = pl.concat([pl.read_parquet(f, hive_partitioning=False) for f in files], how="diagonal_relaxed")
    missing = [c for c in ("conversation_id", *REPLAYED, "behaviour") if c not in frame.columns]
    if missing:
        raise SystemExit(f"{logs}: no column(s) {missing}: not conversation logs under the contract")
    return frame


def hidden_state(customer: Any, personas: list[str]) -> dict[str, float]:
    cu = customer
    row = {"revealed": len(cu.revealed), "required": cu.required, "needs_left": max(0, cu.required - len(cu.revealed)),
           "understood": float(cu.understood), "trust": cu.trust, "annoyance": cu.annoyance, "patience": cu.patience,
           "readiness": cu.readiness, "proposals": cu.proposals, "friendly_count": cu.friendly_count,
           "pending_question": float(cu.pending_question is not None), "ready_cue_given": float(cu.ready_cue_given),
           "likes_emoji": float(cu.likes_emoji), "max_words": cu.max_words}
    row.update({f"persona_{p}": float(cu.persona == p) for p in personas})
    return row


def replay(logs: Any, world: Any, snapshot: set[tuple[str, int]] | None = None) -> tuple[Any, dict[str, Any]]:
    """Each logged conversation run again with its logged suggestions. Returns one row per logged turn the replay
    reached, with the hidden state before its suggestion and ``reproduced`` (the whole conversation came out as
    logged, field for field), and the counts with the ids of the conversations that did not. With ``snapshot``
    ((conversation_id, turn_index) keys), ``counts["snapshots"]`` holds a deep copy of each such conversation just
    before that turn's suggestion, to branch from."""
    import copy

    import polars as pl

    from pipeline_steps.common.policies import Suggestion

    logs = logs.sort("conversation_id", "turn_index")
    ids = world_ids(logs["conversation_id"].unique().to_list())
    logged: dict[str, list[dict[str, Any]]] = {}
    for rec in logs.select("conversation_id", *REPLAYED, "behaviour").iter_rows(named=True):
        logged.setdefault(rec["conversation_id"], []).append(rec)
    personas = list(world.params.personas)
    start = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)  # the clock does not drive the dynamics
    convs = [world.new_conversations(seed, k, 1, start)[0] for cid, (seed, k) in sorted(ids.items())]
    states: dict[tuple[str, int], dict[str, float]] = {}
    snapshots: dict[tuple[str, int], Any] = {}
    ran_past_log: set[str] = set()
    while True:
        active = [cv for cv in convs if not cv.done]
        if not active:
            break
        stepping = []
        for cv in active:
            turn = cv.records[-1]["turn_index"]
            recs = logged[cv.conversation_id]
            if turn > len(recs) or recs[turn - 1]["turn_index"] != turn:
                ran_past_log.add(cv.conversation_id)  # the replay went on where the log had ended
                cv.done = True
                continue
            states[(cv.conversation_id, turn)] = hidden_state(cv.customer, personas)
            if snapshot and (cv.conversation_id, turn) in snapshot:
                snapshots[(cv.conversation_id, turn)] = copy.deepcopy(cv)
            rec = recs[turn - 1]
            stepping.append((cv, Suggestion(rec["suggestion"], json.loads(rec["behaviour"]) if rec["behaviour"] else None)))
        if stepping:
            world.step([cv for cv, _ in stepping], [sug for _, sug in stepping], "replay", "0", "control")
    differ = sorted(cv.conversation_id for cv in convs if cv.conversation_id in ran_past_log
                    or [tuple(r[f] for f in REPLAYED) for r in cv.records]
                    != [tuple(r[f] for f in REPLAYED) for r in logged[cv.conversation_id]])
    not_reproduced = set(differ)
    rows = [{"conversation_id": cid, "turn_index": turn, "reproduced": cid not in not_reproduced, **state}
            for (cid, turn), state in states.items()]
    counts = {"conversations": len(convs), "reproduced": len(convs) - len(differ), "ran_past_log": len(ran_past_log),
              "not_reproduced": differ}
    if snapshot is not None:
        counts["snapshots"] = snapshots
    return pl.DataFrame(rows), counts


def suggestion_acts(logs: Any, featurizer: Any) -> Any:
    """The world's dialogue act of each logged suggestion (abstentions have no row)."""
    import polars as pl

    from world_log_acts import label_acts

    rows = logs.filter(pl.col("suggestion").is_not_null())
    acts = label_acts(rows["suggestion"].to_list(), featurizer)
    return rows.select("conversation_id", "turn_index", pl.col("suggestion").replace_strict(acts).alias("act"))


def read_rows(rows_path: str) -> Any:
    """A ``bench_fit_q.py --folds K`` rows file; any other stops the script before the replay."""
    import polars as pl

    scored = pl.read_parquet(rows_path)
    missing = [c for c in ("conversation_id", "turn_index", "outcome", "fold", "cluster", *COMPARED) if c not in scored.columns]
    if missing:
        raise SystemExit(f"--rows {rows_path}: no column(s) {missing}: a bench_fit_q.py --folds K rows file is expected")
    if scored["fold"].null_count():
        raise SystemExit(f"--rows {rows_path}: {scored['fold'].null_count()} rows without a fold (a single-split run): "
                         "cross-fitting needs a --folds K run")
    folds = sorted(scored["fold"].unique().to_list())
    if folds != list(range(len(folds))) or len(folds) < 2:
        raise SystemExit(f"--rows {rows_path}: folds {folds}: 0..K-1 with K >= 2 expected, as --folds K writes them")
    return scored


def with_act_features(frame: Any, act_names: list[str], state: list[str] | None = None,
                      gates: tuple[str, ...] = GATES) -> tuple[Any, dict[str, list[str]]]:
    """One-hot columns of the suggestion's ``act`` (null, an abstention: all zero) and their products with the
    state the world's rules gate an act's effect on; returns the frame and each model's feature list. ``state``
    (default: the hidden state, persona and turn index) and ``gates`` name other state columns to use."""
    import polars as pl

    frame = frame.with_columns([(pl.col("act") == a).fill_null(False).cast(pl.Float64).alias(f"act_{a}") for a in act_names])
    frame = frame.with_columns([(pl.col(f"act_{a}") * pl.col(g)).alias(f"act_{a}_x_{g}") for a in act_names for g in gates])
    persona_cols = [c for c in frame.columns if c.startswith("persona_")]
    state_features = list(state) if state is not None else [*HIDDEN_STATE, *persona_cols, "turn_index"]
    act_features = [f"act_{a}" for a in act_names]
    gated = act_features + [f"act_{a}_x_{g}" for a in act_names for g in gates]
    return frame, {"hidden_state": state_features, "hidden_state_and_act": state_features + act_features,
                   "hidden_state_and_act_gated": state_features + gated, "hidden_state_and_act_trees": state_features + gated}


def hidden_state_models(models: dict[str, list[str]], seed: int) -> Any:
    """``bench_fit_q.cross_fit``'s ``fit``: every model of ``models`` (name -> features) trained on the fold's train
    rows; held-out P(outcome) of each, and each one's AUC on its own training rows (how far it fits what it saw)."""

    def fit(train: Any, val: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        import warnings

        import numpy as np
        from sklearn.ensemble import HistGradientBoostingClassifier

        from probe_q_features import logistic_by_conversation

        y = train["outcome"].to_numpy()
        if len(np.unique(y)) < 2:
            raise SystemExit("a fold's training rows hold one outcome class only: no model can be fitted")
        preds, fit_auc = {}, {}
        for name, features in models.items():
            est = (HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_depth=3, min_samples_leaf=100,
                                                  early_stopping=True, random_state=seed) if name.endswith("_trees")
                   else logistic_by_conversation(train["cluster"].to_numpy()))
            x_train = train.select(features).to_numpy().astype(float)
            with warnings.catch_warnings():  # scikit-learn's notices of its 1.10 defaults
                warnings.simplefilter("ignore", FutureWarning)
                est.fit(x_train, y)
            preds[name] = est.predict_proba(val.select(features).to_numpy().astype(float))[:, 1]
            fit_auc[name] = bench.auc(y, est.predict_proba(x_train)[:, 1])
        return np.zeros(val.height), preds, {"train_rows": train.height, "fit_auc": fit_auc}

    return fit


def ceiling(logs_dir: str, rows_path: str, params_path: str = "params.yaml", n_boot: int = 1000,
            train_rows: int | None = None, seed: int = 0) -> dict[str, Any]:
    import numpy as np
    import polars as pl

    from pipeline_steps.common.config import load_params
    from pipeline_steps.world.simulator import World

    t0 = time.perf_counter()
    scored = read_rows(rows_path)
    params = load_params(params_path)
    logs = read_collected_logs(logs_dir)
    unmatched = scored.join(logs.filter(pl.col("suggestion").is_not_null()), on=["conversation_id", "turn_index"], how="anti")
    if unmatched.height:
        r = unmatched.row(0, named=True)
        raise SystemExit(f"--rows {rows_path}: {unmatched.height} scored rows have no logged suggestion in {logs_dir}, "
                         f"first ({r['conversation_id']!r}, turn {r['turn_index']}): the rows are of other logs")
    world = World(params.world)
    states, counts = replay(logs, world)
    acts = suggestion_acts(logs, world.featurizer)
    # A conversation whose replay ended early has no state for its later turns: it is not reproduced either way.
    frame = (scored.join(states, on=["conversation_id", "turn_index"], how="left")
             .filter(pl.col("reproduced").fill_null(False)).join(acts, on=["conversation_id", "turn_index"], how="left"))
    act_names = sorted(a for a in frame["act"].unique().to_list() if a is not None)
    frame, models = with_act_features(frame, act_names)
    state_features = models["hidden_state"]
    # bench_fit_q's own cross-fit, on the rows file's folds: each fold scored by models trained on (a --train-rows
    # sample of) the other folds, as Q and TF-IDF were; the pooled rows come back in its order.
    k = frame["fold"].n_unique()
    frame, _, preds, runs = bench.cross_fit(frame, k, train_rows or frame.height, frame.height, seed, 0,
                                            hidden_state_models(models, seed), folds=frame["fold"])
    fit_auc = {name: float(np.mean([r["fit_auc"][name] for r in runs])) for name in models}
    preds.update({name: frame[name].to_numpy() for name in COMPARED})
    y, clusters = frame["outcome"].to_numpy(), frame["cluster"].to_numpy()
    aucs = {name: bench.auc(y, p) for name, p in preds.items()}
    pairs = [(a, b) for a in ("hidden_state", "hidden_state_and_act") for b in ("q", "tfidf_lr")]
    pairs += [("hidden_state_and_act", "hidden_state"), ("hidden_state_and_act_gated", "hidden_state"),
              ("hidden_state_and_act_trees", "hidden_state")]
    vs = {}
    for a, b in pairs:
        lo, hi = bench.paired_auc_diff_ci(y, preds[a], preds[b], clusters, n_boot=n_boot)
        vs[f"{a} - {b}"] = {"diff": aucs[a] - aucs[b], "ci95": [lo, hi]}
    # One hidden variable at a time (below 0.5: more of it, less conversion).
    single = {name: bench.auc(y, frame[name].to_numpy()) for name in state_features if frame[name].n_unique() > 1}
    per_fold = frame.group_by("fold").agg(pl.len().alias("rows"), pl.col("conversation_id").n_unique().alias("conversations"),
                                          pl.col("conversation_id").filter(pl.col("outcome") == 1).n_unique().alias("converted"))
    return {"logs": logs_dir, "rows": rows_path, "params": params_path, "train_rows_per_fold": train_rows, "seed": seed,
            "replay": counts, "scored_rows": scored.height, "rows_compared": frame.height,
            "conversations_compared": int(frame["conversation_id"].n_unique()),
            "conversions_compared": int(frame.group_by("conversation_id").agg(pl.col("outcome").max())["outcome"].sum()),
            "folds": per_fold.sort("fold").to_dicts(), "auc": aucs, "fit_auc_on_training_rows": fit_auc, "paired": vs,
            "single_feature_auc": dict(sorted(single.items(), key=lambda kv: -abs(kv[1] - 0.5))),
            "features": {"hidden_state": state_features, "acts": act_names, "gates": list(GATES)},
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", help="conversation logs the world wrote (the folder collect wrote)")
    ap.add_argument("--rows", required=True, help="a bench_fit_q.py --folds K rows file scored on these logs")
    ap.add_argument("--params", default="params.yaml", help="params.yaml whose world wrote the logs")
    ap.add_argument("--train-rows", type=int, default=None,
                    help="cap each fold's training rows (bench_fit_q's --world-train-rows); default: every other-fold row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    result = ceiling(args.logs, args.rows, args.params, args.n_boot, args.train_rows, args.seed)
    rp = result["replay"]
    console = Console(width=140)
    console.print(f"replayed {rp['conversations']} conversations: {rp['reproduced']} reproduced record for record "
                  f"(not: {', '.join(rp['not_reproduced']) or 'none'}); compared on {result['rows_compared']} of "
                  f"{result['scored_rows']} scored rows ({result['conversations_compared']} conversations, "
                  f"{result['conversions_compared']} converted; per fold {result['folds']})")
    table = Table(title="ROC-AUC for the final outcome, same held-out rows (cross-fitted on the folds of --rows)")
    for col in ("scorer", "sees", "AUC held out", "AUC on its training rows"):
        table.add_column(col, justify="left" if col in ("scorer", "sees") else "right")
    for name, value in sorted(result["auc"].items(), key=lambda kv: -kv[1]):
        fit = result["fit_auc_on_training_rows"].get(name)
        table.add_row(name, SEES[name], f"{value:.3f}", "" if fit is None else f"{fit:.3f}")
    console.print(table)
    for name, d in result["paired"].items():
        console.print(f"{name}: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (conversations resampled)")
    console.print("one hidden variable alone (AUC; below 0.5: more of it, less conversion): " + ", ".join(
        f"{k} {v:.3f}" for k, v in list(result["single_feature_auc"].items())[:6]))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
