"""One pipeline iteration on this machine, each step timed: does it run here, and how long would a profile take?

    python benchmarks/bench_iteration_steps.py --profile profiles/gpu.yaml \\
        --set collect.conversations=128 --set ppo_tune.total_episodes=256 --out bench_runs/steps_gpu

The check to run first on a new machine (a GPU box above all) before a whole ``ippo bench iterate``: the pipeline's
own command lines (``step_commands.argv``, as ``dvc repro`` and the Airflow DAG run them) for one iteration with
pi_0, under ``--out``, each step with ``--no-mlflow`` so that a bare machine needs no tracking server.
``--skip validate`` hands ingest's output straight to returns, for a machine without Great Expectations (on the
simulated world the gate passes every conversation); ``register`` is skipped by default (MLflow's registry, no
accelerator work).

Prints and writes ``<out>/steps.json``: each step's wall time and peak resident memory, the budget that drives
its cost, and the time projected at the profile's own budgets (the run's ``--set`` values undone). The
projection is linear in the driving budget, so it is an upper bound: loading the models is a fixed cost that
does not grow with the budget. Also the headline metrics, so a wrong result on new hardware is seen at once.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_steps.bench.iterate import BenchError, Runner, bench_config, machine_description, step_command, write_yaml
from pipeline_steps.common.config import get_dotted
from pipeline_steps.common.step_commands import STEPS, TURNS, VALIDATED
from pipeline_steps.common.tracking import write_json

# The params.yaml keys whose product drives each step's cost (rows and conversations grow with
# collect.conversations; fit_q's rows are capped by fit_q.max_train_rows, see driving_budget).
COST_KEYS: dict[str, tuple[str, ...]] = {
    "collect": ("collect.conversations",),
    "ingest": ("collect.conversations",),
    "validate": ("collect.conversations",),
    "returns": ("collect.conversations",),
    "fit_q": ("collect.conversations", "fit_q.epochs"),
    "ppo_tune": ("ppo_tune.total_episodes", "ppo_tune.num_ppo_epochs"),
    "evaluate": ("evaluate.ab_conversations",),
    "register": (),
}

HEADLINES: dict[str, tuple[str, ...]] = {
    "collect": ("conversion.rate", "turns_total", "generation.tokens_per_second"),
    "fit_q": ("rows_train", "roc_auc_outcome", "spearman", "mse", "q_error_p90"),
    "ppo_tune": ("training.episodes_per_second", "theorem1.improvement.mean", "theorem1.improvement.ci_low",
                 "theorem1.kl_per_token"),
    "evaluate": ("ab.control.rate", "ab.treatment.rate", "ab.lift_abs", "ab.p_value", "offline.improvement.mean"),
}


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, each value read as YAML (``null``, numbers, booleans)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        out[key] = yaml.safe_load(value)
    return out


def driving_budget(data: dict[str, Any], step: str) -> float:
    """The product of the step's cost keys; fit_q's conversations are capped by its max_train_rows (rows ~ 6 x conversations)."""
    total = 1.0
    for key in COST_KEYS[step]:
        value = float(get_dotted(data, key))
        if step == "fit_q" and key == "collect.conversations":
            cap = get_dotted(data, "fit_q.max_train_rows")
            value = min(value, cap / 6.0) if cap else value
        total *= value
    return total


def pick(metrics: dict[str, Any], dotted: str) -> Any:
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run(args: argparse.Namespace) -> dict[str, Any]:
    sets = parse_sets(args.set)
    data = bench_config(args.params, args.profile, sets)
    full = bench_config(args.params, args.profile, {})
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    params_file = out / "params.yaml"
    write_yaml(params_file, data)
    runner = Runner(out)
    runner.env.pop("MLFLOW_TRACKING_URI", None)
    skip = set(args.skip)
    replace = {VALIDATED: str(out / TURNS)} if "validate" in skip else None
    steps = [s for s in STEPS if s not in skip]
    rows: list[dict[str, Any]] = []
    error = None
    for step in steps:
        cmd = step_command(step, out, params_file, data, replace=replace)
        if step != "register":
            cmd.append("--no-mlflow")
        try:
            rec = runner.command(step, cmd, out / "logs" / f"{step}.log")
        except BenchError as exc:
            error = str(exc)
            print(error, file=sys.stderr)
            break
        metrics_file = out / "metrics" / f"{step}.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        budget, budget_full = driving_budget(data, step), driving_budget(full, step)
        scale = budget_full / budget if budget else 1.0
        rows.append({
            "step": step, "seconds": rec["seconds"], "peak_rss_gb": (rec.get("result") or {}).get("peak_rss_gb"),
            "budget": budget, "profile_budget": budget_full, "projected_seconds": rec["seconds"] * scale,
            "headline": {k: pick(metrics, k) for k in HEADLINES.get(step, ())},
        })
    result = {
        "command": " ".join(sys.argv), "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
        "profiles": list(args.profile), "sets": sets, "skipped": sorted(skip), "steps": rows,
        "seconds": sum(r["seconds"] for r in rows),
        "projected_seconds": sum(r["projected_seconds"] for r in rows) if error is None else None,
        "error": error,
    }
    write_json(out / "steps.json", result)
    print(render(result))
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"{result['machine']}; {result['date']}", "",
             "| step | wall s | peak RSS GB | budget | profile's budget | projected s | headline |",
             "|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        head = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r["headline"].items() if v is not None)
        lines.append(f"| {r['step']} | {r['seconds']:.1f} | {r['peak_rss_gb'] if r['peak_rss_gb'] is not None else '-'} "
                     f"| {r['budget']:g} | {r['profile_budget']:g} | {r['projected_seconds']:.0f} | {head} |")
    proj = result["projected_seconds"]
    lines.append(f"| total | {result['seconds']:.1f} | | | | {'-' if proj is None or not math.isfinite(proj) else f'{proj:.0f}'} | |")
    if result["error"]:
        lines += ["", "FAILED: " + result["error"].splitlines()[0]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile", action="append", default=[], help="Profile(s) merged over params.yaml, in order.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Budget override for this run (YAML value); the projection undoes it.")
    p.add_argument("--skip", action="append", default=None, choices=list(STEPS),
                   help="Steps not to run (default: register). 'validate' feeds ingest's output to returns.")
    p.add_argument("--out", default="bench_runs/iteration_steps")
    p.add_argument("--fresh", action="store_true", help="Delete --out first (otherwise finished steps are skipped).")
    args = p.parse_args(argv)
    if args.skip is None:
        args.skip = ["register"]
    result = run(args)
    return 1 if result["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
