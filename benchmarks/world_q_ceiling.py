"""How well could any Q rank the outcomes of these logs? Replay them in the world and read its hidden customer state.

    .venv/bin/python benchmarks/world_q_ceiling.py benchmarks/results/bench_fit_q_world_logs_gpu/explore_logs_2048 \
        --rows benchmarks/results/bench_fit_q_world_logs_gpu/world_explore_2048_cv2.rows.parquet \
        --out benchmarks/results/bench_fit_q_world_logs_gpu/world_q_ceiling_cv2.json

A companion to ``probe_q_features.py`` and ``world_log_acts.py``. Q, TF-IDF + LR and the turn rate see only the
text. The world also knows each customer's hidden state (needs revealed against needs required, trust, annoyance,
patience, readiness, persona), which the text only hints at. This script gives Q's comparison a ceiling.

1. **Replay.** Every logged conversation is run again in the world, with the same seed and index (read from its
   id, ``c<seed>-<index>``, as ``collect`` writes it), the logged suggestion at each turn, and the logged
   behaviour. The world's random streams belong to each conversation, so a faithful replay writes the logged
   conversation again, record for record. A conversation counts as reproduced only if every customer message,
   business message, relation and outcome matches. The hidden state is read just before each suggestion: the
   state ``s_i`` that Q scores with the action ``a_i``.
2. **Oracles.** Logistic regressions on standardised features are cross-fitted with the folds of a
   ``bench_fit_q.py`` rows file (``--rows``), on the rows of reproduced conversations. One sees the hidden state.
   The other also sees the world's dialogue act of the suggestion (how the customer would read it). They train
   on every other-fold row of the scored set, so they get at least the rows Q got. A linear model, because a
   few dozen converting conversations per fold are all there is to learn from: gradient-boosted trees on the
   same features fitted the training rows at AUC 0.98 and scored 0.57-0.65 held out, below the linear model.
3. **The table.** ROC-AUC for the final outcome, all on the same rows: the oracles, Q, TF-IDF + LR and the turn
   rate, with paired 95% CIs that resample whole conversations.

If even the hidden state ranks the outcomes poorly, the outcome is mostly chance given the state, and no reward
model can do much better on logs of this size. If the oracle ranks well and Q does not, Q's input or training is
what falls short.
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

WORLD_ID_RE = re.compile(r"^c(\d+)-(\d+)$")
HIDDEN_STATE = ("revealed", "required", "needs_left", "understood", "trust", "annoyance", "patience", "readiness",
                "proposals", "friendly_count", "pending_question", "ready_cue_given", "likes_emoji", "max_words")
COMPARED = ("tfidf_lr", "turn_rate", "q")


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


def hidden_state(customer: Any, personas: list[str]) -> dict[str, float]:
    cu = customer
    row = {"revealed": len(cu.revealed), "required": cu.required, "needs_left": max(0, cu.required - len(cu.revealed)),
           "understood": float(cu.understood), "trust": cu.trust, "annoyance": cu.annoyance, "patience": cu.patience,
           "readiness": cu.readiness, "proposals": cu.proposals, "friendly_count": cu.friendly_count,
           "pending_question": float(cu.pending_question is not None), "ready_cue_given": float(cu.ready_cue_given),
           "likes_emoji": float(cu.likes_emoji), "max_words": cu.max_words}
    row.update({f"persona_{p}": float(cu.persona == p) for p in personas})
    return row


def _as_ingested(record: dict[str, Any]) -> tuple[Any, ...]:
    """The fields a replay must reproduce, with the texts PII-redacted as ingest redacts the logs it reads (the
    world's customers give a phone number or an e-mail address when they convert)."""
    from pipeline_steps.ingest import redact_text

    texts = tuple(None if record[f] is None else redact_text(record[f])
                  for f in ("customer_message", "suggestion", "business_message"))
    return (record["turn_index"], record["outcome"], record["relation"], *texts)


def replay(logs: Any, world: Any) -> tuple[Any, dict[str, Any]]:
    """Each logged conversation run again with its logged suggestions. Returns one row per logged suggestion with
    the hidden state before it and ``reproduced`` (the whole conversation came out as logged), and counts."""
    import polars as pl

    from pipeline_steps.common.policies import Suggestion

    logs = logs.sort("conversation_id", "turn_index")
    ids = world_ids(logs["conversation_id"].unique().to_list())
    logged: dict[str, list[dict[str, Any]]] = {}
    for rec in logs.select("conversation_id", "turn_index", "customer_message", "outcome", "suggestion",
                           "business_message", "relation", "behaviour").iter_rows(named=True):
        logged.setdefault(rec["conversation_id"], []).append(rec)
    personas = list(world.params.personas)
    start = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)  # the clock does not drive the dynamics
    convs = [world.new_conversations(seed, k, 1, start)[0] for cid, (seed, k) in sorted(ids.items())]
    states: dict[tuple[str, int], dict[str, float]] = {}
    ran_past_log: set[str] = set()
    while True:
        active = [cv for cv in convs if not cv.done]
        if not active:
            break
        suggestions = []
        for cv in active:
            turn = cv.records[-1]["turn_index"]
            recs = logged[cv.conversation_id]
            if turn > len(recs) or recs[turn - 1]["turn_index"] != turn:
                ran_past_log.add(cv.conversation_id)  # the replay went on where the log had ended
                suggestions.append(None)
                continue
            states[(cv.conversation_id, turn)] = hidden_state(cv.customer, personas)
            rec = recs[turn - 1]
            behaviour = json.loads(rec["behaviour"]) if rec["behaviour"] else None
            suggestions.append(Suggestion(rec["suggestion"], behaviour))
        for cv, s in zip(active, suggestions):
            if s is None:
                cv.done = True
        stepping = [(cv, s) for cv, s in zip(active, suggestions) if s is not None]
        if stepping:
            world.step([cv for cv, _ in stepping], [s for _, s in stepping], "replay", "0", "control")
    reproduced = {cv.conversation_id for cv in convs if cv.conversation_id not in ran_past_log
                  and [_as_ingested(r) for r in cv.records] == [_as_ingested(r) for r in logged[cv.conversation_id]]}
    rows = [{"conversation_id": cid, "turn_index": turn, "reproduced": cid in reproduced, **state}
            for (cid, turn), state in states.items()]
    return pl.DataFrame(rows), {"conversations": len(convs), "reproduced": len(reproduced),
                                "ran_past_log": len(ran_past_log)}


def suggestion_acts(logs: Any, featurizer: Any) -> Any:
    """The world's dialogue act of each logged suggestion (None for an abstention), one featuriser call per text."""
    import polars as pl

    rows = logs.filter(pl.col("suggestion").is_not_null())
    texts = list(dict.fromkeys(rows["suggestion"].to_list()))
    acts = dict(zip(texts, (f.act for f in featurizer(texts))))
    return rows.select("conversation_id", "turn_index", pl.col("suggestion").replace_strict(acts).alias("act"))


def cross_fit_oracle(frame: Any, features: list[str]) -> Any:
    """Held-out P(outcome) of a logistic regression on standardised features, fold by fold, each trained on the
    other folds' rows."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, fold = frame.select(features).to_numpy().astype(float), frame["outcome"].to_numpy(), frame["fold"].to_numpy()
    out = np.full(frame.height, np.nan)
    for f in np.unique(fold):
        train, held = fold != f, fold == f
        if len(np.unique(y[train])) < 2:
            raise SystemExit(f"fold {f}: the other folds' rows hold one outcome class only: no oracle can be fitted")
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        out[held] = model.fit(x[train], y[train]).predict_proba(x[held])[:, 1]
    return out


def ceiling(logs_dir: str, rows_path: str, params_path: str = "params.yaml", n_boot: int = 1000) -> dict[str, Any]:
    import numpy as np
    import polars as pl

    from pipeline_steps.common.config import load_params
    from pipeline_steps.world.simulator import World

    t0 = time.perf_counter()
    params = load_params(params_path)
    logs = pl.from_arrow(bench.read_world_logs(logs_dir))
    world = World(params.world)
    states, counts = replay(logs, world)
    acts = suggestion_acts(logs, world.featurizer)
    scored = pl.read_parquet(rows_path)
    missing = [c for c in ("conversation_id", "turn_index", "outcome", "fold", "cluster", *COMPARED) if c not in scored.columns]
    if missing:
        raise SystemExit(f"--rows {rows_path}: no column(s) {missing}: a bench_fit_q.py --folds K rows file is expected")
    if scored["fold"].null_count():
        raise SystemExit(f"--rows {rows_path}: rows without a fold (a single-split run): cross-fitting needs --folds K")
    unmatched = scored.join(acts, on=["conversation_id", "turn_index"], how="anti")
    if unmatched.height:
        r = unmatched.row(0, named=True)
        raise SystemExit(f"--rows {rows_path}: {unmatched.height} scored rows have no logged suggestion in {logs_dir}, "
                         f"first ({r['conversation_id']!r}, turn {r['turn_index']}): the rows are of other logs")
    # A conversation whose replay ended early has no state for its later turns: it is not reproduced either way.
    frame = (scored.join(states, on=["conversation_id", "turn_index"], how="left")
             .filter(pl.col("reproduced").fill_null(False)).join(acts, on=["conversation_id", "turn_index"], how="left"))
    act_names = sorted(a for a in frame["act"].unique().to_list() if a is not None)
    frame = frame.with_columns([(pl.col("act") == a).fill_null(False).cast(pl.Float64).alias(f"act_{a}") for a in act_names])
    persona_cols = [c for c in frame.columns if c.startswith("persona_")]
    state_features = [*HIDDEN_STATE, *persona_cols, "turn_index"]
    preds = {"oracle_hidden_state": cross_fit_oracle(frame, state_features),
             "oracle_hidden_state_and_act": cross_fit_oracle(frame, [*state_features, *(f"act_{a}" for a in act_names)])}
    preds.update({name: frame[name].to_numpy() for name in COMPARED})
    y, clusters = frame["outcome"].to_numpy(), frame["cluster"].to_numpy()
    aucs = {name: bench.auc(y, p) for name, p in preds.items()}
    vs = {}
    for a in ("oracle_hidden_state", "oracle_hidden_state_and_act"):
        for b in ("q", "tfidf_lr"):
            lo, hi = bench.paired_auc_diff_ci(y, preds[a], preds[b], clusters, n_boot=n_boot)
            vs[f"{a} - {b}"] = {"diff": aucs[a] - aucs[b], "ci95": [lo, hi]}
    lo, hi = bench.paired_auc_diff_ci(y, preds["oracle_hidden_state_and_act"], preds["oracle_hidden_state"], clusters,
                                      n_boot=n_boot)
    vs["oracle_hidden_state_and_act - oracle_hidden_state"] = {
        "diff": aucs["oracle_hidden_state_and_act"] - aucs["oracle_hidden_state"], "ci95": [lo, hi]}
    # One hidden variable at a time (below 0.5: more of it, less conversion).
    single = {name: bench.auc(y, frame[name].to_numpy()) for name in state_features if frame[name].n_unique() > 1}
    return {"logs": logs_dir, "rows": rows_path, "replay": counts, "scored_rows": scored.height,
            "rows_compared": frame.height, "conversations_compared": int(frame["conversation_id"].n_unique()),
            "conversions_compared": int(frame.group_by("conversation_id").agg(pl.col("outcome").max())["outcome"].sum()),
            "folds": sorted(int(f) for f in np.unique(frame["fold"].to_numpy())), "auc": aucs, "paired": vs,
            "single_feature_auc": dict(sorted(single.items(), key=lambda kv: -abs(kv[1] - 0.5))),
            "features": {"hidden_state": state_features, "acts": act_names}, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", help="conversation logs the world wrote (a folder collect wrote)")
    ap.add_argument("--rows", required=True, help="a bench_fit_q.py --folds K rows file scored on these logs")
    ap.add_argument("--params", default="params.yaml", help="params.yaml whose world wrote the logs")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    result = ceiling(args.logs, args.rows, args.params, args.n_boot)
    rp = result["replay"]
    console = Console()
    console.print(f"replayed {rp['conversations']} conversations: {rp['reproduced']} reproduced record for record; "
                  f"compared on {result['rows_compared']} of {result['scored_rows']} scored rows "
                  f"({result['conversations_compared']} conversations, {result['conversions_compared']} converted)")
    table = Table(title="ROC-AUC for the final outcome, same held-out rows (cross-fitted, folds of --rows)")
    table.add_column("scorer")
    table.add_column("sees")
    table.add_column("AUC", justify="right")
    sees = {"oracle_hidden_state": "the world's hidden customer state", "oracle_hidden_state_and_act":
            "hidden state + the suggestion's dialogue act", "q": "text (bench_fit_q's Q)",
            "tfidf_lr": "text (1-2 grams)", "turn_rate": "turn index"}
    for name, value in sorted(result["auc"].items(), key=lambda kv: -kv[1]):
        table.add_row(name, sees[name], f"{value:.3f}")
    console.print(table)
    for name, d in result["paired"].items():
        console.print(f"{name}: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (conversations resampled)")
    console.print("one hidden variable alone (AUC; below 0.5: more of it, less conversion): " + ", ".join(
        f"{k} {v:.3f}" for k, v in list(result["single_feature_auc"].items())[:6]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
