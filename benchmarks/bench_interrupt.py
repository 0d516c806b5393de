"""How long `fedalloc simulate` takes to exit after Ctrl-C (issue 13: within 5 s).

Starts `fedalloc simulate --engine inprocess` on 3 hospitals, waits until round 1 is checkpointed,
waits `--delay` seconds more, sends SIGINT to the command's process group (what Ctrl-C in a
terminal does) and reports when "fedalloc: interrupted" appeared and when the process exited.
Add load by hand (e.g. `python -c "while True: pass" &` per core) to see the busy-machine case.

    python benchmarks/bench_interrupt.py --workers 2 --delays 0.25 0.5 1 --out /tmp/bench-interrupt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rounds_done(run: Path) -> int:
    try:
        return int(json.loads((run / "state.json").read_text())["rounds_done"])
    except (OSError, ValueError, KeyError):
        return 0


def one(out: Path, workers: int, delay: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "fedalloc", "simulate", "--engine", "inprocess", "--hospitals", "3", "--rounds", "8",
           "--name", "R", "--out", str(out), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), ln.rstrip()) for ln in proc.stderr),
                              daemon=True)
    reader.start()
    while _rounds_done(out / "R") < 1:
        if proc.poll() is not None:
            reader.join(5)
            raise SystemExit(f"the run ended (exit {proc.returncode}) before round 1: {lines[-3:]}")
        time.sleep(0.02)
    time.sleep(delay)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait()
    exited = time.monotonic() - t0
    reader.join(5)
    said = [t - t0 for t, ln in lines if ln.startswith("fedalloc: interrupted")]
    return {"delay": delay, "exit_code": proc.returncode, "exit_s": exited, "interrupted_line_s": said[0] if said else None}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--delays", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-interrupt"))
    args = ap.parse_args(argv)
    rows = [one(args.out, args.workers, d) for d in args.delays]
    print("| delay after round 1 s | exit code | 'interrupted' printed after s | exited after s |")
    print("|---|---|---|---|")
    for r in rows:
        said = "-" if r["interrupted_line_s"] is None else f"{r['interrupted_line_s']:.2f}"
        print(f"| {r['delay']:.1f} | {r['exit_code']} | {said} | {r['exit_s']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
