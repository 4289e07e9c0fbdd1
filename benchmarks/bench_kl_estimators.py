"""KL(pi || pi_ref) per token on held-out states: the exact per-position KL summed along pi's samples
(``policies.response_token_kls``, what evaluate, ppo_tune's check and the bench report) against the sampled
log-ratio ``sum(log pi - log pi_ref)`` they reported before, in one run, on the same samples.

    .venv/bin/python benchmarks/bench_kl_estimators.py --returns data/returns/returns.parquet \\
        --policy data/ppo_tune/model/policy --reference pi0 --states 64 --samples 4 --subset 16 \\
        --out benchmarks/results/bench_kl_estimators_cpu.json

Both estimate the same expectation. The question is how much each moves with the states it is computed on: the
bench estimates KL from pi_0 on ``bench.kl_states`` (16 on the CPU profile) states with one sample each, and the
evaluate step's KL gate reads one such number. Every state gets ``--samples`` suggestions from the policy's
deployed sampler (as evaluate draws them); the script then redraws ``--subset`` states at random ``--draws``
times, one sample each, and prints, for each estimator, the spread of the per-token estimate over those draws,
how often it comes out negative, the ratio of the variances, and the seconds each took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench(params_file: str, returns: str, policy: str, reference: str, states: int, samples: int, subset: int,
          draws: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np
    import torch

    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.policies import load_policy, response_logprobs, response_token_kls
    from pipeline_steps.evaluate import heldout_states, sample_suggestions
    from pipeline_steps.world.simulator import World

    if min(states, samples, subset, draws) < 1:
        raise SystemExit("--states, --samples, --subset and --draws must be >= 1")
    params = load_params(params_file)
    vertical = World(params.world).vertical
    held, _ = heldout_states(returns, states)
    pol = load_policy(policy, params, vertical)
    ref = load_policy(reference, params, vertical)
    bs, t = params.collect.batch_size, pol.temperature or 1.0
    # per (sample j, state i): the response's token count and each estimator's sum over its tokens
    tokens = np.zeros((samples, len(held)))
    exact = np.zeros_like(tokens)
    sampled = np.zeros_like(tokens)
    seconds = {"generate": 0.0, "exact": 0.0, "sampled": 0.0}
    for j in range(samples):
        t0 = time.perf_counter()
        _, ids = sample_suggestions(pol, held, bs, seed=params.world.seed + 7919 * j)
        seconds["generate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ex = response_token_kls(pol.model, ref.model, pol.tokenizer, held, ids, t, bs)
        seconds["exact"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        lp = response_logprobs(pol.model, pol.tokenizer, held, ids, t, bs)
        lp_ref = response_logprobs(ref.model, ref.tokenizer, held, ids, t, bs)
        seconds["sampled"] += time.perf_counter() - t0
        tokens[j] = [len(x) for x in ids]
        exact[j] = [float(x.sum()) for x in ex]
        sampled[j] = [float((a - b).sum()) for a, b in zip(lp, lp_ref)]

    rng = np.random.default_rng(seed)
    n = min(subset, len(held))
    pick_state = np.stack([rng.choice(len(held), size=n, replace=False) for _ in range(draws)])
    pick_sample = rng.integers(0, samples, size=(draws, n))

    def summary(per_response: np.ndarray) -> dict[str, Any]:
        est = per_response[pick_sample, pick_state].sum(1) / np.maximum(tokens[pick_sample, pick_state].sum(1), 1)
        return {"all_samples_per_token": float(per_response.sum() / max(tokens.sum(), 1)),
                "subset_mean": float(est.mean()), "subset_std": float(est.std(ddof=1)),
                "subset_p2_5": float(np.percentile(est, 2.5)), "subset_p97_5": float(np.percentile(est, 97.5)),
                "subset_negative_fraction": float((est < 0).mean()),
                "per_response_negative_fraction": float((per_response < 0).mean())}

    out = {"policy": policy, "reference": reference, "states": len(held), "samples_per_state": samples,
           "subset_states": n, "draws": draws, "temperature": t, "tokens_per_response": float(tokens.mean()),
           "exact": summary(exact), "sampled_log_ratio": summary(sampled), "seconds": seconds,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    std_exact, std_sampled = out["exact"]["subset_std"], out["sampled_log_ratio"]["subset_std"]
    out["subset_variance_ratio_sampled_over_exact"] = (std_sampled / std_exact) ** 2 if std_exact > 0 else None
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--returns", required=True, help="a returns Parquet file; its validation split gives the states")
    ap.add_argument("--policy", required=True, help="the policy whose KL is estimated (a folder, or pi0)")
    ap.add_argument("--reference", default="pi0", help="the reference policy (default pi0)")
    ap.add_argument("--states", type=int, default=64, help="held-out states (at most)")
    ap.add_argument("--samples", type=int, default=4, help="suggestions sampled per state")
    ap.add_argument("--subset", type=int, default=16, help="states per redrawn estimate (bench.kl_states)")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here too")
    args = ap.parse_args(argv)
    r = bench(args.params, args.returns, args.policy, args.reference, args.states, args.samples, args.subset,
              args.draws, args.seed)
    e, s = r["exact"], r["sampled_log_ratio"]
    print(f"KL({r['policy']} || {r['reference']}) per token; {r['states']} held-out states x {r['samples_per_state']} "
          f"samples, {r['tokens_per_response']:.1f} tokens per response, temperature {r['temperature']}")
    rows = [("on every sample", "all_samples_per_token", "{:.5f}"),
            (f"on {r['subset_states']} states, mean of {r['draws']} draws", "subset_mean", "{:.5f}"),
            ("  std over draws", "subset_std", "{:.5f}"),
            ("  2.5th percentile of draws", "subset_p2_5", "{:.5f}"),
            ("  97.5th percentile of draws", "subset_p97_5", "{:.5f}"),
            ("  draws below zero", "subset_negative_fraction", "{:.1%}"),
            ("responses below zero", "per_response_negative_fraction", "{:.1%}")]
    print(f"{'':36} {'exact per position':>20} {'sampled log-ratio':>20}")
    for label, key, fmt in rows:
        print(f"{label:36} {fmt.format(e[key]):>20} {fmt.format(s[key]):>20}")
    print(f"{'seconds (both models, all samples)':36} {r['seconds']['exact']:>20.1f} {r['seconds']['sampled']:>20.1f}")
    ratio = r["subset_variance_ratio_sampled_over_exact"]
    print(f"variance ratio, sampled / exact: {ratio:.1f}x" if ratio is not None else "variance ratio: exact has none")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":
    main()
