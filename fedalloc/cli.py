"""The `fedalloc` command line: one entry point for nodes, coordinators and researchers.

Sub-commands import their heavy dependencies (torch, flwr) lazily so `fedalloc allocate` and
`fedalloc validate` start fast on a coordinator laptop.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def main() -> None:
    app()
