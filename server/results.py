"""Writing a run's results to results/<run>/ (coordinator side: only released values)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord

from core.atomic import atomic_write_bytes, atomic_write_text


def run_dir(results_dir: str, run_name: str) -> Path:
    path = Path(results_dir).expanduser().resolve() / run_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_arrays(path: Path, arrays: ArrayRecord) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: a.numpy() for k, a in arrays.items()})
    atomic_write_bytes(path, buf.getvalue())


def commit_round(run_path: Path, round_: int, arrays: ArrayRecord, state: dict[str, Any]) -> None:
    """Checkpoint a finished round so that an interrupt at any point leaves a resumable pair.

    The model goes to `checkpoint-<round>.npz` first; writing `state.json` (which names that
    file) is the commit point. `checkpoint.npz` is then refreshed as a convenience copy, and older
    round files are removed. Resume reads the file `state.json` names, never a half-updated pair.
    """
    name = f"checkpoint-{round_}.npz"
    save_arrays(run_path / name, arrays)
    write_json(run_path / "state.json", {**state, "checkpoint": name})
    tmp = run_path / "checkpoint.npz.link"
    tmp.unlink(missing_ok=True)
    os.link(run_path / name, tmp)
    os.replace(tmp, run_path / "checkpoint.npz")
    for old in run_path.glob("checkpoint-*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)


def resume_point(run_path: Path) -> tuple[ArrayRecord, dict[str, Any]] | None:
    """(model, state) of the last committed round, or None if the run never finished one."""
    f = run_path / "state.json"
    if not f.exists():
        return None
    state = json.loads(f.read_text())
    ckpt = run_path / str(state.get("checkpoint", "checkpoint.npz"))
    return (load_arrays(ckpt), state) if ckpt.exists() else None


def load_arrays(path: Path) -> ArrayRecord:
    # Flower 1.42's ArrayRecord takes Array objects, not plain ndarrays; keep the saved key order.
    with np.load(path) as data:
        return ArrayRecord({k: Array(np.ascontiguousarray(data[k])) for k in data.files})


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable))


def rounds_frame(rounds: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for r in rounds:
        row = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        row["failed_nodes"] = ";".join(f"{n}:{why}" for n, why in r.get("failed_nodes", {}).items())
        row["missing_nodes"] = ";".join(str(n) for n in r.get("missing_nodes", []))
        rows.append(row)
    return pd.DataFrame(rows)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
