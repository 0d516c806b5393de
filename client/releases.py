"""What a node has released (or is about to release) per run, kept beside its ledger.

A coordinator that crashed after a node charged and answered a round asks for that round again
on resume. Re-running DP-SGD would release a second noisy update paid for by one charge, so the
node instead re-sends the identical update it stored for the same input model, and refuses a
different input model for a round it already answered. The D_i release stores its noisy window:
any later forecast from it is post-processing, free of charge.

Outputs are stored *before* they are sent, so "charged but nothing stored" means nothing left the
node, and computing it now is still the one release the charge paid for.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core.atomic import atomic_write_bytes


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a model's arrays."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ReleaseStore:
    """Files under `<ledger>.released/<run>/`: `round-<r>.npz` updates and `release.npz` windows."""

    def __init__(self, ledger_path: Path, run: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", run)[:120] or "run"
        self.dir = Path(ledger_path).with_name(Path(ledger_path).name + ".released") / safe

    def put_update(self, round_: int, input_fp: str, arrays: Mapping[str, np.ndarray], metrics: dict[str, Any]) -> None:
        self._put(f"round-{round_}.npz", arrays, {"input": input_fp, "metrics": metrics})

    def get_update(self, round_: int) -> tuple[str, dict[str, np.ndarray], dict[str, Any]] | None:
        got = self._get(f"round-{round_}.npz")
        if got is None:
            return None
        arrays, meta = got
        return str(meta["input"]), arrays, dict(meta["metrics"])

    def put_window(self, window: np.ndarray, meta: dict[str, Any]) -> None:
        self._put("release.npz", {"window": window}, meta)

    def get_window(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        got = self._get("release.npz")
        return None if got is None else (got[0]["window"], got[1])

    def _put(self, name: str, arrays: Mapping[str, np.ndarray], meta: dict[str, Any]) -> None:
        buf = io.BytesIO()
        np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **{f"a_{k}": np.asarray(v) for k, v in arrays.items()})
        atomic_write_bytes(self.dir / name, buf.getvalue())

    def _get(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        path = self.dir / name
        if not path.exists():
            return None
        with np.load(path) as data:
            meta = json.loads(data["__meta__"].tobytes().decode())
            arrays = {k[2:]: data[k].copy() for k in data.files if k.startswith("a_")}
        return arrays, meta
