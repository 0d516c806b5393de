"""`generate(..., workers=N)`: hospitals generated and written in N spawned processes (issue #13).

The files, hospitals.csv and per-hospital summaries equal those of one process, progress is
reported in this process in hospital order, and a worker's error ends the call with that error
(its own type and one-line message, as `fedalloc` prints it) instead of a hang, leaving no worker
process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from core.records import load_records
from core.synthetic import SyntheticConfig, generate
from simulations.driver import horizon_demand, prepare_nodes

REPO = Path(__file__).resolve().parents[1]
CFG = SyntheticConfig(hospitals=5, years=1, seed=11)


# --- picklable summarisers (imported by the worker processes) -------------------------------------

def summary(i: int, records: pd.DataFrame) -> tuple[int, int, float, int]:
    return i, len(records), float(records["cost"].sum()), os.getpid()


def die_at_hospital_2(i: int, records: pd.DataFrame) -> int:
    if i == 2:
        os._exit(3)
    return i


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _run(workers: int, out: Path) -> tuple[pd.DataFrame, list[int], dict[int, tuple]]:
    progress: list[int] = []
    found: dict[int, tuple] = {}
    table = generate(CFG, out, workers=workers, summarise=summary, on_summary=found.__setitem__,
                     on_hospital=progress.append)
    return table, progress, found


def test_two_workers_write_what_one_writes(tmp_path):
    one, progress_one, found_one = _run(1, tmp_path / "one")
    two, progress_two, found_two = _run(2, tmp_path / "two")
    assert _files(tmp_path / "one") == _files(tmp_path / "two")  # hospital files and hospitals.csv
    pd.testing.assert_frame_equal(one, two)
    assert progress_one == progress_two == list(range(CFG.hospitals))  # in hospital order, here
    assert {i: s[:3] for i, s in found_one.items()} == {i: s[:3] for i, s in found_two.items()}
    assert {s[3] for s in found_one.values()} == {os.getpid()}
    assert os.getpid() not in {s[3] for s in found_two.values()}  # summarised in the workers


def test_on_records_and_bad_workers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="on_records needs workers=1"):
        generate(CFG, tmp_path, workers=2, on_records=lambda i, r: None)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        generate(CFG, tmp_path, workers=0)
    seen: list[int] = []  # one process: on_records still sees every hospital's records
    generate(CFG, tmp_path, on_records=lambda i, r: seen.append(len(r)))
    assert seen == [len(load_records(tmp_path / f"hospital_{i:03d}.csv")) for i in range(CFG.hospitals)]


def test_truth_from_two_workers_equals_one_and_the_files(tmp_path, run_settings):
    run = run_settings(measure="bed_days")
    one = prepare_nodes(tmp_path / "one", hospitals=4, seed=5, budget=3.0, truth_run=run)
    two = prepare_nodes(tmp_path / "two", hospitals=4, seed=5, budget=3.0, truth_run=run, workers=2)
    assert one.truth == two.truth
    assert two.truth == {c["hospital"]: horizon_demand(load_records(c["data-path"]), run) for c in two.node_configs}
    assert _files(tmp_path / "one" / "nodes") == _files(tmp_path / "two" / "nodes")


# --- errors in a worker: in a child process, so a hang is a timeout and leftovers can be seen -------

def _generate_in_child(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Runs `body` (with `out` and `cfg` defined); an exception is printed as `error: Type: message`."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from core.synthetic import SyntheticConfig, generate
        from tests.test_synthetic_parallel import die_at_hospital_2
        out, cfg = Path({str(tmp_path / "out")!r}), SyntheticConfig(hospitals=6, years=1, seed=2)
        out.mkdir()
        try:
    """) + textwrap.indent(textwrap.dedent(body), "    ") + textwrap.dedent("""
        except Exception as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            sys.exit(1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("generate(workers=2) hung on a worker's error")
    left = _group_members(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"a generator worker outlived the call: {left}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _group_members(pgid: int, wait_s: float = 10.0) -> list[str]:
    """The live processes still in group `pgid` after up to `wait_s`. multiprocessing's resource
    tracker leaves a moment after its parent, as an orphan; a zombie has ended (a container's PID 1
    may never reap it)."""
    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        left = [_describe(p) for p in psutil.process_iter(["pid", "status", "cmdline"])
                if _pgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _describe(p: Any) -> str:
    return f"{p.info['pid']} {' '.join(p.info['cmdline'] or [])}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_a_worker_error_is_the_callers_error(tmp_path):
    res = _generate_in_child(tmp_path, """
        (out / "hospital_003.csv").mkdir()  # so hospital 3's file cannot be written
        generate(cfg, out, workers=2)
    """)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: IsADirectoryError:") and "hospital_003.csv" in lines[0], res.stderr
    assert not (tmp_path / "out" / "hospitals.csv").exists()


def test_a_worker_that_dies_ends_the_call(tmp_path):
    res = _generate_in_child(tmp_path, "generate(cfg, out, workers=2, summarise=die_at_hospital_2)")
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error: BrokenProcessPool:"), res.stderr
