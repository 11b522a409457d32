"""Entry point of the `conveyor` command: gathers the subcommands of each module."""

from __future__ import annotations

import typer

from conveyor.cli import (bench_cmd, client_cmd, deploy_cmd, plan_cmd, predictor_cmd,
                          profile_cmd, simulate_cmd)


app = typer.Typer(
    name="conveyor", no_args_is_help=True, add_completion=False,
    help="Pipeline-parallel LLM serving. Start a deployment with `conveyor serve`, then talk to "
         "it with `conveyor generate` or `conveyor chat` (or the Python SDK).")
deploy_cmd.register(app)
client_cmd.register(app)
bench_cmd.register(app)
profile_cmd.register(app)
plan_cmd.register(app)
simulate_cmd.register(app)
predictor_cmd.register(app)


def main() -> None:
    app()
