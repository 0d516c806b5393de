"""The one table reader (core/tables.py): every problem as one line with file, line and column."""

from __future__ import annotations

import pytest

from core.tables import TableError
from server.runner import read_resources


def test_resources_file_reports_every_problem_with_line_and_column(tmp_path):
    f = tmp_path / "hospitals.csv"
    f.write_text("hospital,resources\nh1,10\nh2,-1\n\nh1,abc\n,3\n")
    with pytest.raises(TableError) as err:
        read_resources(str(f))
    lines = str(err.value).splitlines()
    assert lines == [
        f"{f}: line 3, column 'resources': must be >= 0 ('-1')",
        f"{f}: line 5, column 'hospital': duplicate hospital 'h1' (first on line 2)",
        f"{f}: line 5, column 'resources': not a number ('abc')",
        f"{f}: line 6, column 'hospital': empty value",
    ]


@pytest.mark.parametrize("text, expected", [
    ("hospital\nh1\n", "line 1, column 'resources': missing required column (have: hospital)"),
    ("hospital,resources\n", "no hospital rows after the header"),
    ("", "line 1: file is empty"),
])
def test_resources_file_shape_problems(tmp_path, text, expected):
    f = tmp_path / "r.csv"
    f.write_text(text)
    with pytest.raises(TableError) as err:
        read_resources(str(f))
    assert str(err.value) == f"{f}: {expected}"


def test_resources_file_reads_values(tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("\ufeffhospital, resources\n h1 , 2.5\nh2,0\n")
    assert read_resources(str(f)) == {"h1": 2.5, "h2": 0.0}


def test_a_bad_resources_file_fails_the_run_before_any_node_is_asked(node_configs, run_settings, tmp_path):
    from client.app import make_app
    from client.ledger import Ledger
    from server.runner import run_federation
    from simulations.inprocess import InProcessGrid

    bad = tmp_path / "bad.csv"
    bad.write_text("hospital,resources\nhospital_000,lots\n")
    asked: list = []
    out = run_federation(InProcessGrid(make_app(), node_configs[:2], tap=asked.append),
                         run_settings(**{"resources-file": str(bad), "num-server-rounds": 1}))
    assert out.error is not None and "line 2, column 'resources': not a number" in out.error
    assert asked == []
    for cfg in node_configs[:2]:
        with pytest.raises(Exception):
            Ledger.read(cfg["ledger-path"])  # never created: nothing was charged
