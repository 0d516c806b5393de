"""The `fedalloc` command line: one entry point for nodes, coordinators and researchers.

Sub-commands import their heavy dependencies (torch, flwr) lazily so `fedalloc allocate` and
`fedalloc validate` start fast on a coordinator laptop.
"""

from __future__ import annotations

import sys
import traceback

import typer

from fedalloc.commands_allocate import allocate_command
from fedalloc.commands_audit import audit_command
from fedalloc.commands_data import generate_command, validate_command
from fedalloc.commands_query import query_command
from fedalloc.commands_sim import ledger_app, simulate_command
from fedalloc.commands_sweep import sweep_command

# No Rich tracebacks: they print local variables (record frames, node paths). Errors are one line;
# `--debug` (anywhere on the command line) prints the plain traceback, still without locals.
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)

app.command("allocate")(allocate_command)
app.command("validate")(validate_command)
app.command("generate")(generate_command)
app.command("simulate")(simulate_command)
app.command("query")(query_command)
app.command("sweep")(sweep_command)
app.command("audit")(audit_command)
app.add_typer(ledger_app, name="ledger")


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    try:
        app()
    except KeyboardInterrupt:
        print("fedalloc: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # anything not already reported as one line by a command
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"fedalloc: error: {type(exc).__name__}: {first}" + ("" if debug else " (rerun with --debug for the traceback)"),
              file=sys.stderr)
        sys.exit(1)
