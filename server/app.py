"""The coordinator's Flower ServerApp (`flwr run .` loads `app`).

The run itself is `server.runner.run_federation`; this module turns a Flower `Context` into
settings and picks the training workflow: the run config's Flower strategy, or SecAgg+
(`server/secagg.py`) when the app is made with `secure=True`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from core.run_config import RunSettings
from server.runner import RoundCallback, RunOutcome, Workflow, finish, public_plan, run_federation

__all__ = ["app", "make_app", "public_plan", "run_federation", "RunOutcome"]


def make_app(overrides: Mapping[str, Any] | None = None, on_round: RoundCallback | None = None,
             on_finish: Callable[[RunOutcome], None] | None = None, resume: bool = False,
             secure: bool = False) -> ServerApp:
    """A ServerApp; `overrides` win over the run config (the Python simulation has none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        layers = (dict(context.run_config), dict(overrides or {}))
        if secure:
            from server.secagg import SecAggSettings, SecAggWorkflow

            secagg, rest = SecAggSettings.split(*layers)
            run = RunSettings.from_mapping(rest)
            workflow: Workflow | None = SecAggWorkflow(secagg, context)
        else:
            run, workflow = RunSettings.from_mapping(*layers), None
        finish(run_federation(grid, run, workflow, on_round=on_round, resume=resume), on_finish)

    return app


app = make_app()
