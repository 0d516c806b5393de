"""The `fedalloc` command line: one entry point for nodes, coordinators and researchers.

Sub-commands import their heavy dependencies (torch, flwr) lazily so `fedalloc allocate` and
`fedalloc validate` start fast on a coordinator laptop.
"""

from __future__ import annotations

import gc
import sys
import traceback

import click
import typer
from typer.core import TyperGroup

from fedalloc.commands_allocate import allocate_command
from fedalloc.commands_audit import audit_command
from fedalloc.commands_data import data_app, generate_command, validate_command
from fedalloc.commands_query import query_command
from fedalloc.commands_sim import ledger_app, simulate_command
from fedalloc.commands_sweep import sweep_command

INTERRUPTED = "fedalloc: interrupted"


class _Commands(TyperGroup):
    """Typer turns a KeyboardInterrupt inside a command into a silent exit 130; say what happened.

    (`main` below only sees an interrupt outside any command, e.g. while importing.)
    """

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            raise click.exceptions.Exit(130) from None


# No Rich tracebacks: they print local variables (record frames, node paths). Errors are one line;
# `--debug` (anywhere on the command line) prints the plain traceback, still without locals.
app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, help=__doc__,
                  pretty_exceptions_enable=False)

app.command("allocate")(allocate_command)
app.command("validate")(validate_command)
app.command("generate")(generate_command)
app.command("simulate")(simulate_command)
app.command("query")(query_command)
app.command("sweep")(sweep_command)
app.command("audit")(audit_command)
app.add_typer(ledger_app, name="ledger")
app.add_typer(data_app, name="data")


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    try:
        _run(debug)
    finally:
        # The command's work is done and its files are closed. What is left is interpreter
        # teardown, whose garbage collection walks torch's and Flower's object graphs: 1.5-2 s
        # after a simulate, enough on a busy machine to break "Ctrl-C stops within 5 s".
        # Frozen objects are skipped by that collection (they are freed by the OS instead).
        gc.freeze()


def _run(debug: bool) -> None:
    try:
        app()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # anything not already reported as one line by a command
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"fedalloc: error: {type(exc).__name__}: {first}" + ("" if debug else " (rerun with --debug for the traceback)"),
              file=sys.stderr)
        sys.exit(1)
