"""One pipeline iteration on this machine, each step timed: does it run here, and how long would a profile take?

    python benchmarks/bench_iteration_steps.py --profile profiles/gpu.yaml \\
        --set collect.conversations=128 --set ppo_tune.total_episodes=256 --out bench_runs/steps_gpu

The check to run first on a new machine (a GPU box above all) before a whole ``ippo bench iterate``: the pipeline's
own command lines (``step_commands.argv``, as ``dvc repro`` and the Airflow DAG run them) for one iteration with
pi_0, under ``--out``, each step with ``--no-mlflow`` so that a bare machine needs no tracking server.
``--skip validate`` hands ingest's output straight to returns, for a machine without Great Expectations (on the
simulated world the gate passes every conversation). ``register`` (MLflow's registry, no accelerator work) is
always skipped unless ``--with-register`` asks for it; it then writes to ``<out>/mlflow.db``.

Prints and writes ``<out>/steps.json``: each step's wall time and peak resident memory, the budget that drives
its cost, and the time projected at the profile's own budgets. The projection undoes the ``--set`` values of the
cost keys (:data:`COST_KEYS`) only; other ``--set`` keys are listed as ``not_projected``. It is linear in the
driving budget, so it is an upper bound: loading the models is a fixed cost that does not grow with it. The
headline metrics are printed too, so that a wrong result on new hardware is seen at once. Finished steps are
not re-run (``<out>/.done``); a run with other params or skips in the same ``--out`` is refused (``--fresh``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_steps.bench.iterate import BenchError, Runner, bench_config, machine_description, step_command, write_yaml
from pipeline_steps.common.config import flatten_dotted, get_dotted, read_yaml
from pipeline_steps.common.step_commands import STEPS, TURNS, VALIDATED
from pipeline_steps.common.tracking import write_json

# The params.yaml keys whose product drives each step's cost. fit_q's rows grow with collect.conversations
# up to fit_q.max_train_rows; the rows per conversation are measured by the run (see driving_budget).
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
    "returns": ("rows", "conversations"),
    "fit_q": ("rows_train", "roc_auc_outcome", "spearman", "mse", "q_error_p90"),
    "ppo_tune": ("training.episodes_per_second", "theorem1.improvement.mean", "theorem1.improvement.ci_low",
                 "theorem1.improvement.ci_high", "theorem1.kl_per_token"),
    "evaluate": ("ab.control.rate", "ab.treatment.rate", "ab.lift_abs", "ab.p_value", "offline.improvement.mean",
                 "offline.improvement.ci_low", "offline.improvement.ci_high"),
}
PACKAGES = ("transformers", "trl", "peft", "accelerate", "polars")


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


def driving_budget(data: dict[str, Any], step: str, rows_per_conversation: float | None = None) -> float:
    """The product of the step's cost keys. fit_q trains on min(conversations x rows_per_conversation,
    fit_q.max_train_rows) rows per epoch when both the measured rate and a cap are known."""
    total = 1.0
    for key in COST_KEYS[step]:
        value = float(get_dotted(data, key))
        if step == "fit_q" and key == "collect.conversations":
            cap = get_dotted(data, "fit_q.max_train_rows")
            if rows_per_conversation and cap is not None:
                value = min(value * rows_per_conversation, float(cap))
            elif rows_per_conversation:
                value *= rows_per_conversation
        total *= value
    return total


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def gpu_details() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory // 2**20} MiB, {props.multi_processor_count} SMs, CUDA {torch.version.cuda}"


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    sets = parse_sets(args.set)
    data = bench_config(args.params, args.profile, sets)
    full = bench_config(args.params, args.profile, {})
    skip = sorted(set(args.skip) | (set() if args.with_register else {"register"}))
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    params_file, skip_file = out / "params.yaml", out / "skipped.json"
    if params_file.exists() and (read_yaml(params_file) != data
                                 or (skip_file.exists() and json.loads(skip_file.read_text()) != skip)):
        raise BenchError(f"{out}: holds a run with other params or skipped steps; use --fresh or another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(params_file, data)
    skip_file.write_text(json.dumps(skip))
    runner = Runner(out)  # its env points MLflow at <out>/mlflow.db: only register (--with-register) uses it
    replace = {VALIDATED: str(out / TURNS)} if "validate" in skip else None
    rows: list[dict[str, Any]] = []
    error = None
    rows_per_conversation = None
    for step in (s for s in STEPS if s not in skip):
        cmd = step_command(step, out, params_file, data, replace=replace)
        if step != "register":
            cmd.append("--no-mlflow")
        try:
            rec = runner.command(step, cmd, out / "logs" / f"{step}.log")
            metrics_file = out / "metrics" / f"{step}.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        except (BenchError, OSError, ValueError) as exc:
            error = str(exc) if isinstance(exc, BenchError) else f"{step}: {exc}"
            print(error, file=sys.stderr)
            break
        if step == "fit_q" and metrics.get("rows_train"):
            rows_per_conversation = metrics["rows_train"] / float(get_dotted(data, "collect.conversations"))
        flat = flatten_dotted(metrics)
        budget = driving_budget(data, step, rows_per_conversation)
        budget_full = driving_budget(full, step, rows_per_conversation)
        rows.append({
            "step": step, "seconds": rec["seconds"], "peak_rss_gb": (rec.get("result") or {}).get("peak_rss_gb"),
            "budget": budget, "profile_budget": budget_full,
            "projected_seconds": rec["seconds"] * budget_full / budget if budget > 0 else None,
            "headline": {k: flat.get(k) for k in HEADLINES.get(step, ())},
        })
    projected = [r["projected_seconds"] for r in rows]
    result = {
        "command": " ".join(["python benchmarks/bench_iteration_steps.py", *argv]), "machine": machine_description(),
        "gpu": gpu_details(), "versions": versions(), "date": time.strftime("%Y-%m-%d"),
        "profiles": list(args.profile), "sets": sets,
        "not_projected": sorted(k for k in sets if not any(k in keys for keys in COST_KEYS.values())),
        "skipped": skip, "steps": rows, "seconds": sum(r["seconds"] for r in rows),
        "projected_seconds": sum(projected) if error is None and None not in projected else None,
        "error": error,
    }
    write_json(out / "steps.json", result)
    print(render(result))
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"{result['machine']}; {result['gpu'] or 'no GPU'}; {result['date']}", "",
             "| step | wall s | peak RSS GB | budget | profile's budget | projected s | headline |",
             "|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        head = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r["headline"].items() if v is not None)
        proj = "-" if r["projected_seconds"] is None else f"{r['projected_seconds']:.0f}"
        lines.append(f"| {r['step']} | {r['seconds']:.1f} | {r['peak_rss_gb'] if r['peak_rss_gb'] is not None else '-'} "
                     f"| {r['budget']:g} | {r['profile_budget']:g} | {proj} | {head} |")
    proj = result["projected_seconds"]
    lines.append(f"| total | {result['seconds']:.1f} | | | | {'-' if proj is None else f'{proj:.0f}'} | |")
    if result["not_projected"]:
        lines += ["", "not projected (--set keys outside the cost model): " + ", ".join(result["not_projected"])]
    if result["error"]:
        lines += ["", "FAILED: " + result["error"].splitlines()[0]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--profile", action="append", default=[], help="Profile(s) merged over params.yaml, in order.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Budget override for this run (YAML value); the projection undoes the cost keys'.")
    p.add_argument("--skip", action="append", default=[], choices=list(STEPS),
                   help="Steps not to run ('validate' feeds ingest's output to returns). register is always skipped "
                        "unless --with-register.")
    p.add_argument("--with-register", action="store_true", help="Also run register (MLflow, into <out>/mlflow.db).")
    p.add_argument("--out", default="bench_runs/iteration_steps")
    p.add_argument("--fresh", action="store_true", help="Delete --out first (otherwise finished steps are skipped).")
    args = p.parse_args(argv)
    try:
        result = run(args, argv)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if result["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
