"""evaluate: is pi_{i+1} better than pi_i? Offline (Theorems 1-2) and in an A/B test.

    python -m pipeline_steps.evaluate --baseline pi0 --candidate models/ppo/policy \
        --q-model models/q/scorer --returns data/returns.parquet --fit-q-metrics metrics/fit_q.json \
        --metrics metrics/evaluate.json --plots plots/evaluate

Offline, on held-out states (the validation split of the returns): one sampled suggestion per state
from each policy, scored by Q_i. The estimated improvement ``E_{pi'}[Q] - E_{pi}[Q]`` (Theorem 1) with
a paired bootstrap 95% CI, the mean per-token ``KL(pi' || pi)`` on pi''s samples, and the held-out Q
error from fit_q are the Theorem 2 quantities; guardrails are the share of suggestions the business
would send, their mean length and the abstain rate.

A/B: in the world, both policies talk to the same seeded personas (common random numbers), or, in
production, conversations from logs carrying a ``variant`` column (``--ab-logs``). Conversion per arm,
absolute/relative lift, 95% CI, p-values and the sample size needed to detect the observed lift.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline_steps.common.ab_stats import ab_test
from pipeline_steps.common.base_model import sdpa_without_cudnn
from pipeline_steps.common.config import ConfigError, Params, load_params
from pipeline_steps.common.policies import kl_per_token
from pipeline_steps.common.stats import paired_bootstrap
from pipeline_steps.common.tracking import flat_metrics, step_run, write_json

STEP = "evaluate"


# ------------------------------------------------------------------------------------------------
# Offline: Theorem 1 / 2 quantities
# ------------------------------------------------------------------------------------------------


def heldout_states(returns_path: str | Path, n: int) -> tuple[list[str], list[str]]:
    """Distinct validation-split states, a deterministic sample of at most ``n``, and the conversation of each
    (the improvement CI resamples whole conversations)."""
    import polars as pl

    df = pl.read_parquet(returns_path, columns=["state_text", "split", "conversation_id", "turn_index"])
    val = df.filter(pl.col("split") == "validation").unique(subset=["state_text"], keep="first").sort(["conversation_id", "turn_index"])
    if val.height == 0:
        raise ValueError(f"{returns_path}: no validation-split states to evaluate on")
    states, conversations = val["state_text"].to_list(), val["conversation_id"].cast(pl.String).to_list()
    rng = np.random.default_rng(0)
    idx = sorted(rng.choice(len(states), size=min(n, len(states)), replace=False))
    return [states[i] for i in idx], [conversations[i] for i in idx]


def sample_suggestions(policy: Any, states: Sequence[str], batch_size: int, seed: int) -> tuple[list[str | None], list[list[int]]]:
    """One sampled suggestion per rendered state (texts after clean-up, and the raw response ids)."""
    import torch

    from pipeline_steps.common.policies import clean_generation

    tok = policy.tokenizer
    texts: list[str | None] = []
    ids: list[list[int]] = []
    for lo in range(0, len(states), batch_size):
        batch = list(states[lo : lo + batch_size])
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(policy.model.device)
        torch.manual_seed(seed + lo)
        with torch.inference_mode(), sdpa_without_cudnn():
            out = policy.model.generate(**enc, max_new_tokens=policy.max_new_tokens, do_sample=policy.temperature > 0,
                                        temperature=policy.temperature or None, top_p=policy.top_p, top_k=None,
                                        repetition_penalty=policy.repetition_penalty, pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1] :]
        for row in new.tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            ids.append(row)
            texts.append(clean_generation(tok.decode(row, skip_special_tokens=True)))
    return texts, ids


def guardrails(texts: Sequence[str | None], world: Any) -> dict[str, float]:
    """Acceptance proxy (mean probability the simulated business sends it), length, abstain rate."""
    said = [t for t in texts if t is not None]
    feats = world.featurizer(said) if said else []
    return {
        "acceptance": float(np.mean([world.send_probability(f) for f in feats])) if feats else 0.0,
        "mean_words": float(np.mean([f.words for f in feats])) if feats else 0.0,
        "abstain_rate": 1.0 - len(said) / len(texts) if texts else 0.0,
    }


def offline_evaluation(params: Params, baseline: Any, candidate: Any, q_dir: str | Path, states: list[str], world: Any,
                       q_error: dict[str, Any], groups: Sequence[str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Q of each policy's suggestion on ``states`` (paired; the CI resamples ``groups``, the states' conversations,
    when given), KL per token and guardrails."""
    from pipeline_steps.common.q_input import action_text
    from pipeline_steps.common.q_model import load_scorer, score

    e = params.evaluate
    bs = params.collect.batch_size
    base_texts, _ = sample_suggestions(baseline, states, bs, seed=params.world.seed)
    cand_texts, cand_ids = sample_suggestions(candidate, states, bs, seed=params.world.seed)
    q_model, q_tok = load_scorer(q_dir)
    q_base = score(q_model, q_tok, states, [action_text(t) for t in base_texts])
    q_cand = score(q_model, q_tok, states, [action_text(t) for t in cand_texts])
    kl = kl_per_token(candidate, baseline, states, cand_ids, bs)  # at the deployed sampling temperature
    metrics = {
        "states": len(states),
        "q_baseline_mean": float(np.mean(q_base)),
        "q_candidate_mean": float(np.mean(q_cand)),
        "improvement": paired_bootstrap(q_cand, q_base, e.bootstrap_resamples, seed=0, groups=groups),
        "kl_per_token": kl,
        "q_error_p90": q_error.get("q_error_p90"),
        "q_error_mean": q_error.get("q_error_mean"),
        "guardrails": {"baseline": guardrails(base_texts, world), "candidate": guardrails(cand_texts, world)},
    }
    samples = [
        {"state_tail": s[-300:], "baseline": b, "q_baseline": float(qb), "candidate": c, "q_candidate": float(qc)}
        for s, b, c, qb, qc in zip(states, base_texts, cand_texts, q_base, q_cand)
    ]
    return metrics, samples


# ------------------------------------------------------------------------------------------------
# A/B
# ------------------------------------------------------------------------------------------------


def conversions_by_turn(convs_or_rows: Sequence[Sequence[dict[str, Any]]], max_turns: int) -> list[float]:
    """Cumulative share of conversations converted by turn index (for the outcome-by-turn plot)."""
    n = len(convs_or_rows)
    at = np.zeros(max_turns + 1)
    for recs in convs_or_rows:
        for r in recs:
            if r["outcome"] == 1:
                at[min(r["turn_index"], max_turns)] += 1
    return list(np.cumsum(at)[1:] / max(n, 1))


def ab_in_world(params: Params, baseline: Any, candidate: Any, world: Any) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Both policies on the same seeded personas (conversation k meets the same customer in each arm)."""
    e = params.evaluate
    seed = params.world.seed + e.ab_seed
    arms = {}
    from tqdm.auto import tqdm

    for name, pol in (("control", baseline), ("treatment", candidate)):
        with tqdm(total=e.ab_conversations, desc=f"A/B {name}", unit="conv") as bar:
            arms[name] = world.run(pol, e.ab_conversations, seed=seed, batch_size=params.collect.batch_size,
                                   variant=name, progress=bar.update)
    stats = ab_test(sum(c.converted for c in arms["control"]), len(arms["control"]),
                    sum(c.converted for c in arms["treatment"]), len(arms["treatment"]), e.alpha, e.power)
    stats["mode"] = "world"
    curves = {k: conversions_by_turn([c.records for c in v], params.world.max_turns) for k, v in arms.items()}
    return stats, curves


def ab_from_logs(params: Params, logs: str | Path, control: str, treatment: str) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Production mode: conversations from logs with a ``variant`` column (converted = any outcome 1)."""
    import polars as pl

    df = pl.read_parquet(f"{str(logs).rstrip('/')}/**/*.parquet", hive_partitioning=True) if Path(logs).is_dir() else pl.read_parquet(logs)
    per = df.group_by("conversation_id").agg(pl.col("variant").first(), pl.col("outcome").max().alias("converted"))
    counts = {}
    for arm in (control, treatment):
        sub = per.filter(pl.col("variant") == arm)
        if sub.height == 0:
            raise ValueError(f"{logs}: no conversations with variant '{arm}'")
        counts[arm] = (int(sub["converted"].sum()), sub.height)
    e = params.evaluate
    stats = ab_test(*counts[control], *counts[treatment], e.alpha, e.power)
    stats["mode"] = "logs"
    curves = {}
    for name, arm in (("control", control), ("treatment", treatment)):
        ids = set(per.filter(pl.col("variant") == arm)["conversation_id"].to_list())
        recs = df.filter(pl.col("conversation_id").is_in(list(ids))).sort(["conversation_id", "turn_index"]).to_dicts()
        grouped: dict[str, list] = {}
        for r in recs:
            grouped.setdefault(r["conversation_id"], []).append(r)
        curves[name] = conversions_by_turn(list(grouped.values()), params.world.max_turns)
    return stats, curves


def plot(ab: dict[str, Any], curves: dict[str, list[float]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    names = ["control", "treatment"]
    rates = [ab[n]["rate"] for n in names]
    err = [[ab[n]["rate"] - ab[n]["ci_low"] for n in names], [ab[n]["ci_high"] - ab[n]["rate"] for n in names]]
    ax.bar(["pi_i (control)", "pi_i+1 (treatment)"], rates, yerr=err, capsize=6, color=["#999999", "#2b7bba"])
    ax.set_ylabel("conversion (95% CI)")
    ax.set_title(f"A/B: lift {ab['lift_abs']:+.3f} [{ab['lift_ci_low']:+.3f}, {ab['lift_ci_high']:+.3f}], p={ab['p_value']:.3g}", fontsize=9)
    fig.tight_layout()
    p1 = out_dir / "ab_conversion.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
    ax.set_xlabel("turn")
    ax.set_ylabel("converted by this turn")
    ax.legend()
    fig.tight_layout()
    p2 = out_dir / "outcome_by_turn.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    # The same numbers as CSV, so `dvc plots diff` can compare iterations.
    p3 = out_dir / "ab_conversion.csv"
    p3.write_text("arm,rate,ci_low,ci_high\n" + "".join(f"{n},{ab[n]['rate']:.6f},{ab[n]['ci_low']:.6f},{ab[n]['ci_high']:.6f}\n" for n in names))
    p4 = out_dir / "outcome_by_turn.csv"
    arms = list(curves)
    p4.write_text("turn," + ",".join(arms) + "\n" + "".join(
        f"{t + 1}," + ",".join(f"{curves[a][t]:.6f}" for a in arms) + "\n" for t in range(len(curves[arms[0]]))))
    return [p1, p2, p3, p4]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline_steps.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--baseline", default="pi0", help="pi_i: pi0, a model folder or models:/<name>@champion.")
    p.add_argument("--candidate", required=True, help="pi_{i+1}: a model folder (ppo_tune's policy/).")
    p.add_argument("--q-model", required=True, help="Q_i scorer folder (fit_q's scorer/).")
    p.add_argument("--returns", required=True, help="Returns Parquet (held-out states = validation split).")
    p.add_argument("--fit-q-metrics", help="fit_q's metrics JSON (for the held-out Q error).")
    p.add_argument("--ab-logs", help="Production mode: logs with a 'variant' column instead of the world.")
    p.add_argument("--control-variant", default="control")
    p.add_argument("--treatment-variant", default="treatment")
    p.add_argument("--metrics", default="metrics/evaluate.json")
    p.add_argument("--samples", default="metrics/evaluate_samples.json", help="Sample suggestions with Q-values.")
    p.add_argument("--plots", default="plots/evaluate")
    p.add_argument("--no-mlflow", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    from pipeline_steps.common.policies import load_policy
    from pipeline_steps.world.simulator import World

    q_error: dict[str, Any] = {}
    if args.fit_q_metrics:
        if not Path(args.fit_q_metrics).exists():
            raise SystemExit(f"error: fit_q metrics file not found: {args.fit_q_metrics}")
        q_error = json.loads(Path(args.fit_q_metrics).read_text())
    t0 = time.perf_counter()
    world = World(params.world)
    seed = params.world.seed + params.evaluate.ab_seed
    baseline = load_policy(args.baseline, params, world.vertical, seed=seed)
    candidate = load_policy(args.candidate, params, world.vertical, seed=seed)
    with step_run(STEP, params.evaluate.model_dump(), enabled=not args.no_mlflow) as run:
        states, conversations = heldout_states(args.returns, params.evaluate.heldout_states)
        offline, samples = offline_evaluation(params, baseline, candidate, args.q_model, states, world, q_error, conversations)
        if args.ab_logs:
            ab, curves = ab_from_logs(params, args.ab_logs, args.control_variant, args.treatment_variant)
        else:
            ab, curves = ab_in_world(params, baseline, candidate, world)
        metrics = {"offline": offline, "ab": ab, "outcome_by_turn": curves,
                   "policies": {"baseline": args.baseline, "candidate": args.candidate}, "wall_seconds": time.perf_counter() - t0}
        plots = plot(ab, curves, Path(args.plots))
        write_json(args.samples, {"samples": samples})
        if run is not None:
            import mlflow

            mlflow.log_metrics(flat_metrics({"offline": offline, "ab": ab}))
            for p in plots:
                mlflow.log_artifact(str(p), artifact_path="plots")
            mlflow.log_artifact(args.samples)
    write_json(args.metrics, metrics)
    imp = offline["improvement"]
    print(f"offline: E[Q'] - E[Q] = {imp['mean']:+.4f} [{imp['ci_low']:+.4f}, {imp['ci_high']:+.4f}] "
          f"({imp['n_states']} states, {imp.get('n_groups', imp['n_states'])} conversations resampled), "
          f"KL/token = {offline['kl_per_token']:.4f}")
    print(f"A/B ({ab['mode']}): control {ab['control']['rate']:.3f} vs treatment {ab['treatment']['rate']:.3f}, "
          f"lift {ab['lift_abs']:+.3f} [{ab['lift_ci_low']:+.3f}, {ab['lift_ci_high']:+.3f}], p = {ab['p_value']:.3g}")
    return metrics


if __name__ == "__main__":
    main()
