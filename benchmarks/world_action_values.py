"""How much does one suggestion change the outcome? The world's true Q(s, a) at logged states, by branching replays.

    .venv/bin/python benchmarks/world_action_values.py benchmarks/results/bench_fit_q_world_logs_gpu/explore_logs_2048 \
        --states 400 --rollouts 32 --out benchmarks/results/bench_fit_q_world_logs_gpu/world_action_values.json

A companion to ``world_q_ceiling.py``. There, the world's hidden state ranks the outcomes of an LLM policy's logs
at only 0.68-0.70 AUC, and the suggestion's act adds at most 0.01. But an AUC over logged rows mixes the value of
the state with the value of the action, and PPO climbs only the second: ``Q(s, a) - V(s)``, the difference between
actions in one state. The world can measure that difference directly.

1. The logs are replayed as ``world_q_ceiling.replay`` does (every conversation with its seed, index and logged
   suggestions), and ``--states`` decision points of reproduced conversations are drawn at random (seeded). Each is
   a deep copy of the conversation just before the suggestion: the hidden customer included.
2. At each, every candidate suggestion is sent ``--rollouts`` times: one template of each of the vertical's dialogue
   acts, the scripted expert's suggestion for that state, the logged suggestion, and no suggestion (the business
   writes its own). After it, the conversation goes on with ``--continuation`` until it ends (default ``abstain``:
   the business's own habitual messages, as before any SR agent). Rollout ``r`` of every candidate starts from the
   same random seed (common random numbers; the streams part as soon as two candidates draw differently).
3. ``Q(s, a)`` is the share of rollouts that convert: Q under the continuation, not under the policy that wrote
   the logs. Reported: the mean over states of each candidate's Q, also by whether the customer's needs are already
   understood, with 95% CIs that resample conversations; the gain of the best single action over the logged one,
   with the best chosen on half of the rollouts and scored on the other half (a maximum over noisy estimates would
   overstate it; ties go to the logged suggestion); and how many logged decisions had each (understood, call to action) pair,
   the coverage a Q fitted on these logs had to learn from.

The gain of the best action is a conservative estimate of what changing one suggestion, and only that one, adds
under this continuation: the room a one-step policy improvement (Theorem 1) has at these states.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_steps.common.tracking import write_json  # noqa: E402

LOGGED, EXPERT, NO_SUGGESTION = "logged", "expert", "no_suggestion"


def candidate_suggestions(vertical: dict[str, Any], expert_text: str | None, logged_text: str | None) -> dict[str, str | None]:
    """One template per dialogue act of the vertical (the first; ``tailored_book`` needs the customer's terms, which
    the expert fills in), the expert's suggestion, the logged one, and none."""
    out: dict[str, str | None] = {act: texts[0] for act, texts in vertical["business_templates"].items()
                                  if act != "tailored_book"}
    out.update({EXPERT: expert_text, LOGGED: logged_text, NO_SUGGESTION: None})
    return out


def rollouts(world: Any, snapshot: Any, candidates: dict[str, str | None], n: int, continuation: Any,
             seed: int, state_index: int) -> dict[str, Any]:
    """Conversion of each candidate over ``n`` rollouts from one snapshot (a (candidate, rollout) array of 0/1)."""
    import copy

    import numpy as np

    from pipeline_steps.common.policies import Suggestion

    names = list(candidates)
    convs, first = [], []
    for name in names:
        for r in range(n):
            cv = copy.deepcopy(snapshot)
            cv.rng = np.random.default_rng([seed, state_index, r])  # rollout r: the same stream for every candidate
            convs.append(cv)
            first.append(Suggestion(candidates[name]))
    world.step(convs, first, "branch", "0", "control")
    keys = [f"{snapshot.conversation_id}/{r}" for _ in names for r in range(n)]
    while True:
        active = [i for i, cv in enumerate(convs) if not cv.done]
        if not active:
            break
        suggestions = continuation.suggest([convs[i].history for i in active], [keys[i] for i in active])
        world.step([convs[i] for i in active], suggestions, "continuation", "0", "control")
    converted = np.array([cv.converted for cv in convs], dtype=float).reshape(len(names), n)
    return {"names": names, "converted": converted, "conversations": convs}


def best_choice(q: Any, names: list[str]) -> int:
    """Index of the highest value; among ties the logged suggestion if it is one of them, else the first."""
    import numpy as np

    tied = np.flatnonzero(q == q.max())
    logged = names.index(LOGGED)
    return logged if logged in tied else int(tied[0])


def cross_validated_gain(converted: Any, names: list[str]) -> float:
    """Gain of the best candidate over the logged one, the best chosen on even rollouts and scored on odd ones and
    the reverse, averaged: a choice scored on the outcomes that chose it would overstate the gain."""
    a, b = converted[:, 0::2].mean(axis=1), converted[:, 1::2].mean(axis=1)
    logged = names.index(LOGGED)
    return float(0.5 * ((b[best_choice(a, names)] - b[logged]) + (a[best_choice(b, names)] - a[logged])))


def mean_ci(values: Any, conversations: Any, seed: int = 0) -> list[float]:
    """The mean over states and its 95% bootstrap CI, resampling whole conversations (several drawn states can share
    one): ``stats.paired_bootstrap``, as the evaluate step's offline gate computes its CI, against zero."""
    import numpy as np

    from pipeline_steps.common.stats import paired_bootstrap

    values = np.asarray(values, dtype=float)
    ci = paired_bootstrap(values, np.zeros_like(values), 2000, seed, groups=np.asarray(conversations))
    return [ci["mean"], ci["ci_low"], ci["ci_high"]]


def logged_coverage(logs: Any, states: Any, acts: Any, vertical: dict[str, Any]) -> Any:
    """Logged decisions by (needs understood, the suggestion is a call to action), with the conversion of their
    conversations: how much of the act x state pattern the logs show a Q fitted on them."""
    import polars as pl

    cta = list(vertical["call_to_action_acts"])
    return (states.join(acts, on=["conversation_id", "turn_index"])
            .join(logs.group_by("conversation_id").agg(pl.col("outcome").max().alias("converted")), on="conversation_id")
            .group_by(pl.col("understood").cast(pl.Boolean), pl.col("act").is_in(cta).alias("call_to_action"))
            .agg(pl.len().alias("logged_decisions"), pl.col("conversation_id").n_unique().alias("conversations"),
                 pl.col("converted").mean().alias("conversion_of_their_conversations"))
            .sort("understood", "call_to_action"))


def branch_points(logs_dir: str, params: Any, n_states: int, seed: int) -> dict[str, Any]:
    """The logs replayed in the world and ``n_states`` logged decision points drawn at random (seeded), each with a
    deep copy of its conversation just before the suggestion (``snapshots``), kept only where the whole conversation
    reproduced: the states every branching benchmark (this one, ``world_policy_values.py``) starts from."""
    import polars as pl

    import world_q_ceiling as ceiling
    from pipeline_steps.world.simulator import World

    logs = ceiling.read_collected_logs(logs_dir)
    decisions = logs.filter(pl.col("suggestion").is_not_null()).select("conversation_id", "turn_index").sort(
        "conversation_id", "turn_index")
    if decisions.height == 0:
        raise SystemExit(f"{logs_dir}: no logged suggestion to branch from")
    drawn = decisions.sample(min(n_states, decisions.height), seed=seed, shuffle=True)
    keys = set(drawn.iter_rows())
    world = World(params.world)
    states, counts = ceiling.replay(logs, world, snapshot=keys)
    snapshots = counts.pop("snapshots")
    reproduced = set(states.filter(pl.col("reproduced"))["conversation_id"].to_list())
    return {
        "world": world, "logs": logs, "states": states, "counts": counts, "drawn": drawn, "snapshots": snapshots,
        "chosen": [k for k in drawn.iter_rows() if k[0] in reproduced and k in snapshots],
        "state_of": {(r["conversation_id"], r["turn_index"]): r for r in states.iter_rows(named=True)},
        "logged_text": {(r["conversation_id"], r["turn_index"]): r["suggestion"]
                        for r in logs.select("conversation_id", "turn_index", "suggestion").iter_rows(named=True)},
    }


def action_values(logs_dir: str, params_path: str = "params.yaml", n_states: int = 400, n_rollouts: int = 32,
                  continuation_name: str = "abstain", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    import numpy as np
    import polars as pl
    from tqdm import tqdm

    import world_q_ceiling as ceiling
    from pipeline_steps.common.config import load_params
    from pipeline_steps.world.scripted import ScriptedPolicy

    if n_rollouts < 2 or n_rollouts % 2:
        raise SystemExit(f"--rollouts {n_rollouts}: an even number >= 2 (the best action is chosen on half of them)")
    t0 = time.perf_counter()
    params = load_params(params_path)
    bp = branch_points(logs_dir, params, n_states, seed)
    world, logs, states, counts, drawn = bp["world"], bp["logs"], bp["states"], bp["counts"], bp["drawn"]
    chosen, snapshots, state_of, logged_text = bp["chosen"], bp["snapshots"], bp["state_of"], bp["logged_text"]
    expert = ScriptedPolicy("expert", world.vertical, seed=seed)
    continuation = ScriptedPolicy(continuation_name, world.vertical, seed=seed)
    per_state, names = [], None
    for i, key in enumerate(tqdm(chosen, desc="branching", unit="state", disable=not progress)):
        snap = snapshots[key]
        expert_text = expert.suggest([snap.history], [snap.conversation_id])[0].text
        out = rollouts(world, snap, candidate_suggestions(world.vertical, expert_text, logged_text[key]), n_rollouts,
                       continuation, seed, i)
        names = out["names"]
        q = out["converted"].mean(axis=1)
        tied = [names[j] for j in np.flatnonzero(q == q.max())]
        s = state_of[key]
        per_state.append({"conversation_id": key[0], "turn_index": key[1], "understood": bool(s["understood"]),
                          "needs_left": s["needs_left"], "trust": s["trust"], "annoyance": s["annoyance"],
                          "best": tied, "best_gain_over_logged_cv": cross_validated_gain(out["converted"], names),
                          **{f"q_{n}": float(v) for n, v in zip(names, q)}})
    coverage = logged_coverage(logs, states, ceiling.suggestion_acts(logs, world.featurizer), world.vertical)
    if not per_state:
        raise SystemExit(f"{logs_dir}: none of the drawn decision points belongs to a reproduced conversation")
    frame = pl.DataFrame(per_state)
    summary = {}
    for group, sub in (("all", frame), ("needs understood", frame.filter(pl.col("understood"))),
                       ("needs not yet understood", frame.filter(~pl.col("understood")))):
        if sub.height == 0:
            continue
        summary[group] = {"states": sub.height,
                          "q": {n: mean_ci(sub[f"q_{n}"].to_numpy(), sub["conversation_id"].to_numpy(), seed)
                                for n in names},
                          "best_gain_over_logged_cv": mean_ci(sub["best_gain_over_logged_cv"].to_numpy(),
                                                              sub["conversation_id"].to_numpy(), seed),
                          # each state's best candidates, ties sharing the state equally
                          "best_action_share": {n: sum(n in b and 1 / len(b) for b in sub["best"].to_list()) / sub.height
                                                for n in names}}
    return {"logs": logs_dir, "params": params_path, "continuation": continuation_name, "rollouts": n_rollouts,
            "states_drawn": drawn.height, "states": frame.height, "state_conversations": int(frame["conversation_id"].n_unique()),
            "seed": seed, "logged_coverage": coverage.to_dicts(),
            "replay": {k: v for k, v in counts.items()}, "candidates": names, "summary": summary,
            "per_state": per_state, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", help="conversation logs the world wrote (the folder collect wrote)")
    ap.add_argument("--params", default="params.yaml", help="params.yaml whose world wrote the logs")
    ap.add_argument("--states", type=int, default=400, help="decision points to branch from (drawn at random)")
    ap.add_argument("--rollouts", type=int, default=32, help="rollouts per candidate and state (even)")
    ap.add_argument("--continuation", default="abstain",
                    help="scripted strategy that writes the suggestions after the branch (abstain: the business's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from pipeline_steps.world.scripted import STRATEGIES

    if args.continuation not in STRATEGIES:
        ap.error(f"--continuation {args.continuation!r}: one of {', '.join(STRATEGIES)}")
    result = action_values(args.logs, args.params, args.states, args.rollouts, args.continuation, args.seed,
                           progress=not args.no_progress)
    console = Console(width=140)
    groups = list(result["summary"])
    table = Table(title=f"Q(s, a): conversion after one suggestion, then '{result['continuation']}' "
                        f"({result['rollouts']} rollouts per state and candidate; mean over states [95% CI])")
    table.add_column("suggestion")
    for g in groups:
        table.add_column(f"{g} ({result['summary'][g]['states']} states)", justify="right")
    by_all = result["summary"][groups[0]]["q"]
    for name in sorted(result["candidates"], key=lambda n: -by_all[n][0]):
        table.add_row(name, *(f"{result['summary'][g]['q'][name][0]:.3f} [{result['summary'][g]['q'][name][1]:.3f}, "
                              f"{result['summary'][g]['q'][name][2]:.3f}]" for g in groups))
    table.add_row("best at this state - logged (cross-validated)", *(
        "{:+.3f} [{:+.3f}, {:+.3f}]".format(*result["summary"][g]["best_gain_over_logged_cv"]) for g in groups))
    console.print(table)
    console.print(f"{result['states']} states from {result['state_conversations']} conversations; the logs' decisions by "
                  f"(needs understood, call to action): {result['logged_coverage']}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
