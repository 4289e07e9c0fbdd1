"""register: put pi_{i+1} and Q_i in the MLflow registry with their evidence, and apply the gates.

    python -m pipeline_steps.register --policy models/ppo/policy --q-model models/q/scorer \
        --evaluate-metrics metrics/evaluate.json --fit-q-metrics metrics/fit_q.json \
        --validate-metrics metrics/validate.json --data logs=data/validated --out metrics/register.json

Registers the Q-function and the policy as new versions of two registered models (pyfunc models a
reviewer can load and query), tagged with their lineage (git commit, data hashes, the GX result,
params, iteration, parent policy version). The offline and A/B gates (thresholds in ``params.yaml``
``register``) decide: a passing policy version gets the ``challenger`` alias; a failing one is kept,
tagged with the reasons, never aliased. Nothing becomes ``champion`` here: that needs a reviewer's
approval (``ippo approve``) and ``ippo promote``; see :mod:`pipeline_steps.common.registry`.
Registration is all-or-nothing: if any part fails, the versions it created are deleted and no
alias moves.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline_steps.common.config import ConfigError, Params, load_params
from pipeline_steps.common.registry import CHALLENGER, TAG_GATES, TAG_REASONS, RegistryError, ab_gate, current_champion, offline_gate
from pipeline_steps.common.tracking import git_commit, tracking_uri, write_json

STEP = "register"


def read_metrics(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise RegistryError(f"{what} metrics file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{what} metrics file {path} is not valid JSON: {exc}") from exc


def path_md5(path: str | Path) -> str:
    """DVC-style content hash: a file's md5, or for a folder the md5 of its sorted (relpath, md5) list."""
    path = Path(path)
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    if not path.exists():
        raise RegistryError(f"lineage input not found: {path}")
    entries = [(p.relative_to(path).as_posix(), hashlib.md5(p.read_bytes()).hexdigest()) for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.md5(json.dumps(entries).encode()).hexdigest() + ".dir"


def check_server(uri: str) -> None:
    """Fail fast, with the URI in the message, when the tracking server cannot be reached."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models(max_results=1)
    except Exception as exc:
        raise RegistryError(f"MLflow tracking server unreachable at {uri}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def check_linked_runs(items: list[str], uri: str) -> dict[str, str]:
    """Upstream runs (NAME=RUN_ID) must exist before anything is registered."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    out = {}
    for item in items:
        name, _, run_id = item.partition("=")
        if not run_id:
            raise RegistryError(f"--link-run expects NAME=RUN_ID, got '{item}'")
        try:
            client.get_run(run_id)
        except MlflowException as exc:
            raise RegistryError(f"linked {name} run '{run_id}' does not exist at {uri}") from exc
        out[f"run.{name}"] = run_id
    return out


def register(
    params: Params,
    policy_dir: Path,
    q_dir: Path,
    evaluate_metrics: dict[str, Any],
    fit_q_metrics: dict[str, Any],
    validate_metrics: dict[str, Any] | None,
    lineage: dict[str, str],
    iteration: int | None,
    evidence_files: list[Path],
    uri: str,
) -> dict[str, Any]:
    """Gate, log and register; returns what was registered and the decision."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from pipeline_steps.common.contract import system_prompt_for
    from pipeline_steps.common.pyfunc_models import EXAMPLE_CONVERSATION, QFunctionModel, SuggestedResponseModel
    from pipeline_steps.world.simulator import load_vertical

    for d, what in ((policy_dir, "policy"), (q_dir, "Q model")):
        if not (Path(d) / "config.json").exists():
            raise RegistryError(f"{what} folder {d} has no config.json (not a saved model)")
    reg = params.registry
    off = offline_gate(evaluate_metrics, reg.offline_gate)
    ab = ab_gate(evaluate_metrics, reg.ab_gate)
    passed = off.passed and ab.passed
    reasons = off.reasons + ab.reasons

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "iterative-ppo"))
    parent = current_champion(reg.policy_model_name, uri)
    if iteration is None:
        previous = [int(mv.tags.get("ippo.iteration", 0)) for mv in client.search_model_versions(f"name='{reg.policy_model_name}'")]
        iteration = max(previous, default=0) + 1
    lineage_tags = {
        "ippo.iteration": str(iteration),
        "ippo.parent_version": parent or "base",
        "ippo.git_commit": git_commit(),
        "ippo.params_md5": hashlib.md5(params.model_dump_json().encode()).hexdigest(),
        "ippo.gx_success": str((validate_metrics or {}).get("success", "unknown")).lower(),
        **{f"ippo.data.{k}": v for k, v in lineage.items()},
    }
    created: list[tuple[str, str]] = []
    try:
        with mlflow.start_run(run_name=STEP, tags={"ippo.step": STEP}) as run:
            mlflow.log_params({"iteration": iteration, "parent_version": parent or "base", "gates_passed": passed})
            for f in evidence_files:
                mlflow.log_artifact(str(f), artifact_path="evidence")
            with tempfile.TemporaryDirectory() as tmp:
                cfg = Path(tmp) / "policy_config.json"
                vertical = load_vertical(params.world.vertical)
                cfg.write_text(json.dumps({
                    "system_prompt": system_prompt_for(vertical),
                    # The served policy renders the notes pi was trained with (the profile travels with it).
                    "state_notes": params.prompt.state_notes,
                    "vertical": vertical if params.prompt.state_notes != "none" else None,
                    "max_prompt_tokens": params.prompt.max_prompt_tokens, "max_new_tokens": params.collect.max_new_tokens,
                    "temperature": 0.0, "repetition_penalty": params.collect.repetition_penalty, "policy_id": reg.policy_model_name,
                }))
                import pandas as pd

                example = pd.DataFrame({"conversation": [json.dumps(EXAMPLE_CONVERSATION)]})
                pol_sig = infer_signature(example, pd.DataFrame({"suggestion": ["Hi!"]}))
                q_example = pd.DataFrame({"state_text": ["<|im_start|>user\nCustomer: hi<|im_end|>\n<|im_start|>assistant\n"], "action_text": ["Hello!"]})
                q_sig = infer_signature(q_example, pd.DataFrame({"q": [0.5]}))
                reqs = ["torch==2.13.0", "transformers==5.24.0", "pandas"]
                q_info = mlflow.pyfunc.log_model(name="q_model", python_model=QFunctionModel(), artifacts={"scorer": str(q_dir)},
                                                 signature=q_sig, input_example=q_example, pip_requirements=reqs)
                pol_info = mlflow.pyfunc.log_model(name="policy", python_model=SuggestedResponseModel(),
                                                   artifacts={"policy": str(policy_dir), "policy_config": str(cfg)},
                                                   signature=pol_sig, input_example=example, pip_requirements=reqs)
            q_mv = mlflow.register_model(q_info.model_uri, reg.q_model_name)
            created.append((reg.q_model_name, q_mv.version))
            pol_mv = mlflow.register_model(pol_info.model_uri, reg.policy_model_name)
            created.append((reg.policy_model_name, pol_mv.version))
            q_tags = {**lineage_tags, "ippo.q_error_p90": str(fit_q_metrics.get("q_error_p90", ""))}
            for k, v in q_tags.items():
                client.set_model_version_tag(reg.q_model_name, q_mv.version, k, v)
            pol_tags = {
                **lineage_tags,
                "ippo.q_version": str(q_mv.version),
                "ippo.run_id": run.info.run_id,
                TAG_GATES: "passed" if passed else "failed",
                TAG_REASONS: "; ".join(reasons) if reasons else "",
                "ippo.offline_gate": json.dumps(off.checks),
                "ippo.ab_gate": json.dumps(ab.checks),
                "ippo.improvement": json.dumps(evaluate_metrics["offline"]["improvement"]),
                "ippo.ab_lift": json.dumps({k: evaluate_metrics["ab"][k] for k in ("lift_abs", "lift_ci_low", "lift_ci_high", "p_value")}),
            }
            for k, v in pol_tags.items():
                client.set_model_version_tag(reg.policy_model_name, pol_mv.version, k, v[:5000])
            mlflow.log_metrics({"gates_passed": float(passed), "offline_gate_passed": float(off.passed), "ab_gate_passed": float(ab.passed)})
            # The alias moves last, so a failure above leaves every alias where it was.
            if passed:
                client.set_registered_model_alias(reg.policy_model_name, CHALLENGER, pol_mv.version)
    except Exception:
        for name, version in reversed(created):
            try:
                client.delete_model_version(name, version)
            except Exception:
                pass
        raise
    return {
        "iteration": iteration,
        "policy": {"name": reg.policy_model_name, "version": pol_mv.version, "uri": f"models:/{reg.policy_model_name}/{pol_mv.version}"},
        "q_model": {"name": reg.q_model_name, "version": q_mv.version},
        "parent_version": parent,
        "gates": {"passed": passed, "offline": off.passed, "ab": ab.passed, "reasons": reasons},
        "alias": CHALLENGER if passed else None,
        "run_id": run.info.run_id,
        "tracking_uri": uri,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline_steps.register", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--policy", required=True, help="Folder of pi_{i+1} (merged HF model, from ppo_tune).")
    p.add_argument("--q-model", required=True, help="Folder of the merged Q scorer (from fit_q).")
    p.add_argument("--evaluate-metrics", required=True, help="evaluate's metrics JSON (offline + A/B).")
    p.add_argument("--fit-q-metrics", required=True)
    p.add_argument("--validate-metrics", help="validate's metrics JSON (the GX result), for lineage.")
    p.add_argument("--evidence", nargs="*", default=[], help="Extra files (plots, samples) logged with the version.")
    p.add_argument("--data", nargs="*", default=[], help="Lineage inputs as NAME=PATH (hashed like DVC).")
    p.add_argument("--link-run", nargs="*", default=[], help="Upstream MLflow runs as NAME=RUN_ID (checked, tagged).")
    p.add_argument("--iteration", type=int, help="Iteration number (default: previous + 1).")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
    p.add_argument("--out", default="metrics/register.json")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        evaluate_metrics = read_metrics(args.evaluate_metrics, "evaluate")
        fit_q_metrics = read_metrics(args.fit_q_metrics, "fit_q")
        validate_metrics = read_metrics(args.validate_metrics, "validate") if args.validate_metrics else None
        lineage = {}
        for item in args.data:
            name, _, path = item.partition("=")
            if not path:
                raise RegistryError(f"--data expects NAME=PATH, got '{item}'")
            lineage[name] = path_md5(path)
        uri = tracking_uri(args.tracking_uri)
        if uri.startswith("http"):
            check_server(uri)
        lineage.update(check_linked_runs(args.link_run, uri))
        evidence = [Path(p) for p in [args.evaluate_metrics, args.fit_q_metrics, *([args.validate_metrics] if args.validate_metrics else []), *args.evidence]]
        result = register(params, Path(args.policy), Path(args.q_model), evaluate_metrics, fit_q_metrics, validate_metrics,
                          lineage, args.iteration, evidence, uri)
    except (RegistryError, ConfigError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    write_json(args.out, result)
    verdict = "passed both gates -> alias 'challenger'; awaiting reviewer approval" if result["gates"]["passed"] else "FAILED gates: " + "; ".join(result["gates"]["reasons"])
    print(f"registered {result['policy']['name']} v{result['policy']['version']} (iteration {result['iteration']}): {verdict}")
    return result


if __name__ == "__main__":
    main()
