"""Does a reward model fitted on a behaviour policy's logs pick better suggestions? Scored against the world's Q(s, a).

    .venv/bin/python -m pipeline_steps.collect --policy script:random --conversations 2048 --seed 21 \\
        --out data/bench/random_logs_2048 --summary data/bench/random_logs_2048.json --no-mlflow --no-progress
    .venv/bin/python benchmarks/world_action_ranking.py \\
        --values benchmarks/results/bench_fit_q_world_logs_gpu/world_action_values_abstain.json \\
        --train explore=benchmarks/results/bench_fit_q_world_logs_gpu/explore_logs_2048 \\
        --train random=data/bench/random_logs_2048 \\
        --out benchmarks/results/bench_fit_q_world_logs_gpu/world_action_ranking_abstain.json

A companion to ``world_action_values.py``, which measured the world's ``Q(s, a)`` at 400 logged states by branching
replays, and found a large act x state effect (a booking once the needs are understood, a probe before) that no
model fitted on the LLM behaviour policy's logs recovered, as AUC over logged rows. But PPO does not need an AUC: it
needs the reward model to rank the candidate replies *within a state* the way the world does. This script scores
exactly that, and asks whether the behaviour policy that wrote the training logs (its coverage of the acts) or the
learner is what falls short:

1. **Training logs** (``--train LABEL=DIR``, repeatable): any logs ``collect`` wrote in the world, e.g. the LLM
   persona-exploration policy's, and a scripted behaviour policy's (``script:random``: a random dialogue act's
   template at every turn, which puts bookings and probes at every kind of state). Conversations that hold an
   evaluated state are dropped from every training set. Rows are the returns step's, as Q would see them.
2. **Learners** fitted on each, for the final outcome:
   * ``tfidf_lr``: TF-IDF (1-2 grams) + logistic regression on the state text and the reply, bench_fit_q's text
     baseline (a fine-tuned Q reads the same input);
   * ``text_state_and_act_gated``: a logistic regression on what the customer's messages show of the state, as
     the scripted expert reads them (needs stated of the project's needs, a ready cue, a decline, a question), the
     reply's dialogue act and the act's products with that state: what a text reader that found the state could do;
   * ``hidden_state_and_act_gated``: a logistic regression on the world's hidden customer state (replayed), the
     reply's dialogue act and the act's products with the state (``world_q_ceiling.py``'s model): what a learner
     that saw the true state could take from these logs.
   And any trained Q (``--q-model LABEL=DIR``: fit_q's ``scorer/`` or ``adapter/``, e.g. from a GPU run), fitted
   under the same params: the check that matters before PPO climbs it. ``--export-train LABEL=FILE`` writes a
   training set as the returns step writes it (its columns and metadata), so ``python -m pipeline_steps.fit_q
   --input FILE`` fits that Q on exactly the rows the other learners saw::

       .venv/bin/python benchmarks/world_action_ranking.py --values .../world_action_values_abstain.json \\
           --train explore=.../explore_logs_2048 --export-train explore=data/bench/explore_train_returns.parquet
       .venv/bin/python -m pipeline_steps.fit_q --params <params with the fit_q budget> \\
           --input data/bench/explore_train_returns.parquet --out data/bench/q_explore --no-mlflow
       .venv/bin/python benchmarks/world_action_ranking.py ... --q-model q=data/bench/q_explore/scorer
3. **Scoring** at every state of ``--values``: each learner scores the same candidates the world was measured on
   (one template per act, the scripted expert's reply, the logged reply, none). Reported, as mean over states with
   95% CIs that resample conversations:
   * the within-state Spearman correlation of the learner's scores with the world's ``Q(s, a)``;
   * the world's ``Q`` of the learner's top candidate minus that of the logged reply: the gain a greedy step on
     this reward model would take at these states (best-of-n over these candidates; PPO climbs the same ranking);
   * beside them, the world's own best (chosen on half of the rollouts, scored on the other) and fixed choices
     (always a booking, always a probe, the scripted expert).

Two readings: if a learner ranks the world's actions from the scripted behaviour's logs and not from the LLM
policy's, coverage is what the LLM policy's logs lack; if the hidden-state learner ranks them from either and the
text learner from neither, reading the state from the text is what falls short (README, fit_q on world logs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fit_q as bench  # noqa: E402
import world_q_ceiling as ceiling  # noqa: E402
from pipeline_steps.common.tracking import write_json  # noqa: E402
from world_log_acts import label_acts  # noqa: E402
from world_action_values import EXPERT, LOGGED, NO_SUGGESTION, candidate_suggestions, logged_coverage, mean_ci  # noqa: E402

LEARNERS = ("tfidf_lr", "text_state_and_act_gated", "hidden_state_and_act_gated")
# What the text shows of the state, as the scripted expert reads it (world.state_reader), and the part of it
# an act's effect is gated on.
TEXT_STATE = ("stated_needs", "project_needs", "needs_unstated", "all_stated", "ready_cue", "declined", "asked_question")
TEXT_GATES = ("all_stated", "needs_unstated", "ready_cue", "asked_question")
FIXED = {"always a booking": "book", "always a needs probe": "probe", "the scripted expert": EXPERT,
         "no suggestion": NO_SUGGESTION}


def parse_labelled(specs: list[str], flag: str = "--train") -> dict[str, str]:
    """``LABEL=DIR`` arguments as {label: folder}."""
    out = {}
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"{flag} {spec!r}: LABEL=DIR expected, e.g. random=data/bench/random_logs_2048")
        if label in out:
            raise SystemExit(f"{flag} {spec!r}: the label {label!r} is given twice")
        out[label] = folder
    return out


def read_values(path: str) -> dict[str, Any]:
    """A ``world_action_values.py`` result; any other JSON stops the script, naming what is missing."""
    values = json.loads(Path(path).read_text())
    missing = [k for k in ("logs", "per_state", "candidates", "seed", "continuation") if k not in values]
    if missing:
        raise SystemExit(f"--values {path}: no key(s) {missing}: a world_action_values.py result is expected")
    if LOGGED not in values["candidates"]:
        raise SystemExit(f"--values {path}: the candidates hold no '{LOGGED}' reply to compare with")
    return values


def text_state(logs: Any, vertical: dict[str, Any]) -> Any:
    """Per logged turn with a customer message, what the customer's messages so far show (``TEXT_STATE``): the
    public counterpart of the replayed hidden state."""
    import polars as pl

    from pipeline_steps.common.contract import HistoryTurn
    from pipeline_steps.world.state_reader import CustomerStateReader

    reader = CustomerStateReader(vertical)
    rows, history, current = [], [], None
    for rec in logs.sort("conversation_id", "turn_index").select("conversation_id", "turn_index", "customer_message").iter_rows(named=True):
        if rec["conversation_id"] != current:
            history, current = [], rec["conversation_id"]
        if rec["customer_message"] is None:  # the customer left: no suggestion follows
            continue
        history.append(HistoryTurn(rec["customer_message"]))
        seen = reader.read(history)
        stated, needs = len(seen.revealed), len(seen.project_needs)
        rows.append({"conversation_id": rec["conversation_id"], "turn_index": rec["turn_index"], "stated_needs": stated,
                     "project_needs": needs, "needs_unstated": needs - stated,
                     "all_stated": float(stated == needs), "ready_cue": float(seen.ready),
                     "declined": float(seen.declined), "asked_question": float(seen.asked_question)})
    return pl.DataFrame(rows)


def state_rows(params: Any, tokenizer: Any, world: Any, logs_dir: str, snapshot: set[tuple[str, int]] | None = None) -> dict[str, Any]:
    """The returns rows of ``logs_dir`` (state text, reply text, outcome, as Q would see them) of conversations that
    replay record for record, joined with the hidden state before the suggestion, what the text shows of it and the
    logged reply's act; with the logs, states, acts and replay counts (``snapshot``: as ``world_q_ceiling.replay``)."""
    import polars as pl

    keys = ["conversation_id", "turn_index"]
    rows, info = bench.world_log_returns(params, tokenizer, logs_dir)
    logs = ceiling.read_collected_logs(logs_dir)
    states, counts = ceiling.replay(logs, world, snapshot=snapshot)
    acts = ceiling.suggestion_acts(logs, world.featurizer)
    joined = (rows.join(states, on=keys, how="inner").filter(pl.col("reproduced")).join(acts, on=keys, how="left")
              .join(text_state(logs, world.vertical), on=keys, how="inner"))
    return {"rows": joined, "info": info, "logs": logs, "states": states, "acts": acts, "counts": counts}


def training_rows(loaded: dict[str, Any], exclude: set[str], vertical: dict[str, Any], where: str) -> tuple[Any, dict[str, Any]]:
    """``state_rows`` without the conversations in ``exclude`` (those holding an evaluated state), and the coverage of
    the (understood, call to action) cells in what is left: what the learners see."""
    import polars as pl

    everything = loaded["rows"]
    rows = everything.filter(~pl.col("conversation_id").is_in(list(exclude)))
    if rows.height == 0 or rows["outcome"].n_unique() < 2:
        raise SystemExit(f"--train {where}: {rows.height} usable rows, outcomes {rows['outcome'].unique().to_list()}: "
                         "both outcomes are needed to fit a learner")
    used = rows["conversation_id"].unique().to_list()
    coverage = logged_coverage(*(loaded[k].filter(pl.col("conversation_id").is_in(used)) for k in ("logs", "states", "acts")),
                               vertical)
    finals = rows.group_by("conversation_id").agg(pl.col("outcome").max())
    counts = loaded["counts"]
    return rows, {**loaded["info"], "conversations_used": finals.height, "conversions_used": int(finals["outcome"].sum()),
                  "conversations_evaluated_dropped": everything["conversation_id"].n_unique() - finals.height,
                  "conversations_not_reproduced": counts["conversations"] - counts["reproduced"], "rows": rows.height,
                  "coverage": coverage.to_dicts()}


def evaluation_pairs(values: dict[str, Any], loaded: dict[str, Any], world: Any) -> tuple[Any, Any, list[str]]:
    """One row per (evaluated state, candidate), in ``per_state`` order and then ``values["candidates"]`` order: the state
    text as Q reads it, the candidate's reply and its act (the world featuriser's, as the training acts are labelled),
    and the state just before the suggestion; and the per-state frame of the world's Q."""
    import polars as pl

    from pipeline_steps.common.q_input import action_text
    from pipeline_steps.world.scripted import ScriptedPolicy

    per_state = pl.DataFrame(values["per_state"])
    keys = list(zip(per_state["conversation_id"].to_list(), per_state["turn_index"].to_list()))
    snapshots = loaded["counts"]["snapshots"]
    at = {(r["conversation_id"], r["turn_index"]): r for r in loaded["rows"].iter_rows(named=True)}
    missing = [k for k in keys if k not in snapshots or k not in at]
    if missing:
        raise SystemExit(f"--values: state {missing[0]} (and {len(missing) - 1} more) is not a reproduced logged turn of "
                         f"{values['logs']}: the values were measured on other logs")
    expert = ScriptedPolicy("expert", world.vertical, seed=values["seed"])  # as world_action_values.py drew it
    names = values["candidates"]
    state_columns = [c for c in loaded["rows"].columns if c in ceiling.HIDDEN_STATE or c in TEXT_STATE
                     or c.startswith("persona_") or c == "turn_index"]
    pairs = []
    for key in keys:
        snap = snapshots[key]
        cands = candidate_suggestions(world.vertical, expert.suggest([snap.history], [snap.conversation_id])[0].text, None)
        row = at[key]
        for name in names:
            # the logged reply as the returns step wrote it (PII redacted), with its logged act
            reply = row["action_text"] if name == LOGGED else action_text(cands[name])
            pairs.append({"conversation_id": key[0], "candidate": name, "state_text": row["state_text"],
                          "action_text": reply, "logged_act": row["act"], **{c: row[c] for c in state_columns}})
    frame = pl.DataFrame(pairs)
    texts = frame.filter(~pl.col("candidate").is_in([LOGGED, NO_SUGGESTION]))["action_text"].to_list()
    acts = label_acts(texts, world.featurizer)
    frame = frame.with_columns(pl.when(pl.col("candidate") == LOGGED).then(pl.col("logged_act"))
                               .when(pl.col("candidate") == NO_SUGGESTION).then(None)
                               .otherwise(pl.col("action_text").replace_strict(acts, default=None)).alias("act")).drop("logged_act")
    return frame, per_state, names


def q_model_scores(folder: str, pairs: Any, params: Any, tokenizer: Any, vertical: dict[str, Any],
                   cache_dir: str | None = None) -> dict[str, Any]:
    """A trained Q (fit_q's ``scorer/`` or ``adapter/``) scores every evaluation pair, reading the states as this script
    rendered them: a Q fitted on returns of another tokenizer, prompt or base model is refused (its manifest)."""
    import numpy as np

    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.common.q_model import load_scorer, read_manifest, score_by_state
    from pipeline_steps.returns import ReturnsError, check_compatible, returns_metadata

    manifest = read_manifest(folder)
    trained_on = manifest.get("returns_metadata") or {}
    if not trained_on:
        raise SystemExit(f"--q-model {folder}: no fit_q manifest with the returns metadata Q was fitted on: "
                         "fit_q's scorer/ or adapter/ folder is expected")
    try:
        check_compatible(trained_on, returns_metadata(params, tokenizer, system_prompt_for(vertical)), f"--q-model {folder}")
    except ReturnsError as exc:
        raise SystemExit(f"{exc} (run this script with the params Q was fitted under)") from exc
    states, replies = pairs["state_text"].to_list(), pairs["action_text"].to_list()
    # The same pairs under both continuations' values: scores are cached by the scorer's weights and the pairs' texts.
    cached = None
    if cache_dir:  # hashing the weights costs a read of them: only when there is a cache to look in
        key = hashlib.sha256(json.dumps([weights_digest(folder), manifest, states, replies]).encode()).hexdigest()
        cached = Path(cache_dir) / f"q_scores.{key[:16]}.npy"
    if cached is not None and cached.exists():
        scores, seconds = np.load(cached), 0.0
    else:
        t0 = time.perf_counter()
        model, q_tokenizer = load_scorer(folder)
        # 13 candidates per state: each state's tokens run once (3.6x the pairs/s here: bench_q_scoring.py)
        scores = score_by_state(model, q_tokenizer, states, replies, max_action_tokens=manifest.get("max_action_tokens"),
                                progress=True)
        seconds = time.perf_counter() - t0
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(cached, scores)
    return {"scores": scores, "target": manifest.get("target"), "base_model": manifest.get("base_model"),
            "score_seconds": seconds, "cache": str(cached) if cached is not None else None}


def weights_digest(folder: str) -> str:
    """SHA-256 over a model folder's weight files (names and bytes)."""
    from fetch_dealornodeal import file_sha256

    files = sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin"))
    return hashlib.sha256(json.dumps([[f.name, file_sha256(f)] for f in files]).encode()).hexdigest()


def export_returns(rows: Any, params: Any, tokenizer: Any, vertical: dict[str, Any], path: str) -> dict[str, Any]:
    """``rows`` (training rows of one label) as a returns file: the returns step's columns, schema and metadata, so
    fit_q reads it like the step's own output and a Q fitted on it passes ``--q-model``'s compatibility check."""
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.common.parquet_io import write_parquet
    from pipeline_steps.returns import returns_table

    table = returns_table(rows.sort(["conversation_id", "turn_index"]), params, tokenizer, system_prompt_for(vertical))
    write_parquet(table, path)
    split = table.column("split").to_pylist()
    return {"path": path, "rows": table.num_rows, "train_rows": split.count("train"),
            "validation_rows": split.count("validation")}


def fit_and_score(train: Any, pairs: Any, seed: int) -> dict[str, Any]:
    """Each learner fitted on ``train``; its score of every evaluation pair (the predicted P(conversion))."""
    import polars as pl

    act_names = sorted(a for a in train["act"].unique().to_list() if a is not None)
    unseen = sorted(set(a for a in pairs["act"].unique().to_list() if a is not None) - set(act_names))
    train, models = ceiling.with_act_features(train, act_names)
    # An act the training logs never show has no column: the learner scores it as it scores no suggestion.
    pairs, _ = ceiling.with_act_features(pairs.with_columns(pl.when(pl.col("act").is_in(unseen)).then(None)
                                                            .otherwise(pl.col("act")).alias("act")), act_names)
    # the same act columns again, with the text-state products added (the gate names do not overlap)
    train, text_models = ceiling.with_act_features(train, act_names, [*TEXT_STATE, "turn_index"], TEXT_GATES)
    pairs, _ = ceiling.with_act_features(pairs, act_names, [*TEXT_STATE, "turn_index"], TEXT_GATES)
    features = {"hidden_state_and_act_gated": models["hidden_state_and_act_gated"],
                "text_state_and_act_gated": text_models["hidden_state_and_act_gated"]}
    _, preds, _ = ceiling.hidden_state_models(features, seed)(train, pairs)
    preds["tfidf_lr"] = bench.tfidf_baseline(train, pairs)
    return {"scores": preds, "acts_unseen_in_training": unseen}


GROUPS = ("all", "needs understood", "needs not yet understood")


def group_masks(per_state: Any) -> dict[str, Any]:
    import numpy as np

    understood = per_state["understood"].to_numpy().astype(bool)
    masks = (np.ones(len(understood), bool), understood, ~understood)
    return dict(zip(GROUPS, masks))


def ranking(per_state: Any, names: list[str], scores: Any, seed: int, acts: Any = None) -> dict[str, Any]:
    """Within-state Spearman with the world's Q, and the world's Q of the top-scored candidate minus the logged one's,
    overall and by whether the customer's needs were understood. Candidates tied at the top share the pick (the
    expected value of a random tie-break): a learner that reads only the act scores a template, the expert's reply and
    the logged one alike when their acts agree. ``acts`` (states x candidates) adds the share of each act picked."""
    import numpy as np
    from scipy.stats import spearmanr

    q = per_state.select([f"q_{n}" for n in names]).to_numpy()
    s = np.asarray(scores, dtype=float).reshape(len(q), len(names))
    tied = s == s.max(axis=1, keepdims=True)
    weight = tied / tied.sum(axis=1, keepdims=True)  # each state's pick, shared among its tied top candidates
    gain = (weight * q).sum(axis=1) - q[:, names.index(LOGGED)]
    rho = np.array([spearmanr(s[i], q[i]).statistic if np.ptp(q[i]) > 0 and np.ptp(s[i]) > 0 else np.nan
                    for i in range(len(q))])
    groups = per_state["conversation_id"].to_numpy()
    act_of = None if acts is None else np.array([["none" if a is None else a for a in row] for row in acts], dtype=object)
    out = {}
    for label, mask in group_masks(per_state).items():
        if not mask.any():
            continue
        ok = mask & ~np.isnan(rho)
        share = weight[mask].mean(axis=0)
        out[label] = {"states": int(mask.sum()), "gain_over_logged": mean_ci(gain[mask], groups[mask], seed),
                      "spearman": mean_ci(rho[ok], groups[ok], seed) if ok.sum() > 1 else None,
                      "tied_top_states": int((tied[mask].sum(axis=1) > 1).sum()),
                      "top_share": {n: float(v) for n, v in zip(names, share) if v > 0}}
        if act_of is not None:
            by_act: dict[str, float] = {}
            for a, w in zip(act_of[mask].ravel(), weight[mask].ravel()):
                by_act[a] = by_act.get(a, 0.0) + float(w) / int(mask.sum())
            out[label]["top_act_share"] = {a: v for a, v in sorted(by_act.items(), key=lambda kv: -kv[1]) if v > 0}
    return out


def action_ranking(values_path: str, train_specs: dict[str, str], params_path: str = "params.yaml",
                   train_rows: int | None = None, seed: int = 0, q_models: dict[str, str] | None = None,
                   export_train: dict[str, str] | None = None, q_cache: str | None = None,
                   drop_candidates: Sequence[str] = ()) -> dict[str, Any]:
    import numpy as np

    from pipeline_steps.common.base_model import load_tokenizer, resolve_base_model
    from pipeline_steps.common.config import load_params
    from pipeline_steps.world.simulator import World

    t0 = time.perf_counter()
    unknown = sorted(set(export_train or {}) - set(train_specs))
    if unknown:
        raise SystemExit(f"--export-train {unknown[0]}: no --train with that label (labels: {sorted(train_specs)})")
    values = read_values(values_path)
    bad = [d for d in drop_candidates if d not in values["candidates"] or d == LOGGED]
    if bad:
        raise SystemExit(f"--drop-candidate {bad[0]}: expected one of the candidates other than {LOGGED!r} "
                         f"({', '.join(c for c in values['candidates'] if c != LOGGED)})")
    params = load_params(params_path)
    tokenizer = load_tokenizer(resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir))
    world = World(params.world)
    per_state_keys = {(s["conversation_id"], s["turn_index"]) for s in values["per_state"]}
    evaluated_logs = str(Path(values["logs"]).resolve())
    loaded = {evaluated_logs: state_rows(params, tokenizer, world, values["logs"], per_state_keys)}
    pairs, per_state, names = evaluation_pairs(values, loaded[evaluated_logs], world)
    acts = pairs["act"].to_numpy().reshape(per_state.height, len(names))
    evaluated = set(per_state["conversation_id"].to_list())
    # Candidates left out of every chooser's pick (e.g. the abstain marker: a generated reply is text).
    kept = [i for i, n in enumerate(names) if n not in drop_candidates]

    def rank(scores: Any) -> dict[str, Any]:
        s = np.asarray(scores, dtype=float).reshape(len(per_state), len(names))[:, kept]
        return ranking(per_state, [names[i] for i in kept], s.ravel(), seed, acts[:, kept])

    results, trained = {}, {}
    for label, folder in train_specs.items():
        source = str(Path(folder).resolve())
        if source not in loaded:  # the evaluated logs are read and replayed once
            loaded[source] = state_rows(params, tokenizer, world, folder)
        rows, info = training_rows(loaded[source], evaluated, world.vertical, folder)
        if train_rows and rows.height > train_rows:
            rows = rows.sample(train_rows, seed=seed, shuffle=True)
            info["rows_sampled"] = train_rows
        fitted = fit_and_score(rows, pairs, seed)
        trained[label] = {**info, "acts_unseen_in_training": fitted["acts_unseen_in_training"]}
        if label in (export_train or {}):
            trained[label]["exported"] = export_returns(rows, params, tokenizer, world.vertical, export_train[label])
        for learner in LEARNERS:
            results[f"{label} / {learner}"] = rank(fitted["scores"][learner])
    scorers = {}
    for label, folder in (q_models or {}).items():
        scored = q_model_scores(folder, pairs, params, tokenizer, world.vertical, q_cache)
        scorers[label] = {"folder": folder, "target": scored["target"], "base_model": scored["base_model"],
                          "pairs": len(scored["scores"]), "score_seconds": scored["score_seconds"], "cache": scored["cache"]}
        results[f"{label} / q"] = rank(scored["scores"])
    reference = {}
    for label, name in FIXED.items():
        if name in names and name not in drop_candidates:
            reference[label] = rank(np.tile((np.array(names) == name).astype(float), len(per_state)))
    cv_gain, groups = per_state["best_gain_over_logged_cv"].to_numpy(), per_state["conversation_id"].to_numpy()
    best = {g: {"states": int(mask.sum()), "gain_over_logged": mean_ci(cv_gain[mask], groups[mask], seed)}
            for g, mask in group_masks(per_state).items() if mask.any()}
    return {"values": values_path, "continuation": values["continuation"], "params": params_path, "seed": seed,
            "train_rows_cap": train_rows, "states": per_state.height,
            "state_conversations": int(per_state["conversation_id"].n_unique()), "candidates": names,
            "dropped_candidates": list(drop_candidates),
            "training_logs": trained, "q_models": scorers, "learners": results, "fixed_choices": reference,
            "world_best_cross_validated": best, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", required=True, help="a world_action_values.py result (the world's Q at logged states)")
    ap.add_argument("--train", action="append", default=[], metavar="LABEL=DIR",
                    help="training logs collect wrote in the world (repeatable)")
    ap.add_argument("--q-model", action="append", default=[], metavar="LABEL=DIR",
                    help="a trained Q to score as well: fit_q's scorer/ or adapter/ folder (repeatable)")
    ap.add_argument("--export-train", action="append", default=[], metavar="LABEL=FILE",
                    help="write a --train label's training rows as a returns file, for fit_q --input (repeatable)")
    ap.add_argument("--q-cache", default=None, metavar="DIR",
                    help="keep --q-model scores here (keyed by the weights and the pairs), e.g. for the other continuation")
    ap.add_argument("--drop-candidate", action="append", default=[], metavar="NAME",
                    help="leave a candidate out of every pick, e.g. no_suggestion (the world's best keeps all)")
    ap.add_argument("--params", default="params.yaml", help="params.yaml whose world wrote the logs")
    ap.add_argument("--train-rows", type=int, default=None, help="cap each training set's rows (a seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    if not args.train and not args.q_model:
        ap.error("nothing to score: give --train LABEL=DIR and/or --q-model LABEL=DIR")
    result = action_ranking(args.values, parse_labelled(args.train, "--train"), args.params, args.train_rows, args.seed,
                            parse_labelled(args.q_model, "--q-model"), parse_labelled(args.export_train, "--export-train"),
                            args.q_cache, args.drop_candidate)
    console = Console(width=160)
    for label, info in result["training_logs"].items():
        understood_cta = [c for c in info["coverage"] if c["understood"] and c["call_to_action"]]
        total = sum(c["logged_decisions"] for c in info["coverage"])
        console.print(f"training logs '{label}': {info['conversations_used']} conversations ({info['conversions_used']} "
                      f"converted), {info['rows']} rows; calls to action at understood needs: "
                      f"{understood_cta[0]['logged_decisions'] if understood_cta else 0} of {total} logged decisions")
    groups = [g for g in GROUPS if g in result["world_best_cross_validated"]]
    table = Table(title=f"Greedy choice among {len(result['candidates'])} candidates at {result['states']} logged states: "
                        f"the world's Q (continuation '{result['continuation']}') of the top one minus the logged reply's; "
                        "mean [95% CI, conversations resampled]")
    table.add_column("chooser")
    table.add_column("within-state Spearman with the world's Q", justify="right")
    for g in groups:
        table.add_column(f"gain, {g}", justify="right")

    def fmt(ci: list[float] | None, signed: bool = True) -> str:
        if ci is None:
            return ""
        f = "{:+.3f} [{:+.3f}, {:+.3f}]" if signed else "{:.3f} [{:.3f}, {:.3f}]"
        return f.format(*ci)

    for name, r in result["learners"].items():
        table.add_row(name, fmt(r["all"]["spearman"]), *(fmt(r[g]["gain_over_logged"]) for g in groups))
    for name, r in result["fixed_choices"].items():
        table.add_row(name, "", *(fmt(r[g]["gain_over_logged"]) for g in groups))
    b = result["world_best_cross_validated"]
    table.add_row("the world's best (cross-validated)", "", *(fmt(b[g]["gain_over_logged"]) for g in groups))
    console.print(table)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
