"""`InProcessGrid(workers=N)`: the nodes' ClientApps in a process pool (issue #13, "Scale").

A pooled run spends exactly what a one-process run spends (same ledger entries and ε per node:
DP noise is from OS entropy, so only the models differ), a ClientApp exception in a worker is the
same Error reply as in process, a worker that dies answers for its nodes with error replies
instead of hanging, and no worker process outlives the grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.ledger import Ledger
from simulations.inprocess import CLIENT_APP_RAISED_EXCEPTION, InProcessGrid

FAST = {"local-epochs": 1}


# --- importable ClientApp factories for the workers -----------------------------------------------

def counting_app() -> ClientApp:
    """Counts the messages each node saw in its persistent Context state; node 1002 raises,
    node 1003 kills its worker process when asked with config die=1."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:  # type: ignore[no-untyped-def]
        if context.node_id == 1002:
            raise ValueError("boom")
        if context.node_id == 1003 and int(msg.content["config"].get("die", 0)):
            os._exit(3)
        seen = context.state.config_records.setdefault("seen", ConfigRecord({"n": 0}))
        seen["n"] = int(seen["n"]) + 1
        return Message(RecordDict({"m": MetricRecord({"n": seen["n"], "pid": os.getpid()})}), reply_to=msg)

    return app


def _ask(grid: InProcessGrid, die: int = 0) -> dict[int, Message]:
    msgs = [grid.create_message(RecordDict({"config": ConfigRecord({"die": die})}), "train", n, "1")
            for n in grid.get_node_ids()]
    return {m.metadata.src_node_id: m for m in grid.send_and_receive(msgs)}


def _gone(pids: list[int]) -> bool:
    try:
        import psutil
    except ImportError:  # psutil is optional: a reaped child's pid no longer exists
        return all(not Path(f"/proc/{p}").exists() for p in pids)
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def _worker_children() -> list[int]:
    import multiprocessing as mp

    return [p.pid for p in mp.active_children() if p.name.startswith("fedalloc-node-worker")]


# --- the grid -------------------------------------------------------------------------------------

def test_pool_replies_errors_state_and_shutdown(node_configs):
    one = InProcessGrid(counting_app(), node_configs)
    with InProcessGrid(None, node_configs, workers=2, app_factory=counting_app) as grid:
        first, again = _ask(grid), _ask(grid)  # the workers start with the first message
        pids = grid.pool.pids()
        assert len(pids) == 2 and os.getpid() not in pids
        # A ClientApp exception in a worker is the Error reply of the one-process grid.
        ref = _ask(one)[1002]
        assert first[1002].has_error() and ref.has_error()
        assert (first[1002].error.code, first[1002].error.reason) == (ref.error.code, ref.error.reason) \
            == (CLIENT_APP_RAISED_EXCEPTION, "ValueError: boom")
        # Sticky nodes: node index % 2 picks the worker, and each node's state persists there.
        by_pid = {n: int(first[n].content["m"]["pid"]) for n in (1001, 1003, 1004)}
        assert by_pid[1001] == by_pid[1003] == pids[0] and by_pid[1004] == pids[1]
        assert [int(again[n].content["m"]["n"]) for n in (1001, 1003, 1004)] == [2, 2, 2]
        assert first[1001].metadata.reply_to_message_id and first[1001].metadata.src_node_id == 1001
    assert _worker_children() == [] and _gone(pids)


def test_a_dead_worker_answers_with_errors_not_a_hang(node_configs, caplog):
    with InProcessGrid(None, node_configs, workers=2, app_factory=counting_app) as grid:
        replies = _ask(grid, die=1)  # node 1003 kills worker 0 (nodes 1001 and 1003)
        pids = grid.pool.pids()
        assert int(replies[1004].content["m"]["n"]) == 1  # worker 1 is unaffected
        for n in (1003,):
            assert replies[n].has_error() and replies[n].error.code == ErrorCode.CLIENT_APP_CRASHED
            assert "died (exit code 3)" in replies[n].error.reason
        later = _ask(grid)  # the dead worker's nodes stay unavailable, without waiting
        assert later[1001].has_error() and later[1003].has_error() and not later[1004].has_error()
    assert "node worker process 0" in caplog.text and "died" in caplog.text
    assert _worker_children() == [] and _gone(pids)


def test_pool_needs_a_factory_and_a_sane_size(node_configs):
    with pytest.raises(ValueError, match="app_factory"):
        InProcessGrid(counting_app(), node_configs, workers=2)
    with pytest.raises(ValueError, match="workers 0 is not allowed"):
        InProcessGrid(counting_app(), node_configs, workers=0)


# --- a whole run ----------------------------------------------------------------------------------

def _ledger_view(run: Path) -> dict[str, list[tuple]]:
    return {f.stem: [(e["kind"], e["round"], round(e["epsilon_after"], 9), e["noise_multiplier"])
                     for e in Ledger.read(f).entries]
            for f in sorted((run / "nodes" / "ledgers").glob("*.json"))}


def _files(run: Path) -> set[str]:
    # the run's name is part of the nodes' release-store paths
    return {str(p.relative_to(run)).replace(f"/{run.name}/", "/RUN/") for p in run.rglob("*") if p.is_file()}


def test_a_pooled_run_spends_and_writes_what_one_process_does(tmp_path):
    from simulations.driver import simulate

    seen: list[int] = []
    common = dict(hospitals=4, rounds=2, engine="inprocess", results_dir=str(tmp_path), overrides=FAST)
    one = simulate(**common, run_name="one")
    two = simulate(**common, run_name="two", workers=2, on_round=lambda *a: seen.extend(_worker_children()))
    assert one.error is None and two.error is None, (one.error, two.error)
    assert len(set(seen)) == 2  # the rounds ran with two workers
    assert _ledger_view(one.path) == _ledger_view(two.path) and len(_ledger_view(two.path)) == 4
    assert two.epsilon == pytest.approx(one.epsilon)
    assert _files(one.path) == _files(two.path)
    assert two.allocations.allocation.sum() == pytest.approx(1000.0)
    assert [r["ok"] for r in two.rounds] == [4, 4]
    assert _worker_children() == [] and _gone(list(set(seen)))


def test_workers_need_the_inprocess_engine(tmp_path):
    from simulations.driver import simulate

    with pytest.raises(ValueError, match="--workers needs --engine inprocess"):
        simulate(hospitals=4, rounds=1, engine="ray", results_dir=str(tmp_path), workers=2)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers 0 is not allowed; choose 1.."),
    (["--workers", "100000"], "--workers 100000 is not allowed; choose 1.."),
    (["--workers", "2", "--engine", "ray"], "--workers needs --engine inprocess (got --engine ray)"),
])
def test_cli_refuses_bad_workers(tmp_path, args, message):
    from typer.testing import CliRunner

    from fedalloc.cli import app

    res = CliRunner().invoke(app, ["simulate", "--hospitals", "4", "--out", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
