"""Scoring candidates that share a state: ``q_model.score`` (every pair whole) against ``q_model.score_by_state``
(each state's tokens once, the replies on its cached keys and values), in one run, on the same pairs.

    .venv/bin/python benchmarks/bench_q_scoring.py --scorer data/bench/q_explore_256/model/scorer \\
        --returns data/bench/explore_train_returns_256.parquet --states 20 --replies 13 --repeats 2

States and replies are seeded samples of a returns file (each state paired with every reply, as world_action_ranking
scores 13 candidates per state, or best-of-n its n samples). Prints pairs/s of each, the ratio and the largest
difference between their values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench(scorer: str, returns: str, states: int, replies: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np
    import polars as pl

    from pipeline_steps.common.q_model import load_scorer, read_manifest, score, score_by_state

    if states < 1 or replies < 1 or repeats < 1:
        raise SystemExit("--states, --replies and --repeats must be >= 1")
    model, tokenizer = load_scorer(scorer)
    max_action = read_manifest(scorer).get("max_action_tokens")
    rows = pl.read_parquet(returns, columns=["state_text", "action_text"])
    picked = rows.sample(min(states, rows.height), seed=seed)["state_text"].to_list()
    texts = rows.sample(min(replies, rows.height), seed=seed + 1)["action_text"].to_list()
    pair_states = [s for s in picked for _ in texts]
    pair_actions = texts * len(picked)
    runs: dict[str, list[float]] = {"score": [], "score_by_state": []}
    values = {}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for name, fn in (("score", score), ("score_by_state", score_by_state)):
            t0 = time.perf_counter()
            values[name] = fn(model, tokenizer, pair_states, pair_actions, max_action_tokens=max_action)
            runs[name].append(len(pair_states) / (time.perf_counter() - t0))
    rate = {k: float(np.median(v)) for k, v in runs.items()}
    return {"pairs": len(pair_states), "states": len(picked), "replies": len(texts), "pairs_per_second": rate,
            "runs_pairs_per_second": runs, "speedup": rate["score_by_state"] / rate["score"],
            "max_abs_diff": float(np.abs(values["score"] - values["score_by_state"]).max())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scorer", required=True, help="fit_q's scorer/ (or adapter/) folder")
    ap.add_argument("--returns", required=True, help="a returns Parquet file to draw states and replies from")
    ap.add_argument("--states", type=int, default=20)
    ap.add_argument("--replies", type=int, default=13)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    r = bench(args.scorer, args.returns, args.states, args.replies, args.repeats, args.seed)
    print(f"{r['pairs']} pairs ({r['states']} states x {r['replies']} replies), median of {args.repeats}:")
    print(f"  score (every pair whole)      {r['pairs_per_second']['score']:8.1f} pairs/s")
    print(f"  score_by_state (state once)   {r['pairs_per_second']['score_by_state']:8.1f} pairs/s")
    print(f"  ratio {r['speedup']:.2f}x; largest |difference| {r['max_abs_diff']:.1e}")
    return r


if __name__ == "__main__":
    main()
