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


@app.command()
def version() -> None:
    """Print the package version."""
    from pipeline_steps import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
