"""``ippo``: the command line of the pipeline.

Each pipeline step is also an ``ippo`` sub-command that forwards its arguments to
``python -m pipeline_steps.<step>`` (the one command line DVC and Airflow use), e.g.
``ippo collect --policy script:expert --conversations 200``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json

import typer

app = typer.Typer(help="Iterative PPO: weekly multi-turn policy improvement for suggested-response agents.", no_args_is_help=True)

# Step modules under pipeline_steps/, in the order of Algorithm 1. Modules that are not present yet
# (a partial checkout) are simply not offered.
STEPS = ("collect", "ingest", "validate", "returns", "fit_q", "ppo_tune", "evaluate", "register")
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _add_step(step: str) -> None:
    try:
        module = importlib.util.find_spec(f"pipeline_steps.{step}")
    except ModuleNotFoundError:
        module = None
    if module is None:
        return

    @app.command(name=step, context_settings=PASSTHROUGH, help=f"Run the '{step}' step (python -m pipeline_steps.{step}); --help for its options.")
    def _run(ctx: typer.Context) -> None:
        importlib.import_module(f"pipeline_steps.{step}").main(list(ctx.args))


for _step in STEPS:
    _add_step(_step)


@app.command()
def params(path: str = typer.Option("params.yaml", help="params.yaml to validate and print.")) -> None:
    """Validate params.yaml and print the effective configuration (defaults filled in)."""
    from pipeline_steps.common.config import ConfigError, load_params

    try:
        p = load_params(path)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(p.model_dump(), indent=2, default=str))


# --- review and promotion in the MLflow registry (see pipeline_steps.common.registry) -------------

MODEL_OPT = typer.Option("ippo-policy", "--model", help="Registered model name (params.yaml register.policy_model_name).")
URI_OPT = typer.Option(None, "--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")


def _registry_action(fn, *args, **kwargs):
    from pipeline_steps.common.registry import RegistryError

    try:
        return fn(*args, **kwargs)
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)


@app.command()
def approve(
    version: str = typer.Argument(..., help="Model version to approve."),
    reviewer: str = typer.Option(..., "--reviewer", help="Your name, recorded on the version."),
    note: str = typer.Option("", "--note"),
    model: str = MODEL_OPT,
    tracking_uri: str = URI_OPT,
) -> None:
    """Approve a version that passed both gates (tags ippo.approval=approved, ippo.reviewer)."""
    from pipeline_steps.common import registry

    _registry_action(registry.approve, model, version, reviewer, note, tracking_uri)
    typer.echo(f"{model} v{version} approved by {reviewer}")


@app.command()
def reject(
    version: str = typer.Argument(...),
    reviewer: str = typer.Option(..., "--reviewer"),
    note: str = typer.Option("", "--note"),
    model: str = MODEL_OPT,
    tracking_uri: str = URI_OPT,
) -> None:
    """Reject a version (it can never be promoted; the challenger alias is removed)."""
    from pipeline_steps.common import registry

    _registry_action(registry.reject, model, version, reviewer, note, tracking_uri)
    typer.echo(f"{model} v{version} rejected by {reviewer}")


@app.command()
def promote(version: str = typer.Argument(...), model: str = MODEL_OPT, tracking_uri: str = URI_OPT) -> None:
    """Move the champion alias to an approved version that passed both gates."""
    from pipeline_steps.common import registry

    previous = _registry_action(registry.promote, model, version, tracking_uri)
    typer.echo(f"{model}@champion -> v{version} (was {previous or 'none'})")


@app.command()
def rollback(model: str = MODEL_OPT, tracking_uri: str = URI_OPT) -> None:
    """Move the champion alias back to the previous approved champion."""
    from pipeline_steps.common import registry

    target = _registry_action(registry.rollback, model, tracking_uri)
    typer.echo(f"{model}@champion -> v{target} (rolled back)")


@app.command()
def status(model: str = MODEL_OPT, tracking_uri: str = URI_OPT) -> None:
    """Versions with their aliases, gate results and approvals."""
    from rich.console import Console
    from rich.table import Table

    from pipeline_steps.common import registry

    rows = _registry_action(registry.status, model, tracking_uri)
    table = Table(title=f"{model}")
    for col in ("version", "aliases", "gates", "approval", "reviewer", "iteration", "reasons"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("version", "aliases", "gates", "approval", "reviewer", "iteration", "reasons")))
    Console().print(table)


bench_app = typer.Typer(help="Benchmarks of the whole method (see README, 'The proof').", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("iterate")
def bench_iterate(
    profile: list[str] = typer.Option([], "--profile", help="Profile(s) merged over params.yaml, e.g. profiles/bench-cpu.yaml."),
    out: str = typer.Option("bench_runs/default", "--out", help="Folder of the run (resumable; results.{json,md,png})."),
    iterations: int = typer.Option(None, "--iterations", help="Override bench.iterations (K)."),
    params_path: str = typer.Option("params.yaml", "--params", help="Base params.yaml."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete --out first instead of resuming."),
) -> None:
    """K iterations of the pipeline against pi_0, best-of-n with Q_0, myopic PPO and the expert, same personas."""
    from pipeline_steps.bench.iterate import BenchError, bench_iterate as run
    from pipeline_steps.common.config import ConfigError

    try:
        run(params_path, profile, out, iterations=iterations, fresh=fresh, echo=typer.echo)
    except (BenchError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the package version."""
    from pipeline_steps import __version__

    typer.echo(__version__)


# --- the end-of-iteration summary (scripts/main.sh ends with it) ----------------------------------


@app.command()
def summary(
    workspace: str = typer.Option(".", "--workspace", help="Folder holding metrics/ (the DVC workspace or an Airflow runs/<date>/)."),
    model: str = MODEL_OPT,
    tracking_uri: str = URI_OPT,
) -> None:
    """One iteration at a glance: pi_i vs pi_{i+1} (A/B conversion with 95% CIs), the gates, registered versions."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from pipeline_steps.common.tracking import tracking_uri as resolve_uri

    m = Path(workspace) / "metrics"

    def read(name: str) -> dict:
        f = m / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else {}

    def ci(d: dict) -> str:
        return f"{d['rate']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}] (n={d.get('trials', '?')})" if d else "-"

    console = Console()
    col, ev, fq, reg = read("collect"), read("evaluate"), read("fit_q"), read("register")
    t = Table(title="Iterative PPO: this iteration", show_header=False)
    if col:
        t.add_row("pi_i in the logged week (collect)", ci(col.get("conversion", {})))
    if ev:
        ab, off = ev["ab"], ev["offline"]
        pols = ev.get("policies", {})
        t.add_row(f"A/B control pi_i ({pols.get('baseline', '?')})", ci(ab["control"]))
        t.add_row(f"A/B treatment pi_i+1 ({pols.get('candidate', '?')})", ci(ab["treatment"]))
        t.add_row("lift (95% CI), p", f"{ab['lift_abs']:+.3f} [{ab['lift_ci_low']:+.3f}, {ab['lift_ci_high']:+.3f}], p = {ab['p_value']:.3g}")
        imp = off["improvement"]
        t.add_row("offline E[Q'] - E[Q] (95% CI)", f"{imp['mean']:+.4f} [{imp['ci_low']:+.4f}, {imp['ci_high']:+.4f}]")
        t.add_row("KL(pi_i+1 || pi_i) per token", f"{off['kl_per_token']:.4f}")
    if fq.get("q_error_p90") is not None:
        t.add_row("held-out |Q - G| p90", f"{fq['q_error_p90']:.3f}")
    if reg:
        g = reg["gates"]
        verdict = "PASSED (alias challenger, awaiting reviewer approval)" if g["passed"] else "FAILED: " + "; ".join(g["reasons"])
        t.add_row("gates (offline, A/B)", f"{'pass' if g['offline'] else 'fail'}, {'pass' if g['ab'] else 'fail'} -> {verdict}")
        t.add_row("registered", f"{reg['policy']['name']} v{reg['policy']['version']} (iteration {reg['iteration']}), "
                                f"{reg['q_model']['name']} v{reg['q_model']['version']}")
    if not t.row_count:
        typer.echo(f"no metrics under {m} yet (run `dvc repro` first)", err=True)
        raise typer.Exit(1)
    console.print(t)
    uri = resolve_uri(tracking_uri)
    try:
        from pipeline_steps.common import registry

        rows = registry.status(model, uri)
    except Exception as exc:  # no registry yet, or a server that is down: the summary above still stands
        typer.echo(f"(registry {uri}: {exc})")
        rows = []
    if rows:  # the learning curve across iterations: each version's A/B lift over the policy it was tested against
        from mlflow import MlflowClient

        tags = {mv.version: mv.tags for mv in MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions(f"name='{model}'")}
        h = Table(title=f"{model}: every iteration")
        for c in ("iteration", "version", "A/B lift [95% CI]", "aliases", "gates", "approval", "reviewer"):
            h.add_column(c)
        for r in rows:
            lift = json.loads(tags.get(r["version"], {}).get("ippo.ab_lift", "{}") or "{}")
            shown = f"{lift['lift_abs']:+.3f} [{lift['lift_ci_low']:+.3f}, {lift['lift_ci_high']:+.3f}]" if lift else "-"
            h.add_row(str(r["iteration"]), str(r["version"]), shown, *(str(r[c]) for c in ("aliases", "gates", "approval", "reviewer")))
        console.print(h)
    if reg and reg["gates"]["passed"]:
        v = reg["policy"]["version"]
        typer.echo(f"review: ippo approve {v} --reviewer <you>   then: ippo promote {v}")
    typer.echo(f"MLflow UI: mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)" if uri.startswith("sqlite")
               else f"MLflow UI: {uri}")


if __name__ == "__main__":
    app()
