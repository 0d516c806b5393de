"""Wall time and peak memory of a whole DP federation for 10, 100, 1,000 simulated hospitals.

    /work/venv/bin/python benchmarks/bench_scaling.py [--sizes 10 100 1000] [--rounds 10 10 2]
        [--engines inprocess ray] [--workers 1 2] [--ray-max 100] [--limit 600] [--out DIR]

Each (engine, size) runs `simulations.driver.simulate(hospitals=N, rounds=R, epsilon=3, engine=…)`
(synthetic data generation, DP-SGD rounds with ledger and calibration, audit, D_i release,
allocation, result files) in its own subprocess, so memory is per size. Reported:

- wall time of the simulate() call, split into phases from markers the child prints: synthetic
  data generation (`prepare_nodes`), round 1 (includes each node's σ calibration), the mean of
  later rounds, and the rest (Ray start-up before round 1, the predict round, allocation, files);
- peak RSS: the child's `resource.getrusage(RUSAGE_SELF).ru_maxrss` and `RUSAGE_CHILDREN` (only
  children that exited and were waited for), and, because Ray's raylet/workers are long-lived
  descendants, the peak of the summed RSS of the child's whole process tree sampled from /proc
  every 0.5 s (`tree peak`).

A size that runs past `--limit` seconds is killed (the child and every descendant, by PID) and
reported as "stopped" with the phase it was in. Ray runs only for sizes ≤ `--ray-max`.

`--workers 1 2` runs each in-process size once per pool size, back to back (`simulate(workers=N)`:
the nodes in N worker processes; the tree peak then includes the workers and Python's forkserver).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGE = os.sysconf("SC_PAGE_SIZE")


def _child(engine: str, hospitals: int, rounds: int, work: Path, workers: int = 1) -> None:
    from simulations.driver import _quiet_logs

    _quiet_logs()
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    import client.tasks  # noqa: F401  (torch/opacus before the clock)
    import simulations.driver as drv

    t0 = time.perf_counter()

    def mark(what: str) -> None:
        print(f"PHASE {time.perf_counter() - t0:.3f} {what}", flush=True)

    prep = drv.prepare_nodes

    def timed_prepare(*a, **k):
        mark("data-generation")
        try:
            return prep(*a, **k)
        finally:
            mark("data-done")

    drv.prepare_nodes = timed_prepare
    truth = drv.true_demand

    def timed_truth(*a, **k):
        mark("true-demand")
        return truth(*a, **k)

    drv.true_demand = timed_truth
    out = drv.simulate(hospitals=hospitals, rounds=rounds, epsilon=3.0, engine=engine, results_dir=str(work),
                       run_name=f"{engine}-{hospitals}", on_round=lambda r, n, rec: mark(f"round-{r}"), workers=workers)
    wall = time.perf_counter() - t0
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    eps = max(out.epsilon.values()) if out.epsilon else None
    print("RESULT " + json.dumps({"wall": wall, "maxrss_self_mib": self_kib / 1024, "maxrss_children_mib": child_kib / 1024,
                                  "error": out.error, "max_epsilon": eps,
                                  "allocated": 0 if out.allocations is None else len(out.allocations)}), flush=True)


def _descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def run_size(engine: str, hospitals: int, rounds: int, limit: float, work: Path, workers: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, str(hospitals), str(rounds), str(work), str(workers)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "1"}
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    lines: list[str] = []
    err: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True).start()
    threading.Thread(target=lambda: err.extend(iter(p.stderr.readline, "")), daemon=True).start()
    peak, peak_procs, status = 0, 0, "done"
    while p.poll() is None:
        pids = _descendants(p.pid)
        peak = max(peak, sum(_rss(x) for x in pids))
        peak_procs = max(peak_procs, len(pids))
        if time.perf_counter() - t > limit:
            status = f"stopped: time limit {limit:.0f} s"
            for x in reversed(pids):  # only the processes this benchmark started
                try:
                    os.kill(x, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
            break
        time.sleep(0.5)
    time.sleep(0.3)
    res: dict = {"engine": engine, "hospitals": hospitals, "rounds": rounds, "workers": workers, "status": status,
                 "process_s": time.perf_counter() - t, "tree_peak_mib": peak / 2**20, "tree_peak_procs": peak_procs}
    phases = [(float(ln.split()[1]), ln.split()[2]) for ln in lines if ln.startswith("PHASE ")]
    res["phases"] = phases
    res["last_phase"] = phases[-1][1] if phases else "start-up/imports"
    result = [ln for ln in lines if ln.startswith("RESULT ")]
    if result:
        res.update(json.loads(result[-1][7:]))
    elif status == "done":
        res["status"] = f"failed rc={p.returncode}"
        res["stderr"] = "".join(err[-30:])
    ph = dict((w, s) for s, w in phases)
    if "data-done" in ph:
        res["gen_s"] = ph["data-done"] - ph.get("data-generation", 0.0)
    rts = [s for s, w in phases if w.startswith("round-")]
    if rts and "data-done" in ph:
        res["round1_s"] = rts[0] - ph["data-done"]  # includes Ray start-up on the Ray engine
        if len(rts) > 1:
            res["later_round_s"] = (rts[-1] - rts[0]) / (len(rts) - 1)
        if "wall" in res:
            res["after_rounds_s"] = res["wall"] - rts[-1]
    return res


def _fmt(x, f="{:.1f}") -> str:
    return "–" if x is None else f.format(x)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, nargs="+", default=[10, 10, 2], help="one value, or one per size")
    ap.add_argument("--engines", nargs="+", default=["inprocess", "ray"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="in-process pool sizes to run, back to back")
    ap.add_argument("--ray-max", type=int, default=100, help="largest size run on Ray")
    ap.add_argument("--limit", type=float, default=600.0, help="seconds per (engine, size)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        e, n, r, w, k = args.child
        _child(e, int(n), int(r), Path(w), int(k))
        return
    rounds = args.rounds if len(args.rounds) == len(args.sizes) else [args.rounds[0]] * len(args.sizes)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    print(f"# {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}", flush=True)
    results = []
    for engine in args.engines:
        for n, r in zip(args.sizes, rounds):
            if engine == "ray" and n > args.ray_max:
                continue
            for nw in args.workers if engine == "inprocess" else [1]:
                res = run_size(engine, n, r, args.limit, out / f"{engine}-{n}-w{nw}", nw)
                results.append(res)
                print(json.dumps({k: v for k, v in res.items() if k != "phases"}), flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| engine (workers) | hospitals × rounds | status | wall s | data gen s | round 1 s | later round s (mean) | "
          "after rounds s | child maxrss MiB | tree peak MiB (procs) | max ε |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        st = r["status"] if r["status"] == "done" else f"{r['status']} (in {r['last_phase']})"
        print(f"| {r['engine']} ({r['workers']}) | {r['hospitals']} × {r['rounds']} | {st} | {_fmt(r.get('wall'))} | {_fmt(r.get('gen_s'))} | "
              f"{_fmt(r.get('round1_s'))} | {_fmt(r.get('later_round_s'))} | {_fmt(r.get('after_rounds_s'))} | "
              f"{_fmt(r.get('maxrss_self_mib'), '{:.0f}')} | {r['tree_peak_mib']:.0f} ({r['tree_peak_procs']}) | "
              f"{_fmt(r.get('max_epsilon'), '{:.3f}')} |")
    print(f"\nraw: {out / 'results.json'}")


if __name__ == "__main__":
    main()
