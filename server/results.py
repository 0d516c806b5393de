"""Writing a run's results to results/<run>/ (coordinator side: only released values)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord


def run_dir(results_dir: str, run_name: str) -> Path:
    path = Path(results_dir).expanduser().resolve() / run_name
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_arrays(path: Path, arrays: ArrayRecord) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: a.numpy() for k, a in arrays.items()})
    tmp.replace(path)


def load_arrays(path: Path) -> ArrayRecord:
    # Flower 1.42's ArrayRecord takes Array objects, not plain ndarrays; keep the saved key order.
    with np.load(path) as data:
        return ArrayRecord({k: Array(np.ascontiguousarray(data[k])) for k in data.files})


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    tmp.replace(path)


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
