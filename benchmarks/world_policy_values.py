"""Is pi' better than pi where it matters? Theorem 1's E_{a~pi}[Q(s, a)] with the world's true Q, at logged states.

    .venv/bin/python benchmarks/world_policy_values.py benchmarks/results/bench_fit_q_world_logs_gpu/explore_logs_2048 \\
        --params benchmarks/results/bench_fit_q_world_logs_gpu/params_q_explore_notes_cpu.yaml \\
        --policy pi0=pi0 --policy pi1=data/bench/ppo_notes/model/policy --samples 2 \\
        --q-model q=data/bench/q_explore_256_notes_probe/model/scorer --out world_policy_values.json

The evaluate step's offline check measures ``E_{a~pi'}[Q_i] - E_{a~pi}[Q_i]`` with the *learned* Q_i, and its A/B
test measures conversion, which on a CPU budget (40 customers per arm) cannot resolve a few points. Between the two
sits what Theorem 1 is about: the one-step improvement under the *true* Q. The world can measure it directly:

1. The same decision points as ``world_action_values.py`` (its ``branch_points``: the logs replayed, ``--states``
   drawn at random, seeded, each a deep copy of the conversation just before the logged suggestion).
2. Each ``--policy`` writes ``--samples`` suggestions per state for the prompt it would see there (its own
   rendering: ``prompt.state_notes`` of ``--params`` included). Every policy's batch ``b`` is sampled from the same
   seed, so policies that agree draw alike.
3. Every sample, and the logged suggestion, is sent ``--rollouts`` times and the conversation goes on with
   ``--continuation`` (the business's own habitual messages by default), rollout ``r`` of every candidate from the
   same random stream (common random numbers). ``Q_world(s, a)`` is the share of rollouts that convert.

Reported per policy, with 95% CIs that resample conversations: its value ``E_{a~pi}[Q_world(s, a)]`` (the mean over
its samples), the paired difference from the first policy, and from the logged suggestion. With ``--q-model``
(fit_q's scorer or adapter): the learned Q of each sample, the within-state Spearman of Q with Q_world among all the
samples at a state, and best-of-n: the true value of the sample Q ranks highest among a policy's samples (the
inference-time improvement ``ippo bench``'s best-of-n baseline makes), beside the oracle's best (chosen on half of
the rollouts and scored on the other half).

It also reports the best-of-k frontier, k = 2, 4, ... up to ``--samples``: the true gain of the oracle's and each
Q's pick among k of a policy's samples (exact over every k-subset) against the KL that pick may spend,
``log k - (k - 1) / k`` nats per reply at most (Beirami et al., 2024). Best-of-k is about as good a use of a KL
budget as the KL-regularised optimum PPO aims at (Yang et al., 2024), so the oracle's row says roughly what any
reward model could gain at that KL from the policy's own samples, and ppo_tune's ``theorem1.kl_per_response``
says where a PPO policy sits on that axis:

    .venv/bin/python benchmarks/world_policy_values.py benchmarks/results/bench_fit_q_world_logs_gpu/explore_logs_2048 \\
        --params benchmarks/results/bench_fit_q_world_logs_gpu/params_q_explore_notes_cpu.yaml \\
        --policy pi0=pi0 --states 200 --samples 6 --q-model q_probe=data/bench/q_explore_256_notes_probe/model/scorer \\
        --out world_policy_values_pi0_best_of_6.json   # benchmarks/README: 36 min on 2 CPU cores
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

LOGGED = "logged"


def sample_suggestions(policy: Any, histories: list[Any], samples: int, batch_size: int, seed: int,
                       progress: bool = True, desc: str = "sampling") -> tuple[list[str], list[list[str | None]]]:
    """``samples`` suggestions per history from an LLM policy: (the prompts it saw, the cleaned texts per history).

    Prompts are sorted by length into batches (less padding); batch ``b`` is sampled from ``seed + b`` whatever the
    policy, so two policies' draws share their random numbers."""
    import numpy as np
    from tqdm import tqdm

    from pipeline_steps.common.policies import clean_generation

    prompts = policy.prompts(histories)
    rows = [(i, j) for i in np.argsort([len(p) for p in prompts], kind="stable") for j in range(samples)]
    texts: list[list[str | None]] = [[None] * samples for _ in histories]
    with tqdm(total=len(rows), desc=desc, unit="sample", disable=not progress) as bar:
        for b, start in enumerate(range(0, len(rows), batch_size)):
            chunk = rows[start : start + batch_size]
            raw = policy.generate([prompts[i] for i, _ in chunk], seed + b)
            for (i, j), r in zip(chunk, raw):
                texts[i][j] = clean_generation(r)
            bar.update(len(chunk))
    return prompts, texts


def best_by(scores: Any, values: Any, k: int | None = None) -> float:
    """The value of the highest-scored candidate; ties share (their values averaged).

    With ``k`` below the number of candidates: the expected value of that pick among ``k`` candidates drawn at
    random without replacement (best-of-k from the same samples), computed exactly over every k-subset. A subset's
    top score is level ``L`` when it holds none of the ``c`` candidates scored above ``L`` and at least one of the
    ``m`` at ``L``: probability ``(C(n - c, k) - C(n - c - m, k)) / C(n, k)``; given that, the tied ones it holds
    are a random draw from the level, so their mean value is the level's mean."""
    import numpy as np
    from scipy.special import comb

    scores, values = np.asarray(scores, float), np.asarray(values, float)
    n = len(scores)
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"best of k={k} among {n} candidates: 1 <= k <= {n}")
    total, above = 0.0, 0
    for level in np.unique(scores)[::-1]:
        at = scores == level
        m = int(at.sum())
        p = (comb(n - above, k, exact=True) - comb(n - above - m, k, exact=True)) / comb(n, k, exact=True)
        total += p * float(values[at].mean())
        above += m
    return total


def oracle_best(converted: Any, k: int | None = None) -> float:
    """The true value of the best candidate (of a random ``k`` of them), chosen on even rollouts and scored on odd
    ones and the reverse, so that rollout noise alone gains nothing."""
    a, b = converted[:, 0::2].mean(axis=1), converted[:, 1::2].mean(axis=1)
    return 0.5 * (best_by(a, b, k) + best_by(b, a, k))


def best_of_k_sizes(samples: int) -> list[int]:
    """The k of the best-of-k frontier: 2, 4, 8, ... below ``samples``, and ``samples`` itself."""
    return [k for k in (2 ** i for i in range(1, samples.bit_length())) if k < samples] + [samples]


def best_of_k_kl_bound(k: int) -> float:
    """Upper bound on KL(best-of-k || pi) in nats per reply, ``log k - (k - 1) / k`` (Beirami et al., 2024): the
    KL budget a best-of-k pick spends, to set beside a PPO policy's per-reply KL from pi_0."""
    import math

    return math.log(k) - (k - 1) / k


def policy_values(logs_dir: str, policy_specs: dict[str, str], params_path: str = "params.yaml", n_states: int = 400,
                  n_rollouts: int = 32, samples: int = 2, continuation_name: str = "abstain",
                  q_specs: dict[str, str] | None = None, batch_size: int = 32, seed: int = 0,
                  progress: bool = True) -> dict[str, Any]:
    import numpy as np
    import polars as pl
    from scipy.stats import spearmanr
    from tqdm import tqdm

    from pipeline_steps.common.config import load_params
    from pipeline_steps.common.policies import load_policy
    from pipeline_steps.common.q_input import action_text
    from pipeline_steps.world.scripted import ScriptedPolicy
    from world_action_ranking import q_model_scores
    from world_action_values import branch_points, mean_ci, rollouts

    if not policy_specs:
        raise SystemExit("give at least one --policy LABEL=SPEC")
    if n_rollouts < 2 or n_rollouts % 2:
        raise SystemExit(f"--rollouts {n_rollouts}: an even number >= 2 (the oracle's best is chosen on half of them)")
    if samples < 1:
        raise SystemExit(f"--samples {samples}: at least 1")
    scripted = [f"{label}={spec}" for label, spec in policy_specs.items() if spec.startswith("script:")]
    if scripted:
        raise SystemExit(f"--policy {scripted[0]}: an LLM policy is expected (pi0, a model folder or a models:/ URI)")
    t0 = time.perf_counter()
    params = load_params(params_path)
    bp = branch_points(logs_dir, params, n_states, seed)
    world, chosen, snapshots = bp["world"], bp["chosen"], bp["snapshots"]
    if not chosen:
        raise SystemExit(f"{logs_dir}: none of the drawn decision points belongs to a reproduced conversation")
    histories = [snapshots[k].history for k in chosen]

    texts: dict[str, list[list[str | None]]] = {}
    prompts: list[str] | None = None
    gen_seconds: dict[str, float] = {}
    for label, spec in policy_specs.items():
        policy = load_policy(spec, params, world.vertical, seed=seed)
        t = time.perf_counter()
        p, texts[label] = sample_suggestions(policy, histories, samples, batch_size, seed, progress, f"sampling {label}")
        gen_seconds[label] = time.perf_counter() - t
        prompts = prompts or p
        del policy

    labels = list(policy_specs)
    names = [f"{label}/{j}" for label in labels for j in range(samples)] + [LOGGED]
    continuation = ScriptedPolicy(continuation_name, world.vertical, seed=seed)
    converted = []
    for i, key in enumerate(tqdm(chosen, desc="branching", unit="state", disable=not progress)):
        cands = {f"{label}/{j}": texts[label][i][j] for label in labels for j in range(samples)}
        cands[LOGGED] = bp["logged_text"][key]
        converted.append(rollouts(world, snapshots[key], cands, n_rollouts, continuation, seed, i)["converted"])
    conv = np.stack(converted)  # (states, candidates, rollouts)
    q_world = conv.mean(axis=2)
    groups = np.array([k[0] for k in chosen])
    understood = np.array([bool(bp["state_of"][k]["understood"]) for k in chosen])

    def summarise(per_state: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for group, mask in (("all", np.ones(len(chosen), bool)), ("needs understood", understood),
                            ("needs not yet understood", ~understood)):
            if mask.any():
                out[group] = {"states": int(mask.sum()),
                              **{k: mean_ci(v[mask], groups[mask], seed) for k, v in per_state.items()}}
        return out

    cols = {label: [names.index(f"{label}/{j}") for j in range(samples)] for label in labels}
    logged_q = q_world[:, names.index(LOGGED)]
    per_state: dict[str, Any] = {"logged": logged_q}
    for label in labels:
        value = q_world[:, cols[label]].mean(axis=1)
        per_state[f"{label}: value"] = value
        per_state[f"{label}: minus logged"] = value - logged_q
        if label != labels[0]:
            per_state[f"{label}: minus {labels[0]}"] = value - q_world[:, cols[labels[0]]].mean(axis=1)
        for k in best_of_k_sizes(samples):
            per_state[f"{label}: oracle best of {k}"] = np.array([oracle_best(c[cols[label]], k) for c in conv])

    q_models: dict[str, Any] = {}
    if q_specs:
        from pipeline_steps.common.base_model import load_tokenizer, resolve_base_model

        tokenizer = load_tokenizer(resolve_base_model(params.base_model.name_or_path, params.base_model.cache_dir))
    for qlabel, folder in (q_specs or {}).items():
        states = [prompts[i] for i in range(len(chosen)) for _ in names]
        actions = [action_text(texts[n.split("/")[0]][i][int(n.split("/")[1])] if n != LOGGED else bp["logged_text"][k])
                   for i, k in enumerate(chosen) for n in names]
        scored = q_model_scores(folder, pl.DataFrame({"state_text": states, "action_text": actions}), params,
                                tokenizer, world.vertical)
        q = scored.pop("scores").reshape(len(chosen), len(names))
        info = scored
        rho = [spearmanr(q[i], q_world[i]).statistic if np.ptp(q_world[i]) > 0 and np.ptp(q[i]) > 0 else np.nan
               for i in range(len(chosen))]
        ok = ~np.isnan(rho)
        q_models[qlabel] = {**info, "states_with_a_spread": int(ok.sum()),
                            "within_state_spearman": mean_ci(np.asarray(rho)[ok], groups[ok], seed) if ok.any() else None}
        for label in labels:
            for k in best_of_k_sizes(samples):
                per_state[f"{label}: best of {k} by {qlabel}"] = np.array(
                    [best_by(q[i, cols[label]], q_world[i, cols[label]], k) for i in range(len(chosen))])
            per_state[f"{label}: mean {qlabel}"] = q[:, cols[label]].mean(axis=1)

    frontier: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for label in labels:  # each chooser's best-of-k minus one sample, paired per state
        value = per_state[f"{label}: value"]
        for k in best_of_k_sizes(samples):
            row: dict[str, Any] = {"k": k, "kl_bound_nats_per_reply": best_of_k_kl_bound(k),
                                   "oracle gain": mean_ci(per_state[f"{label}: oracle best of {k}"] - value, groups, seed)}
            for qlabel in q_models:
                row[f"{qlabel} gain"] = mean_ci(per_state[f"{label}: best of {k} by {qlabel}"] - value, groups, seed)
            frontier[label].append(row)
    abstain_share = {label: float(np.mean([t is None for row in texts[label] for t in row])) for label in labels}
    examples = [{"conversation_id": k[0], "turn_index": k[1], "understood": bool(understood[i]),
                 "logged": bp["logged_text"][k], **{label: texts[label][i] for label in labels}}
                for i, k in enumerate(chosen[:8])]
    return {"logs": logs_dir, "params": params_path, "policies": policy_specs, "q_models": q_models,
            "continuation": continuation_name, "rollouts": n_rollouts, "samples_per_state": samples,
            "states": len(chosen), "state_conversations": int(len(set(groups))), "seed": seed,
            "abstain_share": abstain_share, "generation_seconds": gen_seconds, "summary": summarise(per_state),
            "best_of_k_frontier": frontier,
            "examples": examples, "seconds": time.perf_counter() - t0}


def print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    groups = list(result["summary"])
    table = Table(title=f"E[Q_world(s, a)] at {result['states']} logged states ({result['samples_per_state']} samples per "
                        f"policy and state, {result['rollouts']} rollouts each, continuation '{result['continuation']}'); "
                        "mean [95% CI, conversations resampled]")
    table.add_column("quantity")
    for g in groups:
        table.add_column(f"{g} ({result['summary'][g]['states']})", justify="right")
    for key in result["summary"]["all"]:
        if key == "states":
            continue
        table.add_row(key, *(("{:+.3f} [{:+.3f}, {:+.3f}]".format(*result["summary"][g][key])
                              if key in result["summary"][g] else "") for g in groups))
    Console(width=200).print(table)
    for label, info in result["q_models"].items():
        rho = info["within_state_spearman"]
        print(f"{label}: within-state Spearman(Q, Q_world) among the samples, {info['states_with_a_spread']} states where "
              "both vary: " + ("{:+.3f} [{:+.3f}, {:+.3f}]".format(*rho) if rho else "none"))
    for label, rows in result.get("best_of_k_frontier", {}).items():
        choosers = [c for c in rows[0] if c.endswith(" gain")]
        table = Table(title=f"best-of-k among {label}'s samples: true gain over one sample [95% CI], against the KL it "
                            "may spend (nats per reply, upper bound)")
        for col in ("k", "KL bound", *choosers, *(f"{c[:-5]} / oracle" for c in choosers[1:])):
            table.add_column(col, justify="right")
        for row in rows:
            share = [f"{row[c][0] / row['oracle gain'][0]:.0%}" if row["oracle gain"][0] > 0 else "" for c in choosers[1:]]
            table.add_row(str(row["k"]), f"{row['kl_bound_nats_per_reply']:.3f}",
                          *("{:+.4f} [{:+.4f}, {:+.4f}]".format(*row[c]) for c in choosers), *share)
        Console(width=200).print(table)
    print("abstain share of the samples:", {k: round(v, 3) for k, v in result["abstain_share"].items()})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from world_action_ranking import parse_labelled

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", help="conversation logs the world wrote (the folder collect wrote)")
    ap.add_argument("--policy", action="append", default=[], metavar="LABEL=SPEC",
                    help="an LLM policy: pi0, a model folder (ppo_tune's policy/) or models:/<name>@<alias> (repeatable; "
                         "the first is the reference of the paired differences)")
    ap.add_argument("--q-model", action="append", default=[], metavar="LABEL=DIR",
                    help="a trained Q (fit_q's scorer/ or adapter/) to score the samples (repeatable)")
    ap.add_argument("--params", default="params.yaml", help="params.yaml whose world wrote the logs (and its prompt)")
    ap.add_argument("--states", type=int, default=400, help="decision points to branch from (drawn at random)")
    ap.add_argument("--rollouts", type=int, default=32, help="rollouts per candidate and state (even)")
    ap.add_argument("--samples", type=int, default=2, help="suggestions per policy and state")
    ap.add_argument("--continuation", default="abstain",
                    help="scripted policy that writes the suggestions after the branched one (abstain: the business alone)")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = ap.parse_args(argv)
    result = policy_values(args.logs, parse_labelled(args.policy, "--policy"), args.params, args.states, args.rollouts,
                           args.samples, args.continuation, parse_labelled(args.q_model, "--q-model"), args.batch_size,
                           args.seed, not args.no_progress)
    print_summary(result)
    if args.out:
        write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
