"""Requests a node refuses whatever the coordinator says: beyond its own limits or its run plan."""

from __future__ import annotations

from typing import Mapping

import numpy as np


class OutsidePlan(RuntimeError):
    """A request this node will not serve (refused before anything is charged)."""


class ModelRefused(RuntimeError):
    """The global model the coordinator sent is malformed, non-finite or out of bounds."""


def check_global_model(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[tuple[int, ...], str]],
                       bound: float) -> None:
    """Refuse a global model before touching any data: exact keys, shapes and dtypes, finite
    values, every |value| ≤ `bound` (the run plan's `weight-bound`). Data-independent by design."""
    if set(arrays) != set(expected):
        raise ModelRefused("global model has the wrong arrays")
    for name, a in arrays.items():
        shape, dtype = expected[name]
        # float64 arrives from SecAgg+'s dequantised aggregate; it is cast on load like float32
        if tuple(a.shape) != shape or (str(a.dtype) != dtype and a.dtype.kind != "f"):
            raise ModelRefused(f"global model array {name} has shape {a.shape} {a.dtype}, expected {shape} {dtype}")
        if a.size and not np.isfinite(a).all():
            raise ModelRefused(f"global model array {name} is not finite")
        if a.size and float(np.abs(a).max()) > bound:
            raise ModelRefused(f"global model array {name} exceeds the weight bound {bound}")
