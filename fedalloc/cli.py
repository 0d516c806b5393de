"""The `fedalloc` command line: one entry point for nodes, coordinators and researchers.

Sub-commands import their heavy dependencies (torch, flwr) lazily so `fedalloc allocate` and
`fedalloc validate` start fast on a coordinator laptop.
"""

from __future__ import annotations

import typer

from fedalloc.commands_allocate import allocate_command
from fedalloc.commands_audit import audit_command
from fedalloc.commands_data import generate_command, validate_command
from fedalloc.commands_query import query_command
from fedalloc.commands_sim import ledger_app, simulate_command
from fedalloc.commands_sweep import sweep_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

app.command("allocate")(allocate_command)
app.command("validate")(validate_command)
app.command("generate")(generate_command)
app.command("simulate")(simulate_command)
app.command("query")(query_command)
app.command("sweep")(sweep_command)
app.command("audit")(audit_command)
app.add_typer(ledger_app, name="ledger")


def main() -> None:
    app()
