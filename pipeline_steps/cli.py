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


@app.command()
def version() -> None:
    """Print the package version."""
    from pipeline_steps import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
