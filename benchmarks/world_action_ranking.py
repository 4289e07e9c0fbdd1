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
   under the same params: the check that matters before PPO climbs it.
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
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fit_q as bench  # noqa: E402
import world_q_ceiling as ceiling  # noqa: E402
from pipeline_steps.common.tracking import write_json  # noqa: E402
from world_log_acts import label_acts  # noqa: E402
from world_action_values import EXPERT, LOGGED, NO_SUGGESTION, candidate_suggestions, logged_coverage, mean_ci  # noqa: E402

LEARNERS = ("tfidf_lr", "text_state_and_act_gated", "hidden_state_and_act_gated")
# What the text shows of the state, as the scripted expert reads it (ScriptedPolicy.read_state), and the part of it
# an act's effect is gated on.
TEXT_STATE = ("stated_needs", "project_needs", "needs_unstated", "all_stated", "ready_cue", "declined", "asked_question")
TEXT_GATES = ("all_stated", "needs_unstated", "ready_cue", "asked_question")
FIXED = {"always a booking": "book", "always a needs probe": "probe", "the scripted expert": EXPERT,
         "no suggestion": NO_SUGGESTION}


def parse_train(specs: list[str], flag: str = "--train") -> dict[str, str]:
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
    from pipeline_steps.world.scripted import ScriptedPolicy

    reader = ScriptedPolicy("expert", vertical)
    rows, history, current = [], [], None
    for rec in logs.sort("conversation_id", "turn_index").select("conversation_id", "turn_index", "customer_message").iter_rows(named=True):
        if rec["conversation_id"] != current:
            history, current = [], rec["conversation_id"]
        if rec["customer_message"] is None:  # the customer left: no suggestion follows
            continue
        history.append(HistoryTurn(rec["customer_message"]))
        seen = reader.read_state(history)
        stated = len(seen["revealed"])
        rows.append({"conversation_id": rec["conversation_id"], "turn_index": rec["turn_index"], "stated_needs": stated,
                     "project_needs": seen["project_needs"], "needs_unstated": seen["project_needs"] - stated,
                     "all_stated": float(stated == seen["project_needs"]), "ready_cue": float(seen["ready"]),
                     "declined": float(seen["declined"]), "asked_question": float(seen["asked_question"])})
    return pl.DataFrame(rows)


def training_rows(params: Any, tokenizer: Any, world: Any, logs_dir: str, exclude: set[str]) -> tuple[Any, dict[str, Any]]:
    """The returns rows of ``logs_dir`` (state text, reply text, outcome) with the replayed hidden state and the reply's
    act, conversations in ``exclude`` and any that did not replay record for record dropped; and the logs' coverage."""
    import polars as pl

    rows, info = bench.world_log_returns(params, tokenizer, logs_dir)
    logs = ceiling.read_collected_logs(logs_dir)
    states, counts = ceiling.replay(logs, world)
    acts = ceiling.suggestion_acts(logs, world.featurizer)
    before = rows["conversation_id"].n_unique()
    rows = (rows.filter(~pl.col("conversation_id").is_in(list(exclude)))
            .join(states, on=["conversation_id", "turn_index"], how="inner").filter(pl.col("reproduced"))
            .join(acts, on=["conversation_id", "turn_index"], how="left")
            .join(text_state(logs, world.vertical), on=["conversation_id", "turn_index"], how="inner"))
    if rows.height == 0 or rows["outcome"].n_unique() < 2:
        raise SystemExit(f"--train {logs_dir}: {rows.height} usable rows, outcomes {rows['outcome'].unique().to_list()}: "
                         "both outcomes are needed to fit a learner")
    finals = rows.group_by("conversation_id").agg(pl.col("outcome").max())
    coverage = logged_coverage(logs, states, acts, world.vertical)
    return rows, {**info, "conversations_used": finals.height, "conversions_used": int(finals["outcome"].sum()),
                  "conversations_dropped": before - finals.height, "rows": rows.height,
                  "replay_reproduced": counts["reproduced"], "coverage": coverage.to_dicts()}


def evaluation_pairs(values: dict[str, Any], params: Any, tokenizer: Any, world: Any) -> tuple[Any, Any, list[str]]:
    """One row per (evaluated state, candidate): the state text as Q reads it, the candidate's reply and act, and the
    hidden state just before the suggestion; and the per-state frame of the world's Q."""
    import polars as pl

    from pipeline_steps.common.q_input import action_text
    from pipeline_steps.world.scripted import ScriptedPolicy

    per_state = pl.DataFrame(values["per_state"])
    keys = set(zip(per_state["conversation_id"].to_list(), per_state["turn_index"].to_list()))
    rows, _ = bench.world_log_returns(params, tokenizer, values["logs"])
    logs = ceiling.read_collected_logs(values["logs"])
    states, counts = ceiling.replay(logs, world, snapshot=keys)
    snapshots = counts.pop("snapshots")
    missing = sorted(keys - set(snapshots))
    if missing:
        raise SystemExit(f"--values: state {missing[0]} (and {len(missing) - 1} more) is not in {values['logs']}: "
                         "the values were measured on other logs")
    text_of = {(r["conversation_id"], r["turn_index"]): r for r in rows.select("conversation_id", "turn_index", "state_text",
                                                                               "action_text").iter_rows(named=True)}
    hidden = {(r["conversation_id"], r["turn_index"]): r for r in states.join(
        text_state(logs, world.vertical), on=["conversation_id", "turn_index"], how="left").iter_rows(named=True)}
    acts = ceiling.suggestion_acts(logs, world.featurizer)
    logged_act = {(r["conversation_id"], r["turn_index"]): r["act"] for r in acts.iter_rows(named=True)}
    expert = ScriptedPolicy("expert", world.vertical, seed=values["seed"])  # as world_action_values.py drew it
    names = values["candidates"]
    pairs, expert_texts = [], {}
    for key in zip(per_state["conversation_id"].to_list(), per_state["turn_index"].to_list()):
        snap = snapshots[key]
        expert_texts[key] = expert.suggest([snap.history], [snap.conversation_id])[0].text
        cands = candidate_suggestions(world.vertical, expert_texts[key], None)
        for name in names:
            if name == LOGGED:
                reply, act = text_of[key]["action_text"], logged_act[key]  # as the returns step wrote it (PII redacted)
            else:
                reply = action_text(cands[name])
                act = None if name == NO_SUGGESTION else name
            pairs.append({"conversation_id": key[0], "turn_index": key[1], "candidate": name,
                          "state_text": text_of[key]["state_text"], "action_text": reply, "act": act,
                          **{k: v for k, v in hidden[key].items() if k not in ("conversation_id", "turn_index", "reproduced")}})
    frame = pl.DataFrame(pairs)
    expert_acts = label_acts(list(expert_texts.values()), world.featurizer)
    frame = frame.with_columns(pl.when(pl.col("candidate") == EXPERT)
                               .then(pl.col("action_text").replace_strict(expert_acts, default=None))
                               .otherwise(pl.col("act")).alias("act"))
    return frame, per_state, names


def q_model_scores(folder: str, pairs: Any, params: Any, tokenizer: Any, vertical: dict[str, Any]) -> dict[str, Any]:
    """A trained Q (fit_q's ``scorer/`` or ``adapter/``) scores every evaluation pair, reading the states as this script
    rendered them: a Q fitted on returns of another tokenizer, prompt or base model is refused (its manifest)."""
    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.common.q_model import load_scorer, read_manifest, score
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
    model, q_tokenizer = load_scorer(folder)
    scores = score(model, q_tokenizer, pairs["state_text"].to_list(), pairs["action_text"].to_list(),
                   max_action_tokens=manifest.get("max_action_tokens"))
    return {"scores": scores, "target": manifest.get("target"), "base_model": manifest.get("base_model")}


def fit_and_score(train: Any, pairs: Any, seed: int) -> dict[str, Any]:
    """Each learner fitted on ``train``; its score of every evaluation pair (the predicted P(conversion))."""
    import polars as pl

    act_names = sorted(a for a in train["act"].unique().to_list() if a is not None)
    unseen = sorted(set(a for a in pairs["act"].unique().to_list() if a is not None) - set(act_names))
    train, models = ceiling.with_act_features(train, act_names)
    # An act the training logs never show has no column: the learner scores it as it scores no suggestion.
    pairs, _ = ceiling.with_act_features(pairs.with_columns(pl.when(pl.col("act").is_in(unseen)).then(None)
                                                            .otherwise(pl.col("act")).alias("act")), act_names)
    gated = {"hidden_state_and_act_gated": models["hidden_state_and_act_gated"]}
    train, text_models = ceiling.with_act_features(train, act_names, [*TEXT_STATE, "turn_index"], TEXT_GATES)
    pairs, _ = ceiling.with_act_features(pairs, act_names, [*TEXT_STATE, "turn_index"], TEXT_GATES)
    gated["text_state_and_act_gated"] = text_models["hidden_state_and_act_gated"]
    _, preds, _ = ceiling.hidden_state_models(gated, seed)(train, pairs)
    preds["tfidf_lr"] = bench.tfidf_baseline(train, pairs)
    return {"scores": preds, "acts_unseen_in_training": unseen}


def ranking(per_state: Any, names: list[str], scores: Any, seed: int) -> dict[str, Any]:
    """Within-state Spearman with the world's Q, and the world's Q of the top-scored candidate minus the logged one's,
    overall and by whether the customer's needs were understood."""
    import numpy as np
    from scipy.stats import spearmanr

    q = per_state.select([f"q_{n}" for n in names]).to_numpy()
    s = np.asarray(scores, dtype=float).reshape(len(q), len(names))
    logged = names.index(LOGGED)
    top = s.argmax(axis=1)
    gain = q[np.arange(len(q)), top] - q[:, logged]
    rho = np.array([spearmanr(s[i], q[i]).statistic if np.ptp(q[i]) > 0 and np.ptp(s[i]) > 0 else np.nan
                    for i in range(len(q))])
    groups = per_state["conversation_id"].to_numpy()
    understood = per_state["understood"].to_numpy().astype(bool)
    out = {}
    for label, mask in (("all", np.ones(len(q), bool)), ("needs understood", understood), ("needs not yet understood", ~understood)):
        ok = mask & ~np.isnan(rho)
        out[label] = {"states": int(mask.sum()), "gain_over_logged": mean_ci(gain[mask], groups[mask], seed),
                      "spearman": mean_ci(rho[ok], groups[ok], seed) if ok.sum() > 1 else None,
                      "top_share": {n: float(np.mean(top[mask] == j)) for j, n in enumerate(names) if np.any(top[mask] == j)}}
    return out


def action_ranking(values_path: str, train_specs: dict[str, str], params_path: str = "params.yaml",
                   train_rows: int | None = None, seed: int = 0, q_models: dict[str, str] | None = None) -> dict[str, Any]:
    import numpy as np

    from pipeline_steps.common.base_model import load_tokenizer, resolve_base_model
    from pipeline_steps.common.config import load_params
    from pipeline_steps.world.simulator import World

    t0 = time.perf_counter()
    values = read_values(values_path)
    params = load_params(params_path)
    tokenizer = load_tokenizer(resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir))
    world = World(params.world)
    pairs, per_state, names = evaluation_pairs(values, params, tokenizer, world)
    evaluated = set(per_state["conversation_id"].to_list())
    results, trained = {}, {}
    for label, folder in train_specs.items():
        rows, info = training_rows(params, tokenizer, world, folder, evaluated)
        if train_rows and rows.height > train_rows:
            rows = rows.sample(train_rows, seed=seed, shuffle=True)
            info["rows_sampled"] = train_rows
        fitted = fit_and_score(rows, pairs, seed)
        trained[label] = {**info, "acts_unseen_in_training": fitted["acts_unseen_in_training"]}
        for learner in LEARNERS:
            results[f"{label} / {learner}"] = ranking(per_state, names, fitted["scores"][learner], seed)
    scorers = {}
    for label, folder in (q_models or {}).items():
        scored = q_model_scores(folder, pairs, params, tokenizer, world.vertical)
        scorers[label] = {"folder": folder, "target": scored["target"], "base_model": scored["base_model"]}
        results[f"{label} / q"] = ranking(per_state, names, scored["scores"], seed)
    reference = {}
    for label, name in FIXED.items():
        if name in names:
            onehot = np.tile((np.array(names) == name).astype(float), len(per_state))
            reference[label] = ranking(per_state, names, onehot, seed)
    best = {g: None for g in ("all", "needs understood", "needs not yet understood")}
    understood = per_state["understood"].to_numpy().astype(bool)
    cv_gain, groups = per_state["best_gain_over_logged_cv"].to_numpy(), per_state["conversation_id"].to_numpy()
    for g, mask in (("all", np.ones(len(cv_gain), bool)), ("needs understood", understood),
                    ("needs not yet understood", ~understood)):
        best[g] = {"states": int(mask.sum()), "gain_over_logged": mean_ci(cv_gain[mask], groups[mask], seed)}
    return {"values": values_path, "continuation": values["continuation"], "params": params_path, "seed": seed,
            "train_rows_cap": train_rows, "states": per_state.height,
            "state_conversations": int(per_state["conversation_id"].n_unique()), "candidates": names,
            "training_logs": trained, "q_models": scorers, "learners": results, "fixed_choices": reference,
            "world_best_cross_validated": best, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", required=True, help="a world_action_values.py result (the world's Q at logged states)")
    ap.add_argument("--train", action="append", default=[], metavar="LABEL=DIR",
                    help="training logs collect wrote in the world (repeatable)")
    ap.add_argument("--q-model", action="append", default=[], metavar="LABEL=DIR",
                    help="a trained Q to score as well: fit_q's scorer/ or adapter/ folder (repeatable)")
    ap.add_argument("--params", default="params.yaml", help="params.yaml whose world wrote the logs")
    ap.add_argument("--train-rows", type=int, default=None, help="cap each training set's rows (a seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    if not args.train and not args.q_model:
        ap.error("nothing to score: give --train LABEL=DIR and/or --q-model LABEL=DIR")
    result = action_ranking(args.values, parse_train(args.train, "--train"), args.params, args.train_rows, args.seed,
                            parse_train(args.q_model, "--q-model"))
    console = Console(width=160)
    for label, info in result["training_logs"].items():
        understood_cta = [c for c in info["coverage"] if c["understood"] and c["call_to_action"]]
        total = sum(c["logged_decisions"] for c in info["coverage"])
        console.print(f"training logs '{label}': {info['conversations_used']} conversations ({info['conversions_used']} "
                      f"converted), {info['rows']} rows; calls to action at understood needs: "
                      f"{understood_cta[0]['logged_decisions'] if understood_cta else 0} of {total} logged decisions")
    groups = ("all", "needs understood", "needs not yet understood")
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
